"""User-facing errors.

Anything a user can cause (a bad file, an unknown recipe key, a wrong flag) raises
:class:`CellSSLError` with a one-line message that names the thing and the fix. The CLI prints
that line and exits with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
