"""The training loop: masked-MAE training, validation, early stopping, checkpoints, resume.

:class:`Trainer` runs one stage (one horizon count) into one run directory. :func:`train`
adds short-horizon pretraining on top: with ``pretrain_horizon`` it trains horizons
``1..k`` into ``RUN_DIR/pretrain-hk`` and then finetunes all horizons from that checkpoint
into ``RUN_DIR``. Researchers can pass their own ``model`` or ``loss_fn`` to the Trainer.

Resume is exact on CPU: ``last.pt`` holds the optimizer, scheduler, both random states and
the early-stopping counters, and an interrupted epoch's batch order and position.

With ``train.fsdp`` a Trainer is :class:`gwnet.scale.trainer.ShardedTrainer`, which fills in
the hooks below (the rank's share of a batch, sums over processes, sharded state); here they
are those of a single process.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import signal
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..config import Config, DataConfig, TrainConfig
from ..data import TrafficData, build_supports, load_data, to_torch
from ..data.scaler import StandardScaler
from ..data.windows import Windows
from ..errors import GWNetError, file_error
from ..nn import GWNet, load_for_more_horizons
from ..scale.world import is_main_process
from .checkpoint import RunDir, load_checkpoint, save_checkpoint
from .metrics import MetricAccumulator, masked_mae

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
# Data fields that shape a model's input windows and targets.
WINDOW_FIELDS = ("seq_len", "horizon", "first_offset", "time_of_day", "day_of_week")
# Model fields that may differ between a pretrained run and the run initialised from it.
INIT_FREE_FIELDS = {"out_dim", "dropout", "graph_conv"}


class Interrupted(Exception):
    """Raised after SIGINT/SIGTERM once ``last.pt`` holds the exact position to resume from."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GWNetError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GWNetError(f"device {name!r} asked for, but no CUDA device is available")
    return device


