"""The run folders on disk: the name of every file a run writes, one run at a time in them, and only the
trainer's own files touched.

* The names: the output root holds ``resume/`` (``STATE``, ``RESUME_CONFIG``, the buffer's checkpoint
  shards ``buffer_shard``) and the suite's files (``SUITE_FILES``); each member folder
  ``<output>/L{layer}{position}-{expansion}x/`` holds the released layout (``LLAMA_SCOPE_FILES``),
  ``METRICS``, ``EVAL``, ``TRAIN_CONFIG``, with ``--jumprelu`` a ``JUMPRELU/`` folder, and while training
  its checkpoints (``member_state``).
* ``check_run_dirs`` / ``create_run_dirs``: what a run may replace or resume, and the folders it starts with.

* ``RunFolderLock``: an exclusive ``flock`` on ``<folder>/.lock`` of the output root and of every member
  folder, held for the whole run by one process (rank 0 under torchrun). A second run into any of those
  folders is refused at once, naming the folder and the holder (pid, host, start time, command). The
  kernel releases a lock when its process dies, however it dies; a lock file left behind by a dead
  process is reported as stale and taken over.
* ``clear_run_files``: what a plain (or ``--overwrite``) run removes before it starts: the files this
  trainer writes, by name, and nothing else (user files in a run folder stay).
* ``remove_stale_temps``: temporary files of a killed checkpoint or export write (``.state.pt.<pid>.tmp``,
  ``.step5.pt.<pid>.tmp``, ``.buffer-....safetensors.<pid>.<hex>.tmp``), removed on start and resume
  (the lock guarantees that no live writer owns them).
* ``truncate_metrics``: ``metrics.jsonl`` cut back to a checkpoint's step (a torn last line included).
* ``same_path``: settings that name local paths compare as resolved paths.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from sae_kernels.atomic import atomic_path, atomic_write_text
from sae_kernels.formats import read_json

LOCK_NAME = ".lock"

# The output root: the run's checkpoint (resume/) and the suite's files.
STATE = "resume/state.pt"  # the step, the buffer's global state, the layout; replaced last by a checkpoint
RESUME_CONFIG = "resume/train_config.json"  # the flags, checked by --resume
SUITE_JSON, SUITE_MD, SUITE_CSV, SUITE_PNG = "suite.json", "suite.md", "suite.csv", "suite.png"
SWEEP_PNG = "sweep.png"  # a suite that sweeps K: EV and delta LM loss against L0 per hook point
SUITE_FILES = (SUITE_JSON, SUITE_MD, SUITE_CSV, SUITE_PNG, SWEEP_PNG)
# A member folder: the released Llama Scope layout, the run's records, the JumpReLU export.
LLAMA_SCOPE_FILES = ("hyperparams.json", "lm_config.json", "checkpoints/final.safetensors")
METRICS, EVAL, TRAIN_CONFIG, TRAINING_PNG = "metrics.jsonl", "eval.json", "train_config.json", "training.png"
JUMPRELU = "jumprelu"
# files that show a member folder holds a run (not replaced without --overwrite)
PRECIOUS = ("hyperparams.json", EVAL)

# The files a run writes into a member folder and into the output root (relative paths).
MEMBER_FILES = (*LLAMA_SCOPE_FILES, METRICS, EVAL, TRAIN_CONFIG, TRAINING_PNG,
                *(f"{JUMPRELU}/{f}" for f in LLAMA_SCOPE_FILES))
ROOT_FILES = (STATE, RESUME_CONFIG, *SUITE_FILES)


def member_state(member_dir: Path, step: int) -> Path:
    """A member's checkpoint at ``step``: its SAE, Adam, counters, metric sums (``<member>/resume/``)."""
    return Path(member_dir) / "resume" / f"step{step}.pt"


def buffer_shard(step: int, rank: int, world: int) -> str:
    """The name (under the root's ``resume/``) of rank ``rank``'s share of the buffer at ``step``."""
    return f"buffer-step{step}-rank{rank}-of{world}.safetensors"


RESUME_PATTERNS = (re.compile(r"step\d+\.pt"), re.compile(r"buffer-step\d+-rank\d+-of\d+\.safetensors"),
                   re.compile(r"state\.pt"), re.compile(r"train_config\.json"))
