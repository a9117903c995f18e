"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import errno
import json
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polykv.errors import OutputError

KILL_ENV = "POLYKV_TEST_KILL_AT"
TEMP_SUFFIX = ".tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)


def maybe_crash(point: str) -> None:
    """Test hook for the crash/resume tests: SIGKILL this process at `point` if $POLYKV_TEST_KILL_AT names it."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _cannot_write(path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    return OutputError(f"cannot write {path} ({reason}); choose an output path in a writable directory with free space")


def check_writable(path: str | Path) -> None:
    """OutputError (as `atomic_write` would raise it) unless `path` could be written, creating nothing: its nearest
    existing ancestor must be a writable directory. For commands that do long work before they write."""
    path = Path(path)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _cannot_write(path, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise _cannot_write(path, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    if path.is_dir():
        raise _cannot_write(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    An OSError (not writable, not a directory, disk full...) becomes an OutputError naming `path`; the temporary
    file is removed on any error, so nothing half-written is left (a SIGKILL can leave a `.NAME.*.tmp` file, which
    readers ignore and `calibrate` removes when it resumes).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the output the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        maybe_crash(f"before-rename:{path.parent.name}/{path.name}")
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from exc
        raise


def remove_stale_temps(directory: str | Path) -> None:
    """Delete the temporary files that a killed `atomic_write` left in `directory` (not recursive)."""
    directory = Path(directory)
    if directory.is_dir():
        for tmp in directory.glob(f".*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
