"""Checkpoint files and the run directory they live in.

A run directory (:class:`RunDir` owns every name in it) holds ``config.json``, ``best.pt``
(the best model by validation MAE, with everything needed to predict: config, including the
model's registered name and its config, scaler, sensor ids, graph), ``last.pt`` (the same
plus the optimizer, scheduler, random states and early-stopping counters, for ``--resume``),
``metrics.csv`` and ``test_metrics.csv``; with ``--log tensorboard`` a ``tensorboard/``
folder; a pretrain-then-finetune run also ``pipeline.json`` and the pretraining stage in
``pretrain-hK/``; a sharded run its ``last-shards-a``/``-b`` folders; and ``.lock``, which the
process training there holds (:class:`RunLock`), so that a second one is refused. Every file is
written atomically. Checkpoints carry a format tag and version; anything else is refused with a
clear message, and loading never unpickles arbitrary objects (``weights_only=True``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # not POSIX: run directories are not locked
    fcntl = None

from .._version import __version__
from ..atomic import atomic_path
from ..errors import GWNetError, file_error
from ..paths import check_input_file, check_not_link, is_temporary, open_private
from .schema import FORMAT, check_agreement, check_saved_config, check_trained

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any], kind: str | None = None) -> None:
    """Write ``payload`` with the format header, atomically. ``kind`` (``best`` or ``last``):
    first check it as its reader will (:mod:`gwnet.engine.schema`)."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "gwnet_version": __version__, **payload}
    if kind is not None:
        check_trained(path, payload, kind)
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:160]
        raise file_error(path, f"cannot write checkpoint ({reason}); the previous one is intact") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    kind: str | None = None) -> dict[str, Any]:
    """Read a gwnet checkpoint, refusing missing, truncated, foreign or newer files; with
    ``kind`` (``best`` or ``last``) every entry is checked (:func:`gwnet.engine.schema.check_trained`)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise file_error(path, "no such checkpoint")
    check_input_file(path, "checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise file_error(path, f"not a readable checkpoint (truncated or foreign file?): {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise file_error(path, "not a gwnet checkpoint (a reference state_dict? use "
                         "gwnet.load_reference_checkpoint)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise file_error(path, f"checkpoint format {version} is newer than this gwnet "
                         f"({__version__}, format {FORMAT_VERSION}); upgrade gwnet")
    if kind is not None:
        check_trained(path, payload, kind)
    return payload


class RunDir:
    """Paths of a run directory: the one place their names are spelled."""

    SHARD_DIRS = ("last-shards-a", "last-shards-b")  # a sharded run's checkpoints, in turn

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.json")
    best = property(lambda self: self.root / "best.pt")
    last = property(lambda self: self.root / "last.pt")
    metrics = property(lambda self: self.root / "metrics.csv")
    test_metrics = property(lambda self: self.root / "test_metrics.csv")
    tensorboard = property(lambda self: self.root / "tensorboard")
    # A pretrain-then-finetune run: the whole pipeline's config, beside the finetuning stage's.
    pipeline = property(lambda self: self.root / "pipeline.json")
    # Held (flock) by the one process that trains here: see RunLock.
    lock = property(lambda self: self.root / ".lock")

    def pretrain(self, horizon: int) -> "RunDir":
        """The pretraining stage (horizons ``1..horizon``) of a pretrain-then-finetune run."""
        return RunDir(self.root / f"pretrain-h{horizon}")

    def shards(self, name: str) -> Path:
        """A sharded checkpoint's folder (one of :attr:`SHARD_DIRS`: a name read from ``last.pt``
        never leads outside the run directory)."""
        if name not in self.SHARD_DIRS:
            raise file_error(self.last, f"names {name!r} as its sharded checkpoint, not one of "
                             f"{', '.join(self.SHARD_DIRS)}")
        check_not_link(self.root / name)  # shards are written and deleted there: never through a link
        return self.root / name

    @property
    def saved_config(self) -> Path:
        """The config that describes the whole run: the pipeline's if there is one."""
        return self.pipeline if self.pipeline.exists() else self.config

    def holds_run(self) -> bool:
        return self.config.exists() or self.last.exists() or self.best.exists() or self.pipeline.exists()

    def progress_files(self) -> list[Path]:
        """What a run writes once it has trained (besides ``last.pt``): with any of these and
        no ``last.pt``, the run cannot be continued exactly, nor started over without loss."""
        files = [self.best, self.metrics, self.test_metrics, *(self.root / n for n in self.SHARD_DIRS)]
        return [f for f in files if f.exists()]

    def check_resumable(self) -> None:
        """Refuse to resume a run whose ``last.pt`` is gone but which had trained: starting it
        over would replace its ``best.pt`` and metrics. (Only a run killed before its first
        checkpoint, with nothing but its config, may start over.)"""
        if self.last.exists():
            return
        found = self.progress_files()
        if found == [self.best] and self._first_epoch_only():
            warnings.warn(f"{self.root}: holds the best.pt of epoch 1 but no last.pt (killed while writing its "
                          "first checkpoint); the run starts over, losing that one epoch")
            return
        if found:
            raise file_error(self.root, f"holds {', '.join(f.name for f in found)} but no {self.last.name}, "
                             "so the run cannot be resumed exactly; nothing was changed (train into "
                             "another --out, or move the directory away to start over)")

    def _first_epoch_only(self) -> bool:
        """Whether best.pt is a checkpoint of epoch 1 (what a kill between writing it and the first
        last.pt leaves)."""
        try:
            return load_checkpoint(self.best).get("epoch") == 1
        except GWNetError:
            return False

    def check_saved_state(self) -> None:
        """Before a resume does anything: ``last.pt`` checked entry by entry, ``config.json``
        option by option, and the two agreeing (:mod:`gwnet.engine.schema`)."""
        if not self.last.exists():
            return
        state = load_checkpoint(self.last, map_location="cpu", kind="last")
        if self.config.exists():
            from ..config import read_config_file

            raw = read_config_file(self.config)
            cfg = check_saved_config(self.config, raw)
            check_agreement(self.config, raw, self.last, state, cfg)

    def remove_stale_temporaries(self) -> None:
        """Delete half-written files a killed run left behind (the real files are intact): only
        files named as gwnet names its temporaries, never a user's own ``.notes.tmp``."""
        for tmp in self.root.iterdir():
            if is_temporary(tmp.name) and (tmp.is_file() or tmp.is_symlink()):
                tmp.unlink(missing_ok=True)

    def check_writable(self) -> None:
        """Fail early, before any training, if outputs cannot be written here."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.root / ".write-test") as tmp:
                tmp.write_bytes(b"\0" * 4096)
            os.unlink(self.root / ".write-test")
        except OSError as exc:
            raise file_error(self.root, f"cannot write the run directory: {exc.strerror or exc}") from None


# Run directories this process has locked: real path of the lock file -> [open file, holders].
_HELD: dict[str, list] = {}


class RunLock:
    """An exclusive lock on a run directory while one process trains into it.

    ``fcntl.flock`` on :attr:`RunDir.lock`: a second process (another ``gwnet-train`` with the
    same ``--out``) is refused with one line before it changes anything, instead of mixing its
    files with the first one's. The system drops the lock when its holder exits, killed or not,
    so the lock file left behind never blocks a later run. Within one process the lock is
    re-entrant: a pipeline holds its run directory while its finetuning stage takes it again.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self._key: str | None = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> "RunLock":
        if self._key is not None or fcntl is None:
            return self
        try:
            self.run.root.mkdir(parents=True, exist_ok=True)
            key = os.path.realpath(self.run.lock)
            entry = _HELD.get(key)
            if entry is None:
                # Never through a link planted at .lock: the pid is written into this file.
                fh = os.fdopen(open_private(self.run.lock), "r+")
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = fh.read().strip()
                    fh.close()
                    who = f"another process (pid {holder})" if holder.isdigit() else "another process"
                    raise file_error(self.run.root, f"is in use: {who} is training into it; wait for it "
                                     "to finish or choose another --out") from None
                except BaseException:
                    fh.close()
                    raise
                fh.truncate(0)
                fh.write(f"{os.getpid()}\n")
                fh.flush()
                entry = _HELD[key] = [fh, 0]
        except OSError as exc:
            raise file_error(self.run.root, f"cannot write the run directory: {exc.strerror or exc}") from None
        entry[1] += 1
        self._key = key
        return self

    def release(self) -> None:
        """Give the lock up (again: nothing); the last holder in this process unlocks the file."""
        key, self._key = self._key, None
        entry = _HELD.get(key) if key is not None else None
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            entry[0].close()  # closing the file drops the lock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
