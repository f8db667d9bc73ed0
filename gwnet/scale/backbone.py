"""The one path a gwnet model takes to scale: sharding, and its state in and out of shards.

:func:`shard_model` applies FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) to each
residual block (every module of the model's ``layers``) and then to the root, on the
world's device mesh. Before that it swaps batch norms for :class:`SyncedBatchNorm`, whose
statistics span the global batch, so that a batch split over processes trains exactly as
one process would; with ``activation_checkpointing`` each block recomputes its activations
in backward. With bf16 precision on GPU, FSDP all-gathers bf16 parameters and reduces bf16
gradients against fp32 master shards; elsewhere everything stays fp32.

A sharded model's state leaves it in two forms: :func:`save_sharded` / :func:`load_sharded`
write and read model and optimizer with ``torch.distributed.checkpoint`` (every process its
own shard, any number of processes on load), and :func:`full_model_state` /
:func:`load_full_model_state` consolidate to and from an ordinary state dict, the one that
``best.pt`` holds for single-process code.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from .world import World

# GWNet's blocks and root return views (``view_as``, ``permute``) that nothing modifies in
# place, which is what FSDP2 warns about for every forward pass.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

_recomputing = False


@contextmanager
def _recomputation() -> Iterator[None]:
    global _recomputing
    _recomputing = True
    try:
        yield
    finally:
        _recomputing = False


class _AllSum(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    r"""Batch norm whose training statistics cover the whole batch across processes.

    Mean and (biased) variance over all dimensions but the channels (dim 1), summed over the
    processes in two passes (``sum x``, then ``sum (x - mean)^2``) so that they equal
    one-process statistics of the global batch up to rounding; gradients flow back through
    both sums. Running statistics are updated the same way on every process, and not again
    when activation checkpointing recomputes a block. Evaluation uses the running statistics
    like :class:`torch.nn.BatchNorm1d`, whose parameters and buffers this keeps.
    ``torch.nn.SyncBatchNorm`` would do, but it runs on GPUs only.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = xf.new_tensor([xf.numel() // xf.size(1)])
        sums = _AllSum.apply(torch.cat([xf.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centered = xf - mean.view(shape)
        var = _AllSum.apply(centered.square().sum(dims)) / n
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and not _recomputing:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * n / (n - 1).clamp(min=1), momentum)
        return out.to(x.dtype)


def sync_batch_norms(model: nn.Module) -> nn.Module:
    """Replace every batch norm of ``model`` by a :class:`SyncedBatchNorm` with its state."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncedBatchNorm):
            state = child.state_dict()
            synced = SyncedBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            synced.load_state_dict(state)
            if state:
                synced.to(next(iter(state.values())).device)
            setattr(model, name, synced.train(child.training))
        else:
            sync_batch_norms(child)
    return model


def _recompute_in_backward(block: nn.Module) -> None:
    # The block's own forward runs under checkpoint, inside FSDP's hooks: parameters are
    # gathered for the recomputation the same way as for the forward pass.
    forward = block.forward

    def checkpointed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), _recomputation()),
                          **kwargs)

    block.forward = checkpointed


def mixed_precision(device: torch.device, precision: str) -> MixedPrecisionPolicy:
    """bf16 parameters and gradient reduction on GPU when bf16 is asked for, else fp32.

    On CPU, bf16 collectives and matmuls are slower than fp32 ones, so shards stay fp32 there
    (bf16 autocast, if asked for, still applies to the forward pass).
    """
    if device.type == "cuda" and precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, world: World, precision: str = "fp32",
                activation_checkpointing: bool = False) -> nn.Module:
    """Shard ``model`` in place over ``world``: each block of ``model.layers``, then the root.

    A model without ``layers`` is sharded as one unit. Every process must pass the same
    initial weights (build the model from the same seed).
    """
    sync_batch_norms(model)
    policy = mixed_precision(world.device, precision)
    for block in getattr(model, "layers", ()):
        if activation_checkpointing:
            _recompute_in_backward(block)
        fully_shard(block, mesh=world.mesh, mp_policy=policy)
    fully_shard(model, mesh=world.mesh, mp_policy=policy)
    return model


# --- state ------------------------------------------------------------------------------
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict on CPU, on rank 0 (empty elsewhere); every rank calls it."""
    return get_model_state_dict(model, options=_FULL_ON_RANK0)


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load an ordinary (unsharded) state dict into a sharded model; every rank calls it."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of model and optimizer into the directory ``path``."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=Path(path))


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read what :func:`save_sharded` wrote, resharded to this world if its size differs."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=Path(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
