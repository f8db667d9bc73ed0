"""The Trainer over several processes: its hooks filled in for FSDP2.

Every process reads the same data and draws the same batch order; each takes a contiguous
share of every global batch, so that the batches, and with them the losses, are those of a
single process whatever the number of processes. Batch-norm statistics span the global batch
(:class:`~gwnet.scale.backbone.SyncedBatchNorm`), and each process weights its loss by its
share of the batch's valid readings before FSDP averages the gradients. This assumes the
loss is a mean over the valid readings, as :func:`~gwnet.engine.metrics.masked_mae` is.

Run directory: ``best.pt``, ``metrics.csv`` and ``test_metrics.csv`` are those of a
single-process run (only rank 0 writes). ``last.pt`` holds the consolidated model and the
progress, and names the ``torch.distributed.checkpoint`` directory with the sharded model
and optimizer that ``--resume`` loads, on any number of processes: ``last-shards-a`` and
``-b`` in turn, the older removed only once ``last.pt`` names the newer, so that a kill
during a save leaves a whole checkpoint.
"""
from __future__ import annotations

import shutil
import warnings
from typing import Sequence

import torch
import torch.distributed as dist

from ..config import Config
from ..data import TrafficData, load_data
from ..engine.metrics import MetricAccumulator, masked_mae, valid_mask
from ..engine.checkpoint import RunDir
from ..engine.inference import forecast
from ..engine.listeners import EpochListener
from ..engine.trainer import LossFn, Trainer
from ..errors import GWNetError, file_error
from .backbone import full_model_state, load_full_model_state, load_sharded, save_sharded, shard_model
from .world import current_world

SHARD_DIRS = RunDir.SHARD_DIRS


class ShardedTrainer(Trainer):
    """A :class:`~gwnet.engine.trainer.Trainer` whose model is sharded over the processes of
    :func:`~gwnet.scale.world.distributed`; :func:`gwnet.engine.make_trainer` gives one for a
    config with ``train.fsdp``."""

    sharded = True

    def __init__(self, cfg: Config, data: TrafficData | None = None, model: torch.nn.Module | None = None,
                 loss_fn: LossFn = masked_mae, resume: bool = False, listeners: Sequence[EpochListener] = ()):
        self.world = current_world()
        self.world_size, self.is_main = self.world.size, self.world.is_main
        self._shards: str | None = None
        outs = set(self.world.gather(cfg.out))
        if len(outs) > 1:
            raise GWNetError(f"the processes name different run directories ({', '.join(map(str, outs))}); "
                             "pass --out")
        if data is None:
            # Rank 0 first: it generates a missing synthetic dataset once, the others read it.
            if self.is_main:
                data = load_data(cfg.data, memmap=True if cfg.train.memmap else None)
            self.world.barrier()
            if data is None:
                data = load_data(cfg.data, memmap=True if cfg.train.memmap else None)
        super().__init__(cfg, data, model, loss_fn, resume, listeners)

    def _open_run(self, resume: bool) -> None:
        # Rank 0 alone locks and checks the run directory; the others stop with its error
        # rather than wait for it in a collective.
        def attempt() -> str | None:
            try:
                super(ShardedTrainer, self)._open_run(resume)
            except GWNetError as exc:
                return str(exc)
            return None

        error = self.world.from_main(attempt)
        if error is not None:
            raise GWNetError(error)

    def _prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        t = self.cfg.train
        model = shard_model(model, self.world, t.precision, t.activation_checkpointing)
        # Every process built the same weights from one seed; dropout masks must differ.
        torch.manual_seed(t.seed + 1 + self.world.rank)
        return model

    def _share(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.tensor_split(self.world.size)[self.world.rank]

    def _global_loss(self, loss: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = valid_mask(target, self.cfg.train.null_value).sum()
        sums = self.world.all_sum(torch.stack([loss.detach().double() * count, count.double()]))
        total = sums[1].clamp(min=1)
        # FSDP averages gradients over the processes: a share's weight is its part of the
        # batch's valid readings, times the number of processes.
        weight = (self.world.size * count / total).to(loss.dtype)
        return (sums[0] / total).to(loss.dtype), loss * weight

    def _update_metrics(self, acc: MetricAccumulator, pred: torch.Tensor, target: torch.Tensor) -> None:
        share = MetricAccumulator(acc.sums.size(1), acc.null_value)
        share.update(pred, target)
        acc.sums += self.world.all_sum(share.sums)

    def _stop_requested(self) -> bool:
        # A signal may reach one process only, or the processes at different batches: they
        # stop together, after the batch in which any of them got one.
        signum = torch.tensor(self._stop_signal or 0)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        if signum and self._stop_signal is None:
            self._stop_signal = int(signum)
        return bool(signum)

    def evaluate(self, split: str = "val") -> MetricAccumulator:
        t, windows = self.cfg.train, self.data.windows[split]
        acc = MetricAccumulator(self.cfg.data.horizon, t.null_value)
        self.model.eval()
        for chunk in torch.arange(len(windows)).split(t.batch_size):
            mine = self._share(chunk)
            # Every process takes part in every forward pass: one without windows forecasts
            # the chunk's first and drops it.
            x, y = windows.batch(mine if len(mine) else chunk[:1], self.data.scaler)
            pred = forecast(self.model, x, self.data.scaler, t, self.device)
            if len(mine):
                acc.update(pred, y)
        self.world.all_sum(acc.sums)
        return acc

    # --- state ---------------------------------------------------------------------------
    def _model_state(self) -> dict[str, torch.Tensor]:
        return full_model_state(self.model)

    def _load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        load_full_model_state(self.model, state)

    def _training_state(self) -> dict:
        name = SHARD_DIRS[1] if self._shards == SHARD_DIRS[0] else SHARD_DIRS[0]
        path = self.run.shards(name)
        if self.is_main:
            shutil.rmtree(path, ignore_errors=True)
        self.world.barrier()
        save_sharded(path, self.model, self.optimizer)
        self._shards = name
        return {"sharded": name, "torch_rng": self.world.gather(torch.get_rng_state())}

    def _save_last(self) -> None:
        super()._save_last()
        if self.is_main:  # last.pt now names the new shards: the older ones are garbage
            shutil.rmtree(self.run.shards(SHARD_DIRS[1 - SHARD_DIRS.index(self._shards)]), ignore_errors=True)

    def _load_training_state(self, state: dict) -> None:
        if "sharded" not in state:
            raise file_error(self.run.last, "was written by a single-process run; resume it without --fsdp")
        load_sharded(self.run.shards(state["sharded"]), self.model, self.optimizer)
        self._shards = state["sharded"]
        rng = state["torch_rng"]
        if len(rng) == self.world.size:
            torch.set_rng_state(rng[self.world.rank])
        elif self.is_main:
            warnings.warn(f"resumed on {self.world.size} processes a run saved on {len(rng)}: "
                          "dropout masks differ from those of an uninterrupted run")
