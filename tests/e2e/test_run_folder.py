"""What happens to run folders on disk (issue 14, items 6-11): crafted resume files are refused without
running their payload; one run at a time holds a folder (stale locks reported); a plain run deletes only
the trainer's own files; a killed write's temporary files, a torn metrics line and a moved folder do not
block --resume; a full disk ends in one line with the previous checkpoint intact; files honour the umask.

Every run is ``python -m trainer.run``'s ``main`` on a tiny random Llama (16 steps of 256 tokens).
"""
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer.run as R
from trainer.run import main
from trainer.run_folder import LOCK_NAME, FolderBusy, RunFolderLock, truncate_metrics
from trainer.train import Trainer

RUN_FOLDER_PY = Path(R.__file__).with_name("run_folder.py")


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(root / "docs.jsonl", "w") as f:  # ~14k byte tokens: tokenised in milliseconds
        for i in range(60):
            f.write(json.dumps({"text": " ".join(words[(i * j) % len(words)] for j in range(30 + i % 7))}) + "\n")
    (root / "model").symlink_to(tiny_llama)  # beside its data, as argv expects
    return str(root / "model"), root


def argv(model, out, *extra, layer=True, data=None):
    data = data or str(Path(model).parent / "docs.jsonl")
    return ["--model", model, "--dataset", data, *(["--layer", "1"] if layer else []), "--context-len", "64",
            "--lm-batch-size", "4",
            "--tokens", "4096", "--batch-size", "256", "--buffer-tokens", "1024", "--eval-tokens", "256",
            "--no-progress", "--no-eval-lm-loss", "--export-dtype", "float32", "--checkpoint-every", "3",
            "--log-every", "1", "--output", str(out), *extra]


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture(scope="module")
def stopped(tiny):
    """A run stopped after 6 of 16 steps (checkpoints at 3 and 6), written under umask 027."""
    model, root = tiny
    out = root / "stopped"
    old = os.umask(0o027)
    try:
        assert main(argv(model, out, "--stop-after-steps", "6")) == 0
    finally:
        os.umask(old)
    return out


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


