"""From a :class:`~gwnet.config.DataConfig` to ready-to-batch data.

``load_data(cfg)`` resolves where the readings and the graph are (a named dataset of
:data:`gwnet.registry.DATASETS`, a directory, or explicit files), fills the options the
dataset's protocol decides (split, target, unit, step), reads both files, aligns the graph
to the data's sensor ids, and cuts the windows. The named ``synthetic`` dataset is generated
on first use and cached.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import scipy.sparse as sp
import torch

from ..config import DataConfig
from ..errors import GWNetError, file_error
from ..registry import DATASETS, READERS
from .graph import SensorGraph, align_graph, read_graph
from .protocols import Protocol, protocol_of
from .readers import ReadOptions, infer_step, read_speeds
from .scaler import StandardScaler
from .supports import build_supports
from .windows import MEMMAP_AUTO_BYTES, Series, Windows, build_series, make_splits, series_cache_key

# A dataset directory's graph file, by preference: DCRNN's pickle, a distances CSV, the PEMS0X
# graph, LargeST's road-network adjacency, any other array adjacency, any other CSV (an edge list).
GRAPH_PATTERNS = ("*.pkl", "distances*.csv", "distance.csv", "PEMS*.csv", "*_rn_adj.npy", "*.npy", "*.csv")

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
    """The one readings file and the graph file in a dataset directory."""
    speeds = sorted(p for p in folder.iterdir() if p.suffix.lower() in speed_extensions())
    if len(speeds) != 1:
        found = ", ".join(p.name for p in speeds) or "none"
        raise file_error(folder, f"expected one readings file ({'/'.join(speed_extensions())}), found {found}; "
                         "pass --data")
    for pattern in GRAPH_PATTERNS:
        graphs = sorted(folder.glob(pattern))
        if len(graphs) > 1:
            raise file_error(folder, f"several graph files ({', '.join(p.name for p in graphs)}); pass --adj")
        if graphs:
            return speeds[0], graphs[0]
    raise file_error(folder, "no graph file (.pkl, distances*.csv, distance.csv, PEMS*.csv, *.npy); pass --adj")


@dataclass(frozen=True)
class Source:
    """Where a config's readings and graph are, and how to read them."""

    data: Path
    graph: Path | None
    options: ReadOptions
    adj_weights: str | None
    protocol: Protocol


def resolve_source(cfg: DataConfig, need_graph: bool = True) -> Source:
    """The files ``cfg`` points to and how to read them (see the module docstring); without
    ``need_graph``, explicit readings (``cfg.data``) may come without a graph file (``graph``
    is then ``None``)."""
    protocol = protocol_of(cfg.dataset, cfg.data is not None)
    spec = DATASETS.get(cfg.dataset) if cfg.data is None else None
    ids = start = None
    weights = cfg.adj_weights
    if cfg.data is not None:
        if cfg.adj is None and need_graph:
            raise file_error(cfg.data, "no sensor graph given; pass --adj (DCRNN pickle, CSV or .npy adjacency)")
        data, graph, key = Path(cfg.data), Path(cfg.adj) if cfg.adj else None, cfg.key
        ids = str(data.with_suffix(".txt"))  # PEMS03.txt beside PEMS03.npz, when present
    elif cfg.dataset == "synthetic":
        folder = synthetic_dir(cfg)
        data, graph, key = folder / "speeds.h5", Path(cfg.adj or folder / "adj_mx.pkl"), "df"
    elif spec is not None:
        root = data_root()
        data = root / spec.data
        graph = Path(cfg.adj) if cfg.adj else next((root / g for g in spec.graph if (root / g).exists()),
                                                    root / spec.graph[0])
        for path in (data, graph):
            if not path.exists():
                raise file_error(path, f"{spec.name} is not downloaded; see data/README.md: get {path.name} from "
                                 f"{spec.where} and put it at {path} (or set GWNET_DATA)")
        key = cfg.key or spec.key
        ids = str(root / spec.ids) if spec.ids else None
        start = spec.start
        weights = weights or spec.adj_weights
    else:
        folder = Path(cfg.dataset)
        if not folder.is_dir():
            raise GWNetError(f"{cfg.dataset}: not a dataset name ({', '.join(['synthetic', *DATASETS])}) "
                             "nor a directory")
        data, graph = _find_in_dir(folder)
        graph = Path(cfg.adj) if cfg.adj else graph
        key = cfg.key
        ids = str(data.with_suffix(".txt"))
    # An array file without a named target holds flow first, as the PEMS0X releases do.
    default_target = "flow" if data.suffix.lower() == ".npz" and spec is None else protocol.target
    _warn_idle_options(cfg, data, protocol.target)
    options = ReadOptions(key=key, target=cfg.target or default_target,
                          start=cfg.start or start, step_minutes=cfg.step_minutes or protocol.step_minutes, ids=ids)
    return Source(data, graph, options, weights, protocol)


