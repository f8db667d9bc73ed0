"""Atomic file writes: write to a temporary name beside the target, then rename.

A reader (or a run killed mid-write) sees either the old file or the complete new one,
never a truncated file. :func:`atomic_directory` does the same for a directory of results
written together (gwnet-predict's, an ``.npz`` export): never a mix of old and new files.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Collection, Iterator

from .errors import file_error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    return path.parent / f".{path.name}.old"


def _stage_prefix(path: Path, pid: int | None = None) -> str:
    """How the directories a new result is written in begin (they end in ``.tmp``)."""
    return f".{path.name}.new-{os.getpid() if pid is None else pid}-"


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
    start = f".{path.name}.new-"
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
            held = sorted(e.name for e in real.iterdir()
                          if not (e.name.startswith(".") and e.name.endswith(".tmp")))  # half-written files
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
    place whole: the previous result is renamed aside, the new one renamed in, the previous one
    deleted. A failure or a kill while writing leaves the previous result as it was (a kill
    also leaves the hidden ``.NAME.new-PID-*.tmp`` directory beside it, which the next call
    deletes); a kill between the two renames leaves it aside as ``.NAME.old``, where the next
    call finds it and puts it back. What the directory may hold, and the checks before any
    work: :func:`check_output_directory`."""
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
        yield stage
        # Checked again: another process may have written there meanwhile.
        check_output_directory(shown, overwrite, ours, what)
        try:
            if real.is_dir() and any(real.iterdir()):
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

