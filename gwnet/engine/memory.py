"""How much memory a training run needs, before it starts.

:func:`estimate` adds up, in bytes of fp32: the parameters, their gradients, the optimizer's
state, and the activations that the forward pass of one batch keeps for backward. For Graph
WaveNet the activations follow from what each residual layer's forward saves (see
:func:`gwnet_activation_elements`); another registered model gets the parameter terms only
and an activation term from its input and output (a floor, said so in :meth:`describe`).

The trainer prints :meth:`MemoryEstimate.describe` on the main process (with
``train.progress``) and refuses, with one line naming a batch size that fits, a run whose
estimate exceeds ``train.memory_limit_gb`` -- or, when that is ``None``, the memory available
now: ``MemAvailable`` of ``/proc/meminfo`` on CPU, the free memory of the GPU on CUDA (no
limit where neither can be read).

The activation formula was checked against the growth of peak RSS (:func:`peak_rss_bytes`) over one
training step (improved preset, 12 steps, batch 64) in a fresh process, after a warm-up step
at batch 1 (``tests/test_memory.py``). With glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_=65536``), RSS follows the live tensors: estimate +3% at 100 and
200 nodes, +13% at 200 nodes with checkpointing. With glibc's default (a threshold that grows
as large blocks are freed, which then stay in the heap) RSS is 16-21% above the estimate
without checkpointing and 2.5 times it with checkpointing (measured with an earlier form of
the estimate, before its checkpointing term stopped counting the recomputed layer's input
twice): set that variable (or use another allocator) to get the memory checkpointing
saves. ``--malloc reuse`` (and ``auto`` where an activation is above glibc's 32 MiB mmap
ceiling, :mod:`gwnet.engine.allocator`) keeps every freed block in the heap: faster steps
at large graphs, RSS above the estimate as with glibc's grown threshold.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import GWNetError

GB = 1e9
FLOAT = 4  # bytes: activations, parameters, gradients and Adam's moments are fp32
# Bytes of optimizer state per parameter: Adam/AdamW keep two fp32 moments; the 8-bit
# AdamW two uint8 moments plus a small per-block scale.
OPTIMIZER_BYTES = {"adam": 8, "adamw": 8, "adamw8bit": 2.1}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step needs: fixed terms and activations (linear in the batch)."""

    batch_size: int
    parameters: int
    parameter_bytes: float
    gradient_bytes: float
    optimizer_bytes: float
    activation_bytes: float  # at ``batch_size``
    series_bytes: float = 0.0
    exact_activations: bool = True  # False: a floor for a model without a formula here

    @property
    def fixed_bytes(self) -> float:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.series_bytes

    @property
    def total_bytes(self) -> float:
        return self.fixed_bytes + self.activation_bytes

    def fits(self, limit_bytes: float) -> Optional[int]:
        """The largest batch whose estimate stays within ``limit_bytes`` (``None``: none does)."""
        per_window = self.activation_bytes / self.batch_size
        room = limit_bytes - self.fixed_bytes
        if per_window <= 0:
            return self.batch_size if room >= 0 else None
        batch = int(room // per_window)
        return batch if batch >= 1 else None

    def describe(self) -> str:
        """One line: the total and its parts."""
        floor = " (at least: no activation formula for this model)" if not self.exact_activations else ""
        data = f", data {_size(self.series_bytes)}" if self.series_bytes else ""
        return (f"memory estimate: about {_size(self.total_bytes)} at batch {self.batch_size} "
                f"({self.parameters:,} parameters {_size(self.parameter_bytes)}, gradients "
                f"{_size(self.gradient_bytes)}, optimizer {_size(self.optimizer_bytes)}, activations "
                f"{_size(self.activation_bytes)}{floor}{data})")

    def refusal(self, limit_bytes: float) -> Optional[str]:
        """``None`` when the estimate fits ``limit_bytes``, else the one-line reason it does not."""
        if self.total_bytes <= limit_bytes:
            return None
        batch = self.fits(limit_bytes)
        hint = (f"batch {batch} would fit" if batch is not None else
                "no batch would fit; use --activation-checkpointing, a smaller model or more memory")
        return (f"needs about {self.total_bytes / GB:.2f} GB at batch {self.batch_size} "
                f"(limit {limit_bytes / GB:.2f} GB); {hint}")


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


def gwnet_activation_elements(cfg, num_nodes: int, batch_size: int, steps: Optional[int] = None,
                              checkpointing: bool = False) -> int:
    r"""fp32 elements Graph WaveNet's forward keeps for backward at one batch.

    With :math:`P_i = N B L'_i` positions after layer :math:`i`'s temporal convolution
    (:math:`L'_i = L_i - (k-1)d_i`), a layer keeps

    * its input, which the temporal convolution keeps (a view of the previous layer's
      output, held for backward only by it): :math:`C_r N B L_i`;
    * the gate's two activations (tanh and sigmoid) and their product (the graph
      convolution's input):
      :math:`3 C_d P_i`;
    * unless it is the last layer: the graph convolution's Horner partials for each support
      that needs a gradient (the adaptive one): :math:`K C_r P_i`; the dropout mask
      :math:`C_r P_i` (when dropout > 0); the batch norm's input :math:`C_r P_i`;
    * its skip convolution's input, the newest step of the product: :math:`N B C_d`.

    Around the layers: the padded input and the start convolution's output
    (:math:`N R B (F + C_r)`, :math:`R` the receptive field), the adaptive adjacency
    (:math:`3 N^2`: its product, softmax and the transposed copy; :math:`3 N k` or :math:`3 N r`
    for the top-k and low-rank forms), and the output head
    (:math:`N B (C_s + C_e + H)`: the ReLU outputs the two end convolutions read). Backward
    adds a workspace: the gradients in flight through the largest layer, :math:`(C_r + 2 C_d)
    \max_i P_i`.

    With ``checkpointing`` a layer keeps only its input (:math:`N L_i B C_r`), and one layer at
    a time is recomputed in backward: the largest layer's other terms are added once (and no
    separate workspace: its saved tensors are freed as its backward consumes them).
    """
    c = cfg
    n, b = num_nodes, batch_size
    depth = c.blocks * c.layers
    receptive = c.receptive_field
    length = max(steps or c.seq_len, receptive)
    adaptive = c.do_graph_conv and depth > 1 and c.addaptadj
    grad_supports = int(bool(adaptive))
    total = n * length * b * (c.in_dim + c.residual_channels)
    form = getattr(c, "adaptive", "dense")
    if adaptive:  # dense: N x N; the sparse forms keep O(N) rows of k entries or r features
        width = n if form == "dense" else getattr(c, "adaptive_k" if form == "topk" else "adaptive_rank", n)
        total += 3 * n * width
    total += n * b * (c.skip_channels + c.end_channels + c.out_dim)
    largest = 0
    workspace = 0
    for i in range(depth):
        last = i == depth - 1
        out_len = length - (c.kernel_size - 1) * 2 ** (i % c.layers)
        p = n * b * out_len
        layer = c.residual_channels * n * b * length + 3 * c.dilation_channels * p
        if not last:
            layer += (grad_supports * c.order + (c.dropout > 0) + 1) * c.residual_channels * p
        if not checkpointing:  # measured: with recomputation the freed saved tensors make room
            workspace = max(workspace, (c.residual_channels + 2 * c.dilation_channels) * p)
        if checkpointing:
            # the checkpoint holds the input; a recomputed layer saves it again without a copy
            total += n * length * b * c.residual_channels
            largest = max(largest, layer - c.residual_channels * n * b * length
                          + n * b * c.dilation_channels)
        else:
            total += layer + n * b * c.dilation_channels
        length = out_len
    return total + largest + workspace


def _parameter_count(cfg, num_nodes: int) -> int:
    """Parameters of ``cfg``'s model for ``num_nodes`` nodes, built on the meta device (no
    memory, no initialisation work)."""
    import numpy as np
    import scipy.sparse as sp

    from ..models import build_model_from_config

    cfg = copy.deepcopy(cfg)
    if hasattr(cfg.model, "randomadj"):
        cfg.model.randomadj = True  # same parameters, no initialisation from the graph
    if hasattr(cfg.model, "graph_conv"):
        # Same parameters; the dense kernel never inspects the supports' values, so a small graph
        # builds on the meta device too (the fallback below would allocate the real model).
        cfg.model.graph_conv = "dense"
    supports = [sp.identity(num_nodes, format="csr", dtype=np.float32)] * int(getattr(cfg.model, "num_supports", 0) or 0)
    try:
        with torch.device("meta"):
            model = build_model_from_config(cfg, supports)
    except RuntimeError:  # a step that needs values (a small graph's supports go dense): build it
        model = build_model_from_config(cfg, supports)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def estimate(cfg, num_nodes: int, batch_size: int, parameters: Optional[int] = None,
             series_bytes: float = 0.0, shards: int = 1) -> MemoryEstimate:
    """The memory a training step of ``cfg`` (a resolved :class:`~gwnet.config.Config`) needs
    on ``num_nodes`` nodes at ``batch_size`` windows; ``parameters`` counts the trainable
    parameters when known (else the model is built on the meta device to count them).
    ``shards``: processes that share parameters (FSDP) -- ``batch_size`` is then one
    process's share of the batch and the parameter terms are divided among them."""
    if parameters is None:
        parameters = _parameter_count(cfg, num_nodes)
    parameters = -(-parameters // max(shards, 1))
    t = cfg.train
    checkpointing = bool(t.activation_checkpointing) and cfg.arch == "gwnet"
    if cfg.arch == "gwnet":
        acts, exact = gwnet_activation_elements(cfg.model, num_nodes, batch_size, cfg.data.seq_len,
                                                checkpointing), True
    else:
        m = cfg.model
        in_dim = getattr(m, "in_dim", 1) or 1
        acts, exact = batch_size * num_nodes * (cfg.data.seq_len * in_dim + cfg.data.horizon), False
    return MemoryEstimate(batch_size=batch_size, parameters=parameters, parameter_bytes=FLOAT * parameters,
                          gradient_bytes=FLOAT * parameters,
                          optimizer_bytes=OPTIMIZER_BYTES.get(t.optimizer, 8) * parameters,
                          activation_bytes=FLOAT * acts, series_bytes=float(series_bytes),
                          exact_activations=exact)


def available_bytes(device: torch.device) -> Optional[float]:
    """Memory free for this run now: the GPU's free memory on CUDA, else ``MemAvailable``."""
    if device.type == "cuda":
        try:
            return float(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident memory: its own high-water mark (``VmHWM``) on Linux.

    ``ru_maxrss`` is the fallback elsewhere, but on Linux it is carried over ``exec`` from the
    parent, so a child of a large process (pytest, a benchmark driver) would report at least
    the parent's size. ``None`` where neither can be read."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_limit(limit_gb: Optional[float], device: torch.device) -> Optional[float]:
    """Bytes a run may use: ``limit_gb`` when given, else what :func:`available_bytes` finds."""
    if limit_gb is not None:
        if not (isinstance(limit_gb, (int, float)) and math.isfinite(limit_gb) and limit_gb > 0):
            raise GWNetError(f"memory_limit_gb must be a positive number of GB, got {limit_gb}")
        return float(limit_gb) * GB
    return available_bytes(device)
