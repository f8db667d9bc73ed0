"""The training step and the forecast on the training device: the data there, no per-batch
synchronisation, and CUDA graphs.

A Graph WaveNet step at road-network sizes is bound by kernel launches, not arithmetic (on
one H200 the eager fp32 step of the improved preset at batch 64 runs at a few TFLOP/s; one
CUDA graph of the whole step ran it 2.2x faster). So on CUDA:

* the series is copied to the device once (:func:`device_windows`) and every batch is
  gathered there from a batch order moved once per epoch: no host-to-device copy per batch;
* the loss, gradient norms and metrics are accumulated in device tensors
  (:class:`StepStats`, a device :class:`~gwnet.engine.metrics.MetricAccumulator`) and read
  once per epoch; whether a batch has a valid target is known on the host from the series
  (:func:`windows_with_targets`), and a non-finite step is recorded on the device and
  raised at the end of the epoch (or before any checkpoint) with its batch number, so
  ``nan_policy="stop"`` needs no synchronisation per batch. ``nan_policy="skip"`` must know
  before the optimizer step whether to take it: it reads the loss and gradient norm of
  every batch (and so takes no CUDA graph);
* :class:`GraphedStep` replays forward, loss, backward, gradient clipping and the Adam step
  (``capturable=True``, its learning rate a device tensor the scheduler fills) as one CUDA
  graph on static input buffers, and :class:`Forecaster` does the same for a forecast
  (validation and test). A last batch of another size runs eagerly. Dropout inside the
  graph draws from the CUDA generator's graph-safe Philox state: each replay advances the
  generator as the eager step would, and ``last.pt`` holds the generator's state, so
  resume stays exact. The warm-up steps that capture needs change the weights, batch-norm
  statistics, optimizer state and random state: all are put back before the first replay.

On the CPU the same :class:`GraphedStep` runs eagerly through its static buffers, which is
what the tests check against the plain step.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import GWNetError
from .metrics import valid_mask

GRAPH_SETTINGS = ("auto", "on", "off")
# Eager steps on a side stream before capture: cuDNN/cuBLAS pick their algorithms and the
# optimizer creates its state (three, as PyTorch's whole-network capture example does).
WARMUP_STEPS = 3
# The series goes to the device when it takes at most this share of the device's memory:
# METR-LA's is 28 MB; a LargeST year at 8,600 sensors (18 GB in fp32) stays on the host on
# most GPUs and its batches are copied from there.
SERIES_DEVICE_SHARE = 0.25


def graphs_decision(setting: str, device: torch.device, *, nan_policy: str = "stop",
                    sharded: bool = False, optimizer: str = "adam",
                    activation_checkpointing: bool = False) -> tuple[bool, str]:
    """``(use CUDA graphs, why)`` for ``--cuda-graphs`` ``setting``: ``auto`` takes them
    wherever they can work (CUDA, one process, Adam or AdamW, ``nan_policy="stop"``), ``on``
    refuses with one line where they cannot, ``off`` never takes them."""
    if setting not in GRAPH_SETTINGS:
        raise GWNetError(f"cuda_graphs={setting!r} is not one of {', '.join(GRAPH_SETTINGS)}")
    if setting == "off":
        return False, "off"
    reason = None
    if device.type != "cuda":
        reason = f"they need a CUDA device (this run is on {device.type})"
    elif sharded:
        reason = "FSDP's collectives and hooks run outside a captured step"
    elif nan_policy != "stop":
        reason = "nan_policy skip decides on the host, before each optimizer step, whether to take it"
    elif optimizer not in ("adam", "adamw"):
        reason = f"the {optimizer} optimizer has no capturable update"
    elif activation_checkpointing:
        reason = "activation checkpointing recomputes the forward pass inside backward"
    if reason is None:
        return True, "on"
    if setting == "on":
        raise GWNetError(f"--cuda-graphs on: {reason}")
    return False, f"off ({reason})"


def bf16_advice(device: torch.device, precision: str, graphs: bool) -> str | None:
    """A warning for bf16 where it is not the fast path. On CUDA, eager bf16 autocast adds a
    cast kernel per product to a launch-bound step: on one H200 it made the dense training
    step 44.9 ms against fp32's 37.5 (and the fast kernel 60.7 against 47.1); inside one CUDA
    graph, where the casts cost no launches of their own, the whole step took 12.4 ms in bf16
    against 17.1 in fp32. So bf16 is offered on CUDA with graphs only."""
    if precision == "bf16" and device.type == "cuda" and not graphs:
        return ("bf16 autocast on CUDA without CUDA graphs is slower than fp32 (each cast is one more "
                "kernel launch); use --cuda-graphs auto/on, or --precision fp32")
    return None


# --- the data on the device ----------------------------------------------------------------
def series_fits(nbytes: int, device: torch.device) -> bool:
    """Whether a series of ``nbytes`` goes to ``device`` (see SERIES_DEVICE_SHARE)."""
    if device.type != "cuda":
        return device.type != "cpu"
    return nbytes <= SERIES_DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory


def device_windows(windows: dict, device: torch.device) -> dict:
    """The splits' windows gathering on ``device`` from one copy of the series there (the
    splits share it), or ``windows`` itself on the CPU or when the series is too large for
    the device (over SERIES_DEVICE_SHARE of its memory)."""
    if device.type == "cpu" or not windows:
        return windows
    series = next(iter(windows.values())).series
    if not series_fits(series.nbytes, device):
        return windows
    moved = series.to(device)
    return {name: w.with_series(moved) for name, w in windows.items()}


def windows_with_targets(windows, null_value: float) -> torch.Tensor:
    """``(windows,)`` bools on the CPU: whether window ``i`` has at least one valid target
    reading, from the series once (a cumulative count of steps with one), so that a batch
    without any is known without looking at its targets on the device."""
    speeds = windows.series.speeds
    speeds = speeds.cpu() if speeds.device.type != "cpu" else speeds
    step_valid = valid_mask(speeds, null_value).any(dim=1)
    counts = torch.zeros(len(step_valid) + 1, dtype=torch.long)
    torch.cumsum(step_valid, 0, out=counts[1:])
    first = torch.arange(windows.start, windows.stop) + windows.seq_len - 1 + windows.first_offset
    return counts[first + windows.horizon] > counts[first]


@dataclass
class StepResult:
    """A step's outputs, all device tensors: loss (of the whole batch), gradient norm
    before clipping, and the forecast in real units."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    pred: torch.Tensor


