"""Graph WaveNet layers and model, and loaders for weights trained elsewhere."""
from .adaptive import AdaptiveAdjacency, LowRankAdaptiveAdjacency, TopKAdaptiveAdjacency, build_adaptive
from .graph_conv import DiffusionGraphConv, prepare_support
from .model import GWNet, GWNetLayer
from .reference import load_for_more_horizons, load_reference_checkpoint
from .temporal import GatedTemporalConv

__all__ = [
    "AdaptiveAdjacency", "TopKAdaptiveAdjacency", "LowRankAdaptiveAdjacency", "build_adaptive",
    "DiffusionGraphConv", "GatedTemporalConv", "GWNet", "GWNetLayer",
    "load_for_more_horizons", "load_reference_checkpoint", "prepare_support",
]
