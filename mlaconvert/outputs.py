"""Writing results without ever leaving half a file or clobbering someone's work.

Everything goes to a temporary sibling first and is renamed into place, so an interrupted run leaves the
previous output (or nothing) behind, never a truncated one.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mlaconvert.errors import MlaconvertError


def _default_mode(directory: bool) -> int:
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_writable(path: Path, force: bool) -> None:
    """Refuse, before any work, an existing output without --force and an output that cannot be written."""
    if path.exists() and not force:
        raise MlaconvertError(f"output '{path}' already exists; pass --force to overwrite it")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise MlaconvertError(f"cannot write '{path}': '{folder}' is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MlaconvertError(f"cannot write '{path}': no permission to write in '{folder}'")


def claim_output(path: Path, force: bool) -> None:
    """check_writable, then claim `path` for this process with a lock file beside it, so a second job writing
    the same output refuses at once instead of racing this one. The claim ends when this process does; a
    claim left by a process that died is taken over."""
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner == os.getpid():
                return
            if owner is not None:
                raise MlaconvertError(f"another mlaconvert (process {owner}) is writing '{path}'; wait for it or choose another output") from None
            lock.unlink(missing_ok=True)  # its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lock.unlink, missing_ok=True)
        return


def _lock_owner(lock: Path) -> int | None:
    """The live process holding `lock`, or None when it has exited."""
    try:
        pid = int(lock.read_text() or 0)
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, FileNotFoundError):
        return None
    except PermissionError:  # alive, but another user's
        pass
    return pid


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


def write_json_lines(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """A JSON-lines file, whole or not at all."""
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_json_lines(path: str | os.PathLike) -> list[Any]:
    """The rows of a JSON-lines file that `append_json_line` wrote. A last line without its newline is one a kill
    cut short: left out. Any other line that does not parse is damage: a one-line error."""
    text = Path(path).read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            if line.strip():
                rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise MlaconvertError(f"'{path}' is damaged: line {number} is not JSON; start over with --force") from None
    return rows


def append_json_line(path: str | os.PathLike, row: Any) -> None:
    """One row onto a JSON-lines file, on disk before this returns: what a kill leaves is whole rows, but for
    at most the one it was writing."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
