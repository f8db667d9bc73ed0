"""Sensor graphs: the DCRNN adjacency pickle, a distances CSV, and alignment with the data.

A :class:`SensorGraph` is a list of sensor ids and a weighted directed adjacency whose
row/column ``i`` belongs to ``sensor_ids[i]``. Graphs are matched to the speed columns by
id, never by position.
"""
from __future__ import annotations

import io
import os
import pickle
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import file_error


@dataclass
class SensorGraph:
    """Sensor ids and their ``(N, N)`` weighted adjacency (row = source sensor)."""

    sensor_ids: list[str]
    adj: np.ndarray

    def __post_init__(self) -> None:
        self.sensor_ids = [str(s) for s in self.sensor_ids]
        self.adj = np.asarray(self.adj, dtype=np.float32)

    @property
    def num_nodes(self) -> int:
        return len(self.sensor_ids)

    @property
    def density(self) -> float:
        """Share of non-zero entries of the adjacency."""
        return float(np.count_nonzero(self.adj)) / max(self.adj.size, 1)

    def subgraph(self, sensor_ids: list[str], source: str = "graph") -> "SensorGraph":
        """The graph restricted and reordered to ``sensor_ids``; every id must be present."""
        index = {s: i for i, s in enumerate(self.sensor_ids)}
        missing = [s for s in sensor_ids if s not in index]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise file_error(source, f"{len(missing)} sensor(s) of the data are not in the graph: {shown}")
        order = np.array([index[s] for s in sensor_ids], dtype=np.int64)
        return SensorGraph(list(sensor_ids), self.adj[np.ix_(order, order)])


