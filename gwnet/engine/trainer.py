"""The training loop: masked-MAE training, validation, early stopping, checkpoints, resume.

:class:`Trainer` runs one stage (one horizon count) of any registered model into one run
directory; :mod:`gwnet.engine.pipeline` chains stages (pretrain, then finetune) and picks
the sharded trainer. Researchers can pass their own ``model`` (build it through a registered
model for the run to be reloadable), ``loss_fn`` or ``listeners``.

Resume is exact on CPU: ``last.pt`` holds the optimizer, scheduler, both random states and
the early-stopping counters, and an interrupted epoch's batch order and position.

:class:`gwnet.scale.trainer.ShardedTrainer` (``train.fsdp``) fills in the hooks below (the
rank's share of a batch, sums over processes, sharded state); here they are those of a
single process.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..config import Config, fields_with_role, read_config_file
from ..data import TrafficData, load_data
from ..errors import GWNetError, file_error
from ..models import build_model_from_config, model_spec
from ..nn import load_for_more_horizons
from .checkpoint import RunDir, RunLock, load_checkpoint, save_checkpoint
from .schema import STARTED_FROM, check_agreement, check_optimizer_state
from .allocator import apply_policy as apply_malloc, largest_activation_bytes
from .device import autocast, check_precision, place, resolve_device
from .listeners import EpochListener, announce, make_listeners
from .distill import ExtraTargets, batch_loss
from .metrics import MetricAccumulator, masked_mae
from .step import (Forecaster, GraphedStep, StepResult, StepStats, TrainStep, bf16_advice, device_windows,
                   graphs_decision, portable_optimizer_state, series_fits, windows_with_targets)
from .step import plain as plain_tensor
from .shrink import shrink_from_run
from .quantiles import pinball_loss_fn, point_forecast

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
# nan_policy stop reads whether a step was finite every this many batches (and at the end of
# an epoch): one synchronisation per 200 steps bounds the steps wasted after a non-finite one.
FINITE_CHECK_BATCHES = 200
# Model options that may differ between a pretrained run and the run initialised from it.
INIT_FREE_ROLES = ("output", "regularization", "kernel")


def stamp_data_options(cfg: Config, data: TrafficData) -> None:
    """Write what the data and its protocol decided (split, target, unit, step, the protocol's
    description, the forecast clamp) into ``cfg``, so that ``config.json`` states them."""
    for f in dataclasses.fields(cfg.data):
        if getattr(cfg.data, f.name) is None and getattr(data.config, f.name) is not None:
            setattr(cfg.data, f.name, getattr(data.config, f.name))
    if cfg.train.clamp_max is None:
        cfg.train.clamp_max = data.clamp_max
    clamp = cfg.train.clamp_max if cfg.train.clamp_max is not None and math.isfinite(cfg.train.clamp_max) else None
    cfg.data.protocol = data.protocol.describe(cfg.data.train_ratio, cfg.data.test_ratio, cfg.data.target,
                                               cfg.data.unit, cfg.data.step_minutes, clamp,
                                               cfg.data.seq_len, cfg.data.horizon)


class Interrupted(Exception):
    """Raised after SIGINT/SIGTERM once ``last.pt`` holds the exact position to resume from."""


def build_model(cfg: Config, data: TrafficData) -> torch.nn.Module:
    """A fresh model of ``cfg.arch`` for ``data``'s graph, seeded by ``cfg.train.seed``."""
    torch.manual_seed(cfg.train.seed)
    return build_model_from_config(cfg, data.supports())


@dataclass
class RunResult:
    """What a finished run produced; the same numbers are in its run directory."""

    run_dir: Path
    best_epoch: int
    best_val_mae: float
    test_metrics: pd.DataFrame
    history: pd.DataFrame = field(repr=False)


@dataclass
class _Progress:
    """Everything besides weights that must survive an interruption."""

    epoch: int = 0
    best_val_mae: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False
    history: list = field(default_factory=list)
    partial: dict | None = None  # an interrupted epoch: batch order, next batch, sums so far


