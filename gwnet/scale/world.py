"""The group of processes a sharded run trains in, as ``torchrun`` starts it.

:func:`distributed` opens (and at the end closes) the ``torch.distributed`` process group
from the environment ``torchrun`` sets, places each process on its device (``cuda:LOCAL_RANK``
with NCCL, or the CPU with gloo), and refuses the launches that cannot work, each with one
line. :class:`World` is what the rest of :mod:`gwnet.scale` needs from it: the rank, the
number of processes, the device mesh FSDP shards over, and the few small collectives of the
training loop's bookkeeping.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import Config
from ..engine.device import resolve_device
from ..errors import GWNetError

T = TypeVar("T")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = "torchrun --nproc_per_node=N -m gwnet train --fsdp ..."

_current: World | None = None


@dataclass(frozen=True)
class World:
    """This process's place among the ``size`` processes of a run."""

    rank: int
    size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place; returns it."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj: T) -> list[T]:
        """Every process's ``obj``, in rank order."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, make: Callable[[], T]) -> T:
        """Rank 0's ``make()`` on every process (the others do not call it)."""
        box = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def current_world() -> World:
    """The world :func:`distributed` opened; a clear error outside one."""
    if _current is None:
        raise GWNetError(f"--fsdp needs the processes that torchrun starts: {LAUNCH_HINT} "
                         "(from Python: inside gwnet.scale.distributed(cfg))")
    return _current


def is_main_process() -> bool:
    """True unless this is a sharded run's process of rank 1 or more."""
    return _current is None or _current.is_main


def _device_type(name: str) -> str:
    if name not in ("auto", "cpu", "cuda"):
        raise GWNetError(f"--fsdp places every process on its own device: use --device auto, cuda "
                         f"or cpu, not {name!r}")
    return resolve_device(name).type


@contextmanager
def launch(device: str = "auto") -> Iterator[World]:
    """Join the process group ``torchrun`` describes in the environment, for the block.

    Each process takes GPU ``LOCAL_RANK`` with NCCL (gloo for CPU tensors), or the CPU with
    gloo. A process group opened by the caller is used as it is and left open.
    """
    global _current
    kind = _device_type(device)
    owned = not dist.is_initialized()
    if owned:
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise GWNetError(f"--fsdp needs the processes that torchrun starts ({', '.join(missing)} "
                             f"not set): {LAUNCH_HINT}")
        if kind == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl" if kind == "cuda" else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    # set_device above makes the bare "cuda" this process's own GPU.
    _current = World(rank, size, torch.device(kind), init_device_mesh(kind, (size,)))
    try:
        yield _current
    except BaseException:
        # The other processes may be inside a collective that will never complete: no barrier,
        # exit now and let torchrun stop them.
        _current = None
        if owned:
            dist.destroy_process_group()
        raise
    _current = None
    if owned:
        # Without the barrier a process can tear gloo down while another still talks to it,
        # which now and then aborts the run at exit.
        dist.barrier()
        dist.destroy_process_group()


def distributed(cfg: Config) -> ContextManager[World | None]:
    """The process context a run needs: :func:`launch` with ``cfg.train.fsdp``, else none.

    In a sharded run without ``cfg.out``, every process takes the run directory that rank 0
    names. Several processes without ``--fsdp`` would each train the whole model into the
    same run directory, so that launch is refused.
    """
    if cfg.train.fsdp:
        return _sharded_run(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GWNetError(f"started as {os.environ['WORLD_SIZE']} processes without --fsdp; pass --fsdp "
                         "to shard the model over them, or start one process")
    return nullcontext()


@contextmanager
def _sharded_run(cfg: Config) -> Iterator[World]:
    with launch(cfg.train.device) as world:
        if cfg.out is None:
            cfg.out = world.from_main(lambda: copy.deepcopy(cfg).resolve().out)
        yield world