def build_model(cfg: Config, data: TrafficData) -> GWNet:
    """A fresh GWNet for ``data``'s graph, seeded by ``cfg.train.seed``."""
    torch.manual_seed(cfg.train.seed)
    supports = to_torch(data.supports(), dense=cfg.model.graph_conv == "dense")
    return GWNet(cfg.model, supports)


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
    """Train ``cfg`` into ``cfg.out``; ``resume=True`` continues the run found there."""

    # Processes that share each batch; only the first writes files and prints.
    world_size = 1
    is_main = True

    def __new__(cls, cfg: Config, *args, **kwargs):
        if cls is Trainer and cfg.train.fsdp:
            from ..scale.trainer import ShardedTrainer

            cls = ShardedTrainer
        return super().__new__(cls)

    def __init__(self, cfg: Config, data: TrafficData | None = None, model: torch.nn.Module | None = None,
                 loss_fn: LossFn = masked_mae, resume: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.data = data if data is not None else load_data(cfg.data)
        cfg.resolve(num_nodes=self.data.num_nodes)
        self.run = RunDir(cfg.out)
        if self.is_main:
            if not resume and self.run.holds_run():
                raise file_error(self.run.root, "already holds a run; resume it with --resume or choose another --out")
            self.run.check_writable()
            self.run.remove_stale_temporaries()
        self.device = resolve_device(cfg.train.device)
        model = (model if model is not None else build_model(cfg, self.data)).to(self.device)
        # A run killed before its first checkpoint has nothing to restore: it starts over.
        resume = resume and self.run.last.exists()
        if cfg.train.init_from and not resume:
            init_from_run(model, cfg, self.data, cfg.train.init_from)
        self.model = self._prepare_model(model)
        self.loss_fn = loss_fn
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.train.lr_decay)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.progress = _Progress()
        self._stop_signal: int | None = None
        if resume:
            self._restore()
        elif self.is_main:
            cfg.save(self.run.config)

    # --- hooks: one process here, several in gwnet.scale.trainer.ShardedTrainer -------------
    def _prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as training uses it (sharded over processes, or as it is)."""
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
        return {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}

    def _load_training_state(self, state: dict) -> None:
        if "sharded" in state:
            raise file_error(self.run.last, "was written by a sharded run; resume it under torchrun with --fsdp")
        self._load_model_state(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])

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
        if not self.is_main:
            return
        save_checkpoint(self.run.last, payload)
        self._write_metrics()

    def _write_metrics(self) -> None:
        """metrics.csv, derived from the history in last.pt (written after it)."""
        with atomic_path(self.run.metrics) as tmp:
            pd.DataFrame(self.progress.history).to_csv(tmp, index=False)

    def _restore(self) -> None:
        state = load_checkpoint(self.run.last, map_location="cpu")
        if state["sensor_ids"] != self.data.sensor_ids:
            raise file_error(self.run.last, "was trained on other sensors than the data given")
        if state.get("finished") and self.run.test_metrics.exists():
            raise file_error(self.run.root, "run already finished; nothing to resume")
        self._load_training_state(state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["shuffle_rng"])
        self.progress = _Progress(epoch=state["epoch"], best_val_mae=state["best_val_mae"],
                                  best_epoch=state["best_epoch"], bad_epochs=state["bad_epochs"],
                                  history=list(state["history"]), partial=state["partial"],
                                  finished=bool(state.get("finished")))
        if self.is_main:  # a kill between last.pt and metrics.csv leaves the CSV an epoch behind
            self._write_metrics()

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
        t, p = self.cfg.train, self.progress
        windows = self.data.windows["train"]
        if p.partial is not None:
            order, start, sums = p.partial["order"], p.partial["next_batch"], p.partial["sums"]
            grads = list(p.partial["grads"])
        else:
            order, start, sums = torch.randperm(len(windows), generator=self.generator), 0, None
            grads = [0.0, 0.0, 0]  # sum, max, count of gradient norms (before clipping)
        # A last batch too small to give every process a window is left out.
        batches = [b for b in order.split(t.batch_size) if len(b) >= self.world_size]
        if t.batches_per_epoch is not None:
            batches = batches[: t.batches_per_epoch]
        acc = MetricAccumulator(self.cfg.data.horizon, t.null_value)
        if sums is not None:
            acc.sums = sums
        self.model.train()
        bar = tqdm(total=len(batches), initial=start, desc=f"epoch {epoch}/{t.epochs}", unit="batch",
                   leave=False, dynamic_ncols=True,
                   # None: a bar on terminals only, so logs keep just the per-epoch lines.
                   disable=None if t.progress and self.is_main else True)
        for b in range(start, len(batches)):
            x, y = windows.batch(self._share(batches[b]))
            y = y.to(self.device)
            pred = self._forward(x)
            loss, objective = self._global_loss(self.loss_fn(pred, y, t.null_value), y)
            self.optimizer.zero_grad(set_to_none=True)
            grad_norm = torch.tensor(float("nan"))
            if torch.isfinite(loss):
                objective.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                           t.clip if t.clip is not None else math.inf)
            if not torch.isfinite(grad_norm):
                what = "loss" if not torch.isfinite(loss) else "gradient"
                if t.nan_policy == "stop":
                    raise GWNetError(f"non-finite {what} at epoch {epoch}, batch {b + 1}; stopped, the last "
                                     f"good checkpoint is {self.run.last} (try a lower --lr or --nan-policy skip)")
                warnings.warn(f"non-finite {what} at epoch {epoch}, batch {b + 1}: batch skipped")
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self.optimizer.step()
                self._update_metrics(acc, pred, y)
                grads[0] += float(grad_norm)
                grads[1] = max(grads[1], float(grad_norm))
                grads[2] += 1
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
            if self._stop_requested():
                p.partial = {"order": order, "next_batch": b + 1, "sums": acc.sums, "grads": grads}
                p.epoch = epoch - 1
                bar.close()
                self._save_last()
                raise Interrupted(f"stopped by signal {self._stop_signal}; resume with "
                                  f"gwnet-train --resume {self.run.root}")
        bar.close()
        p.partial = None
        return {**acc.overall(), "grad_norm": grads[0] / max(grads[2], 1), "grad_norm_max": grads[1]}

    def evaluate(self, split: str = "val") -> MetricAccumulator:
        """Clamped, masked metrics of the current model on a split."""
        return split_metrics(self.model, self.data.windows[split], self.data.scaler, self.cfg.train,
                             self.device)

    def fit(self) -> RunResult:
        t, p = self.cfg.train, self.progress
        # A run killed after its last epoch but before its test metrics only needs _finish().
        epochs = range(p.epoch + 1, t.epochs + 1) if not p.finished else range(0)
        with self._catch_signals():
            for epoch in epochs:
                started = time.perf_counter()
                lr = float(self.optimizer.param_groups[0]["lr"])  # a tensor in torchao's optimizers
                train = self._train_epoch(epoch)
                val = self.evaluate("val").overall()
                self.scheduler.step()
                p.epoch = epoch
                improved = val["mae"] < p.best_val_mae
                if improved:
                    p.best_val_mae, p.best_epoch, p.bad_epochs = val["mae"], epoch, 0
                    best = {**self._model_payload(), "epoch": epoch, "val_mae": val["mae"]}
                    if self.is_main:
                        save_checkpoint(self.run.best, best)
                else:
                    p.bad_epochs += 1
                seconds = time.perf_counter() - started
                p.history.append({"epoch": epoch, **{(k if k.startswith("grad") else f"train_{k}"): v
                                                     for k, v in train.items()},
                                  **{f"val_{k}": v for k, v in val.items()}, "lr": lr, "seconds": seconds})
                p.finished = p.bad_epochs >= t.patience or epoch == t.epochs
                self._save_last()
                if t.progress and self.is_main:
                    tqdm.write(f"epoch {epoch:3d}/{t.epochs}  train mae {train['mae']:.4f}  "
                               f"val mae {val['mae']:.4f}  lr {lr:.2e}  {seconds:.1f}s"
                               + ("  *" if improved else ""))
                if p.finished:
                    break
            if not p.finished:  # resumed a run whose last epoch was already done
                p.finished = True
                self._save_last()
        return self._finish()

    def _finish(self) -> RunResult:
        best = load_checkpoint(self.run.best, map_location=self.device)
        self._load_model_state(best["model"])
        table = self.evaluate("test").table()
        if self.is_main:
            with atomic_path(self.run.test_metrics) as tmp:
                table.to_csv(tmp)
        return RunResult(self.run.root, self.progress.best_epoch, self.progress.best_val_mae, table,
                         pd.DataFrame(self.progress.history))


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for; fp32 runs untouched."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def forecast(model: torch.nn.Module, x: torch.Tensor, scaler: StandardScaler, t: TrainConfig,
             device: torch.device) -> torch.Tensor:
    """``(B, horizon, N)`` forecast in real units, clamped to the physical range, on the CPU."""
    with autocast(device, t.precision):
        out = model(x.to(device))
    return scaler.inverse_transform(out.float()).clamp(t.clamp_min, t.clamp_max).cpu()


def predict_batches(model: torch.nn.Module, windows: Windows, scaler: StandardScaler, t: TrainConfig,
                    device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(forecast, target)`` per batch of a split (see :func:`forecast`)."""
    model.eval()
    for x, y in windows.batches(t.batch_size, scaler=scaler):
        yield forecast(model, x, scaler, t, device), y


