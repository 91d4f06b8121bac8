"""SAE variants from one LM pass (docs/method.md sec. 11), on a tiny random Llama:

* a mixed suite (``batchtopk`` and ``matryoshka_batchtopk`` at two K, ``standard`` at two L1 coefficients)
  names its members ``L1R-4x-{architecture}-k{K}`` / ``-l1c{c}``, and each equals, bitwise, the SAE trained
  alone with its flags; stopped mid-way and resumed, it equals the uninterrupted suite;
* a ``batchtopk`` member exports as JumpReLU at its estimated threshold and a ``standard`` member as ReLU,
  and both reload through ``TopKSAE.from_llama_scope`` and through SAELens's own loader with the same
  latents on the same inputs; sparsify's format refuses them, naming the architecture;
* bad variant flags are refused before the model loads, naming the flag and the item.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from sae_kernels import TopKSAE
from trainer.config import TrainConfig
from helpers import assert_refused_before_load
from trainer.run import run

MIXED = dict(hookpoints="L1R", expansion=4, architecture="batchtopk,matryoshka_batchtopk,standard", k="4,8",
             l1_coefficient="1,3")
NAMES = ["L1R-4x-batchtopk-k4", "L1R-4x-batchtopk-k8", "L1R-4x-matryoshka_batchtopk-k4",
         "L1R-4x-matryoshka_batchtopk-k8", "L1R-4x-standard-l1c1", "L1R-4x-standard-l1c3"]
ALONE = {  # each member's flags when trained alone
    "L1R-4x-batchtopk-k4": dict(architecture="batchtopk", k=4),
    "L1R-4x-batchtopk-k8": dict(architecture="batchtopk", k=8),
    "L1R-4x-matryoshka_batchtopk-k4": dict(architecture="matryoshka_batchtopk", k=4),
    "L1R-4x-matryoshka_batchtopk-k8": dict(architecture="matryoshka_batchtopk", k=8),
    "L1R-4x-standard-l1c1": dict(architecture="standard", l1_coefficient=1.0),
    "L1R-4x-standard-l1c3": dict(architecture="standard", l1_coefficient=3.0),
}
quiet = lambda s: None  # noqa: E731


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    return tiny_llama, tmp_path_factory.mktemp("variants")


def cfg(tiny, out, **kw):
    model, root = tiny
    base = dict(model=model, context_len=64, lm_batch_size=4, tokens=4096, batch_size=256, buffer_tokens=1024,
                eval_tokens=256, eval_lm_tokens=128, progress=False, export_dtype="float32", log_every=4,
                checkpoint_every=5, output=str(root / out))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def mixed(tiny):
    return run(cfg(tiny, "mixed", **MIXED), log=quiet)


def metrics(folder):
    """metrics.jsonl without its timings."""
    lines = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines]


def final(folder):
    return load_file(str(folder / "checkpoints/final.safetensors"))


def test_mixed_suite_members_equal_their_runs_alone(tiny, mixed):
    root = tiny[1]
    assert list(mixed["members"]) == NAMES
    for name, flags in ALONE.items():
        alone = run(cfg(tiny, f"alone-{name}", layer=1, position="R", expansion=4, **flags), log=quiet)
        mine, theirs = root / "mixed" / name, root / f"alone-{name}" / "L1R-4x"
        a, b = final(mine), final(theirs)
        assert set(a) == set(b)
        for key in b:
            assert torch.equal(a[key], b[key]), f"{name} {key}"
        assert metrics(mine) == metrics(theirs), name
        ours, their_cfg = (json.loads((d / "train_config.json").read_text()) for d in (mine, theirs))
        ours.pop("output"), their_cfg.pop("output")
        assert ours == their_cfg, name
        got, want = mixed["members"][name], alone["members"]["L1R-4x"]
        assert got["explained_variance"] == want["explained_variance"] and got["l0"] == want["l0"], name
    rec = {m["name"]: m for m in json.loads((root / "mixed" / "suite.json").read_text())["members"]}
    assert [(rec[n]["architecture"], rec[n]["k"], rec[n]["l1_coefficient"]) for n in NAMES] == [
        ("batchtopk", 4, None), ("batchtopk", 8, None), ("matryoshka_batchtopk", 4, None),
        ("matryoshka_batchtopk", 8, None), ("standard", None, 1.0), ("standard", None, 3.0)]
    table = (root / "mixed" / "suite.md").read_text()
    assert table.startswith("| member | architecture | K | L1 | EV | L0 |")
    png = (root / "mixed" / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_mixed_suite_resumes_exactly(tiny, mixed):
    root = tiny[1]
    assert run(cfg(tiny, "mixed-cut", **MIXED, stop_after_steps=7), log=quiet) == {"stopped": 7}
    run(cfg(tiny, "mixed-cut", **MIXED, resume=True), log=quiet)
    for name in NAMES:
        a, b = final(root / "mixed" / name), final(root / "mixed-cut" / name)
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_variants_export_as_they_run_and_reload_in_saelens(tiny, mixed, tmp_path):
    sl = pytest.importorskip("sae_lens")
    root = tiny[1]
    g = torch.Generator().manual_seed(0)
    for name, act_fn, arch in (("L1R-4x-batchtopk-k8", "jumprelu", "jumprelu"),
                               ("L1R-4x-matryoshka_batchtopk-k4", "jumprelu", "jumprelu"),
                               ("L1R-4x-standard-l1c3", "relu", "standard")):
        folder = root / "mixed" / name
        hp = json.loads((folder / "hyperparams.json").read_text())
        assert hp["act_fn"] == act_fn and hp["architecture"] == name.split("-")[2]
        sae = TopKSAE.from_llama_scope(folder, dtype="float64")
        theta = hp["jump_relu_threshold"]
        assert (theta > 0) == (act_fn == "jumprelu")
        ev = json.loads((folder / "eval.json").read_text())
        assert ev["architecture"] == hp["architecture"] and ev["inference"].startswith(act_fn)
        if act_fn == "jumprelu":  # the exported SAE's own L0 beside K: near it, not equal to it
            assert ev["k"] in (4, 8) and 0.4 * ev["k"] < ev["l0"] < 2.5 * ev["k"], ev
        x = torch.randn(64, 32, generator=g, dtype=torch.float64) * 3
        f = sae.encode(x)
        assert 0 < float((f > 0).sum(1).double().mean()) < 128
        sae.to_saelens(tmp_path / name)
        cfg_json = json.loads((tmp_path / name / "cfg.json").read_text())
        assert cfg_json["architecture"] == arch
        theirs = sl.SAE.load_from_disk(tmp_path / name, dtype="float64")
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), f, rtol=1e-9, atol=1e-9)
        with pytest.raises(ValueError, match="TopK SAEs only; this SAE is " + ("ReLU .architecture .standard" if arch == "standard" else "JumpReLU .*batchtopk")):
            sae.to_sparsify(tmp_path / f"{name}-sparsify")


@pytest.mark.parametrize("argv,flag,item", [
    (["--architecture", "topk,relu"], "--architecture", "relu"),
    (["--architecture", "topk,topk"], "--architecture", "topk"),
    (["--l1-coefficient", "2"], "--l1-coefficient", "standard"),
    (["--architecture", "standard", "--l1-coefficient", "1,-2"], "--l1-coefficient", "-2"),
    (["--architecture", "standard", "--k", "4,8"], "--k", "4,8"),
    (["--matryoshka-widths", "8,16"], "--matryoshka-widths", "matryoshka_batchtopk"),
    (["--architecture", "matryoshka_batchtopk", "--matryoshka-widths", "64,32,256"], "--matryoshka-widths", "64, 32, 256"),
    (["--architecture", "matryoshka_batchtopk", "--matryoshka-widths", "8,64"], "--matryoshka-widths", "256"),
    (["--architecture", "batchtopk", "--k", "300"], "--k", "300"),
])
def test_bad_variant_flags_are_refused_before_the_model_loads(tiny, argv, flag, item, capsys, monkeypatch):
    assert_refused_before_load(tiny[0], tiny[1] / "bad", argv, flag, item, capsys, monkeypatch)


def test_a_standard_member_ignores_the_suites_k_settings(tiny):
    """K means nothing to 'standard': a suite's --k / --k-start do not reach its record (a K-start below the
    default K is not refused for it)."""
    res = run(cfg(tiny, "kstart", hookpoints="L1R", expansion=4, architecture="topk,standard", k=8, k_start=16,
                  tokens=1024), log=quiet)
    assert list(res["members"]) == ["L1R-4x-topk", "L1R-4x-standard"]
    rec = json.loads((tiny[1] / "kstart" / "L1R-4x-standard" / "train_config.json").read_text())
    assert rec["architecture"] == "standard" and rec["k"] == 50 and rec["k_start"] == 50
