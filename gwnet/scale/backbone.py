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

A sharded checkpoint is untrusted input like any file: torch.distributed.checkpoint reads its
``.metadata`` with a plain unpickler and its non-tensor values with
``torch.load(weights_only=False)``, either of which runs whatever code a crafted file names.
:func:`load_sharded` first checks the whole folder (:func:`check_sharded_checkpoint`: the
metadata through an unpickler that builds only the checkpoint's own metadata classes, and
every item with ``weights_only=True``), then loads through a reader and a planner that never
unpickle anything else either; a file refused is one line naming it.
"""
from __future__ import annotations

import io
import pickle
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata, _MEM_FORMAT_ENCODING)
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from ..errors import GWNetError, file_error, one_line
from .world import World

# GWNet's blocks and root return views (``view_as``, ``permute``) that nothing modifies in
# place, which is what FSDP2 warns about for every forward pass.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

_recomputing = False


@contextmanager
def _recomputation(block: nn.Module | None = None) -> Iterator[None]:
    """While activation checkpointing recomputes ``block``: batch norms must not update their
    running statistics a second time. :class:`SyncedBatchNorm` reads ``_recomputing``; torch's
    own batch norms of ``block`` get their running statistics and counter back as they were
    before the recomputation (they must still run the same kernels: checkpoint checks that the
    recomputation saves the same tensors)."""
    global _recomputing
    kept = [(m, [buf.clone() for buf in (m.running_mean, m.running_var, m.num_batches_tracked)])
            for m in (block.modules() if block is not None else ())
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, SyncedBatchNorm)
            and m.training and m.track_running_stats and m.running_mean is not None]
    _recomputing = True
    try:
        yield
    finally:
        _recomputing = False
        with torch.no_grad():
            for m, before in kept:
                for buf, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), before):
                    buf.copy_(value)


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
    # The block's own forward runs under checkpoint (inside FSDP's hooks when sharded:
    # parameters are gathered for the recomputation the same way as for the forward pass).
    # Dropout draws the same masks again: checkpoint restores the RNG state it saved.
    forward = block.forward

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), _recomputation(block)),
                          **kwargs)

    block.forward = checkpointed
    block._gwnet_checkpointed = True


def checkpoint_layers(model: nn.Module) -> bool:
    """Make each block of ``model.layers`` recompute its activations in backward (one process
    or sharded); ``False`` (and nothing changed) for a model without ``layers``. Blocks already
    made so are left as they are."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return False
    for block in layers:
        if not getattr(block, "_gwnet_checkpointed", False):
            _recompute_in_backward(block)
    return True


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
    if activation_checkpointing:
        checkpoint_layers(model)
    for block in getattr(model, "layers", ()):
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
    """Read what :func:`save_sharded` wrote, resharded to this world if its size differs;
    a folder that is not such a checkpoint, or that holds anything but its metadata and
    tensors, is refused before anything is unpickled (see the module's docstring)."""
    path = Path(path)
    check_sharded_checkpoint(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, storage_reader=_SafeReader(path), planner=_SafeLoadPlanner(path))
    except (Exception, CheckpointException) as exc:  # every process fails: dcp gathers the failures
        if isinstance(exc, CheckpointException) and exc.failures:
            exc = next(iter(exc.failures.values()))[0]
        if isinstance(exc, GWNetError):
            raise GWNetError(str(exc)) from None
        raise file_error(path, f"cannot be loaded: {one_line(exc)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# --- reading sharded checkpoints safely -------------------------------------------------
METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's name for it

# What the .metadata of a checkpoint save_sharded wrote references (found by listing the
# globals of real ones): the metadata dataclasses, torch.Size, dtypes (any torch.<dtype>),
# the layout and memory-format encodings, and the folder's path (StorageMeta.checkpoint_id).
_METADATA_CLASSES = (Metadata, MetadataIndex, StorageMeta, TensorProperties, TensorStorageMetadata,
                     BytesStorageMetadata, ChunkStorageMetadata, _MEM_FORMAT_ENCODING, _StorageInfo)
_METADATA_GLOBALS = frozenset(
    {(c.__module__, c.__qualname__) for c in _METADATA_CLASSES}
    | {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
       ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), (Path.__module__, type(Path()).__name__)})


