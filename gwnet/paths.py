"""Names and paths: what gwnet reads must be a regular file, what it writes stays inside its
output directory and never goes through a link it did not make.

* :func:`check_input_file`: an input (readings, graph, config, checkpoint, reference weights)
  must be a regular file; a FIFO would block the read forever, a device (``/dev/zero``)
  never ends, a link loop cannot be followed. Each is one line instead.
* :func:`check_plain_name`: a name taken from a flag or a file (``--name``, a dataset's file
  stem) that becomes part of a file name must be a plain file name: no directory part, no
  ``..``, nothing hidden: joined to the output directory it stays inside it.
* :func:`open_private`: open a file gwnet keeps beside its results (a lock file) without
  following a symbolic link planted at its name.
* :data:`TEMP_MARK`: the mark in the name of every temporary gwnet makes; only names that
  carry it are ever deleted or replaced as leftovers of a killed run.
"""
from __future__ import annotations

import errno
import os
import re
import stat

from .errors import GWNetError, file_error

# In every temporary file or folder gwnet makes (".NAME.gwnet-XXXX.tmp"): a user's own
# ".thesis.tmp" or ".results.old" beside an output is never taken for one.
TEMP_MARK = ".gwnet-"
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one gwnet gives its temporaries (``.NAME.gwnet-....tmp``)."""
    return name.startswith(".") and name.endswith(".tmp") and TEMP_MARK in name


def check_input_file(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse, with one line, an input that is not a regular file (links to one are fine)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise file_error(path, "is a loop of symbolic links") from None
        if exc.errno == errno.ENOENT:
            raise file_error(path, f"no such {what}") from None
        raise file_error(path, f"cannot read the {what}: {exc.strerror or exc}") from None
    for test, kind in SPECIAL_KINDS:
        if test(info.st_mode):
            raise file_error(path, f"is {kind}, not a regular {what}")


def check_plain_name(name: str, what: str = "name") -> str:
    """``name`` if it is a plain file name (letters, digits, ``_ . + -``; no path separator,
    not hidden, no ``..``), else one line."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise GWNetError(f"{what} {name!r} must be a plain file name (letters, digits, '_', '.', '+', '-'; "
                         "no directory part)")
    return name


def open_private(path: str | os.PathLike, flags: int = os.O_RDWR | os.O_CREAT, mode: int = 0o666) -> int:
    """``os.open`` that never follows a symbolic link at ``path`` (``O_NOFOLLOW``) and refuses
    anything but a regular file there; returns the descriptor."""
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise file_error(path, "is a symbolic link; gwnet does not write through links it did not make") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise file_error(path, "is not a regular file; gwnet does not write into it")
    return fd


def check_not_link(path: str | os.PathLike) -> None:
    """Refuse to write into ``path`` when it is a symbolic link (a folder gwnet makes itself
    and fills: shard folders, the tensorboard folder)."""
    if os.path.islink(path):
        raise file_error(path, "is a symbolic link; gwnet does not write through links it did not make")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise file_error(path, "exists and is not a directory")
