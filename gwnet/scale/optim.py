"""8-bit AdamW (``--optimizer adamw8bit``) and what optimizer states cost.

The optimizer is torchao's ``AdamW8bit``: block-wise dynamic quantization of both Adam
moments (blocks of 256 values, one scale each, 8-bit codes of a dynamic map; Dettmers et al.
2022), applied to plain parameters and to FSDP2's sharded ones alike, with states that
``torch.distributed.checkpoint`` saves and reloads. As the paper recommends, the node
embeddings of the adaptive adjacency keep 32-bit states: they are few, and each row is a
node's whole identity (build the model with ``stable_embedding`` for the layer norm and
Xavier initialisation that go with it).

torchao compiles its update step once per parameter shape (seconds to tens of seconds
each, cached in ``TORCHINDUCTOR_CACHE_DIR``); ``TORCH_COMPILE_DISABLE=1`` runs it eagerly.
"""
from __future__ import annotations

import functools
import logging
import warnings
from contextlib import nullcontext
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..config import Config
from ..errors import GWNetError
from ..nn.adaptive import AdaptiveAdjacency

INSTALL_HINT = "pip install 'gwnet[scale]'"


def _torchao_optim() -> ModuleType:
    # torchao logs a warning for each of its GPU kernel libraries a CPU build cannot load.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.optim
    except ImportError:
        raise GWNetError(f"--optimizer adamw8bit needs torchao: {INSTALL_HINT}") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return torchao.optim


@functools.cache
def adamw8bit_class() -> type[torch.optim.Optimizer]:
    """torchao's ``AdamW8bit``, with 32-bit states for the parameters named at construction."""
    base = _torchao_optim().AdamW8bit

    class AdamW8bit(base):
        def __init__(self, params, *, full_precision: tuple[Tensor, ...] = (), **kwargs):
            super().__init__(params, **kwargs)
            self._full_precision = {id(p) for p in full_precision}

        def step(self, closure=None):
            # torchao compiles its update with fullgraph=True, which fails outright when
            # compilation is switched off (TORCH_COMPILE_DISABLE=1): run it eagerly instead.
            eager = torch._dynamo.config.disable
            with torch.compiler.set_stance("force_eager") if eager else nullcontext():
                return super().step(closure)

        def _new_buffer(self, p: Tensor, signed: bool) -> Tensor:
            if id(p) in self._full_precision:
                return torch.zeros_like(p)  # a DTensor stays one, sharded like its parameter
            return super()._new_buffer(p, signed)

    AdamW8bit.__qualname__ = AdamW8bit.__name__
    AdamW8bit.__module__ = __name__
    return AdamW8bit


def embedding_parameters(model: nn.Module) -> tuple[Tensor, ...]:
    """Parameters of the model's adaptive adjacencies (node embeddings and their norms)."""
    return tuple(p for m in model.modules() if isinstance(m, AdaptiveAdjacency) for p in m.parameters())


def make_8bit_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with 8-bit states for ``model`` (sharded or not), learning rate and decay of ``cfg``."""
    t = cfg.train
    embeddings = embedding_parameters(model)
    if embeddings and not getattr(cfg.model, "stable_embedding", False):
        warnings.warn("adamw8bit: the node embeddings train best as a stable embedding "
                      "(--stable-embedding), as the 8-bit optimizers paper recommends")
    params = [p for p in model.parameters() if p.requires_grad]
    return adamw8bit_class()(params, lr=t.lr, weight_decay=t.weight_decay, full_precision=embeddings)


def tensor_bytes(t: Tensor) -> int:
    """Bytes this process holds for ``t``: its local shard, every inner tensor of a quantized one."""
    if isinstance(t, DTensor):
        t = t.to_local()
    if hasattr(t, "__tensor_flatten__"):  # quantized states: codes, scales, code book
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this process's optimizer states (moments and step counters)."""
    return sum(tensor_bytes(v) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, Tensor))
