"""Writing a run's outputs: one clear line when the file system says no.

A full disk, a read-only directory, or a file where a directory should be all surface as
``OutputError`` (an OSError): one line naming the path, the reason and what to do, which the CLI prints
as is. torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected pos",
"basic_ios::clear: iostream error"), not as an OSError; those are recognized too. Whoever writes through
``writing`` removes what it left half-written (see ``checkpoint.write_atomically``).
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

# Fewer free bytes than this after a failed write: the disk is what is full.
FULL_DISK_BYTES = 64 << 20
# How torch's zip writer words a failed write (it raises RuntimeError, not OSError).
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "iostream error", "unexpected pos",
                         "file write failed")


class OutputError(OSError):
    """A run's output could not be written; the message names the path, the reason and the fix."""


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def is_write_failure(exc: BaseException) -> bool:
    """An OSError, or torch's RuntimeError for a file it could not write."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILURES)


def reason(exc: BaseException, path: Path) -> tuple:
    """(errno, words) for a failed write to ``path``."""
    code = getattr(exc, "errno", None)
    free = free_bytes(path)
    if code == errno.ENOSPC or (not isinstance(exc, OSError) and 0 <= free < FULL_DISK_BYTES):
        return errno.ENOSPC, f"the disk is full ({max(free, 0) >> 20} MiB free)"
    if code in (errno.EACCES, errno.EPERM):
        return code, "permission denied"
    if code == errno.EROFS:
        return code, "the file system is read-only"
    if code in (errno.EEXIST, errno.ENOTDIR):
        return code, "a file is in the way where a directory should be"
    if code == errno.EISDIR:
        return code, "a directory is in the way where a file should be"
    text = str(exc).strip().splitlines()
    return code or errno.EIO, (text[0] if text else type(exc).__name__)


FIX = {
    errno.ENOSPC: "free some space (save_total_limit keeps fewer checkpoints) or choose another output_dir",
    errno.EACCES: "fix its permissions or choose another output_dir",
    errno.EPERM: "fix its permissions or choose another output_dir",
    errno.EROFS: "choose an output_dir on a writable file system",
    errno.EEXIST: "remove that file or choose another output_dir",
    errno.ENOTDIR: "remove that file or choose another output_dir",
    errno.EISDIR: "remove that directory or choose another output_dir",
}


@contextlib.contextmanager
def writing(what: str, path: Path, extra: str = ""):
    """Turn a failed write of ``what`` at ``path`` into one OutputError line (``extra``: what stays intact)."""
    try:
        yield
    except OutputError:
        raise
    except (OSError, RuntimeError) as exc:
        if not is_write_failure(exc):
            raise
        code, words = reason(exc, path)
        fix = FIX.get(code, "check the output directory")
        raise OutputError(code, f"cannot write {what} {path}: {words}{'; ' + extra if extra else ''}; {fix}") from exc


def prepare_dir(path: Path, what: str = "output_dir") -> Path:
    """``path`` as an existing, writable directory, or an OutputError that says why not."""
    path = Path(path)
    with writing(what, path):
        if path.exists() and not path.is_dir():
            raise FileExistsError(errno.EEXIST, "a file is in the way", str(path))
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{id(path)}"
        probe.write_text("")
        probe.unlink()
    return path