class Trainer:
    """Train ``cfg`` into ``cfg.out``; ``resume=True`` continues the run found there (or
    starts one where there is nothing of a run, and refuses a run that lost its ``last.pt``).

    The main process holds the run directory's lock (:class:`~gwnet.engine.checkpoint.RunLock`)
    from construction to the end of :meth:`fit` (or :meth:`close`): another process that
    would train into the same directory is refused before it writes anything."""

    # Processes that share each batch; only the first writes files and prints.
    world_size = 1
    is_main = True
    sharded = False  # True for gwnet.scale.trainer.ShardedTrainer

    def __init__(self, cfg: Config, data: TrafficData | None = None, model: torch.nn.Module | None = None,
                 loss_fn: LossFn = masked_mae, resume: bool = False,
                 listeners: Sequence[EpochListener] = (), extra_targets: ExtraTargets | None = None):
        cfg.validate()
        if cfg.train.teacher and extra_targets is None:
            raise GWNetError("train.teacher: a run with teachers trains through gwnet.ensemble.distill.train "
                             "(gwnet-train does), which gives the trainer the teachers' forecasts")
        # Targets beside the readings (a teacher's forecasts), gwnet.engine.distill.
        self.extra_targets = extra_targets
        if cfg.train.fsdp and not self.sharded:
            raise GWNetError("train.fsdp needs the sharded trainer: use gwnet.train(cfg) or "
                             "gwnet.engine.make_trainer(cfg) under torchrun")
        self.cfg = cfg
        self.data = data if data is not None else load_data(cfg.data, memmap=True if cfg.train.memmap else None)
        cfg.resolve(num_nodes=self.data.num_nodes)
        stamp_data_options(cfg, self.data)
        self.run = RunDir(cfg.out)
        # The run directory is this trainer's, from here to the end of fit() (or close()).
        self._lock: RunLock | None = None
        self._resume_state: dict | None = None
        self._open_run(resume)
        try:
            self._set_up(cfg, model, loss_fn, resume, listeners)
        except BaseException:
            self.close()
            raise

    def _set_up(self, cfg: Config, model: torch.nn.Module | None, loss_fn: LossFn, resume: bool,
                listeners: Sequence[EpochListener]) -> None:
        self.device = resolve_device(cfg.train.device)
        check_precision(self.device, cfg.train.precision)
        local_batch = -(-cfg.train.batch_size // self.world_size)
        self.reuses_memory = apply_malloc(
            cfg.train.malloc, self.device, cfg.train.activation_checkpointing,
            largest_activation_bytes(cfg.model, cfg.data.seq_len, self.data.num_nodes, local_batch))
        if model is None:
            self._check_memory(None)  # counted on the meta device: too big is refused before it is allocated
            model = build_model(cfg, self.data)
        else:
            self._check_memory(model)
        self.kernel_choice = place(model, self.device)  # printed when fit() starts
        # A run killed before its first checkpoint has nothing to restore: it starts over
        # (_open_run refused one that had trained and lost its last.pt).
        resume = resume and self.run.last.exists()
        if cfg.train.init_from and not resume:
            init_from_run(model, cfg, self.data, cfg.train.init_from)
        if cfg.train.shrink_from and not resume:
            shrink_from_run(model, cfg, self.data, cfg.train.shrink_from)
        self.model = self._prepare_model(model)
        if cfg.model.quantiles and loss_fn is masked_mae:  # a quantile head learns by the pinball loss
            loss_fn = pinball_loss_fn(cfg.model.quantiles)
        self.loss_fn = loss_fn
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.train.lr_decay)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.progress = _Progress()
        self._stop_signal: int | None = None
        self._graphs()  # --cuda-graphs on where they cannot work: refused before anything is written
        if resume:
            self._restore()
        elif self.is_main:
            cfg.save(self.run.config)
        if self.extra_targets is not None:
            self.extra_targets.prepare(self)
        # Only the main process reports; its listeners are built last, so that a logger that
        # cannot start (a missing package) fails before any training.
        self.listeners: list[EpochListener] = [*make_listeners(self), *listeners] if self.is_main else []

    def _check_memory(self, model: torch.nn.Module | None) -> None:
        """Estimate the memory of a training step (:mod:`gwnet.engine.memory`; :meth:`fit`
        prints it on the main process with ``train.progress``) and refuse, with one line, a run
        it says cannot fit: within ``train.memory_limit_gb``, or when that is ``None`` the
        memory available now (MemAvailable, shared by the processes of the machine; on CUDA
        the GPU's free memory)."""
        from .memory import estimate, memory_limit

        t = self.cfg.train
        params = None if model is None else sum(p.numel() for p in model.parameters() if p.requires_grad)
        series = self.data.series
        # A memory-mapped series is shared page cache; on a GPU the series is copied there
        # when it fits (gwnet.engine.step.series_fits), else it stays in host memory.
        if self.device.type == "cuda":
            series_bytes = series.nbytes if series_fits(series.nbytes, self.device) else 0
        else:
            series_bytes = 0 if getattr(series, "memmapped", False) else series.nbytes
        local_batch = -(-t.batch_size // self.world_size)
        est = estimate(self.cfg, self.data.num_nodes, local_batch, parameters=params,
                       series_bytes=series_bytes, shards=self.world_size if self.sharded else 1)
        self.memory_estimate = est  # fit() prints it (here a later error would not be one line)

        def decide() -> str | None:
            limit = memory_limit(t.memory_limit_gb, self.device)
            if limit is not None and t.memory_limit_gb is None and self.device.type != "cuda":
                # The processes of a machine share its available memory.
                limit /= max(int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)), 1)
            reason = est.refusal(limit) if limit is not None else None
            if reason is not None and self.world_size > 1:
                reason += f" (per process, {self.world_size} processes)"
            return reason

        # Sharded: the main process decides for all (the memory each one finds may differ),
        # so that every process stops together rather than some waiting in a collective.
        world = getattr(self, "world", None)
        reason = world.from_main(decide) if self.world_size > 1 and world is not None else decide()
        if reason is not None:
            raise GWNetError(reason)

    def _open_run(self, resume: bool) -> None:
        """On the main process: lock the run directory (a second process training into it is
        refused), and check that this run may write there, before anything is written."""
        if not self.is_main:
            return
        lock = RunLock(self.run).acquire()
        try:
            if not resume and self.run.holds_run():
                raise file_error(self.run.root, "already holds a run; resume it with --resume or choose another --out")
            if resume:
                self.run.check_resumable()
                if self.run.last.exists():
                    self._resume_state = load_checkpoint(self.run.last, map_location="cpu", kind="last")
                    raw = read_config_file(self.run.config) if self.run.config.exists() else self.cfg.to_dict()
                    check_agreement(self.run.config, raw, self.run.last, self._resume_state, self.cfg,
                                    free=STARTED_FROM)
            self.run.check_writable()
            self.run.remove_stale_temporaries()
        except BaseException:
            lock.release()
            raise
        self._lock = lock

    def close(self) -> None:
        """Unlock the run directory (fit() does when it ends; a trainer that is not fitted
        holds it until this, or until the process exits)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- hooks: one process here, several in gwnet.scale.trainer.ShardedTrainer -------------
    def _prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as training uses it (sharded over processes, or as it is; with
        ``train.activation_checkpointing`` each residual layer recomputes in backward)."""
        if self.cfg.train.activation_checkpointing:
            from ..scale.backbone import checkpoint_layers

            if not checkpoint_layers(model):
                warnings.warn(f"activation_checkpointing: the {self.cfg.arch} model has no residual layers "
                              "(model.layers) to recompute; training without it")
        return model

    def _share(self, positions: torch.Tensor) -> torch.Tensor:
        """This process's windows of a batch."""
        return positions

    def _global_loss(self, loss: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss of the whole batch, what this process back-propagates)``."""
        return loss, loss

    def _update_metrics(self, acc: MetricAccumulator, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch to ``acc``, whose sums cover the whole batch."""
        acc.update(pred, target)

    def _stop_requested(self) -> bool:
        """Whether a signal asks to stop after this batch."""
        return self._stop_signal is not None

    def _model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict (on the main process)."""
        return self.model.state_dict()

    def _load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def _training_state(self) -> dict:
        """What ``last.pt`` needs besides the model and the progress to resume exactly."""
        state = {"optimizer": portable_optimizer_state(self.optimizer), "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":  # dropout draws on the device's generator
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def _load_training_state(self, state: dict) -> None:
        if "sharded" in state:
            raise file_error(self.run.last, "was written by a sharded run; resume it under torchrun with --fsdp")
        self._load_model_state(state["model"])
        check_optimizer_state(self.run.last, state["optimizer"], self.optimizer)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    # --- checkpoints ---------------------------------------------------------------------
    def _model_payload(self) -> dict:
        # The graph travels with the weights so a run predicts without its original files.
        return {"config": self.cfg.to_dict(), "model": self._model_state(),
                "scaler": self.data.scaler.to_dict(), "sensor_ids": self.data.sensor_ids,
                "adjacency": torch.from_numpy(self.data.graph.adj)}

    def _save_last(self) -> None:
        p = self.progress
        payload = {**self._model_payload(), **self._training_state(),
                   "scheduler": self.scheduler.state_dict(), "shuffle_rng": self.generator.get_state(),
                   "epoch": p.epoch, "best_val_mae": p.best_val_mae, "best_epoch": p.best_epoch,
                   "bad_epochs": p.bad_epochs, "finished": p.finished, "history": p.history,
                   "partial": p.partial}
        if self.is_main:
            save_checkpoint(self.run.last, payload, kind="last")

    def _restore(self) -> None:
        # Read and checked (against config.json too) by _open_run on the main process.
        state, self._resume_state = self._resume_state, None
        if state is None:
            state = load_checkpoint(self.run.last, map_location="cpu", kind="last")
        if state["sensor_ids"] != self.data.sensor_ids:
            raise file_error(self.run.last, "was trained on other sensors than the data given")
        finished = bool(state.get("finished"))
        if finished and self.run.test_metrics.exists():
            raise file_error(self.run.root, "run already finished; nothing to resume")
        if state["best_epoch"] and not self.run.best.exists():
            what = "its test metrics cannot be recomputed" if finished else "it cannot be resumed exactly"
            raise file_error(self.run.best, f"is missing (epoch {state['best_epoch']} was the best), so {what}; "
                             "nothing was changed")
        # A finished run only computes its test metrics again, from best.pt: it trains no more,
        # so nothing else of last.pt is needed (a sharded run's shards may be gone).
        if not finished:
            partial = state["partial"]
            if partial is not None and len(partial["order"]) != len(self.data.windows["train"]):
                raise file_error(self.run.last, f"partial 'order' covers {len(partial['order'])} windows, the "
                                 f"data's training split {len(self.data.windows['train'])}")
            try:
                self._load_training_state(state)
                self.scheduler.load_state_dict(state["scheduler"])
                self.generator.set_state(state["shuffle_rng"])
            except GWNetError:
                raise
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
                reason = " ".join(str(exc).split())[:160]
                raise file_error(self.run.last, f"training state does not fit this run ({reason})") from None
        self.progress = _Progress(epoch=state["epoch"], best_val_mae=state["best_val_mae"],
                                  best_epoch=state["best_epoch"], bad_epochs=state["bad_epochs"],
                                  history=list(state["history"]), partial=state["partial"],
                                  finished=bool(state.get("finished")))

    # --- the loop ------------------------------------------------------------------------
    @contextmanager
    def _catch_signals(self) -> Iterator[None]:
        """Turn SIGINT/SIGTERM into a clean stop at the next batch boundary."""
        def handler(signum, frame):
            self._stop_signal = signum

        try:
            previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.cfg.train.precision):
            out = self.model(x.to(self.device, non_blocking=True))
        return self.data.scaler.inverse_transform(out.float())

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch on the training device (see :mod:`gwnet.engine.step`): batches gathered
        there from a batch order moved once, losses, gradient norms and metrics summed
        there and read once at the end (``nan_policy="skip"`` reads each step's)."""
        t, p = self.cfg.train, self.progress
        windows = self.data.windows["train"]
        on_device = self._device_windows()["train"]
        if p.partial is not None:
            order, start, sums = p.partial["order"], p.partial["next_batch"], p.partial["sums"]
            grads = list(p.partial["grads"])
        else:
            order, start, sums = torch.randperm(len(windows), generator=self.generator), 0, None
            grads = [0.0, 0.0, 0, 0]  # sum, max, count of gradient norms (before clipping); empty batches
        grads += [0] * (4 - len(grads))  # an interrupted epoch of a gwnet that did not count empty batches
        # A last batch too small to give every process a window is left out.
        batches = [b for b in order.split(t.batch_size) if len(b) >= self.world_size]
        if t.batches_per_epoch is not None:
            batches = batches[: t.batches_per_epoch]
        device_batches = order.to(on_device.series.speeds.device).split(t.batch_size)
        # The sharded trainer sums its metrics over processes on the CPU.
        acc = MetricAccumulator(self.cfg.data.horizon, t.null_value,
                                device="cpu" if self.sharded else self.device)
        if sums is not None:
            acc.sums = sums.to(acc.sums.device)
        stats = StepStats(self.device, grads)
        with_targets = self._windows_with_targets()
        step = self._step_fn()
        deferred = t.nan_policy == "stop"
        self.model.train()
        bar = tqdm(total=len(batches), initial=start, desc=f"epoch {epoch}/{t.epochs}", unit="batch",
                   leave=False, dynamic_ncols=True,
                   # None: a bar on terminals only, so logs keep just the per-epoch lines.
                   disable=None if t.progress and self.is_main else True)
        for b in range(start, len(batches)):
            positions = self._share(batches[b])
            if not bool(with_targets[batches[b]].any()):
                # Every target missing: no loss to learn from, so no step (Adam would still move
                # the weights by its momentum and weight decay). Counted in the epoch's record.
                stats.empty += 1
                bar.update()
                if self._stop_requested():
                    self._interrupt(epoch, order, b, acc, stats, bar)
                continue
            x, y = on_device.batch(self._share(device_batches[b]))
            self._positions = positions  # what the loss of this batch needs of the host (a teacher's targets)
            if deferred:
                out = step(x, y)
                stats.add(b, out)
                if (b + 1) % FINITE_CHECK_BATCHES == 0:
                    self._check_finite(stats, epoch)
            else:
                out = self._step_or_skip(step, x, y, epoch, b)
                if out is not None:
                    stats.add(b, out)
            if out is not None:
                self._update_metrics(acc, point_forecast(out.pred, self.cfg.model.quantiles), y)
                if not bar.disable and b % 20 == 0:  # a terminal's bar: one read every 20 batches
                    bar.set_postfix(loss=f"{out.loss.item():.3f}", refresh=False)
            bar.update()
            if self._stop_requested():
                self._interrupt(epoch, order, b, acc, stats, bar)
        bar.close()
        self._check_finite(stats, epoch)
        p.partial = None
        grads = stats.values()
        if grads[3]:
            warnings.warn(f"epoch {epoch}: {grads[3]} of {len(batches)} training batches had no valid "
                          "target reading and were skipped")
        return {**acc.overall(), "grad_norm": grads[0] / max(grads[2], 1), "grad_norm_max": grads[1],
                "empty_batches": grads[3]}

    # --- the step on the device (gwnet.engine.step) ----------------------------------------
    def _batch_loss(self, pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss of the whole batch, what this process back-propagates)`` of the current batch."""
        return self._global_loss(batch_loss(self, pred, y, self._positions), y)

    def _graphs(self) -> tuple[bool, str]:
        """Whether the step and the forecast run as CUDA graphs (``train.cuda_graphs``)."""
        if getattr(self, "_graph_decision", None) is None:
            t = self.cfg.train
            decision = graphs_decision(t.cuda_graphs, self.device, nan_policy=t.nan_policy, sharded=self.sharded,
                                       optimizer=t.optimizer, activation_checkpointing=t.activation_checkpointing)
            if decision[0] and self.extra_targets is not None:
                if t.cuda_graphs == "on":
                    raise GWNetError("--cuda-graphs on: a teacher's targets are gathered on the host per batch")
                decision = (False, "off (a teacher's targets are gathered on the host per batch)")
            self._graph_decision = decision
        return self._graph_decision

    def _step_fn(self):
        """The training step: a :class:`~gwnet.engine.step.GraphedStep` of the full batch shape
        with CUDA graphs (captured at its first batch; other shapes run eagerly), else the
        plain :class:`~gwnet.engine.step.TrainStep`."""
        if getattr(self, "_step", None) is None:
            self._step = TrainStep(self.model, self.optimizer, self._forward, self._batch_loss, self.cfg.train.clip)
        if not self._graphs()[0]:
            return self._step
        plain = self._step

        def run(x: torch.Tensor, y: torch.Tensor):
            graphed = getattr(self, "_graphed", None)
            if graphed is None and len(x) == -(-self.cfg.train.batch_size // self.world_size):
                graphed = self._graphed = GraphedStep(plain, x, y)
                try:
                    graphed.capture(x, y)
                except Exception as exc:  # a model or loss that cannot be captured (a host read)
                    graphed = self._graphed = self._graphs_failed("training step", exc)
            return graphed(x, y) if graphed and graphed.fits(x, y) else plain(x, y)

        return run

    def _graphs_failed(self, what: str, exc: Exception) -> bool:
        """``--cuda-graphs on``: re-raise; ``auto``: warn and run eagerly (the weights, the
        optimizer and the random state are as before the attempt). Returns ``False``."""
        if self.cfg.train.cuda_graphs == "on":
            raise exc
        reason = " ".join(str(exc).split())[:200]
        warnings.warn(f"CUDA graph capture of the {what} failed ({type(exc).__name__}: {reason}); "
                      "running it eagerly (--cuda-graphs off hides this)")
        return False

    def _step_or_skip(self, step, x: torch.Tensor, y: torch.Tensor, epoch: int, b: int):
        """``nan_policy="skip"``: the step, unless its loss or gradient is not finite (read on
        the host before the optimizer step); ``None`` for a skipped batch."""
        plain = self._step
        pred = self._forward(x)
        loss, objective = self._batch_loss(pred, y)
        self.optimizer.zero_grad(set_to_none=True)
        what = "loss"
        if torch.isfinite(loss):
            objective.backward()
            norm = plain_tensor(torch.nn.utils.clip_grad_norm_(plain.params, plain.clip))
            if torch.isfinite(norm):
                self.optimizer.step()
                return StepResult(loss.detach(), norm, pred.detach())
            what = "gradient"
        warnings.warn(f"non-finite {what} at epoch {epoch}, batch {b + 1}: batch skipped")
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def _check_finite(self, stats: StepStats, epoch: int) -> None:
        """``nan_policy="stop"``: raise for the first non-finite step recorded so far (one read
        of the device). The weights after it are never saved: ``last.pt`` stays the last good
        checkpoint."""
        bad = stats.first_bad()
        if bad is not None:
            b, what = bad
            raise GWNetError(f"non-finite {what} at epoch {epoch}, batch {b + 1}; stopped, the last "
                             f"good checkpoint is {self.run.last} (try a lower --lr or --nan-policy skip)")

    def _device_windows(self) -> dict:
        """The splits' windows gathering on the training device (the series copied there once)."""
        if getattr(self, "_on_device", None) is None:
            self._on_device = device_windows(self.data.windows, self.device)
        return self._on_device

    def _windows_with_targets(self) -> torch.Tensor:
        """Per training window, whether it has a valid target (host bools, computed once)."""
        if getattr(self, "_with_targets", None) is None:
            self._with_targets = windows_with_targets(self.data.windows["train"], self.cfg.train.null_value)
        return self._with_targets

    def _interrupt(self, epoch: int, order: torch.Tensor, b: int, acc: MetricAccumulator, stats: StepStats,
                   bar) -> None:
        """Save the exact position after batch ``b`` of ``epoch`` and stop (a signal asked)."""
        self._check_finite(stats, epoch)
        p = self.progress
        p.partial = {"order": order, "next_batch": b + 1, "sums": acc.sums.cpu(), "grads": stats.values()}
        p.epoch = epoch - 1
        bar.close()
        self._save_last()
        raise Interrupted(f"stopped by signal {self._stop_signal}; resume with "
                          f"gwnet-train --resume {self.run.root}")

    def _say(self, message: str) -> None:
        """A line about what the run does (on the main process; ``train.progress`` only turns
        the progress bar off, so a log still shows what started, resumed and stopped)."""
        if self.is_main:
            announce(message)

    def evaluate(self, split: str = "val") -> MetricAccumulator:
        """Clamped, masked metrics of the current model on a split: the windows gathered on the
        device, the sums kept there and read once (the forecasts of
        :func:`~gwnet.engine.inference.split_metrics`, replayed from a CUDA graph with
        ``train.cuda_graphs``)."""
        t = self.cfg.train
        windows = self._device_windows()[split]
        acc = MetricAccumulator(windows.horizon, t.null_value, device=self.device)
        if getattr(self, "_forecaster", None) is None:
            self._forecaster = Forecaster(self._forecast, self._graphs()[0],
                                          on_failure=lambda exc: self._graphs_failed("forecast", exc))
        self.model.eval()
        for chunk in torch.arange(len(windows), device=windows.series.speeds.device).split(t.batch_size):
            x, y = windows.batch(chunk, self.data.scaler)
            acc.update(self._forecaster(x), y)
        return acc

    def _forecast(self, x: torch.Tensor) -> torch.Tensor:
        """The clamped point forecast in real units (a quantile model's median of its sorted
        quantiles), on the device."""
        t = self.cfg.train
        out = self._forward(x).clamp(t.clamp_min, t.clamp_max)
        return point_forecast(out.sort(dim=2).values if out.dim() == 4 else out, self.cfg.model.quantiles)

    def fit(self) -> RunResult:
        try:
            for listener in self.listeners:
                listener.on_fit_start(self)
            return self._fit()
        finally:
            try:
                for listener in self.listeners:
                    listener.close()
            finally:
                self.close()

    def _fit(self) -> RunResult:
        t, p = self.cfg.train, self.progress
        # A run killed after its last epoch but before its test metrics only needs _finish().
        epochs = range(p.epoch + 1, t.epochs + 1) if not p.finished else range(0)
        if p.finished:
            self._say(f"{self.run.root}: training had finished; computing the test metrics")
        elif p.epoch or p.partial is not None:
            where = f", batch {p.partial['next_batch'] + 1}" if p.partial is not None else ", batch 1"
            self._say(f"resuming at epoch {p.epoch + 1} of {t.epochs}{where} ({self.run.root})")
        if not p.finished:
            self._say(self.data.graph.describe())
            if self.kernel_choice:
                self._say(self.kernel_choice)
            if self.device.type == "cuda":
                self._say(f"CUDA graphs: {self._graphs()[1]}")
            advice = bf16_advice(self.device, t.precision, self._graphs()[0])
            if advice:
                warnings.warn(advice)
            est = self.memory_estimate
            self._say(est.describe() + (f" per process ({self.world_size} processes)" if self.world_size > 1 else ""))
        if not p.finished and not _bar_shown():
            windows = self.data.windows["train"]
            per_epoch = len([b for b in torch.arange(len(windows)).split(t.batch_size) if len(b) >= self.world_size])
            capped = min(per_epoch, t.batches_per_epoch) if t.batches_per_epoch is not None else per_epoch
            self._say(f"training {len(windows)} windows, {capped} batches of {t.batch_size} per epoch, "
                      f"up to {t.epochs} epochs (early stop after {t.patience} without improvement)")
        with self._catch_signals():
            for epoch in epochs:
                started = time.perf_counter()
                lr = float(self.optimizer.param_groups[0]["lr"])  # a tensor in torchao's optimizers
                train = self._train_epoch(epoch)
                val = self.evaluate("val").overall()
                with warnings.catch_warnings():
                    # The schedule follows epochs: an epoch whose batches were all skipped (no
                    # valid target, a non-finite loss) took no optimizer step, and PyTorch's
                    # warning about the order of the two steps does not apply to it.
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                    self.scheduler.step()
                p.epoch = epoch
                improved = val["mae"] < p.best_val_mae
                if improved:
                    p.best_val_mae, p.best_epoch, p.bad_epochs = val["mae"], epoch, 0
                    best = {**self._model_payload(), "epoch": epoch, "val_mae": val["mae"]}
                    if self.is_main:
                        save_checkpoint(self.run.best, best, kind="best")
                else:
                    p.bad_epochs += 1
                seconds = time.perf_counter() - started
                record = {"epoch": epoch, **{(k if k.startswith(("grad", "empty")) else f"train_{k}"): v
                                             for k, v in train.items()},
                          **{f"val_{k}": v for k, v in val.items()}, "lr": lr, "seconds": seconds}
                p.history.append(record)
                p.finished = p.bad_epochs >= t.patience or epoch == t.epochs
                self._save_last()
                for listener in self.listeners:
                    listener.on_epoch_end(self, dict(record), improved)
                if p.finished and epoch < t.epochs:
                    self._say(f"early stop: {p.bad_epochs} epochs without improvement (best epoch "
                              f"{p.best_epoch}, validation MAE {p.best_val_mae:.4f})")
                if p.finished:
                    break
            if not p.finished:  # resumed a run whose last epoch was already done
                p.finished = True
                self._save_last()
        return self._finish()

    def _finish(self) -> RunResult:
        best = load_checkpoint(self.run.best, map_location=self.device, kind="best")
        self._load_model_state(best["model"])
        table = self.evaluate("test").table()
        if self.is_main:
            with atomic_path(self.run.test_metrics) as tmp:
                table.to_csv(tmp)
        return RunResult(self.run.root, self.progress.best_epoch, self.progress.best_val_mae, table,
                         pd.DataFrame(self.progress.history))


