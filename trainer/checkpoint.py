"""Resume-checkpoint files: written atomically with the umask's permissions, read without running code.

* ``save_state(obj, path)``: ``torch.save`` to ``.<name>.<pid>.tmp`` beside ``path`` (created like any
  file, so the umask decides its mode), fsync, ``os.replace``. A failed write (disk full, quota, I/O
  error) removes the temporary file and raises ``OSError`` naming ``path``; ``path`` itself is untouched.
* ``load_state(path)``: ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, tuples and
  dicts; never an arbitrary object), memory-mapped. A file that needs more than that (a crafted pickle
  whose payload would run at load time), a truncated file or a missing one is a ``CheckpointError``
  naming the file: nothing in it is executed.
* ``CheckpointWriteError``: the one-line end of a run whose checkpoint could not be written (which
  file, the errno, and whether the previous checkpoint is intact).
"""
from __future__ import annotations

import errno as _errno
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch


class CheckpointError(ValueError):
    """A resume file that cannot be read or is refused (names the file and the problem)."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the message is one line (file, errno, state of the previous one)."""

    def __init__(self, message: str, errno: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno


def temp_path(path: Path) -> Path:
    """The temporary name ``save_state`` writes ``path`` through (see run_folder's stale clean-up)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_state(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically; the file gets the mode of any new file (umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:  # open() honours the umask (mkstemp would give 0600)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except RuntimeError as e:  # torch's zip writer reports some write failures as RuntimeError
        raise OSError(_errno.EIO, f"write failed ({str(e).splitlines()[0]})", str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def load_state(path: Path, what: str = "--resume") -> Any:
    """``torch.load(path, weights_only=True)``; every failure is a ``CheckpointError`` naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: the checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(
            f"{what}: refused {path}: it holds Python objects other than tensors, numbers, strings, lists and "
            f"dicts, which a checkpoint written by this trainer never does, and it was not unpickled "
            f"({detail[:200]})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        msg = str(e).strip().splitlines()
        raise CheckpointError(f"{what}: could not read the checkpoint {path} ({type(e).__name__}: "
                              f"{msg[0][:200] if msg else ''}); it is truncated or not a checkpoint") from None


def describe_os_error(e: OSError) -> str:
    """``file: [Errno 28] No space left on device`` for a write error."""
    code = f"[Errno {e.errno}] " if e.errno is not None else ""
    name = f" ({_errno.errorcode[e.errno]})" if e.errno in _errno.errorcode else ""
    return f"{e.filename}: {code}{e.strerror or e}{name}"