class Payload:
    """What an attacker puts in a checkpoint: unpickling it creates a folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_files_honour_the_umask(stopped):
    files = [stopped / Trainer.STATE_FILE, stopped / "resume" / "train_config.json",
             *stopped.glob("resume/buffer-*.safetensors"), stopped / "L1R-8x" / "resume" / "step6.pt",
             stopped / "L1R-8x" / "metrics.jsonl", stopped / "L1R-8x" / "train_config.json"]
    assert len(files) == 6
    for f in files:
        assert mode(f) == 0o640, f"{f}: mode {oct(mode(f))} under umask 027"


@pytest.mark.parametrize("target", ["resume/state.pt", "L1R-8x/resume/step6.pt"])
def test_a_crafted_resume_file_is_refused_and_its_payload_never_runs(tiny, stopped, tmp_path, target, capsys):
    model = tiny[0]
    out = copy_of(stopped, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    real = torch.load(out / target, weights_only=True)
    torch.save({**real, "extra": Payload(marker)}, out / target)  # a valid checkpoint plus one crafted object
    capsys.readouterr()
    assert main(argv(model, out, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists(), "the payload ran"
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"error: --resume: refused {out / target}: it holds Python objects"), err[-3:]
    assert "not unpickled" in err[-1] and "os.makedirs" in err[-1]
    # the file really is dangerous: an unrestricted load runs the payload
    torch.load(out / target, weights_only=False)
    assert marker.is_dir()


def test_resume_after_kills_mid_write_from_a_moved_folder(tiny, stopped, tmp_path, monkeypatch, capsys):
    """Temporary files of killed writes are removed (ours only), a torn last metrics line is dropped, and a
    folder that moved since the run started resumes from its new place under a relative --output (and a
    --dataset spelt relative this time: paths compare resolved)."""
    model = tiny[0]
    out = copy_of(stopped, tmp_path / "first")
    member = out / "L1R-8x"
    temps = [out / "resume" / ".state.pt.4242.tmp", member / "resume" / ".step9.pt.4242.tmp",
             out / "resume" / ".buffer-step9-rank0-of1.safetensors.4242.1a2b3c4d.tmp",
             member / "checkpoints" / ".final.safetensors.4242.9f8e7d6c.tmp"]
    for t in temps:
        t.parent.mkdir(exist_ok=True)
        t.write_bytes(b"\0" * 100_000)
    lookalike = member / ".my-notes.txt.1.tmp"  # not a name the trainer writes: it stays
    lookalike.write_text("mine")
    with open(member / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 7, "tokens": 1792, "loss": 0.0')  # killed while writing the line of step 7
    os.rename(out, tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    old = os.umask(0o027)
    try:
        data = os.path.relpath(Path(model).parent / "docs.jsonl", tmp_path)
        assert main(argv(model, "moved", "--resume", data=data)) == 0
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    moved = tmp_path / "moved"
    assert "removed 4 temporary files left by a killed run" in err
    assert f"the run folder moved from {stopped} to moved" in err  # where it was started
    assert sorted(moved.rglob("*.tmp")) == [moved / "L1R-8x" / lookalike.name]
    assert (moved / "L1R-8x" / lookalike.name).read_text() == "mine"
    recs = [json.loads(ln) for ln in (moved / "L1R-8x" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 17))
    assert json.loads((moved / "L1R-8x" / "train_config.json").read_text())["output"] == "moved"
    assert not (moved / "resume").exists() and not (moved / "L1R-8x" / "resume").exists()
    for f in ("hyperparams.json", "lm_config.json", "checkpoints/final.safetensors", "eval.json"):
        assert mode(moved / "L1R-8x" / f) == 0o640, f
    assert mode(moved / "suite.json") == 0o640 and not (moved / LOCK_NAME).exists()


def test_truncate_metrics_refuses_a_corrupt_line_before_the_end(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        truncate_metrics(p, 3)
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    truncate_metrics(p, 2)
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_plain_run_never_deletes_files_it_did_not_write(tiny, tmp_path):
    model = tiny[0]
    out = tmp_path / "runs"
    d = out / "L1R-8x"
    (d / "data").mkdir(parents=True)
    (d / "notes.md").write_text("my notes")
    (d / "data" / "acts.bin").write_bytes(b"\1\2")
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "mine.safetensors").write_bytes(b"x")
    (d / "metrics.jsonl").write_text('{"step": 99}\n')  # a failed start's leftover: replaced, not appended to
    (out / "other.txt").write_text("also mine")
    assert main(argv(model, out)) == 0
    for f, text in ((d / "notes.md", b"my notes"), (d / "data" / "acts.bin", b"\1\2"),
                    (d / "checkpoints" / "mine.safetensors", b"x"), (out / "other.txt", b"also mine")):
        assert f.read_bytes() == text, f
    assert json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert main(argv(model, out, "--overwrite")) == 0  # replacing the run replaces the run's files only
    assert (d / "notes.md").read_text() == "my notes" and (d / "data" / "acts.bin").exists()
    assert (d / "checkpoints" / "mine.safetensors").exists() and (d / "checkpoints" / "final.safetensors").exists()


HOLD = r"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("run_folder", sys.argv[1])
rf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rf)
rf.RunFolderLock(sys.argv[2:]).acquire()
print("locked", flush=True)
sys.stdin.readline()
os._exit(0)  # ends without releasing: the kernel drops the locks, the lock files stay
"""