def _bar_shown() -> bool:
    """Whether tqdm draws the progress bar (it does on terminals only)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    from ..scale.optim import make_8bit_optimizer

    return make_8bit_optimizer(model, cfg)


def init_from_run(model: torch.nn.Module, cfg: Config, data: TrafficData, run_dir: str | Path) -> None:
    """Start ``model`` from another run's best weights (horizons it lacks stay fresh)."""
    path = RunDir(run_dir).best
    state = load_checkpoint(path, kind="best")
    if state["sensor_ids"] != data.sensor_ids:
        raise file_error(path, "was trained on a different sensor graph than this run's data")
    if state["config"].get("arch", "gwnet") != cfg.arch:
        raise file_error(path, f"holds a {state['config'].get('arch', 'gwnet')} model, this run trains {cfg.arch}")
    theirs = state["config"]["model"]
    ours = cfg.to_dict()["model"]
    free = fields_with_role(cfg.model, *INIT_FREE_ROLES)
    differ = [k for k in ours if k not in free and theirs.get(k) != ours[k]]
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} vs {ours[k]!r}" for k in differ[:3])
        raise file_error(path, f"model does not match this run's ({shown})")
    if theirs["out_dim"] > ours["out_dim"]:
        raise file_error(path, f"has {theirs['out_dim']} horizons, more than this run's {ours['out_dim']}")
    load_for_more_horizons(model, state["model"], str(path), head=model_spec(cfg.arch).horizon_head)
