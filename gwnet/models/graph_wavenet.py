"""Graph WaveNet in the registry: the first entry (its presets live in :mod:`gwnet.config`)."""
from __future__ import annotations

from ..config import GWNetConfig
from ..data.supports import to_torch
from ..nn import GWNet
from .registry import Supports, register_model


@register_model("gwnet", GWNetConfig, horizon_head="end_conv_2", preset=False)
def build_gwnet(cfg: GWNetConfig, supports: Supports) -> GWNet:
    """Graph WaveNet on the fixed supports: dense tensors for the reference-math kernel,
    sparse (O(edges)) for the fast one."""
    return GWNet(cfg, to_torch(supports, dense=cfg.graph_conv == "dense"))
