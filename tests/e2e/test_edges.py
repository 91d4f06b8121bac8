"""The edges of a run, where the user meets them (``python -m trainer.run``'s ``main``): a kill at any
instant of the end of a run, symbolic links in the output folder, full disks outside a checkpoint, a
diverged run, damaged or swapped checkpoint files, and inputs refused before the model loads."""
import errno
import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import sae_kernels.atomic as atomic
import trainer.run as R
import trainer.run_folder as names
from trainer.run import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(root / "docs.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": " ".join(words[(i * j) % len(words)] for j in range(30 + i % 7))}) + "\n")
    return str(root / "docs.jsonl")


def argv(model, data, out, *extra):
    """A suite of two members (a transcoder among them), 8 steps, checkpoints every 3."""
    return ["--model", model, "--dataset", data, "--hookpoints", "L1R,L2TC", "--expansion", "4", "--k", "8",
            "--context-len", "64", "--lm-batch-size", "4", "--tokens", "2048", "--batch-size", "256",
            "--buffer-tokens", "1024", "--eval-tokens", "256", "--no-progress", "--no-eval-lm-loss",
            "--export-dtype", "float32", "--checkpoint-every", "3", "--log-every", "1", "--output", str(out), *extra]


MEMBERS = ("L1R-4x", "L2TC-4x")


def last_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err), "\n".join(err)
    return err[-1] if err else ""


def outputs(out):
    """What a finished run leaves, comparable across runs: weights (bitwise), eval.json without its times and
    paths, the suite's metrics, the metrics lines without their speed."""
    got = {}
    for m in MEMBERS:
        got[m, "weights"] = {k: v for k, v in load_file(out / m / "checkpoints" / "final.safetensors").items()}
        ev = json.loads((out / m / "eval.json").read_text())
        ev["train_final"] = {k: v for k, v in ev["train_final"].items() if k != "tokens_per_s"}
        got[m, "eval"] = {k: v for k, v in ev.items() if k not in ("seconds", "lm_tokens", "checkpoint")}
        got[m, "metrics"] = [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}
                             for ln in (out / m / "metrics.jsonl").read_text().splitlines()]
    suite = json.loads((out / "suite.json").read_text())
    got["suite"] = [{k: v for k, v in m.items() if k != "folder"} for m in suite["members"]]
    return got


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key[-1] == "weights":
            assert all(torch.equal(a[key][t], b[key][t]) for t in a[key]), key
        else:
            assert a[key] == b[key], key


class _Kill(BaseException):
    """The process dies here: no handler of the trainer catches it (files stay as they are on disk)."""


def end_events(monkeypatch, kill_at=None):
    """Count (and optionally kill at, before it happens) each file write and deletion after training: the
    atomic writes' renames and the run folders' removals. Returns the list of events seen."""
    seen, armed = [], {"on": False}
    real_remove, real_export = names._remove, R.export_members

    def event(what):
        if armed["on"]:
            if kill_at is not None and len(seen) == kill_at:
                raise _Kill(what)
            seen.append(what)

    class Os:  # the atomic writer's os, with its renames seen (the os module itself is left alone)
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            event(f"write {os.path.basename(dst)}")
            return os.replace(src, dst)

    def remove(paths):
        paths = list(paths)
        event(f"remove {[os.path.basename(p) for p in paths]}")
        return real_remove(paths)

    def export(*a, **k):
        armed["on"] = True  # training (with its final checkpoint) is over
        return real_export(*a, **k)

    monkeypatch.setattr(atomic, "os", Os())
    monkeypatch.setattr(names, "_remove", remove)
    monkeypatch.setattr(R, "export_members", export)
    return seen


@pytest.fixture(scope="module")
def finished(tiny_llama, data, tmp_path_factory):
    """An uninterrupted run, the end-of-run events it went through, and the folder as a kill right after
    training leaves it (the final checkpoint written, nothing exported)."""
    root = tmp_path_factory.mktemp("end")
    mp = pytest.MonkeyPatch()
    try:
        seen = end_events(mp)
        assert main(argv(tiny_llama, data, root / "ref")) == 0
        mp.undo()
        end_events(mp, kill_at=0)
        with pytest.raises(_Kill):
            main(argv(tiny_llama, data, root / "trained"))
    finally:
        mp.undo()
    return outputs(root / "ref"), list(seen), root / "trained"


