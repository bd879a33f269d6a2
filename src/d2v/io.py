"""Safe file I/O shared by checkpoints, model folders and classifier folders.

* :func:`save_torch` -- ``torch.save`` + fsync; a full disk is an ``OSError`` naming the file;
* :func:`atomic_save` -- the same through a temp file and a rename (a crash never leaves half a file);
* :func:`atomic_dir` -- build a folder under a temp name, then swap it in with one rename;
* :func:`torch_load_checked` -- ``torch.load(weights_only=True)``, every failure an ``InputError``
  naming the file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from d2v.errors import InputError


class _WriteRecorder:
    """A file wrapper that remembers the OSError of a failed write: ``torch.save`` turns it into
    a bare "unexpected pos" RuntimeError, which would hide a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` then fsync; a failed write (disk full, quota, I/O error) raises
    ``OSError`` with the cause's errno and a message naming ``path`` (the partial file is left to
    the caller, who wrote it to a temporary name)."""
    rec = None
    try:
        with open(path, "wb") as f:
            rec = _WriteRecorder(f)
            torch.save(obj, rec)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        cause = rec.error if rec is not None and rec.error is not None else e
        code = getattr(cause, "errno", None)
        why = os.strerror(code) if code else f"{type(cause).__name__}: {first_line(str(cause))}"
        raise (OSError(code, f"{path}: {why}") if code else OSError(f"{path}: {why}")) from cause


def torch_load_checked(path: Path, map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into an ``InputError`` naming ``path``.

    Only tensors and plain containers load; a pickle that names any other global is refused
    (before anything it names is called).
    """
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise InputError(f"{path}: is a folder, expected a checkpoint file") from e
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "unsupported GLOBAL" in msg or "Can only" in msg or "blocked" in msg:
            detail = _refusal_detail(msg)
            raise InputError(f"{path}: refused to load: the pickle names {detail}, outside the allowed set "
                             "(tensors and plain containers); nothing from it was executed") from e
        raise InputError(f"{path}: truncated or corrupt checkpoint ({first_line(msg)})") from e
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError, KeyError, AttributeError,
            TypeError, IndexError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {first_line(str(e))})") from e


def first_line(msg: str) -> str:
    return (msg.strip().splitlines() or [""])[0][:300]


def _refusal_detail(msg: str) -> str:
    import re

    m = re.search(r"GLOBAL (\S+)", msg)
    if m:
        return f"the global {m.group(1)}"
    m = re.search(r"(but got|function) (.+?)(\.|$)", msg)
    return m.group(2)[:200] if m else "a class or function"


def atomic_save(obj: Any, path: Path, what: str = "checkpoint") -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves half a file.

    A failed write (disk full, quota, I/O error) removes the temp file and raises ``OSError``
    naming ``path`` and the cause; a previous file at ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        save_torch(obj, tmp)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        why = os.strerror(e.errno) if e.errno else str(e)
        kept = f"the previous {what} {path} is unchanged" if path.exists() else f"no {what} was written"
        msg = f"{path}: could not write the {what} ({why}); {kept}"
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``out_dir``; on success it replaces ``out_dir`` (old one removed),
    on failure it is deleted and ``out_dir`` is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        yield tmp
        for f in tmp.iterdir():  # on disk before the folder is swapped in
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