def _warn_idle_options(cfg: DataConfig, data: Path, holds: str | None) -> None:
    """Options that would change nothing for this file are said, not silently dropped: a start
    time for a file that has its own timestamps, a target for a file of one quantity whose
    protocol says which (the option would only relabel it)."""
    if data.suffix.lower() == ".npz":  # no timestamps; several features to pick from
        return
    if cfg.start is not None:
        warnings.warn(f"{data}: the file has its own timestamps; --start {cfg.start} is ignored (it places "
                      "files without them, .npz)", stacklevel=3)
    if cfg.target is not None and holds is not None and cfg.target != holds:
        warnings.warn(f"{data}: the file holds one quantity, {holds}; --target {cfg.target} only renames it "
                      "(it picks a feature of a multi-feature .npz)", stacklevel=3)


def resolve_paths(cfg: DataConfig) -> tuple[Path, Path, str | None]:
    """``(readings file, graph file, hdf5 key)`` that ``cfg`` points to."""
    source = resolve_source(cfg)
    return source.data, source.graph, source.options.key


def resolved_config(cfg: DataConfig, protocol: Protocol, speeds: pd.DataFrame, target: str | None) -> DataConfig:
    """``cfg`` with the options its protocol and its files decide filled in (a copy)."""
    step = infer_step(speeds.index) if len(speeds) > 1 else pd.Timedelta(minutes=cfg.step_minutes or
                                                                          protocol.step_minutes)
    minutes = step // pd.Timedelta(minutes=1)
    if cfg.step_minutes is not None and cfg.step_minutes != minutes:
        raise GWNetError(f"step_minutes {cfg.step_minutes} given, but the readings are {minutes} minutes apart")
    out = dataclasses.replace(
        cfg, train_ratio=protocol.train_ratio if cfg.train_ratio is None else cfg.train_ratio,
        test_ratio=protocol.test_ratio if cfg.test_ratio is None else cfg.test_ratio,
        target=cfg.target or target or protocol.target,
        unit=protocol.unit if cfg.unit is None else cfg.unit, step_minutes=int(minutes))
    out.protocol = protocol.describe(out.train_ratio, out.test_ratio, out.target, out.unit, out.step_minutes)
    return out


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

    protocol: Protocol = protocol_of("", True)

    @classmethod
    def from_frames(cls, speeds: pd.DataFrame, graph: SensorGraph, cfg: DataConfig,
                    scaler: StandardScaler | None = None, source: str = "data",
                    graph_source: str = "graph", protocol: Protocol | None = None,
                    series_key: str | None = None, memmap: bool | None = None) -> "TrafficData":
        """Window ``speeds`` (time x sensors, any non-negative quantity) on ``graph`` (aligned
        by sensor id; see :mod:`gwnet.data.graph` for PyG edge_index and other inputs).

        ``series_key`` identifies readings read from a file (:func:`~gwnet.data.windows.series_cache_key`);
        with it the series is memory-mapped from the cache directory when ``memmap`` is true,
        or (``memmap=None``) when it is at least ``MEMMAP_AUTO_BYTES``; ``False``: never."""
        protocol = protocol or protocol_of(cfg.dataset, cfg.data is not None)
        cfg = resolved_config(cfg, protocol, speeds, None)
        graph = align_graph(graph, [str(c) for c in speeds.columns], graph_source)
        big = speeds.shape[0] * speeds.shape[1] * 4 >= MEMMAP_AUTO_BYTES
        mapped = series_key is not None and (memmap or (memmap is None and big))
        series = build_series(speeds, cfg, cache=cache_root() if mapped else None, key=series_key)
        values = series.speeds.numpy()
        if (speeds.dtypes == values.dtype).all():
            # The table becomes a view of the series: the readings are held once (in the page
            # cache when mapped), not once in the table and again in the series.
            speeds = pd.DataFrame(values, index=speeds.index, columns=speeds.columns, copy=False)
        windows, scaler = make_splits(series, speeds.index, cfg, source, scaler)
        return cls(speeds, graph, cfg, series, windows, scaler, source, protocol)

    @property
    def step(self) -> pd.Timedelta:
        """Time between readings."""
        return pd.Timedelta(minutes=self.config.step_minutes)

    @property
    def clamp_max(self) -> float:
        """The upper clamp of forecasts: the protocol's, else the largest training reading."""
        if self.protocol.clamp_max is not None:
            return float(self.protocol.clamp_max)
        train = self.windows["train"]
        rows = train.stop + train.seq_len - 1 + train.first_offset + train.horizon - 1
        return float(self.series.speeds[:rows].max())

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
        if len(self.series) < self.config.seq_len:
            raise file_error(self.source, f"{len(self.series)} readings are too few: the model reads the "
                             f"last {self.config.seq_len} steps")
        x = self.series.gather(torch.arange(len(self.series) - self.config.seq_len, len(self.series)))[None]
        x[..., 0] = (scaler or self.scaler).transform(x[..., 0])
        return x, self.speeds.index[-1]


