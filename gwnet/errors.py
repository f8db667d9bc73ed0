"""User-facing errors.

Anything a user can cause (a wrong path, a malformed file, an impossible option) raises
:class:`GWNetError` with a one-line message that names the file and the problem. The
command-line entry points print that line and exit with status 2; library callers get an
ordinary exception (it subclasses ``ValueError``).
"""
from __future__ import annotations

import os
import re


class GWNetError(ValueError):
    """A mistake in the user's input, reported as one line without a traceback."""


def file_error(path: str | os.PathLike, problem: str) -> GWNetError:
    """Build the conventional ``<path>: <problem>`` error."""
    return GWNetError(f"{os.fspath(path)}: {problem}")


def one_line(exc: BaseException, limit: int = 160) -> str:
    """The gist of a library's exception, to quote inside a :class:`GWNetError`: its first
    non-blank line, whitespace collapsed, at most ``limit`` characters (the exception's type
    name when it says nothing). torch's ``weights_only`` refusal is paragraphs of advice around
    one reason; the reason is what is kept."""
    text = str(exc)
    at = text.find("WeightsUnpickler error:")
    if at >= 0:
        text = text[at + len("WeightsUnpickler error:"):].split(" was not an allowed global")[0]
    elif text.startswith("Weights only load failed"):  # newer torch: the reason is the second paragraph
        paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        text = paragraphs[1] if len(paragraphs) > 1 else text
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    return " ".join(line.split())[:limit] or type(exc).__name__