# subfolders a run creates, removed when the run's files are gone and they are empty
MEMBER_DIRS = ("jumprelu/checkpoints", "jumprelu", "checkpoints", "resume")


class FolderBusy(ValueError):
    """Another live run holds the lock of a run folder."""


def _holder_text(info: dict) -> str:
    host = info.get("host")
    where = "this machine" if host == socket.gethostname() else f"host {host}" if host else "an unknown host"
    started = f", started {info['started']}" if info.get("started") else ""
    cmd = f": {info['command']}" if info.get("command") else ""
    return f"pid {info.get('pid', '?')} on {where}{started}{cmd}"


def _read_info(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class RunFolderLock:
    """Exclusive locks on ``folders`` (created if missing; the first is the output root).

    ``acquire()`` takes every lock without waiting or raises ``FolderBusy`` (holding none);
    ``release()`` removes the lock files and the folders that ``acquire`` created if they are still
    empty. Locks are per process and per open file: a second run in the same process is refused too.
    """

    def __init__(self, folders: Sequence[Path], log: Callable[[str], None] = print) -> None:
        seen, self.folders = set(), []
        for f in folders:
            r = Path(os.path.abspath(f))
            if r not in seen:
                seen.add(r)
                self.folders.append(r)
        self.log = log
        self.held: List[Tuple[Path, int, List[Path]]] = []  # (folder, fd, folders created for it)
        self.stale: List[str] = []

    def acquire(self) -> "RunFolderLock":
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(["python -m trainer.run" if a.endswith("trainer/run.py") else a
                                     for a in sys.argv])[:300]}
        try:
            for folder in self.folders:
                self._lock_one(folder, info)
        except BaseException:
            self.release()
            raise
        for s in self.stale[:4]:
            self.log(s)
        if len(self.stale) > 4:
            self.log(f"... and {len(self.stale) - 4} more stale locks")
        return self

    def _lock_one(self, folder: Path, info: dict) -> None:
        created = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        while True:
            try:  # never through a symbolic link: its target would be truncated and overwritten
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                raise FolderBusy(f"--output: {path} is a symbolic link; the trainer writes no file through a link: "
                                 "remove it") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_info(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise FolderBusy(
                    f"--output: the run folder {folder} is in use by another run ({_holder_text(holder)}); "
                    "wait for it to finish, stop it, or choose another --output") from None
            try:  # a holder releasing its lock unlinks the file: lock the file that is there now
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_info(fd)
        if old.get("pid") is not None and old.get("pid") != os.getpid():
            self.stale.append(f"{folder}: removed the stale lock of a run that ended without releasing it "
                              f"({_holder_text(old)})")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.held.append((folder, fd, created))

    def release(self) -> None:
        for folder, fd, created in reversed(self.held):
            with contextlib.suppress(OSError):
                os.unlink(folder / LOCK_NAME)  # while holding it: see the samestat check above
            os.close(fd)
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if still empty: the run wrote nothing there
        self.held = []

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked_run_folders(root: Path, member_dirs: Iterable[Path], ctx, log: Callable[[str], None]) -> Iterator[None]:
    """Rank 0 holds the locks of ``root`` and every member folder for the ``with`` block; every rank
    raises the same ``FolderBusy`` when they are taken (under torchrun: one process per job locks)."""
    lock, err = None, None
    if ctx.is_main:
        lock = RunFolderLock([Path(root), *member_dirs], log)
        try:
            lock.acquire()
        except FolderBusy as e:
            err = str(e)
        except OSError as e:
            err = f"--output {root}: could not create or lock the run folder ({e.strerror or e}: {e.filename})"
    err = ctx.broadcast_object(err)
    if err:
        raise FolderBusy(err)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# ----------------------------------------------------------------------------------- the run's own files


def _remove(paths: Iterable[Path]) -> List[Path]:
    gone = []
    for p in paths:
        if p.is_file() or p.is_symlink():
            p.unlink()
            gone.append(p)
    return gone


def _resume_files(folder: Path) -> List[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if any(r.fullmatch(p.name) for r in RESUME_PATTERNS)]


def _rmdir_empty(folder: Path, subdirs: Sequence[str]) -> None:
    for sub in subdirs:
        with contextlib.suppress(OSError):
            (folder / sub).rmdir()


def clear_run_files(root: Path, member_dirs: Iterable[Path]) -> List[Path]:
    """Remove the files a run of this trainer writes (by name) from ``root`` and each member folder, then
    the run's subfolders if that left them empty. Anything else stays. Returns the removed files."""
    root = Path(root)
    gone = _remove([root / f for f in ROOT_FILES if f.startswith("resume/")] + _resume_files(root / "resume"))
    _rmdir_empty(root, ("resume",))
    for d in member_dirs:
        d = Path(d)
        gone += _remove([d / f for f in MEMBER_FILES] + _resume_files(d / "resume"))
        _rmdir_empty(d, MEMBER_DIRS)
    return gone


def remove_resume_files(folder: Path) -> None:
    """A finished run's ``resume/`` (the root's or a member's): its checkpoint files, then the folder if empty."""
    _remove(_resume_files(Path(folder)))
    _rmdir_empty(Path(folder), ("",))


def finish_run(root: Path, member_dirs: Iterable[Path]) -> None:
    """The end of a finished run: its checkpoint goes, ``STATE`` first. Until then a kill at any instant
    leaves a checkpoint that ``--resume`` finishes from; from then on the run is finished
    (``run_is_finished``), and what a kill leaves behind is only stale checkpoint files."""
    root = Path(root)
    _remove([root / STATE])
    remove_resume_files(root / "resume")
    for d in member_dirs:
        remove_resume_files(Path(d) / "resume")


def run_is_finished(root: Path, specs) -> bool:
    """No checkpoint left, the suite's files written and every member evaluated."""
    root = Path(root)
    return (not (root / STATE).exists() and (root / SUITE_JSON).is_file()
            and all((root / m.name / EVAL).is_file() for m in specs))


class RunFinished(Exception):
    """``--resume`` of a run that has nothing left to do: ``folders`` are its member folders."""

    def __init__(self, message: str, root: Path, folders: List[Path]) -> None:
        super().__init__(message)
        self.root, self.folders = Path(root), list(folders)


def _our_temp(name: str) -> bool:
    """``.<file>.<pid>.tmp`` / ``.<file>.<pid>.<hex>.tmp`` / ``.<file>.<random>.tmp`` of a file a run writes."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    parts = name[1:-4].split(".")
    known = {Path(f).name for f in MEMBER_FILES + ROOT_FILES}
    for cut in (1, 2):
        base = ".".join(parts[:-cut])
        if len(parts) > cut and (base in known or any(r.fullmatch(base) for r in RESUME_PATTERNS)):
            return True
    return False


def remove_stale_temps(root: Path, member_dirs: Iterable[Path]) -> Tuple[List[Path], int]:
    """Temporary files of writes that a killed run left behind in the run's folders (the caller holds
    the folders' locks, so no live writer owns them). Returns the removed paths and their bytes."""
    root = Path(root)
    folders = [root, root / "resume"]
    for d in member_dirs:
        d = Path(d)
        folders += [d, d / "resume", d / "checkpoints", d / "jumprelu", d / "jumprelu" / "checkpoints"]
    gone, size = [], 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if _our_temp(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    n = p.stat().st_size
                    p.unlink()
                    gone.append(p)
                    size += n
    return gone, size


def describe_removed(gone: Sequence[Path], size: int) -> str:
    shown = ", ".join(str(p) for p in gone[:3]) + (f", ... ({len(gone)} files)" if len(gone) > 3 else "")
    return (f"removed {len(gone)} temporary file{'s' if len(gone) > 1 else ''} left by a killed run "
            f"({size / 2**20:.1f} MiB): {shown}")


def truncate_metrics(path: Path, step: int) -> Optional[dict]:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (a checkpoint's), drop the later ones and a
    torn last line (a run killed while writing it); a corrupt line before the end is a ValueError.
    Returns the last record kept (None when there is none)."""
    path = Path(path)
    if not path.exists():
        return None
    lines = path.read_bytes().split(b"\n")
    keep: List[bytes] = []
    last = None
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            if any(ln.strip() for ln in lines[i + 1:]):
                raise ValueError(f"--resume: {path}, line {i + 1}: not a JSON record (a corrupt metrics file); "
                                 "repair or remove that line") from None
            break  # the torn last line of a killed write
        if int(rec.get("step", 0)) <= step:
            keep.append(raw)
            last = rec
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"".join(ln + b"\n" for ln in keep))
    return last


def same_path(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two settings name the same thing: equal strings, or local paths that resolve alike."""
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    return os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)


# ----------------------------------------------------------------------------------- starting a run


def check_run_dirs(cfg, specs) -> Optional[str]:
    """Refuses to replace a finished or resumable run unless ``--overwrite``; with ``--resume`` the
    output folder must hold a checkpoint of a run with the same flags (paths compared resolved; the
    folder itself may have moved: returns where it was). Read-only (every rank checks)."""
    out = Path(cfg.output)
    state = out / STATE
    if cfg.resume:
        if not state.is_file():
            if run_is_finished(out, specs):
                raise RunFinished(f"--resume: the run in {out} is finished ({SUITE_JSON} and every member's {EVAL} "
                                  "are written): nothing to resume", out, [out / m.name for m in specs])
            off = (out / RESUME_CONFIG).is_file() and read_json(out / RESUME_CONFIG, "--resume").get("checkpoint_every") == 0
            raise ValueError(f"--resume: no checkpoint {state} to resume from"
                             + (" (the run wrote none: --checkpoint-every 0); start it again with --overwrite" if off else ""))
        saved = read_json(out / RESUME_CONFIG, "--resume")
        diff = [
            f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}"
            for k, v in cfg.to_dict().items()
            if k not in cfg.RUNTIME_FIELDS + ("output",) and not same_path(saved.get(k), v)
        ]
        if diff:
            raise ValueError("--resume: the flags differ from the run being resumed: " + "; ".join(diff))
        was = saved.get("output")
        return was if isinstance(was, str) and not same_path(was, str(out)) else None
    if state.exists() and not cfg.overwrite:
        raise ValueError(f"--output: {out} holds an unfinished run ({state}); pass --resume to continue it, "
                         "--overwrite to replace it, or another --output for a new run beside it")
    for m in specs:
        run_dir = out / m.name
        precious = [f for f in PRECIOUS if (run_dir / f).exists()]
        if precious and not cfg.overwrite:
            raise ValueError(f"--output: the run folder {run_dir} already holds a run ({', '.join(precious)}); "
                             "pass another --output for a new run beside it, or --overwrite to replace it")
    return None


def create_run_dirs(cfg, specs, d_model: int, moved_from: Optional[str] = None,
                    log: Callable[[str], None] = print) -> None:
    """Every member's folder with its train_config.json (exactly a run alone's), and ``resume/``. Removes
    the temporary files of a killed run, and (a new run) the files of an earlier run of this trainer
    that check_run_dirs allowed to replace; never anything else. Rank 0, holding the folders' locks."""
    out = Path(cfg.output)
    member_dirs = [out / m.name for m in specs]
    gone, size = remove_stale_temps(out, member_dirs)
    if gone:
        log(describe_removed(gone, size))
    if cfg.resume:
        if moved_from is not None:  # a moved run folder: its configs name where it is now
            log(f"--resume: the run folder moved from {moved_from} to {out}")
            _write_configs(out, cfg, specs, d_model)
        return
    clear_run_files(out, member_dirs)  # --overwrite, or leftovers of a failed start (checked by check_run_dirs)
    for folder in [out / "resume"] + member_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    _write_configs(out, cfg, specs, d_model)


def _write_configs(out: Path, cfg, specs, d_model: int) -> None:
    """The run's flags (``RESUME_CONFIG``) and each member's ``train_config.json``, exactly a run alone's."""
    atomic_write_text(out / RESUME_CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
    for m in specs:
        atomic_write_text(out / m.name / TRAIN_CONFIG, json.dumps(cfg.solo(m, d_model).to_dict(), indent=2) + "\n")
