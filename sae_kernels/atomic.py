"""Atomic file writes, the package's one way to write a file.

Each writer fills a temporary file beside the target (created with mode 0666 less the umask, like any
new file), fsyncs it and ``os.replace``s it over the target, so a killed process leaves either the old
file or the new one, never half of one. A failed write raises an ``OSError`` that keeps its errno
(``ENOSPC`` for a full disk) and names the target, and leaves no temporary file behind.

``atomic_path`` is the context manager under the others: ``atomic_write_text``, ``atomic_write_bytes``,
``atomic_write_json``, ``atomic_save_safetensors`` and ``atomic_torch_save``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

PathLike = Union[str, "os.PathLike[str]"]


def _new_temp(path: Path) -> str:
    """Create an empty temporary file beside ``path``, mode 0666 less the umask (mkstemp would give 0600)."""
    while True:
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _naming(e: OSError, path: Path, tmp: Optional[str]) -> OSError:
    """``e`` with the target as its file name when it named none or the temporary file; errno kept."""
    if e.filename is not None and e.filename != tmp:
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The body writes the temporary file (by name); an ``OSError`` from the body, the fsync or the
    replace comes out naming ``path`` with its errno unchanged, and the temporary file is removed.
    """
    path = Path(path)
    tmp: Optional[str] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp(path)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        named = _naming(e, path, tmp)
        if named is e:
            raise
        raise named from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):  # never hide the error that got us here
                os.unlink(tmp)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, as UTF-8."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, sorted keys, a final newline) to ``path`` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"  # a value JSON cannot hold fails before any file
    atomic_write_text(path, text)


def atomic_save_safetensors(path: PathLike, tensors: Dict[str, torch.Tensor], metadata=None) -> None:
    """``safetensors.torch.save_file`` to ``path`` atomically (tensors detached, contiguous, on the CPU).

    safetensors reports I/O errors as a ``SafetensorError`` ("... os error 28"): that becomes the
    ``OSError`` it is, with that errno, naming ``path``.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        umask_mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 less the umask (see atomic_path)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.chmod(tmp, umask_mode)  # safetensors writes its files with mode 0600
        except SafetensorError as e:
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            num = int(code.group(1))
            raise OSError(num, os.strerror(num), str(path)) from None


class _UnbufferedWriter:
    """What ``torch.save`` writes through: each ``write`` goes to the file descriptor in full or raises the
    ``OSError`` it met. Given a buffered Python file, torch's zip writer turns a short write on a full disk
    into a RuntimeError ("unexpected pos") and the errno is lost; here ENOSPC stays ENOSPC."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name  # name: the file being written, like a Python file's
        self.error: Optional[OSError] = None  # torch may catch it and report a RuntimeError instead

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as e:
            self.error = self.error or e
            raise
        return len(view)

    def flush(self) -> None:
        pass


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically; the file gets the umask's mode like any new file.

    A write that fails keeps its errno (a full disk is ENOSPC); a failure torch itself reports as a
    RuntimeError comes out as ``OSError(EIO, "write failed (...)", path)``.
    """
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)  # the file atomic_path created: its mode is kept
        writer = _UnbufferedWriter(fd, tmp)
        try:
            torch.save(obj, writer)
        except RuntimeError as e:
            if writer.error is not None:
                raise OSError(writer.error.errno, writer.error.strerror, str(path)) from None
            first = str(e).strip().splitlines()
            raise OSError(errno.EIO, f"write failed ({first[0] if first else type(e).__name__})", str(path)) from None
        finally:
            os.close(fd)
