"""The stage pipeline: what ``gwnet.train(cfg)`` and ``gwnet-train`` run.

A plain run is one stage. With ``train.pretrain_horizon = k`` it is two, as Shleifer et al.
trained their best model: horizons ``1..k`` into ``RUN_DIR/pretrain-hk``, then all horizons
initialised from that stage's best weights into ``RUN_DIR`` (``pipeline.json`` records the
whole pipeline's config). :func:`make_trainer` is the one place that picks the trainer: the
sharded one (:mod:`gwnet.scale`, imported only then) when ``train.fsdp`` asks for it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import pandas as pd

from ..config import Config
from ..data import TrafficData
from ..errors import GWNetError, file_error
from .checkpoint import RunDir, RunLock, load_checkpoint
from .listeners import announce
from .trainer import RunResult, Trainer


def make_trainer(cfg: Config, data: TrafficData | None = None, **kw) -> Trainer:
    """The trainer for ``cfg``: over torchrun's processes with ``train.fsdp`` (inside
    :func:`gwnet.scale.distributed`), else in this process. ``kw`` goes to the Trainer."""
    if cfg.train.fsdp:
        from ..scale.trainer import ShardedTrainer  # FSDP and the process group only when asked for

        return ShardedTrainer(cfg, data, **kw)
    return Trainer(cfg, data, **kw)


def _on_main_process(cfg: Config, step: Callable[[], None]) -> None:
    """``step()`` on the main process only; in a sharded run the other processes stop with its
    error rather than wait for it in a collective."""
    if not cfg.train.fsdp:
        step()  # several processes without --fsdp are refused at launch
        return
    from ..scale.world import current_world

    def attempt() -> str | None:
        try:
            step()
        except GWNetError as exc:
            return str(exc)
        return None

    error = current_world().from_main(attempt)
    if error is not None:
        raise GWNetError(error)


def _say(cfg: Config, message: str) -> None:
    """A stage header on the main process (``train.progress`` only hides the progress bar)."""
    if cfg.train.fsdp:
        from ..scale.world import is_main_process

        if not is_main_process():
            return
    announce(message)


def run_finished(run_dir: str | Path) -> bool:
    """Whether a run directory holds a finished run with its test metrics."""
    rd = RunDir(run_dir)
    if not rd.last.exists():
        return False
    return bool(load_checkpoint(rd.last, kind="last").get("finished")) and rd.test_metrics.exists()


def _run_stage(cfg: Config, data: TrafficData | None, **kw) -> RunResult:
    """Run, resume or (when complete) reload one stage: its trainer continues what is there,
    starts when there is nothing of a run, and refuses a stage that lost its ``last.pt``."""
    rd = RunDir(cfg.out)
    if run_finished(rd.root):
        state = load_checkpoint(rd.last, kind="last")
        return RunResult(rd.root, state["best_epoch"], state["best_val_mae"],
                         pd.read_csv(rd.test_metrics, index_col=0), pd.DataFrame(state["history"]))
    return make_trainer(cfg, data, resume=True, **kw).fit()


def train(cfg: Config, data: TrafficData | None = None, resume: bool = False, **kw) -> RunResult:
    """Train as ``cfg`` says; with ``train.pretrain_horizon`` first pretrain, then finetune.

    ``resume=True`` continues whatever stage was interrupted. ``kw`` goes to the Trainer
    (``model``, ``loss_fn``, ``listeners``).
    """
    cfg = copy.deepcopy(cfg)
    k = cfg.train.pretrain_horizon
    if k is None:
        return make_trainer(cfg, data, resume=resume, **kw).fit()
    cfg.validate().resolve()
    run = RunDir(cfg.out)
    pre = copy.deepcopy(cfg)
    pre.out = str(run.pretrain(k).root)
    pre.data.horizon = k
    pre.train.pretrain_horizon = None
    # The main process holds the run directory for the whole pipeline (its stages' trainers
    # take the same lock again), so a second process is refused before it writes anything.
    lock = RunLock(run)

    def open_pipeline() -> None:
        lock.acquire()
        try:
            if resume and run_finished(run.root):
                raise file_error(cfg.out, "run already finished; nothing to resume")
            if not resume and (run.holds_run() or run.pretrain(k).holds_run()):
                raise file_error(cfg.out, "already holds a run; resume it with --resume or choose another --out")
            run.check_writable()
            cfg.save(run.pipeline)
        except BaseException:
            lock.release()
            raise

    _on_main_process(cfg, open_pipeline)
    try:
        # Once the finetuning stage has a checkpoint, pretraining is over and no longer needed.
        if not run.last.exists():
            _say(cfg, f"stage 1/2: pretraining horizons 1-{k} into {pre.out}")
            _run_stage(pre, None if data is None else _with_horizon(data, k), **kw)
        else:
            _say(cfg, f"stage 1/2: pretraining horizons 1-{k} done ({pre.out})")
        fine = copy.deepcopy(cfg)
        fine.train.init_from = pre.out
        _say(cfg, f"stage 2/2: finetuning horizons 1-{cfg.data.horizon} from {pre.out} into {cfg.out}")
        return _run_stage(fine, data, **kw)
    finally:
        lock.release()


def _with_horizon(data: TrafficData, horizon: int) -> TrafficData:
    cfg = copy.deepcopy(data.config)
    cfg.horizon = horizon
    return TrafficData.from_frames(data.speeds, data.graph, cfg, source=data.source, protocol=data.protocol)