class _MetadataUnpickler(pickle.Unpickler):
    """Builds the metadata of a sharded checkpoint and nothing else: any other global (a
    function to call, a class from elsewhere) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        allowed = (module, name) in _METADATA_GLOBALS or (
            module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_shard_metadata(folder: str | Path) -> Metadata:
    """The ``.metadata`` of a sharded checkpoint folder, unpickled with
    :class:`_MetadataUnpickler` and checked: every item lies in a file of the folder itself."""
    folder = Path(folder)
    meta = folder / METADATA_FILE
    if not folder.is_dir():
        raise file_error(folder, "no such sharded checkpoint folder")
    try:
        with open(meta, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise file_error(meta, "is missing: the sharded checkpoint is incomplete") from None
    except Exception as exc:
        raise file_error(meta, f"refused: not the metadata of a sharded checkpoint ({one_line(exc)})") from None
    if not (isinstance(md, Metadata) and isinstance(md.state_dict_metadata, dict)
            and isinstance(md.storage_data, dict) and isinstance(md.storage_meta, (StorageMeta, type(None)))):
        raise file_error(meta, "refused: not the metadata of a sharded checkpoint")
    for key, item in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(item, (TensorStorageMetadata, BytesStorageMetadata)):
            raise file_error(meta, f"refused: unexpected entry {key!r}")
    sizes: dict[str, int] = {}
    for index, info in md.storage_data.items():
        if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo)
                and index.fqn in md.state_dict_metadata):
            raise file_error(meta, "refused: unexpected storage entry")
        name = info.relative_path
        if not isinstance(name, str) or name != Path(name).name or name.startswith("."):
            raise file_error(meta, f"refused: names {name!r}, not a file of the checkpoint folder")
        if info.transform_descriptors:
            raise file_error(meta, f"refused: {index.fqn!r} is stored with transforms gwnet does not write")
        if not all(type(v) is int and v >= 0 for v in (info.offset, info.length)):
            raise file_error(meta, f"refused: bad position of {index.fqn!r}")
        if name not in sizes:
            path = folder / name
            if path.is_symlink() or not path.is_file():
                raise file_error(path, "is missing: the sharded checkpoint is incomplete")
            sizes[name] = path.stat().st_size
        if info.offset + info.length > sizes[name]:
            raise file_error(folder / name, f"is truncated (it ends before {index.fqn!r})")
    return md


def check_sharded_checkpoint(folder: str | Path) -> Metadata:
    """Refuse, with one line naming the file, a sharded checkpoint whose metadata or items
    would unpickle anything but metadata and tensors (each item read with
    ``weights_only=True``); returns the metadata."""
    folder = Path(folder)
    md = read_shard_metadata(folder)
    by_file: dict[str, list[tuple[MetadataIndex, _StorageInfo]]] = {}
    for index, info in md.storage_data.items():
        by_file.setdefault(info.relative_path, []).append((index, info))
    for name, items in sorted(by_file.items()):
        path = folder / name
        with open(path, "rb") as fh:
            for index, info in items:
                fh.seek(info.offset)
                try:
                    torch.load(io.BytesIO(fh.read(info.length)), map_location="cpu", weights_only=True)
                except Exception as exc:
                    raise file_error(path, f"refused: {index.fqn!r} is not plain tensor data "
                                     f"({one_line(exc)})") from None
    return md


class _SafeReader(FileSystemReader):
    """torch's file reader, with the metadata read by :func:`read_shard_metadata` (tensors
    it already reads with ``weights_only=True``)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # save_sharded writes one global .metadata
            raise file_error(Path(self.path) / METADATA_FILE, "is missing: the sharded checkpoint is incomplete")
        md = read_shard_metadata(Path(self.path))
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _SafeLoadPlanner(DefaultLoadPlanner):
    """The default planner, but non-tensor values (the optimizer's hyperparameters) are
    unpickled with ``weights_only=True``: the default planner uses ``weights_only=False``."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as exc:
            info = getattr(self, "metadata", None) and self.metadata.storage_data.get(read_item.storage_index)
            where = self.folder / info.relative_path if info else self.folder
            raise file_error(where, f"refused: {read_item.dest_index.fqn!r} is not plain data "
                             f"({one_line(exc)})") from None
        # What the default planner unpickles is then only what the safe load built.
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)