def test_one_run_at_a_time_in_a_run_folder(tiny, tmp_path, monkeypatch, capsys):
    model = tiny[0]
    out = tmp_path / "runs"

    def no_load(*a, **k):
        raise AssertionError("the model was loaded: the second run was not refused")

    monkeypatch.setattr(R, "load_model", no_load)
    # another process runs the suite L1R, L2R into `runs`
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(RUN_FOLDER_PY), str(out), str(out / "L1R-8x"),
                               str(out / "L2R-8x")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cases = [(argv(model, out), out),  # the same output root
                 (argv(model, out, "--hookpoints", "L2R,L0R", layer=False), out),  # a suite sharing a member
                 (argv(model, out / "L1R-8x"), out / "L1R-8x")]  # a run whose output is a member's folder
        for args, folder in cases:
            capsys.readouterr()
            assert main(args) == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith(f"error: --output: the run folder {folder} is in use by another run "
                                  f"(pid {holder.pid} on this machine, started "), err
        assert not (out / "L1R-8x" / "L1R-8x").exists()  # a refused run leaves nothing behind
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait()
    # the holder died without releasing: its lock files are stale, reported and taken over
    logs = []
    lock = RunFolderLock([out, out / "L1R-8x"], log=logs.append).acquire()
    assert len(logs) == 2 and f"removed the stale lock of a run that ended without releasing it (pid {holder.pid}" in logs[0]
    with pytest.raises(FolderBusy, match=f"pid {os.getpid()}"):  # a second lock in this process is refused too
        RunFolderLock([out / "L1R-8x"]).acquire()
    lock.release()
    assert not (out / LOCK_NAME).exists() and not (out / "L1R-8x" / LOCK_NAME).exists()


def fill(folder, leave):
    st = os.statvfs(folder)
    with open(Path(folder) / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_a_full_disk_during_a_checkpoint_ends_in_one_line(tiny, tmp_path, how, monkeypatch, capsys):
    """Disk full at the checkpoint of step 6 (resumed from the one of step 3): one line naming the file and
    the errno, this step's partial files removed, the previous checkpoint intact and resumable. ``tmpfs``: a
    real 4 MiB filesystem filled to 64 KiB (root only); ``injected``: ENOSPC from the member state's write."""
    import trainer.train.checkpoint as C

    model = tiny[0]
    disk = tmp_path / "disk"
    disk.mkdir()
    if how == "tmpfs":
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (not root)")
    out = disk / "runs"
    try:
        assert main(argv(model, out, "--stop-after-steps", "3")) == 0
        if how == "tmpfs":
            fill(disk, leave=64 * 1024)  # the log lines still fit, the next checkpoint does not
            failing = r"\S+/runs/resume/buffer-step6-rank0-of1\.safetensors"
        else:
            real_save = torch.save

            def full_disk(obj, f, *a, **k):
                if "step6" in str(getattr(f, "name", "")):
                    f.write(b"\0" * 1000)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_save(obj, f, *a, **k)

            monkeypatch.setattr(C.torch, "save", full_disk)
            failing = r"\S+/runs/L1R-8x/resume/step6\.pt"
        capsys.readouterr()
        assert main(argv(model, out, "--resume")) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err)
        assert re.fullmatch(
            rf"error: checkpoint at step 6: could not write {failing}: \[Errno 28\] No space left on device "
            rf"\(ENOSPC\); the previous checkpoint \(step 3, {re.escape(str(out / Trainer.STATE_FILE))}\) is intact: "
            r"free space and continue with --resume", err[-1]), err[-1]
        assert torch.load(out / Trainer.STATE_FILE, weights_only=True)["step"] == 3
        assert not list(out.rglob("*step6*")) and not list(out.rglob("*.tmp"))
        assert not (out / LOCK_NAME).exists()
        if how == "tmpfs":
            (disk / "filler").unlink()
        else:
            monkeypatch.setattr(C.torch, "save", real_save)
        assert main(argv(model, out, "--resume")) == 0
        assert (out / "L1R-8x" / "eval.json").is_file()
    finally:
        if how == "tmpfs":
            # lazy: a failed assertion keeps frames (and files memory-mapped from the disk) alive in its
            # traceback, so a plain umount would answer EBUSY and leave the mount behind
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