def split_metrics(model: torch.nn.Module, windows: Windows, scaler: StandardScaler, t: TrainConfig,
                  device: torch.device) -> MetricAccumulator:
    """Clamped, masked metrics of ``model`` over every window of a split."""
    acc = MetricAccumulator(windows.horizon, t.null_value)
    for pred, y in predict_batches(model, windows, scaler, t, device):
        acc.update(pred, y)
    return acc


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
    state = load_checkpoint(path)
    if state["sensor_ids"] != data.sensor_ids:
        raise file_error(path, "was trained on a different sensor graph than this run's data")
    theirs = state["config"]["model"]
    ours = cfg.to_dict()["model"]
    differ = [k for k in ours if k not in INIT_FREE_FIELDS and theirs.get(k) != ours[k]]
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} vs {ours[k]!r}" for k in differ[:3])
        raise file_error(path, f"model does not match this run's ({shown})")
    if theirs["out_dim"] > ours["out_dim"]:
        raise file_error(path, f"has {theirs['out_dim']} horizons, more than this run's {ours['out_dim']}")
    load_for_more_horizons(model, state["model"])


def run_finished(run_dir: str | Path) -> bool:
    """Whether a run directory holds a finished run with its test metrics."""
    rd = RunDir(run_dir)
    if not rd.last.exists():
        return False
    return bool(load_checkpoint(rd.last).get("finished")) and rd.test_metrics.exists()