def test_a_kill_at_any_instant_of_the_end_of_a_run_is_finished_by_resume(tiny_llama, data, finished, tmp_path,
                                                                          monkeypatch):
    """Killed before each write and each removal of the end of a run (exports, eval.json, the suite's files,
    the checkpoint's removal), the same command with --resume finishes it: the same weights, metrics and
    suite as the uninterrupted run, and no checkpoint file left."""
    ref, seen, trained = finished
    kinds = [e.split()[1] for e in seen]
    assert kinds.count("hyperparams.json") == len(MEMBERS) and "eval.json" in kinds and "suite.png" in kinds
    assert any(e.startswith("remove") and "state.pt" in e for e in seen)
    # every event of one kind's first and last occurrence, every removal, and after the last event
    picks = sorted({i for k in set(kinds) for i in (kinds.index(k), len(kinds) - 1 - kinds[::-1].index(k))}
                   | {i for i, e in enumerate(seen) if e.startswith("remove")} | {len(seen)})
    for i in picks:
        folder = tmp_path / f"kill{i}"
        shutil.copytree(trained, folder)
        if i < len(seen):
            with monkeypatch.context() as mp:
                end_events(mp, kill_at=i)
                with pytest.raises(_Kill):
                    main(argv(tiny_llama, data, folder, "--resume"))
        assert main(argv(tiny_llama, data, folder, "--resume")) == 0, f"killed before {seen[i] if i < len(seen) else 'the end'}"
        assert_same(outputs(folder), ref)
        assert not list(folder.rglob("step*.pt")) and not (folder / names.STATE).exists(), i
    # killed while removing the members' checkpoints: finished; --resume says so and cleans up
    folder = tmp_path / "cleanup"
    shutil.copytree(trained, folder)
    with monkeypatch.context() as mp:
        end_events(mp, kill_at=len(seen) - 1)
        with pytest.raises(_Kill):
            main(argv(tiny_llama, data, folder, "--resume"))
    assert not (folder / names.STATE).exists() and list(folder.rglob("step*.pt"))
    assert R.run(R.TrainConfig(**vars(R.build_parser().parse_args(argv(tiny_llama, data, folder, "--resume")))),
                 log=lambda s: None)["finished"]
    assert not list(folder.rglob("step*.pt"))


