"""Resume-checkpoint files: written atomically with the umask's permissions, read without running code.

* ``save_state(obj, path)``: ``torch.save`` through the package's one atomic writer
  (``sae_kernels.atomic``): a temporary file beside ``path`` (the umask decides its mode), fsync,
  ``os.replace``. A failed write (disk full, quota, I/O error) removes the temporary file and raises
  ``OSError`` naming ``path``; ``path`` itself is untouched.
* ``load_state(path)``: ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, tuples and
  dicts; never an arbitrary object), memory-mapped. A file that needs more than that (a crafted pickle
  whose payload would run at load time), a truncated file or a missing one is a ``CheckpointError``
  naming the file: nothing in it is executed.
* ``CheckpointWriteError``: the one-line end of a run whose checkpoint could not be written (which
  file, the errno, and whether the previous checkpoint is intact).
* ``rng_state`` / ``set_rng_state``: the random states a checkpoint carries; ``shard_reader``: the rows
  of the activation buffer's checkpoint shards (written one per rank, read by any layout).

What each checkpoint holds and where its files live: ``trainer.train.loop.Trainer.save_checkpoint`` and
``trainer.run_folder`` (the file names).
"""
from __future__ import annotations

import errno as _errno
import pickle
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from sae_kernels.atomic import atomic_torch_save


class CheckpointError(ValueError):
    """A resume file that cannot be read or is refused (names the file and the problem)."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the message is one line (file, errno, state of the previous one)."""

    def __init__(self, message: str, errno: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno


def save_state(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (``sae_kernels.atomic``: a temporary file beside it,
    fsync, rename; the umask's mode); a failed write raises ``OSError`` naming ``path`` and leaves it as it was."""
    atomic_torch_save(obj, path)


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
    if e.errno == _errno.ELOOP:
        return f"{e.filename}: it is a symbolic link, and the trainer writes no file through a link (remove it)"
    code = f"[Errno {e.errno}] " if e.errno is not None else ""
    name = f" ({_errno.errorcode[e.errno]})" if e.errno in _errno.errorcode else ""
    return f"{e.filename}: {code}{e.strerror or e}{name}"


def rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def shard_reader(folder: Path, shards: List[str]) -> Callable[[Tensor], Tensor]:
    """``read_rows(slots)`` over the buffer shards of a checkpoint: the rows of the sorted global
    ``slots``, each shard read only where it holds them (safetensors slices)."""
    from safetensors import safe_open

    def read_rows(slots: Tensor) -> Tensor:
        pieces_s, pieces_r = [], []
        for name in shards:
            with safe_open(str(folder / name), framework="pt", device="cpu") as f:
                have = f.get_tensor("slots")
                lo = int(torch.searchsorted(have, slots[0]))
                hi = int(torch.searchsorted(have, slots[-1], right=True))
                if hi > lo:
                    pieces_s.append(have[lo:hi])
                    pieces_r.append(f.get_slice("rows")[lo:hi])
        got = torch.cat(pieces_s) if pieces_s else torch.empty(0, dtype=torch.int64)
        order = got.argsort()
        if not torch.equal(got[order], slots):
            raise ValueError(f"checkpoint {folder}: the buffer shards do not hold the rows of {slots.numel()} slots")
        return torch.cat(pieces_r)[order]

    return read_rows


def check_shards(folder: Path, shards: List[str]) -> None:
    """Every buffer shard a checkpoint names exists and is a safetensors file with its rows: a
    ``CheckpointError`` naming the file otherwise (before anything is loaded)."""
    from safetensors import SafetensorError, safe_open

    for name in shards:
        path = Path(folder) / name
        if not path.is_file():
            raise CheckpointError(f"--resume: the checkpoint's buffer shard {path} does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                missing = {"slots", "rows"} - set(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"--resume: could not read the buffer shard {path} ({str(e).splitlines()[0][:200]}); "
                                  "it is truncated or not a checkpoint") from None
        if missing:
            raise CheckpointError(f"--resume: the buffer shard {path} has no {', '.join(sorted(missing))}")


def check_identity(state: Dict[str, Any], member, path: Path) -> None:
    """A member's checkpoint is the checkpoint of this member (name, shapes, settings): a
    ``CheckpointError`` naming the file otherwise, so swapped or foreign files are never loaded."""
    saved = state.get("identity") or {"name": state.get("name")}
    want = member.identity
    for key in ["name"] + sorted((set(saved) | set(want)) - {"name"}):
        if key in saved and key in want and saved[key] != want[key]:
            raise CheckpointError(f"--resume: {path} is not a checkpoint of {member.name}: its {key} is "
                                  f"{saved[key]!r}, expected {want[key]!r}")
