"""Quantile heads for any registered model.

With ``model.quantiles`` set (e.g. ``(0.05, 0.5, 0.95)``) a model is built by its own build
function with ``out_dim = horizons x quantiles`` and its ``(B, H * Q, N)`` output is viewed as
``(B, H, Q, N)`` by a forward hook. The rows of the output layer are horizon-major (horizon 1's
quantiles first), so ``--init-from`` and pretrain-then-finetune, which copy the first rows of
``horizon_head``, carry over whole horizons. Nothing is wrapped: the state dict keeps the
model's own names. A model needs nothing beyond what every registered model does (an output
layer of ``config.out_dim`` rows, outputs ``(B, out_dim, N)``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import Tensor, nn

from ..config import ModelConfig

# The attribute a quantile model carries: its levels (inference reads them).
LEVELS_ATTRIBUTE = "quantile_levels"


def widened(config: ModelConfig) -> ModelConfig:
    """The config the build function receives: ``out_dim`` times the number of quantiles."""
    levels = config.quantiles
    if not levels:
        return config
    return dataclasses.replace(config, out_dim=config.out_dim * len(levels))


def attach_quantile_head(model: nn.Module, config: ModelConfig) -> nn.Module:
    """Make ``model`` (built from :func:`widened` ``config``) return ``(B, H, Q, N)``."""
    levels = config.quantiles
    if not levels:
        return model
    horizons, count = config.out_dim, len(levels)

    def reshape(module: nn.Module, inputs, output: Tensor) -> Tensor:
        if output.dim() != 3 or output.shape[1] != horizons * count:
            raise ValueError(f"a quantile model must output (batch, {horizons * count}, nodes), "
                             f"got {tuple(output.shape)}")
        return output.unflatten(1, (horizons, count))

    model.register_forward_hook(reshape)
    setattr(model, LEVELS_ATTRIBUTE, tuple(float(q) for q in levels))
    return model


def quantile_levels(model: nn.Module) -> tuple[float, ...] | None:
    """The levels of a model built with quantiles; ``None`` for a point model."""
    return getattr(model, LEVELS_ATTRIBUTE, None)


def build_with_quantiles(build: Callable[[ModelConfig], nn.Module], config: ModelConfig) -> nn.Module:
    return attach_quantile_head(build(widened(config)), config)