def test_no_file_is_written_through_a_symbolic_link(tiny_llama, data, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    # a .lock that is a link: refused, its target untouched
    out = tmp_path / "lock"
    out.mkdir()
    (outside / "precious").write_text("keep\n")
    (out / names.LOCK_NAME).symlink_to(outside / "precious")
    assert main(argv(tiny_llama, data, out)) == 2
    assert "is a symbolic link" in last_error(capsys) and (outside / "precious").read_text() == "keep\n"
    # a dangling metrics.jsonl link: a new run removes it (a file of the trainer's), a resumed one refuses
    # to append through it; nothing is created outside either way
    out = tmp_path / "metrics"
    (out / "L1R-4x").mkdir(parents=True)
    (out / "L1R-4x" / "metrics.jsonl").symlink_to(outside / "created")
    assert main(argv(tiny_llama, data, out, "--stop-after-steps", "3")) == 0
    assert not (out / "L1R-4x" / "metrics.jsonl").is_symlink() and not (outside / "created").exists()
    (out / "L1R-4x" / "metrics.jsonl").unlink()
    (out / "L1R-4x" / "metrics.jsonl").symlink_to(outside / "created")
    assert main(argv(tiny_llama, data, out, "--resume")) == 1
    err = last_error(capsys)
    assert "metrics.jsonl" in err and "symbolic link" in err and not (outside / "created").exists(), err
    # links where a resumed run writes its outputs (eval.json, the suite's files): replaced, targets untouched
    out = tmp_path / "resumed"
    assert main(argv(tiny_llama, data, out, "--stop-after-steps", "3")) == 0
    links = [out / "L1R-4x" / "eval.json", out / "suite.md", out / "suite.csv", out / "suite.png", out / "suite.json"]
    for i, link in enumerate(links):
        (outside / f"t{i}").write_text("keep\n")
        link.symlink_to(outside / f"t{i}")
    assert main(argv(tiny_llama, data, out, "--resume")) == 0
    assert all(not p.is_symlink() and p.is_file() for p in links)
    assert all((outside / f"t{i}").read_text() == "keep\n" for i in range(len(links)))


def test_a_full_disk_outside_a_checkpoint_ends_in_one_line(tiny_llama, data, tmp_path, monkeypatch, capsys):
    """ENOSPC while appending a metrics line, and while writing eval.json: one line naming the file and the
    errno, exit status 1, and the files written before intact."""
    import trainer.train.loop as loop

    real_write = loop.os.write

    def full(fd, data_):
        if data_[:9] == b'{"step": ' and b'"step": 5,' in data_[:12]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data_)

    out = tmp_path / "metrics"
    with monkeypatch.context() as mp:
        mp.setattr(loop.os, "write", full)
        assert main(argv(tiny_llama, data, out)) == 1
    err = last_error(capsys)
    assert err.startswith(f"error: step 5: could not write {out / 'L1R-4x' / 'metrics.jsonl'}: [Errno 28] "), err
    assert "(ENOSPC)" in err and "the previous checkpoint (step 3" in err
    assert [json.loads(ln)["step"] for ln in (out / "L1R-4x" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    out = tmp_path / "eval"

    class Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if os.path.basename(dst) == "eval.json" and "L2TC" in str(dst):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.replace(src, dst)

    with monkeypatch.context() as mp:
        mp.setattr(atomic, "os", Os())
        assert main(argv(tiny_llama, data, out)) == 1
    err = last_error(capsys)
    assert err.startswith(f"error: could not write {out / 'L2TC-4x' / 'eval.json'}: [Errno 28] No space left on "
                          "device (ENOSPC)"), err
    assert (out / "L1R-4x" / "eval.json").is_file() and not list(out.rglob("*.tmp"))
    # the run is not lost: its final checkpoint is there, and --resume finishes it
    assert main(argv(tiny_llama, data, out, "--resume")) == 0 and (out / "L2TC-4x" / "eval.json").is_file()


def test_a_checkpoint_on_a_full_disk_reports_enospc(tmp_path):
    """torch.save through the atomic writer on a real full filesystem: ENOSPC, not EIO."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        with pytest.raises(OSError) as e:
            atomic.atomic_torch_save({"W": torch.ones(200_000)}, disk / "state.pt")
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(disk / "state.pt")
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_diverged_run_stops_and_exports_nothing(tiny_llama, data, tmp_path, capsys):
    out = tmp_path / "nan"
    assert main(argv(tiny_llama, data, out, "--lr", "1e15")) == 1
    err = last_error(capsys)
    assert err.startswith("error: step ") and "the training diverged" in err and "--lr" in err, err
    assert not any((out / m / "checkpoints" / "final.safetensors").exists() for m in MEMBERS)
    assert not any((out / m / "hyperparams.json").exists() for m in MEMBERS)
    if (out / names.STATE).exists():  # the last checkpoint holds finite weights
        step = torch.load(out / names.STATE, weights_only=True)["step"]
        for m in MEMBERS:
            sd = torch.load(out / m / "resume" / f"step{step}.pt", weights_only=True)["sae"]
            assert all(torch.isfinite(t).all() for t in sd.values()), m


@pytest.fixture
def stopped(tiny_llama, data, tmp_path):
    out = tmp_path / "stopped"
    assert main(argv(tiny_llama, data, out, "--stop-after-steps", "3")) == 0
    return out


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated"])
def test_a_damaged_buffer_shard_is_refused_naming_it(tiny_llama, data, stopped, damage, capsys):
    (shard,) = (stopped / "resume").glob("buffer-*.safetensors")
    if damage == "missing":
        shard.unlink()
    elif damage == "empty":
        shard.write_bytes(b"")
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    assert main(argv(tiny_llama, data, stopped, "--resume")) == 2
    err = last_error(capsys)
    assert err.startswith("error: --resume: ") and str(shard) in err, err


def test_swapped_member_checkpoints_are_refused(tiny_llama, data, stopped, capsys):
    a, b = (stopped / m / "resume" / "step3.pt" for m in MEMBERS)
    tmp = a.with_name("x")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    assert main(argv(tiny_llama, data, stopped, "--resume")) == 2
    err = last_error(capsys)
    assert f"{a} is not a checkpoint of L1R-4x: its name is 'L2TC-4x'" in err, err


def test_inputs_refused_before_the_model_loads(tiny_llama, data, tmp_path, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.chdir(tmp_path)
    cases = [
        (["--context-len", "513"], "error: --context-len: expected at most 512 tokens (the model's "
                                   "max_position_embeddings), got 513"),
        (["--context-len", "100000000"], "error: --context-len: expected at most 512 tokens"),
        (["--output", ""], "error: --output: expected a folder for the run, got ''"),
        (["--dist-timeout", "1e15"], "error: --dist-timeout: expected seconds in (0, 2.592e+06] (30 days)"),
    ]
    with monkeypatch.context() as mp:
        mp.setattr(R, "load_model", no_load)
        for extra, want in cases:
            assert main(argv(tiny_llama, data, tmp_path / "o") + extra) == 2, extra
            assert last_error(capsys).startswith(want), extra
    assert not (tmp_path / "o").exists() and not any(tmp_path.iterdir())


def test_a_dataset_without_held_out_text_is_refused_before_training(tiny_llama, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "a single short document " * 10}) + "\n")
    out = tmp_path / "o"
    assert main(argv(tiny_llama, str(one), out)) == 2
    err = last_error(capsys)
    assert err.startswith(f"error: --dataset {str(one)!r}: ") and "--eval-every" in err, err
    assert not out.exists()  # nothing to block a corrected rerun


@pytest.mark.parametrize("cmd", ["analyze", "evaluate"])
def test_a_non_utf8_json_is_named(tiny_llama, data, tmp_path, cmd, capsys):
    from trainer.analyze.cli import main as analyze
    from trainer.evaluate.cli import main as evaluate

    out = tmp_path / "o"
    (out / "L1R-4x").mkdir(parents=True)
    (out / "L1R-4x" / "hyperparams.json").write_bytes(b'{"d_model": 32, "name": "\xff\xfe"}')
    (out / "L1R-4x" / "checkpoints").mkdir()
    (out / "L1R-4x" / "checkpoints" / "final.safetensors").write_bytes(b"")
    assert (analyze if cmd == "analyze" else evaluate)([str(out / "L1R-4x"), "--no-progress"]) == 2
    err = last_error(capsys)
    assert str(out / "L1R-4x" / "hyperparams.json") in err and "UTF-8" in err, err
