"""Distillation: one model trained on a teacher ensemble's forecasts (``gwnet-train --teacher``).

:func:`train` is :func:`gwnet.engine.train` for a config with ``train.teacher``: it loads the
teacher runs (read only), checks that they fit the student's data, fits their ensemble
exactly as ``gwnet-predict`` does (the same members, strategy, data and validation windows)
and hands the trainer a :class:`TeacherForecasts`, which the trainer's extra-targets hook
(:mod:`gwnet.engine.distill`) asks for the forecasts of each training batch.

The teacher's forecasts are computed once per window, for the training and validation
windows only (never a test window), and kept in the run directory::

    RUN_DIR/teacher-cache/train.npy   (training windows, horizons, sensors) float32
    RUN_DIR/teacher-cache/val.npy     (validation windows, horizons, sensors) float32
    RUN_DIR/teacher-cache/teacher.json  what they are: teachers and their best.pt digests,
                                        strategy and weights, the student's windows

Each array is written beside its final name and renamed into place, ``teacher.json`` last,
so a cache with its ``teacher.json`` is complete. Training reads the arrays memory-mapped (a
LargeST-size run does not hold them in memory), and a resumed run reuses them: the forecasts
it started with, even if the teacher runs have moved away since (a teacher whose ``best.pt``
changed since is refused).

A teacher of quantile runs forecasts its median (:func:`gwnet.engine.forecast`), so a
student of a quantile ensemble learns the median.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..atomic import atomic_path, atomic_write_text
from ..config import Config
from ..data import TrafficData, load_data
from ..engine import RunResult, resolve_device, run_finished
from ..engine import train as engine_train
from ..engine.checkpoint import RunDir
from ..engine.metrics import MetricAccumulator
from ..errors import GWNetError, file_error
from ..paths import is_temporary
from ..registry import STRATEGIES
from .combine import Ensemble
from .members import WINDOW_FIELDS, Member, check_compatible, load_member, load_members, member_names
from .report import fit_on_validation

CACHE_DIR = "teacher-cache"
# The splits whose windows the teacher forecasts: never the test split.
CACHED_SPLITS = ("train", "val")
CACHE_VERSION = 1


def train(cfg: Config, data: TrafficData | None = None, resume: bool = False, **kw) -> RunResult:
    """Train ``cfg`` as :func:`gwnet.engine.train` does; with ``train.teacher``, against the
    teachers' forecasts as ``train.distill_mode`` says. Every check of the teachers runs
    before anything is written."""
    if not cfg.train.teacher:
        return engine_train(cfg, data, resume=resume, **kw)
    cfg = copy.deepcopy(cfg).validate()
    t = cfg.train
    if t.fsdp:
        raise GWNetError("train.teacher: distillation runs in one process (no --fsdp)")
    if getattr(cfg.model, "quantiles", None):
        raise GWNetError("train.teacher: the student learns the teachers' point forecasts; train it without "
                         "model.quantiles")
    STRATEGIES.get_entry(t.teacher_strategy, hint=" (train.teacher_strategy)")
    # config.json records where the teachers are, whatever directory a resume runs from.
    t.teacher = [str(Path(p).resolve()) for p in t.teacher]
    if data is None:
        data = load_data(cfg.data, memmap=True if t.memmap else None)
    cfg.resolve(num_nodes=data.num_nodes)
    teachers = TeacherForecasts(cfg, data)
    if not teachers.cached(RunDir(cfg.out).root / CACHE_DIR):
        teachers.load(resolve_device(t.device))
    return engine_train(cfg, data, resume=resume, extra_targets=teachers, **kw)


def check_teacher_runs(paths: Sequence[str | Path]) -> None:
    """Each teacher must be a finished run directory: one line naming the first that is not."""
    for path in map(Path, paths):
        if path.is_file():
            raise file_error(path, "is a file; a teacher is a run directory of gwnet-train")
        if not path.is_dir():
            raise file_error(path, "no such teacher run directory")
        if not RunDir(path).best.exists():
            raise file_error(path, "is not a finished run (no best.pt); a teacher must have finished training")
        if not run_finished(path):
            raise file_error(path, "is not a finished run (its training has not finished: resume it first)")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TeacherForecasts:
    """The teacher ensemble's forecasts of a student's training and validation windows
    (:class:`gwnet.engine.distill.ExtraTargets`)."""

    def __init__(self, cfg: Config, data: TrafficData):
        self.cfg, self.data = cfg, data
        self.paths = [Path(p) for p in cfg.train.teacher]
        self.strategy = cfg.train.teacher_strategy
        self.ensemble: Ensemble | None = None
        self.arrays: dict[str, np.ndarray] = {}

    # --- what the cache must hold ---------------------------------------------------------
    def identity(self) -> dict:
        """What the cached forecasts depend on, besides the teachers' weights."""
        d, w = self.cfg.data, self.data.windows
        return {"version": CACHE_VERSION, "teachers": [str(p) for p in self.paths], "strategy": self.strategy,
                "horizon": d.horizon, "seq_len": d.seq_len, "first_offset": d.first_offset,
                "sensors": len(self.data.sensor_ids),
                "sensor_digest": hashlib.sha256("\n".join(self.data.sensor_ids).encode()).hexdigest(),
                "splits": {s: [w[s].start, w[s].stop] for s in CACHED_SPLITS}}

    def shape(self, split: str) -> tuple[int, int, int]:
        return (len(self.data.windows[split]), self.cfg.data.horizon, self.data.num_nodes)

    def cached(self, root: Path) -> bool:
        """Whether ``root`` holds the complete cache of these teachers for these windows; if so
        its arrays are opened (memory-mapped) and a teacher whose weights changed is refused."""
        meta_path = root / "teacher.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(meta, dict) or meta.get("identity") != self.identity():
            return False
        arrays = {}
        for split in CACHED_SPLITS:
            try:
                array = np.load(root / f"{split}.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError):
                return False
            if array.shape != self.shape(split) or array.dtype != np.float32:
                return False
            arrays[split] = array
        for path, digest in zip(self.paths, meta.get("digests", [])):
            best = RunDir(path).best
            if best.is_file() and file_digest(best) != digest:
                raise file_error(best, f"changed since this run cached its forecasts in {root}; train into "
                                 "another --out to distil from the new teacher")
        self.arrays = arrays
        return True

    # --- the teachers -----------------------------------------------------------------------
    def load(self, device: torch.device) -> None:
        """Load the teachers, check them against the student's data and fit their ensemble as
        gwnet-predict does (on the validation windows of the data windowed for them)."""
        check_teacher_runs(self.paths)
        # Their configs first: a teacher of other windows, step or horizons is named before any
        # data are read for it.
        self._check_configs([(p, Config.load(RunDir(p).config)) for p in self.paths])
        d = self.cfg.data
        source = {name: getattr(d, name) for name in ("dataset", "data", "adj", "key") if getattr(d, name)}
        members, teacher_data = load_members(self.paths, device, **source)
        self._check(members, teacher_data)
        # gwnet-predict's default batch size
        self.ensemble = fit_on_validation(Ensemble(members, self.strategy), teacher_data,
                                          members[0].config.train.batch_size)

    def _check_configs(self, configs: list[tuple[Path, Config]]) -> None:
        """Each teacher reads the student's input windows of readings of the same step, and
        together they cover the student's horizons."""
        d, step = self.cfg.data, self.data.config.step_minutes
        for path, cfg in configs:
            for name in WINDOW_FIELDS:
                theirs, ours = getattr(cfg.data, name), getattr(d, name)
                if theirs is not None and ours is not None and theirs != ours:
                    raise file_error(path, f"{name} is {theirs!r} there but {ours!r} in this run; a teacher must "
                                     "read the student's input windows")
            theirs = cfg.data.step_minutes
            if theirs is not None and step is not None and theirs != step:
                raise file_error(path, f"was trained on {theirs}-minute readings, this run's data are "
                                 f"{step}-minute")
        longest, cfg = max(configs, key=lambda pc: pc[1].data.horizon)
        if d.horizon > cfg.data.horizon:
            raise file_error(longest, f"the teachers forecast {cfg.data.horizon} horizons, this run asks for "
                             f"{d.horizon}: a student may not forecast further than its teachers")

    def _check(self, members: list[Member], teacher_data: TrafficData) -> None:
        data = self.data
        first = members[0]
        for m in members:
            if m.sensor_ids != data.sensor_ids:
                n, k = len(m.sensor_ids), len(data.sensor_ids)
                what = f"{n} sensors, the data {k}" if n != k else "the same number of sensors, other ids or order"
                raise file_error(m.source, f"was trained on other sensors than this run's data ({what})")
        ours, theirs = data.series.speeds, teacher_data.series.speeds
        if ours.shape != theirs.shape or not torch.equal(ours, theirs):
            raise file_error(first.source, f"its data ({teacher_data.source}) are not this run's readings "
                             f"({data.source}); train the student on the teachers' data")

    # --- the trainer's hook -----------------------------------------------------------------
    def prepare(self, trainer) -> None:
        """Open the run directory's cache, or compute and write it (main process)."""
        root = trainer.run.root / CACHE_DIR
        if self.cached(root):
            return
        if self.ensemble is None:  # a resumed run whose cache is gone: compute it again
            self.load(trainer.device)
        if trainer.is_main:
            self._write(root)
        self.ensemble = None  # the teachers are not needed once their forecasts are cached
        if not self.cached(root):
            raise file_error(root, "the teacher's forecasts could not be cached")

    def _write(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.iterdir():  # gwnet's own temporaries, left by a run killed while writing
            if is_temporary(stale.name) and not stale.is_dir():
                stale.unlink(missing_ok=True)
        meta = {"identity": self.identity(),
                "digests": [file_digest(RunDir(p).best) for p in self.paths],
                "ensemble": self.ensemble.describe()}
        for split in CACHED_SPLITS:
            with atomic_path(root / f"{split}.npy") as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=self.shape(split))
                for positions, forecast in self.forecasts(split):
                    out[positions.numpy()] = forecast.numpy()
                out.flush()
                del out  # the map is closed before atomic_path syncs and renames the file
        atomic_write_text(root / "teacher.json", json.dumps(meta, indent=2) + "\n")

    def forecasts(self, split: str):
        """``(positions, (B, H, N) forecasts)`` of ``split``'s windows in order, as gwnet-predict
        computes them: each member reads the windows with its own scaler, the ensemble
        combines them; the student's horizons are kept."""
        if split not in CACHED_SPLITS:
            raise ValueError(f"the teacher never forecasts {split} windows")
        windows = self.data.windows[split]
        ensemble = self.ensemble
        for positions in torch.arange(len(windows)).split(self.predict_batch_size):
            preds = [m.forward(windows.batch(positions, scaler=m.scaler)[0]) for m in ensemble.members]
            yield positions, ensemble.combine(preds)[:, :self.cfg.data.horizon]

    @property
    def predict_batch_size(self) -> int:
        """Windows per teacher forward pass: gwnet-predict's default (the first teacher's)."""
        return self.ensemble.members[0].config.train.batch_size

    def targets(self, split: str, positions: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.arrays[split][positions.numpy()]))


def score_beside(paths: Sequence[str | Path], ensemble: Ensemble, windows, batch_size: int,
                 device: torch.device) -> dict[str, pd.DataFrame]:
    """Per-horizon metrics (``MetricAccumulator.per_horizon``) of runs scored beside an
    ensemble on the same windows without joining it (``gwnet-predict --beside``: a distilled
    student beside its teachers)."""
    names = member_names(paths)
    taken = {m.name for m in ensemble.members}
    out = {}
    for path, name in zip(paths, names):
        member = load_member(path, device, name if name not in taken else str(Path(path).absolute()))
        check_compatible([ensemble.members[0], member])
        if member.horizon > windows.horizon:
            raise file_error(path, f"forecasts {member.horizon} horizons, the runs it is scored beside "
                             f"{windows.horizon}")
        acc = MetricAccumulator(member.horizon, ensemble.null_value)
        for positions in torch.arange(len(windows)).split(batch_size):
            x, y = windows.batch(positions, scaler=member.scaler)
            acc.update(member.forward(x), y[:, :member.horizon])
        out[member.name] = acc.per_horizon()
    return out