class TrainStep:
    """Forward, loss, backward, gradient clipping and the optimizer step of one batch, with
    no synchronisation: everything it returns stays on the device.

    ``forward(x)`` gives the forecast in real units, ``loss(pred, y)`` the pair ``(loss of
    the whole batch, what this process back-propagates)``: the trainer's hooks.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 forward: Callable[[torch.Tensor], torch.Tensor],
                 loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 clip: float | None):
        self.model, self.optimizer = model, optimizer
        self.forward, self.loss = forward, loss
        self.clip = math.inf if clip is None else clip
        self.params = [p for p in model.parameters() if p.requires_grad]

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Everything but the optimizer step (gradients clipped)."""
        pred = self.forward(x)
        loss, objective = self.loss(pred, y)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        norm = plain(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
        return StepResult(loss.detach(), norm, pred.detach())

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        out = self.backward(x, y)
        self.optimizer.step()
        return out


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded model's (FSDP's DTensor) gradient norm as the plain tensor it stands for."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Adam/AdamW updated inside a CUDA graph: ``capturable`` (its step counts on the device,
    no host reads) and the learning rate a device tensor, which the scheduler fills in place
    (a float would be frozen into the captured kernels)."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict as an eager run writes it (learning rate a float,
    ``capturable`` off), so that ``last.pt`` resumes with or without graphs, on any device."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if "capturable" in group:
            group["capturable"] = False
        if torch.is_tensor(group.get("lr")):
            group["lr"] = float(group["lr"])
    return state


