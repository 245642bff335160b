"""User-facing errors.

Anything a user can cause (a bad file, an unknown recipe key, a wrong flag) raises
:class:`CellSSLError` with a one-line message that names the thing and the fix. The CLI prints
that line and exits with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


class CellSSLError(Exception):
    """An error caused by the user's input, printed as one line by the CLI (exit code 2)."""


class ConfigError(CellSSLError):
    """A recipe or override that cannot be used."""


class DataError(CellSSLError):
    """Data that cannot be read or used (empty folder, unreadable files, too few images)."""


class CheckpointError(CellSSLError):
    """A checkpoint that cannot be loaded for the requested use."""


class TrainingError(CellSSLError):
    """A training run that had to stop (non-finite losses, collapse with stop enabled)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class DiskFullError(CellSSLError):
    """A write that failed because its disk (or the user's quota) is full; nothing was half-written."""


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how safetensors and the OS word a full disk (torch's zip writer says only "unexpected pos": free space decides)
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded")


def format_bytes(n: float) -> str:
    """``26.1 MB``-style size (powers of 1000, as ``df -H`` shows them)."""
    if abs(n) < 1000:
        return f"{n:.0f} bytes"
    for unit in ("kB", "MB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def mount_point(path: str | Path) -> Path:
    """The mount point (the disk) that holds ``path``, or would hold it: its nearest existing parent's."""
    p = Path(os.path.abspath(path))
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def is_disk_full(exc: BaseException, free_bytes: int | None = None, needed_bytes: int | None = None) -> bool:
    """True when ``exc`` (a failed write) comes from a full disk: an ENOSPC / EDQUOT ``OSError``, one of
    the texts torch or safetensors wrap it in, or any error while fewer bytes are free than the write
    needs (torch's zip writer reports a full disk only as "unexpected pos")."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
    text = str(exc).lower()
    if any(t in text for t in _DISK_FULL_TEXT):
        return True
    return free_bytes is not None and needed_bytes is not None and free_bytes < needed_bytes


@contextlib.contextmanager
def disk_full_as_error(target: str | Path, needed_bytes: int | None, kept: str | Callable[[], str],
                       fix: str = "free space there or choose another --out") -> Iterator[None]:
    """Turn a write of ``target`` that fails on a full disk into one :class:`DiskFullError` line naming
    the disk, the space the write needs (``needed_bytes``, an estimate), the space free and what was
    kept (``kept``, e.g. "the previous checkpoint is kept", or a function that says it, called only
    on a failure); other errors pass unchanged. Wrap the whole write, its clean-up of temporary files
    included, so that the free space is measured after it."""
    try:
        yield
    except CellSSLError:
        raise
    except Exception as exc:
        target = Path(target)
        disk = mount_point(target)
        try:
            free = shutil.disk_usage(disk).free
        except OSError:
            free = None
        if not is_disk_full(exc, free, needed_bytes):
            raise
        need = f"needs about {format_bytes(needed_bytes)}" if needed_bytes else "needs more space"
        have = f", {format_bytes(free)} free" if free is not None else ""
        said = kept() if callable(kept) else kept
        raise DiskFullError(f"the disk at {disk} is full: writing {target} {need}{have}; {said}; {fix}") from exc
