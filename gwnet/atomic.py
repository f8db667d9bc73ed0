"""Atomic file writes: write to a temporary name beside the target, then rename.

A reader (or a run killed mid-write) sees either the old file or the complete new one,
never a truncated file. :func:`atomic_directory` does the same for a directory of results
written together (gwnet-predict's, an ``.npz`` export): never a mix of old and new files.
Every temporary carries :data:`gwnet.paths.TEMP_MARK` in its name, and only names with it
are ever deleted or put back as leftovers of a killed process.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Collection, Iterator

from .errors import file_error
from .paths import TEMP_MARK, is_temporary

# Errors of a place that cannot take a write (full, read-only, over quota, forbidden, a file where
# a folder belongs): the command-line tools say them in one line (gwnet.cli.common.run_cli).
DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG,
               errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ELOOP)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _aside(path: Path) -> Path:
    """Where :func:`atomic_directory` keeps the previous result while the new one moves in."""
    return path.parent / f".{path.name}{TEMP_MARK}old"


def _stage_prefix(path: Path, pid: int | None = None) -> str:
    """How the directories a new result is written in begin (they end in ``.tmp``)."""
    return f".{path.name}{TEMP_MARK}new-{os.getpid() if pid is None else pid}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


def _recover(path: Path) -> None:
    """Finish a replacement that a kill interrupted: the previous result comes back if the new
    one never moved in, and is deleted if it had; half-written results of processes that are
    gone are deleted."""
    start = f".{path.name}{TEMP_MARK}new-"
    if path.parent.is_dir():
        for stage in path.parent.iterdir():
            pid = stage.name[len(start):].split("-")[0]
            if (stage.name.startswith(start) and stage.name.endswith(".tmp") and pid.isdigit()
                    and not _alive(int(pid)) and stage.is_dir() and not stage.is_symlink()):
                shutil.rmtree(stage, ignore_errors=True)
    aside = _aside(path)
    if not aside.is_dir() or aside.is_symlink():
        return
    if os.path.lexists(path):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(aside, path)


def check_output_directory(path: str | os.PathLike, overwrite: bool = False, ours: Collection[str] = (),
                           what: str = "gwnet") -> Path:
    """Refuse, before any work, an output directory :func:`atomic_directory` could not fill:
    an existing file, a directory that holds results (unless ``overwrite``) or anything but
    the names in ``ours`` (those are all it would replace), or a place that cannot be written.
    Returns the directory's real path."""
    shown = Path(path)
    real = Path(os.path.realpath(shown))
    try:
        _recover(real)
        if real.exists() and not real.is_dir():
            raise file_error(shown, "exists and is not a directory")
        if real.is_dir():
            held = sorted(e.name for e in real.iterdir() if not is_temporary(e.name))  # half-written files
            foreign = [name for name in held if name not in ours]
            if foreign:
                raise file_error(shown, f"holds {foreign[0]!r}, which {what} did not write; choose another "
                                 "output directory (nothing is replaced there)")
            if held and not overwrite:
                raise file_error(shown, "already holds results; pass --overwrite to replace them, or choose "
                                 "another output directory")
        real.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=_stage_prefix(real), suffix=".tmp", dir=real.parent))
    except OSError as exc:
        raise file_error(shown, f"cannot write here: {exc.strerror or exc}") from None
    return real


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False, ours: Collection[str] = (),
                     what: str = "gwnet") -> Iterator[Path]:
    """Yield a new, empty directory beside ``path`` to write; on success it takes ``path``'s
    place whole: the two are exchanged in one rename (:func:`_exchange`), and the previous one
    is deleted. A failure or a kill while writing leaves the previous result as it was (a kill
    also leaves the hidden ``.NAME.gwnet-new-PID-*.tmp`` directory beside it, which the next
    call deletes); a write that fails (a full or read-only disk) is one line. Where the system
    cannot exchange, the previous result is renamed aside first: a kill between the two
    renames leaves it as ``.NAME.gwnet-old``, where the next call finds it and puts it back.
    What the directory may hold, and the checks before any work: :func:`check_output_directory`."""
    shown = Path(path)
    real = check_output_directory(shown, overwrite, ours, what)
    try:
        stage = Path(tempfile.mkdtemp(prefix=_stage_prefix(real), suffix=".tmp", dir=real.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; give it mkdir's permissions
    except OSError as exc:
        raise file_error(shown, f"cannot write here: {exc.strerror or exc}") from None
    try:
        try:
            yield stage
        except OSError as exc:  # a full or read-only disk, while the new result was written
            raise file_error(getattr(exc, "filename", None) or shown,
                             f"{exc.strerror or exc}; {shown} was left as it was (the partial new result "
                             "is removed)") from None
        # Checked again: another process may have written there meanwhile.
        check_output_directory(shown, overwrite, ours, what)
        try:
            if real.is_dir() and any(real.iterdir()) and _exchange(stage, real):
                pass  # one rename swapped them: the previous result is now at ``stage``
            elif real.is_dir() and any(real.iterdir()):
                aside = _aside(real)
                os.rename(real, aside)  # the complete previous result steps aside,
                try:
                    os.rename(stage, real)  # the complete new one takes its place,
                except OSError:
                    os.rename(aside, real)
                    raise
                shutil.rmtree(aside, ignore_errors=True)  # and the previous one goes
            else:
                os.replace(stage, real)  # nothing there, or an empty directory
        except OSError as exc:
            raise file_error(shown, f"cannot move the new results in: {exc.strerror or exc}") from None
        try:  # the renames on disk, not only in the cache (best effort: not every system can)
            fd = os.open(real.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one rename (Linux's ``renameat2(RENAME_EXCHANGE)``): a kill at
    any moment leaves either the previous result or the new one in place, whole. False where
    the system or the file system cannot (the caller then renames twice)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))

