"""From a :class:`~gwnet.config.DataConfig` to ready-to-batch data.

``load_data(cfg)`` resolves where the readings and the graph are (a named dataset, a
directory, or explicit files), reads both, aligns the graph to the data's sensor ids, and
cuts the windows. The named ``synthetic`` dataset is generated on first use and cached.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import scipy.sparse as sp
import torch

from ..config import DataConfig
from ..errors import GWNetError, file_error
from .graph import SensorGraph, align_graph, read_graph
from ..registry import READERS
from .readers import read_speeds
from .scaler import StandardScaler
from .supports import build_supports
from .windows import Series, Windows, build_series, make_splits

# Conventional locations below the data root ($GWNET_DATA, else ./data), as DCRNN lays them out.
NAMED = {
    "metr-la": dict(data="metr-la.h5", key="df", adj="sensor_graph/adj_mx.pkl"),
    "pems-bay": dict(data="pems-bay.h5", key="speed", adj="sensor_graph/adj_mx_bay.pkl"),
}

def speed_extensions() -> tuple[str, ...]:
    """What a dataset directory's speeds file may end in: any registered format but CSV, which
    in such a directory is the distances graph."""
    return tuple(ext for ext in READERS if ext != ".csv")


def data_root() -> Path:
    return Path(os.environ.get("GWNET_DATA", "data"))


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gwnet"
    return Path(os.environ.get("GWNET_CACHE", default))


def synthetic_dir(cfg: DataConfig) -> Path:
    """The cached synthetic dataset for ``cfg``'s size and seed, generated if absent."""
    from . import synthetic

    out = cache_root() / f"synthetic-n{cfg.synth_nodes}-d{cfg.synth_days}-s{cfg.synth_seed}"
    if not (out / "speeds.h5").exists() or not (out / "adj_mx.pkl").exists():
        synthetic.write(out, nodes=cfg.synth_nodes, days=cfg.synth_days, seed=cfg.synth_seed)
    return out


def _find_in_dir(folder: Path) -> tuple[Path, Path]:
    """The one speeds file and the graph file in a dataset directory."""
    speeds = sorted(p for p in folder.iterdir() if p.suffix.lower() in speed_extensions())
    if len(speeds) != 1:
        found = ", ".join(p.name for p in speeds) or "none"
        raise file_error(folder, f"expected one speeds file (.h5/.parquet), found {found}; pass --data")
    graphs = sorted(folder.glob("*.pkl")) or sorted(folder.glob("distances*.csv"))
    if len(graphs) != 1:
        found = ", ".join(p.name for p in graphs) or "none"
        raise file_error(folder, f"expected one graph file (.pkl or distances*.csv), found {found}; pass --adj")
    return speeds[0], graphs[0]


def resolve_paths(cfg: DataConfig) -> tuple[Path, Path, str | None]:
    """``(speeds file, graph file, hdf5 key)`` that ``cfg`` points to."""
    if cfg.data is not None:
        if cfg.adj is None:
            raise file_error(cfg.data, "no sensor graph given; pass --adj (DCRNN pickle or distances CSV)")
        return Path(cfg.data), Path(cfg.adj), cfg.key
    name = cfg.dataset
    if name == "synthetic":
        folder = synthetic_dir(cfg)
        return folder / "speeds.h5", Path(cfg.adj or folder / "adj_mx.pkl"), "df"
    if name in NAMED:
        spec = NAMED[name]
        root = data_root()
        speeds, graph = root / spec["data"], Path(cfg.adj or root / spec["adj"])
        for path in (speeds, graph):
            if not path.exists():
                raise file_error(path, f"{name} is not downloaded; see data/README.md for where to get "
                                 f"{path.name} and put it at {path} (or set GWNET_DATA)")
        return speeds, graph, cfg.key or spec["key"]
    folder = Path(name)
    if not folder.is_dir():
        raise GWNetError(f"{name}: not a dataset name (synthetic, metr-la, pems-bay) nor a directory")
    speeds, graph = _find_in_dir(folder)
    return speeds, Path(cfg.adj) if cfg.adj else graph, cfg.key


@dataclass
class TrafficData:
    """A speed table, its aligned sensor graph, the model-ready series and its window splits."""

    speeds: pd.DataFrame
    graph: SensorGraph
    config: DataConfig
    series: Series
    windows: dict[str, Windows]
    scaler: StandardScaler
    source: str = "data"

    @classmethod
    def from_frames(cls, speeds: pd.DataFrame, graph: SensorGraph, cfg: DataConfig,
                    scaler: StandardScaler | None = None, source: str = "data",
                    graph_source: str = "graph") -> "TrafficData":
        graph = align_graph(graph, [str(c) for c in speeds.columns], graph_source)
        series = build_series(speeds, cfg)
        windows, scaler = make_splits(series, speeds.index, cfg, source, scaler)
        return cls(speeds, graph, cfg, series, windows, scaler, source)

    @property
    def sensor_ids(self) -> list[str]:
        return self.graph.sensor_ids

    @property
    def num_nodes(self) -> int:
        return self.graph.num_nodes

    def supports(self) -> list[sp.csr_matrix]:
        return build_supports(self.graph.adj, self.config.adjtype)

    def latest(self, scaler: StandardScaler | None = None) -> tuple[torch.Tensor, pd.Timestamp]:
        """The last ``seq_len`` readings as one scaled input ``(1, seq_len, N, F)``, and its origin."""
        x = self.series.gather(torch.arange(len(self.series) - self.config.seq_len, len(self.series)))[None]
        x[..., 0] = (scaler or self.scaler).transform(x[..., 0])
        return x, self.speeds.index[-1]


def load_data(cfg: DataConfig, scaler: StandardScaler | None = None) -> TrafficData:
    """Read and window the data ``cfg`` describes (see :func:`resolve_paths`)."""
    speeds_path, graph_path, key = resolve_paths(cfg)
    speeds = read_speeds(speeds_path, key)
    graph = read_graph(graph_path, sensor_ids=[str(c) for c in speeds.columns],
                       normalized_k=cfg.normalized_k)
    return TrafficData.from_frames(speeds, graph, cfg, scaler, source=str(speeds_path),
                                   graph_source=str(graph_path))