def _run_stage(cfg: Config, data: TrafficData | None, **kw) -> RunResult:
    """Run, resume or (when complete) reload one stage."""
    rd = RunDir(cfg.out)
    if run_finished(rd.root):
        state = load_checkpoint(rd.last)
        return RunResult(rd.root, state["best_epoch"], state["best_val_mae"],
                         pd.read_csv(rd.test_metrics, index_col=0), pd.DataFrame(state["history"]))
    return Trainer(cfg, data, resume=rd.last.exists(), **kw).fit()


def train(cfg: Config, data: TrafficData | None = None, resume: bool = False, **kw) -> RunResult:
    """Train as ``cfg`` says; with ``train.pretrain_horizon`` first pretrain, then finetune.

    ``resume=True`` continues whatever stage was interrupted. ``kw`` goes to :class:`Trainer`
    (``model``, ``loss_fn``).
    """
    cfg = copy.deepcopy(cfg)
    k = cfg.train.pretrain_horizon
    if k is None:
        return Trainer(cfg, data, resume=resume, **kw).fit()
    cfg.validate().resolve()
    if resume and run_finished(Path(cfg.out)):
        raise file_error(cfg.out, "run already finished; nothing to resume")
    pre = copy.deepcopy(cfg)
    pre.out = str(Path(cfg.out) / f"pretrain-h{k}")
    pre.data.horizon = k
    pre.train.pretrain_horizon = None
    if is_main_process():
        if not resume and RunDir(cfg.out).holds_run():
            raise file_error(cfg.out, "already holds a run; resume it with --resume or choose another --out")
        RunDir(cfg.out).check_writable()
        cfg.save(RunDir(cfg.out).root / "pipeline.json")
    _run_stage(pre, None if data is None else _with_horizon(data, k), **kw)
    fine = copy.deepcopy(cfg)
    fine.train.init_from = pre.out
    return _run_stage(fine, data, **kw)


def _with_horizon(data: TrafficData, horizon: int) -> TrafficData:
    cfg = copy.deepcopy(data.config)
    cfg.horizon = horizon
    return TrafficData.from_frames(data.speeds, data.graph, cfg, source=data.source)


def evaluate(run_dir: str | Path, data: DataConfig | TrafficData | None = None, split: str = "test",
             device: str = "auto") -> pd.DataFrame:
    """Per-horizon test metrics (plus the mean row) of a run's best model on ``data``.

    ``data`` defaults to the data the run was trained on; a :class:`DataConfig` or a loaded
    :class:`TrafficData` evaluates on other readings of the same sensors, scaled as in training.
    """
    device = resolve_device(device)
    model, cfg, scaler, sensor_ids = load_trained(run_dir, device)
    if not isinstance(data, TrafficData):
        # Other readings, but the windows and features the model was trained on.
        window = {name: getattr(cfg.data, name) for name in WINDOW_FIELDS}
        data = load_data(dataclasses.replace(data or cfg.data, **window), scaler=scaler)
    elif any(getattr(data.config, name) != getattr(cfg.data, name) for name in WINDOW_FIELDS):
        raise GWNetError(f"{data.source}: windows or features differ from those of run {run_dir}")
    if data.sensor_ids != sensor_ids:
        raise GWNetError(f"{data.source}: sensors differ from those of run {run_dir}")
    return split_metrics(model, data.windows[split], scaler, cfg.train, device).table()


def load_trained(run_dir: str | Path,
                 device: str | torch.device = "cpu") -> tuple[GWNet, Config, StandardScaler, list[str]]:
    """Rebuild the model of a run directory: ``(model in eval mode, config, scaler, sensor ids)``."""
    rd = RunDir(run_dir)
    if not rd.root.is_dir():
        raise file_error(rd.root, "no such run directory")
    state = load_checkpoint(rd.best, map_location="cpu")  # the supports are built with scipy
    cfg = Config.from_dict(state["config"], source=str(rd.root))
    scaler = StandardScaler(**state["scaler"])
    sensor_ids = list(state["sensor_ids"])
    supports = to_torch(build_supports(state["adjacency"].numpy(), cfg.data.adjtype),
                        dense=cfg.model.graph_conv == "dense")
    model = GWNet(cfg.model, supports)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, scaler, sensor_ids