def load_latest(cfg: DataConfig, sensor_ids: list[str], adjacency, scaler: StandardScaler) -> TrafficData:
    """The readings of ``cfg`` as data to forecast the next steps from, and nothing more.

    The file may hold just the last readings (at least ``cfg.seq_len`` steps): nothing is split
    or fitted. The graph is ``adjacency`` over ``sensor_ids`` (what a run's ``best.pt`` holds)
    unless ``cfg.adj`` names a graph file; the sensors must be the run's (any column order)
    and the step its ``cfg.step_minutes``; inputs are scaled with ``scaler`` (the run's). The
    returned data has no windows (``windows == {}``): use :meth:`TrafficData.latest`.
    """
    source = resolve_source(cfg, need_graph=False)
    path, options, protocol = source.data, source.options, source.protocol
    speeds = read_speeds(path, options=options)
    columns = [str(c) for c in speeds.columns]
    expected = [str(s) for s in sensor_ids]
    if set(columns) != set(expected):
        missing = [s for s in expected if s not in set(columns)]
        extra = [s for s in columns if s not in set(expected)]
        what = (f"lacks {len(missing)} of the run's {len(expected)} sensors, e.g. {missing[0]!r}" if missing
                else f"has {len(extra)} sensors the run was not trained on, e.g. {extra[0]!r}")
        raise file_error(path, f"{what}; forecast from readings of the run's sensors")
    speeds.columns = columns
    speeds = speeds[expected]
    if len(speeds) < cfg.seq_len:
        raise file_error(path, f"{len(speeds)} readings are too few: the model reads the last {cfg.seq_len} steps")
    if not speeds.iloc[-cfg.seq_len:].to_numpy().any():
        raise file_error(path, f"the last {cfg.seq_len} readings of every sensor are missing (0): there is nothing "
                         "to forecast from")
    if len(speeds) > 1:
        minutes = infer_step(speeds.index) // pd.Timedelta(minutes=1)
        if cfg.step_minutes is not None and minutes != cfg.step_minutes:
            raise file_error(path, f"readings are {minutes} minutes apart, the run was trained on "
                             f"{cfg.step_minutes}-minute readings")
    if cfg.adj is not None:
        graph = read_graph(cfg.adj, sensor_ids=expected, normalized_k=cfg.normalized_k,
                           weights=cfg.adj_weights)
        graph = align_graph(graph, expected, str(cfg.adj))
    else:
        graph = SensorGraph(expected, adjacency)
    cfg = dataclasses.replace(cfg, target=cfg.target or options.target)
    if cfg.step_minutes is None:
        cfg.step_minutes = (infer_step(speeds.index) // pd.Timedelta(minutes=1) if len(speeds) > 1
                            else protocol.step_minutes)
    return TrafficData(speeds, graph, cfg, build_series(speeds, cfg), {}, scaler, str(path), protocol)


def load_data(cfg: DataConfig, scaler: StandardScaler | None = None, memmap: bool | None = None) -> TrafficData:
    """Read and window the data ``cfg`` describes (see :func:`resolve_source`); the
    returned data's ``config`` has the protocol's options filled in. ``memmap``: map the
    series from the cache directory (``True``), never (``False``), or when it is large
    (``None``; see :meth:`TrafficData.from_frames`)."""
    source = resolve_source(cfg)
    speeds = read_speeds(source.data, options=source.options)
    graph = read_graph(source.graph, sensor_ids=[str(c) for c in speeds.columns],
                       normalized_k=cfg.normalized_k, weights=source.adj_weights)
    cfg = dataclasses.replace(cfg, target=cfg.target or source.options.target)
    return TrafficData.from_frames(speeds, graph, cfg, scaler, source=str(source.data),
                                   graph_source=str(source.graph), protocol=source.protocol,
                                   series_key=series_cache_key(source.data, source.options), memmap=memmap)