class GraphedStep:
    """A :class:`TrainStep` on static input buffers of one batch shape, replayed from a CUDA
    graph once :meth:`capture` has run (CUDA only); before that (and on the CPU) it runs
    the step eagerly through the same buffers."""

    def __init__(self, step: TrainStep, x_like: torch.Tensor, y_like: torch.Tensor):
        self.step = step
        self.x = torch.zeros_like(x_like)
        self.y = torch.zeros_like(y_like)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: StepResult | None = None

    def fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        return x.shape == self.x.shape and y.shape == self.y.shape

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        self.x.copy_(x)
        self.y.copy_(y)
        if self.graph is None:
            return self.step(self.x, self.y)
        self.graph.replay()
        return self.out

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Capture the step on this batch (CUDA). The warm-up steps run inside
        :func:`state_kept`, so the first replay is the step an eager run would take."""
        device = self.x.device
        step = self.step
        make_capturable(step.optimizer, device)
        self.x.copy_(x)
        self.y.copy_(y)
        with state_kept(step.model, step.optimizer, device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    step(self.x, self.y)
            torch.cuda.current_stream(device).wait_stream(side)
            step.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step(self.x, self.y)
        self.graph, self.out = graph, out


@contextmanager
def state_kept(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
    """Put back, in place, everything steps run inside change: weights, buffers (batch-norm
    statistics), the optimizer's state and the CPU (and CUDA) random state. Optimizer state
    created inside (a fresh Adam's first step) is zeroed, step count included: a fresh Adam's
    first update from there is the same. In place, because a captured graph holds these
    very tensors."""
    tensors = _state_tensors(model)
    saved = [t.detach().clone() for t in tensors]
    had = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in optimizer.state.items()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in zip(tensors, saved):
                t.copy_(v)
            for p, s in optimizer.state.items():
                before = had.get(p, {})
                for k, v in s.items():
                    if torch.is_tensor(v):
                        v.copy_(before[k]) if k in before else v.zero_()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)


def _state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers (batch-norm statistics and counters) a step changes."""
    return [*model.parameters(), *(b for b in model.buffers() if b.layout == torch.strided)]


class StepStats:
    """Gradient norms (sum, max, count of the steps taken) and the first non-finite step of
    an epoch, kept as device tensors: read by :meth:`values` and :meth:`first_bad` only
    (once per epoch, or before a checkpoint)."""

    def __init__(self, device: torch.device, grads: list):
        self.sum = torch.full((), float(grads[0]), dtype=torch.float64, device=device)
        self.max = torch.full((), float(grads[1]), dtype=torch.float64, device=device)
        self.count = torch.full((), int(grads[2]), dtype=torch.long, device=device)
        self.empty = int(grads[3])
        # (batch index, 0 for a non-finite loss or 1 for a non-finite gradient), -1: none
        self.bad = torch.full((2,), -1, dtype=torch.long, device=device)

    def add(self, b: int, out: StepResult) -> None:
        loss_ok = torch.isfinite(out.loss)
        ok = loss_ok & torch.isfinite(out.grad_norm)
        first = (self.bad[0] < 0) & ~ok
        self.bad[0] = torch.where(first, b, self.bad[0])
        self.bad[1] = torch.where(first, torch.where(loss_ok, 1, 0), self.bad[1])
        norm = torch.where(ok, out.grad_norm.detach().double(), 0.0)
        self.sum += norm
        torch.maximum(self.max, norm, out=self.max)
        self.count += ok

    def first_bad(self) -> tuple[int, str] | None:
        """``(batch index, "loss" or "gradient")`` of the first non-finite step, or ``None``."""
        b, kind = self.bad.tolist()
        return None if b < 0 else (b, "gradient" if kind else "loss")

    def values(self) -> list:
        """``[sum, max, count, empty batches]``, the form ``last.pt`` keeps."""
        return [float(self.sum), float(self.max), int(self.count), self.empty]


class Forecaster:
    """Forecasts of whole batches on the device, ``forecast(x)`` (in real units, clamped);
    with ``graphs``, the forecast of the first batch's shape is replayed from a CUDA graph
    captured at that batch (a forecast changes no state), any other shape runs eagerly. A
    capture that fails goes to ``on_failure(exc)``, which raises or lets the forecasts run
    eagerly from then on."""

    def __init__(self, forecast: Callable[[torch.Tensor], torch.Tensor], graphs: bool,
                 on_failure: Callable[[Exception], object] | None = None):
        self.forecast, self.graphs, self.on_failure = forecast, graphs, on_failure
        self.x: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.graphs:
            return self.forecast(x)
        if self.x is None:
            try:
                self._capture(x)
            except Exception as exc:  # without on_failure (or if it returns) the forecast runs eagerly
                if self.on_failure is None:
                    raise
                self.on_failure(exc)
                self.graphs = False
                return self.forecast(x)
        if x.shape != self.x.shape:
            return self.forecast(x)
        self.x.copy_(x)
        self.graph.replay()
        return self.out

    def _capture(self, x: torch.Tensor) -> None:
        device = x.device
        self.x = x.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.forecast(self.x)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.forecast(self.x)
