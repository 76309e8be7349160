"""Writing results without ever leaving half a file or clobbering someone's work.

Everything goes to a temporary sibling first and is renamed into place, so an interrupted run leaves the
previous output (or nothing) behind, never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlaconvert.errors import MlaconvertError


def _default_mode(directory: bool) -> int:
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_writable(path: Path, force: bool) -> None:
    """Refuse an existing output unless the user said --force."""
    if path.exists() and not force:
        raise MlaconvertError(f"output '{path}' already exists; pass --force to overwrite it")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces `path` only if the block finishes without an exception."""
    path = Path(path)
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(_default_mode(directory=True))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):
        if f.is_file():
            f.chmod(_default_mode(directory=False))  # some writers (safetensors) create private files
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path in the same folder; it is renamed onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(_default_mode(directory=False))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