class _AdjacencyUnpickler(pickle.Unpickler):
    """Unpickles only what a DCRNN adjacency holds: containers, strings, numbers, arrays.

    Pickles are untrusted input; anything that would import other code is refused.
    """

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("builtins", "list"), ("builtins", "dict"), ("builtins", "str"), ("builtins", "int"),
        ("__builtin__", "list"), ("__builtin__", "dict"), ("__builtin__", "unicode"),
        ("__builtin__", "str"), ("__builtin__", "int"),
        ("_codecs", "encode"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("__builtin__", "object"), ("builtins", "object"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_adjacency_pickle(path: str | os.PathLike) -> SensorGraph:
    """Read DCRNN's ``[sensor_ids, sensor_id_to_ind, adj_mx]`` pickle (Python 2 ones too)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise file_error(path, f"cannot read graph: {exc.strerror or exc}") from None
    if not raw:
        raise file_error(path, "graph file is empty")
    try:
        obj = _AdjacencyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:
        raise file_error(path, f"not a readable adjacency pickle ({exc})") from None
    if not (isinstance(obj, (list, tuple)) and len(obj) == 3):
        raise file_error(path, "expected the DCRNN triple [sensor_ids, sensor_id_to_ind, adj_mx]")
    sensor_ids, id_to_ind, adj = obj
    if not isinstance(sensor_ids, (list, tuple)) or not isinstance(id_to_ind, dict):
        raise file_error(path, "expected the DCRNN triple [sensor_ids, sensor_id_to_ind, adj_mx]")
    try:
        adj = np.asarray(adj, dtype=np.float32)
    except (TypeError, ValueError):
        raise file_error(path, "adjacency is not a numeric matrix") from None
    ids = [str(s) for s in sensor_ids]
    _check_adjacency(path, adj, ids)
    # The dict is authoritative for which row belongs to which id; honour it if it reorders.
    try:
        rows = [int(id_to_ind[s]) for s in sensor_ids]
    except (KeyError, TypeError, ValueError):
        raise file_error(path, "sensor_id_to_ind does not map every sensor id to a row") from None
    if sorted(rows) != list(range(len(ids))):
        raise file_error(path, "sensor_id_to_ind is not a permutation of the adjacency rows")
    order = np.argsort(rows)
    return SensorGraph([ids[i] for i in order], adj)


def _check_adjacency(path: str, adj: np.ndarray, ids: list[str]) -> None:
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise file_error(path, f"adjacency must be square, got shape {adj.shape}")
    if adj.shape[0] != len(ids):
        raise file_error(path, f"adjacency is {adj.shape[0]}x{adj.shape[1]} but lists {len(ids)} sensor ids")
    if len(set(ids)) != len(ids):
        raise file_error(path, "duplicate sensor ids in the graph")
    if not np.isfinite(adj).all():
        raise file_error(path, "adjacency holds NaN or infinite weights")
    if (adj < 0).any():
        raise file_error(path, "adjacency holds negative weights")


def gaussian_kernel_adjacency(distances: np.ndarray, normalized_k: float = 0.1) -> np.ndarray:
    """DCRNN's thresholded Gaussian kernel: ``exp(-(d / std)^2)``, entries < ``normalized_k`` -> 0.

    ``distances`` is ``(N, N)`` with ``inf`` where no road distance is known; ``std`` is taken
    over the finite entries.
    """
    finite = distances[np.isfinite(distances)]
    std = finite.std() if finite.size else 0.0
    if std == 0:
        std = 1.0
    adj = np.exp(-np.square(distances / std))
    adj[adj < normalized_k] = 0.0
    return adj.astype(np.float32)


def read_distances_csv(path: str | os.PathLike, sensor_ids: list[str] | None = None,
                       normalized_k: float = 0.1) -> SensorGraph:
    """Build a graph from a ``from,to,distance`` CSV (header optional) with DCRNN's kernel.

    Without ``sensor_ids`` the nodes are every id that appears, in order of appearance.
    Rows with an empty distance are skipped (no road distance known).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise file_error(path, "no such graph file")
    try:
        table = pd.read_csv(path, header=None, dtype=str, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        raise file_error(path, "distances CSV is empty") from None
    except Exception as exc:
        raise file_error(path, f"cannot parse distances CSV ({exc})") from None
    if table.shape[1] < 3:
        raise file_error(path, "distances CSV needs three columns: from,to,distance")
    table = table.iloc[:, :3]
    table.columns = ["from", "to", "distance"]
    if table.iloc[0]["distance"] is not None and str(table.iloc[0]["distance"]).strip().lower() == "distance":
        table = table.iloc[1:]
    table = table.dropna(subset=["from", "to"])
    dist = pd.to_numeric(table["distance"], errors="coerce")
    bad = table["distance"].notna() & dist.isna()
    if bad.any():
        line = int(bad.to_numpy().nonzero()[0][0])
        raise file_error(path, f"distance {table['distance'].iloc[line]!r} is not a number")
    if (dist < 0).any():
        raise file_error(path, "negative road distance")
    src = table["from"].str.strip().tolist()
    dst = table["to"].str.strip().tolist()
    if sensor_ids is None:
        sensor_ids = list(dict.fromkeys(src + dst))
    if not sensor_ids:
        raise file_error(path, "distances CSV lists no sensors")
    index = {s: i for i, s in enumerate(sensor_ids)}
    dense = np.full((len(sensor_ids), len(sensor_ids)), np.inf, dtype=np.float64)
    keep = dist.notna().to_numpy()
    for s, d, value in zip(np.asarray(src)[keep], np.asarray(dst)[keep], dist.to_numpy()[keep]):
        if s in index and d in index:
            dense[index[s], index[d]] = value
    return SensorGraph(list(sensor_ids), gaussian_kernel_adjacency(dense, normalized_k))


def read_graph(path: str | os.PathLike, sensor_ids: list[str] | None = None,
               normalized_k: float = 0.1) -> SensorGraph:
    """Read a graph file by extension: ``.pkl`` (DCRNN pickle) or ``.csv`` (distances)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise file_error(path, "no such graph file")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pkl", ".pickle"):
        return read_adjacency_pickle(path)
    if ext in (".csv", ".txt"):
        return read_distances_csv(path, sensor_ids, normalized_k)
    raise file_error(path, "graph must be a DCRNN pickle (.pkl) or a distances CSV (.csv)")


def align_graph(graph: SensorGraph, sensor_ids: list[str], source: str = "graph") -> SensorGraph:
    """Reorder ``graph`` to the data's column order, matching by sensor id.

    Every data sensor must be in the graph; graph sensors without data are dropped with a
    warning (a data file may hold a subset of a published graph).
    """
    aligned = graph.subgraph(sensor_ids, source)
    dropped = graph.num_nodes - aligned.num_nodes
    if dropped:
        warnings.warn(f"{source}: {dropped} graph sensor(s) have no data column and are dropped",
                      stacklevel=2)
    return aligned
