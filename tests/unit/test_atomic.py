"""The package's one atomic writer (``sae_kernels.atomic``): a file is the old one or the new one whatever
fails, never half written; errors name the target and keep their errno; new files get the umask's mode;
and the folds (``sae_kernels.fold``) leave their inputs alone."""
import errno
import json
import os
import stat

import pytest
import torch

from helpers import assert_close
from sae_kernels import SAEConfig, fold
from sae_kernels.atomic import (
    atomic_path, atomic_save_safetensors, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text,
)


def _writers():
    return {
        "text": lambda p: atomic_write_text(p, "new\n"),
        "bytes": lambda p: atomic_write_bytes(p, b"new\n"),
        "json": lambda p: atomic_write_json(p, {"new": 1}),
        "safetensors": lambda p: atomic_save_safetensors(p, {"w": torch.ones(3)}),
        "torch": lambda p: atomic_torch_save({"new": torch.ones(3)}, p),
    }


@pytest.mark.parametrize("kind", list(_writers()))
def test_each_writer_replaces_the_file_with_the_umask_mode(tmp_path, kind):
    path = tmp_path / "sub" / f"out.{kind}"
    old = os.umask(0o027)
    try:
        _writers()[kind](path)
    finally:
        os.umask(old)
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_names_the_target_with_its_errno(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old\n")
    with pytest.raises(OSError) as e:
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise OSError(errno.ENOSPC, "No space left on device")  # a full disk, mid-write
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_torch_writer_reports_its_runtime_errors_as_eio(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, path)

    def broken(obj, f):
        f.write(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="write failed") as e:
        atomic_torch_save({"step": 2}, path)
    assert e.value.errno == errno.EIO and e.value.filename == str(path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_json_is_sorted_indented_and_ends_with_a_newline(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "a.json").read_text()
    assert text.endswith("\n") and json.loads(text) == {"a": [1, 2], "b": 1} and text.index('"a"') < text.index('"b"')


def test_folds_return_new_tensors_and_match_float64():
    g = torch.Generator().manual_seed(0)
    cfg = SAEConfig(d_model=7, d_sae=13, k=3, norm_in=2.5, norm_out=0.75)
    t = {"W_enc": torch.randn(13, 7, generator=g), "b_enc": torch.randn(13, generator=g),
         "W_dec": torch.randn(13, 7, generator=g), "b_dec": torch.randn(7, generator=g),
         "threshold": torch.rand(13, generator=g)}
    before = {k: v.clone() for k, v in t.items()}
    cfg2, out = fold.folded(cfg, t)
    assert all(torch.equal(t[k], before[k]) for k in t), "the inputs were modified"
    assert cfg2.norm_in == cfg2.norm_out == 1.0 and not cfg2.weighted_topk
    n = (t["W_dec"].double() * (2.5 / 0.75)).norm(dim=1)
    assert_close(out["W_dec"], t["W_dec"].double() * (2.5 / 0.75) / n[:, None], 1e-6, "W_dec")
    assert_close(out["W_enc"], t["W_enc"].double() * n[:, None], 1e-6, "W_enc")
    assert_close(out["b_enc"], t["b_enc"].double() / 2.5 * n, 1e-6, "b_enc")
    assert_close(out["b_dec"], t["b_dec"].double() / 0.75, 1e-6, "b_dec")
    assert_close(out["threshold"], t["threshold"].double() / 0.75, 1e-6, "threshold")  # weighted: 1 / s_out
