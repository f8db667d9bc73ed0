"""Data in: readers, sensor graphs, supports, windows and splits, scaling, synthetic data,
named datasets and their protocols.

The path is ``file -> readings (time x sensors) -> series (time x sensors x features) ->
window views -> batches``; :func:`load_data` runs all of it for a :class:`~gwnet.config.DataConfig`.
"""
from .datasets import TrafficData, load_data, resolve_paths
from .graph import (SensorGraph, align_graph, gaussian_kernel_adjacency, graph_from_edge_index, graph_from_pyg,
                    read_graph)
from .protocols import DatasetSpec, Protocol
from .readers import check_speeds, read_speeds, register_reader
from .scaler import StandardScaler
from .supports import build_supports, to_torch
from .windows import SPLITS, Windows, split_sizes

__all__ = [
    "TrafficData", "load_data", "resolve_paths", "SensorGraph", "align_graph",
    "gaussian_kernel_adjacency", "graph_from_edge_index", "graph_from_pyg", "DatasetSpec", "Protocol", "read_graph", "check_speeds", "read_speeds", "register_reader", "StandardScaler",
    "build_supports", "to_torch", "SPLITS", "Windows", "split_sizes",
]
