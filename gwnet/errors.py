"""User-facing errors.

Anything a user can cause (a wrong path, a malformed file, an impossible option) raises
:class:`GWNetError` with a one-line message that names the file and the problem. The
command-line entry points print that line and exit with status 2; library callers get an
ordinary exception (it subclasses ``ValueError``).
"""
from __future__ import annotations

import os


class GWNetError(ValueError):
    """A mistake in the user's input, reported as one line without a traceback."""


def file_error(path: str | os.PathLike, problem: str) -> GWNetError:
    """Build the conventional ``<path>: <problem>`` error."""
    return GWNetError(f"{os.fspath(path)}: {problem}")
