"""Sensor graphs: DCRNN's adjacency pickle, distances and edge-list CSVs, dense or sparse
``.npy``/``.npz`` adjacencies, PyG ``edge_index`` tensors, and alignment with the data.

A :class:`SensorGraph` is a list of sensor ids and a weighted directed adjacency whose
row/column ``i`` belongs to ``sensor_ids[i]``. Graphs are matched to the readings' columns by
id, never by position; the formats that carry no ids (``.npy``, ``.npz``, ``edge_index``) are
in the data's column order, as LargeST publishes them.

How a CSV's edges become weights (``adj_weights``): ``kernel`` is DCRNN's thresholded
Gaussian kernel of the road distances (METR-LA, PEMS-BAY; the default for a
``from,to,distance`` CSV), ``binary`` is 1 in both directions for every listed pair (the
usual use of the PEMS0X ``from,to,cost`` graphs, and of a two-column ``from,to`` list), ``given``
takes a ``weight`` column as it is, in the listed direction.

Every graph says what it holds (:meth:`SensorGraph.describe`, printed at the start of
training and by ``gwnet-data inspect``); a graph read from an edge list also says how many of
the listed edges its weighting kept (:class:`EdgeReport`). DCRNN's kernel cuts every distance
whose weight falls below ``normalized_k`` (0.1): right for the dense distance tables of
METR-LA and PEMS-BAY, where it is the published graph, but a short edge list of one's own can
lose most of its edges to it, so keeping fewer than half of the listed edges is a warning that
names the flags that keep them (``--adj-weights binary``, a lower ``--normalized-k``).
"""
from __future__ import annotations

import io
import os
import pickle
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import GWNetError, file_error
from ..paths import check_input_file
from .arrays import load_sparse_npz, npy_header, npz_members


# Third-column names of a headered graph CSV (a header is also recognised by from,to).
HEADER_NAMES = ("distance", "cost", "weight", "w")
# The largest graph read: a dense N x N float32 adjacency of 20,000 sensors is 1.5 GiB (LargeST's
# whole of California has 8,600). A file asking for more is refused before anything that size
# is allocated, whatever its own size (a pickle can repeat one row object N times).
MAX_GRAPH_SENSORS = 20_000
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_graph_size(path: str, n: int, what: str = "adjacency") -> None:
    """Refuse an ``n x n`` dense adjacency beyond :data:`MAX_GRAPH_SENSORS`."""
    if n > MAX_GRAPH_SENSORS:
        gib = n * n * 4 / 2**30
        raise file_error(path, f"{what} has {n:,} sensors, more than the {MAX_GRAPH_SENSORS:,} gwnet reads "
                         f"(a dense {n:,} x {n:,} adjacency would take {gib:,.1f} GiB)")


def _nested_size(obj, limit: int, seen: dict[int, int] | None = None) -> int:
    """Scalars a nested list/tuple holds, counting a repeated (shared) element each time it
    appears, as ``np.asarray`` would copy it; stops counting past ``limit``."""
    if not isinstance(obj, (list, tuple)):
        return int(obj.size) if isinstance(obj, np.ndarray) else 1
    seen = {} if seen is None else seen
    key = id(obj)
    if key in seen:
        return seen[key]
    seen[key] = limit + 1  # a list holding itself is as good as infinite
    total = 0
    for item in obj:
        total += _nested_size(item, limit, seen)
        if total > limit:
            break
    seen[key] = total
    return total


# How each weighting of an edge list is described in reports and warnings.
WEIGHTINGS = {"kernel": "DCRNN's Gaussian kernel of the distances", "binary": "1 in both directions",
              "given": "the listed weights"}


@dataclass(frozen=True)
class EdgeReport:
    """What an edge list became. ``listed``: distinct pairs of two different sensors of the
    data that the file lists with a value; ``kept``: those with a non-zero weight after the
    weighting; ``unknown``: rows naming a sensor the data lacks; ``no_value``: rows with an empty
    distance; ``conflicting``: pairs listed more than once with different values."""

    listed: int
    kept: int
    unknown: int = 0
    no_value: int = 0
    conflicting: int = 0
    weights: str = "kernel"
    normalized_k: float = 0.1

    @property
    def cut(self) -> int:
        return self.listed - self.kept

    def describe(self) -> str:
        how = WEIGHTINGS[self.weights]
        text = f"{self.kept:,} of {self.listed:,} listed edges kept ({how}"
        if self.weights == "kernel":
            text += f", weights below --normalized-k {self.normalized_k:g} cut"
        text += ")"
        if self.unknown:
            text += f", {self.unknown:,} rows name sensors the data lacks"
        if self.no_value:
            text += f", {self.no_value:,} rows without a value skipped"
        if self.conflicting:
            text += f", {self.conflicting:,} pairs listed twice with different values (the last kept)"
        return text


@dataclass
class SensorGraph:
    """Sensor ids and their ``(N, N)`` weighted adjacency (row = source sensor); ``source``
    names the file it came from, ``report`` what an edge list's weighting kept."""

    sensor_ids: list[str]
    adj: np.ndarray
    source: str | None = None
    report: EdgeReport | None = None

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

    @property
    def isolated(self) -> int:
        """Sensors in no edge with another sensor (self-loops do not count)."""
        linked = self.adj != 0
        np.fill_diagonal(linked, False)
        return int(np.count_nonzero(~(linked.any(axis=0) | linked.any(axis=1))))

    def describe(self) -> str:
        """One line: where the graph comes from, its edges (for an edge list: listed vs kept)
        and how many sensors are in no edge."""
        edges = self.report.describe() if self.report is not None else \
            f"{off_diagonal_edges(self.adj):,} edges between sensors"
        alone = self.isolated
        return (f"graph {self.source or ''}: {self.num_nodes:,} sensors, {edges}; "
                f"{alone:,} sensor{'' if alone == 1 else 's'} in no edge").replace("graph :", "graph:")

    def subgraph(self, sensor_ids: list[str], source: str = "graph") -> "SensorGraph":
        """The graph restricted and reordered to ``sensor_ids``; every id must be present."""
        index = {s: i for i, s in enumerate(self.sensor_ids)}
        missing = [s for s in sensor_ids if s not in index]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise file_error(source, f"{len(missing)} sensor(s) of the data are not in the graph: {shown}")
        order = np.array([index[s] for s in sensor_ids], dtype=np.int64)
        # An edge list's report counts edges among the data's sensors: it holds while they are all kept.
        report = self.report if len(order) == self.num_nodes else None
        return SensorGraph(list(sensor_ids), self.adj[np.ix_(order, order)], self.source, report)


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
    _check_graph_size(path, len(sensor_ids), "sensor_ids")
    if not all(isinstance(s, (str, bytes, int, np.integer, np.str_)) for s in sensor_ids):
        raise file_error(path, "sensor ids must be strings or integers")
    if isinstance(adj, (list, tuple)):
        _check_graph_size(path, len(adj), "adjacency")
        limit = MAX_GRAPH_SENSORS ** 2
        try:
            entries = _nested_size(adj, limit)
        except RecursionError:
            raise file_error(path, "adjacency is nested too deeply to be a matrix") from None
        if entries > max(len(sensor_ids), 1) ** 2:
            raise file_error(path, f"adjacency holds more entries than {len(sensor_ids)} x {len(sensor_ids)} "
                             "(one per pair of the listed sensor ids)")
    elif isinstance(adj, np.ndarray) and adj.ndim >= 1:
        _check_graph_size(path, int(adj.shape[0]), "adjacency")
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


def off_diagonal_edges(adj: np.ndarray) -> int:
    """How many edges of ``adj`` join two different sensors (self-loops do not count)."""
    return int(np.count_nonzero(adj)) - int(np.count_nonzero(np.diagonal(adj)))


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
                       normalized_k: float = 0.1, weights: str | None = None) -> SensorGraph:
    """Build a graph from a ``from,to[,distance|cost|weight]`` CSV (header optional).

    ``weights`` (see the module docstring) defaults by the third column's header: ``weight``
    is ``given``, ``cost`` (PEMS0X) and no third column ``binary``, anything else
    (``distance``, no header) DCRNN's ``kernel``. Without ``sensor_ids`` the nodes are every id that appears,
    in order of appearance. Rows with an empty value are skipped (no road distance known).
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
    if table.shape[1] < 2:
        raise file_error(path, "graph CSV needs the columns from,to[,distance|cost|weight]")
    header = None
    first = [str(v).strip().lower() for v in table.iloc[0]]
    if first[:2] == ["from", "to"] or table.shape[1] >= 3 and first[2] in HEADER_NAMES:
        header, table = first, table.iloc[1:]
    if table.shape[1] == 2:
        table = table.assign(value="1")
        weights = weights or "binary"
    elif weights is None:
        # A weight column is taken as it is; PEMS0X's from,to,cost lists the road links of
        # neighbours, used as a binary undirected graph; distances get DCRNN's kernel.
        third = header[2] if header is not None else None
        weights = "given" if third in ("weight", "w") else "binary" if third == "cost" else "kernel"
    table = table.iloc[:, :3]
    table.columns = ["from", "to", "distance"]
    table = table.dropna(subset=["from", "to"])
    dist = pd.to_numeric(table["distance"], errors="coerce")
    bad = table["distance"].notna() & dist.isna()
    if bad.any():
        line = int(bad.to_numpy().nonzero()[0][0])
        raise file_error(path, f"distance {table['distance'].iloc[line]!r} is not a number")
    if (dist < 0).any():
        raise file_error(path, "negative road distance")
    # A value float32 cannot hold would become inf in the adjacency (or 0 after the kernel).
    huge = dist.notna() & ~(dist.abs() <= FLOAT32_MAX)
    if huge.any():
        line = int(huge.to_numpy().nonzero()[0][0])
        raise file_error(path, f"value {table['distance'].iloc[line]!r} of edge {table['from'].iloc[line]!r} -> "
                         f"{table['to'].iloc[line]!r} is not a finite float32 number")
    src = table["from"].str.strip().tolist()
    dst = table["to"].str.strip().tolist()
    if sensor_ids is None:
        sensor_ids = list(dict.fromkeys(src + dst))
    if not sensor_ids:
        raise file_error(path, "distances CSV lists no sensors")
    index = {s: i for i, s in enumerate(sensor_ids)}
    values = dist.to_numpy()
    no_value = int(np.isnan(values).sum())
    # Distinct pairs, in the listed direction; a pair listed again with another value counts as
    # a conflict, and its last value is the one used (as the dense tables' last write wins).
    chosen: dict[tuple[int, int], float] = {}
    unknown = conflicting = 0
    for s_id, d_id, value in zip(src, dst, values):
        if np.isnan(value):
            continue
        if s_id not in index or d_id not in index:
            unknown += 1
            continue
        key = (index[s_id], index[d_id])
        if key in chosen and chosen[key] != value:
            conflicting += 1
        chosen[key] = float(value)
    n = len(sensor_ids)
    _check_graph_size(path, n, "graph CSV")
    linked = {i for i, j in chosen if i != j} | {j for i, j in chosen if i != j}
    if not linked:
        listed = next(iter(src), None)
        raise file_error(path, f"no edges among the {n} sensors (the file lists ids like {listed!r}, the data "
                         f"has ids like {sensor_ids[0]!r})")
    if len(linked) < n:
        warnings.warn(f"{path}: {n - len(linked)} of {n} sensors appear in no edge of the graph", stacklevel=2)
    if weights == "kernel":
        dense = np.full((n, n), np.inf, dtype=np.float64)
        for (i, j), value in chosen.items():
            dense[i, j] = value
        adj = gaussian_kernel_adjacency(dense, normalized_k)
        if n > 1 and not off_diagonal_edges(adj):
            finite = dense[np.isfinite(dense)]
            why = (f"all {finite.size} distances are equal ({finite[0]:g}), so their spread is 0"
                   if finite.size and finite.std() == 0 else f"every weight is below normalized_k={normalized_k:g}")
            raise file_error(path, f"no edge is left after DCRNN's Gaussian kernel of the distances ({why}); "
                             "use --adj-weights binary or given")
    else:
        adj = np.zeros((n, n), dtype=np.float32)
        for (i, j), value in chosen.items():
            if weights == "binary":
                adj[i, j] = adj[j, i] = 1.0
            else:
                adj[i, j] = value
    between = [(i, j) for i, j in chosen if i != j]
    report = EdgeReport(listed=len(between), kept=sum(1 for i, j in between if adj[i, j] != 0), unknown=unknown,
                        no_value=no_value, conflicting=conflicting, weights=weights, normalized_k=normalized_k)
    if report.kept * 2 < report.listed:
        # The silent failure this guards against: a short edge list of one's own whose distances
        # the kernel mostly cuts, leaving the model an almost empty graph.
        why = (f"DCRNN's Gaussian kernel cut {report.cut} whose weight fell below --normalized-k {normalized_k:g}"
               if weights == "kernel" else f"{report.cut} are listed with weight 0")
        warnings.warn(f"{path}: the graph keeps only {report.kept} of {report.listed} listed edges: {why}; pass "
                      "--adj-weights binary to keep every listed edge"
                      + (", or a lower --normalized-k" if weights == "kernel" else ""), stacklevel=2)
    return SensorGraph(list(sensor_ids), adj, path, report)


def read_adjacency_array(path: str | os.PathLike, sensor_ids: list[str] | None = None,
                         key: str | None = None) -> SensorGraph:
    """A dense ``(N, N)`` ``.npy`` (LargeST's ``*_rn_adj.npy``) or a ``.npz`` holding a scipy
    sparse matrix (``scipy.sparse.save_npz``) or one dense array, in the data's column order
    (``sensor_ids``; without them the nodes are 0..N-1). Read without unpickling."""
    path = os.fspath(path)
    try:
        if path.lower().endswith(".npy"):
            with open(path, "rb") as fh:  # the header's shape, before the array is allocated
                _check_graph_size(path, max(npy_header(fh)[0], default=0))
            adj = np.load(path, allow_pickle=False)
        else:
            names = list(npz_members(path))  # every member's header bounded before any is read
            if {"data", "indices", "indptr", "shape", "format"} <= set(names) or {"row", "col", "shape"} <= set(names):
                matrix = load_sparse_npz(path)  # its structure checked in full: scipy trusts it
                _check_graph_size(path, max(matrix.shape, default=0))
                adj = matrix.toarray()
            else:
                name = key if key in names else (names[0] if len(names) == 1 else "adj" if "adj" in names else None)
                if name is None:
                    raise file_error(path, f"holds {', '.join(names)}; which one is the adjacency?")
                with np.load(path, allow_pickle=False) as npz:
                    with npz.zip.open(name + ".npy") as fh:
                        _check_graph_size(path, max(npy_header(fh)[0], default=0))
                    adj = npz[name]
    except GWNetError:
        raise
    except Exception as exc:
        raise file_error(path, f"not a readable adjacency array ({' '.join(str(exc).split())[:160]})") from None
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise file_error(path, f"adjacency must be square (N, N), got shape {adj.shape}")
    if adj.dtype.kind not in "fiub":
        raise file_error(path, f"adjacency is not numeric ({adj.dtype})")
    adj = adj.astype(np.float32)
    if not np.isfinite(adj).all() or (adj < 0).any():
        raise file_error(path, "adjacency holds negative or non-finite weights")
    ids = list(sensor_ids) if sensor_ids is not None else [str(i) for i in range(adj.shape[0])]
    if len(ids) != adj.shape[0]:
        raise file_error(path, f"adjacency is {adj.shape[0]} x {adj.shape[0]}, the data has {len(ids)} sensors "
                         "(an array graph follows the data's column order)")
    return SensorGraph(ids, adj)


def graph_from_edge_index(edge_index, edge_weight=None, sensor_ids: list[str] | None = None,
                          num_nodes: int | None = None) -> SensorGraph:
    """A graph from a PyG-style ``edge_index`` ``(2, E)`` (row 0 source, row 1 target, node
    positions in the data's column order) and optional ``edge_weight`` ``(E,)`` (default 1)."""
    edges = np.asarray(edge_index.detach().cpu() if hasattr(edge_index, "detach") else edge_index)
    if edges.ndim != 2 or edges.shape[0] != 2 or edges.dtype.kind not in "iu":
        raise GWNetError(f"edge_index must be an integer array of shape (2, E), got {edges.dtype} {edges.shape}")
    n = len(sensor_ids) if sensor_ids is not None else num_nodes
    if n is None:
        n = int(edges.max()) + 1 if edges.size else 0
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise GWNetError(f"edge_index refers to node {int(edges.max())}, but the graph has {n} nodes")
    _check_graph_size("edge_index", n, "graph")
    if edge_weight is None:
        weight = np.ones(edges.shape[1], dtype=np.float32)
    else:
        weight = np.asarray(edge_weight.detach().cpu() if hasattr(edge_weight, "detach") else edge_weight,
                            dtype=np.float32).reshape(-1)
        if weight.shape[0] != edges.shape[1]:
            raise GWNetError(f"edge_weight has {weight.shape[0]} entries for {edges.shape[1]} edges")
        if not np.isfinite(weight).all() or (weight < 0).any():
            raise GWNetError("edge_weight holds negative or non-finite weights")
    adj = np.zeros((n, n), dtype=np.float32)
    np.add.at(adj, (edges[0], edges[1]), weight)
    return SensorGraph(list(sensor_ids) if sensor_ids is not None else [str(i) for i in range(n)], adj)


def graph_from_pyg(data, sensor_ids: list[str] | None = None) -> SensorGraph:
    """A graph from a ``torch_geometric.data.Data`` (its ``edge_index``, and ``edge_weight`` or
    a one-column ``edge_attr``); torch-geometric itself is not imported."""
    weight = getattr(data, "edge_weight", None)
    if weight is None and getattr(data, "edge_attr", None) is not None:
        weight = data.edge_attr
        if weight.dim() > 1 and weight.shape[-1] != 1:
            raise GWNetError(f"edge_attr has {weight.shape[-1]} columns; pass one weight per edge as edge_weight")
    return graph_from_edge_index(data.edge_index, weight, sensor_ids, getattr(data, "num_nodes", None))


def read_graph(path: str | os.PathLike, sensor_ids: list[str] | None = None,
               normalized_k: float = 0.1, weights: str | None = None) -> SensorGraph:
    """Read a graph file by extension: ``.pkl`` (DCRNN pickle), ``.csv`` (distances or an
    edge list, ``weights`` as in :func:`read_distances_csv`), ``.npy``/``.npz`` (an adjacency
    in the data's column order ``sensor_ids``)."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise file_error(path, "no such graph file")
    check_input_file(path, "graph file")  # a FIFO, a device or a link loop: one line, no hang
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pkl", ".pickle"):
        graph = read_adjacency_pickle(path)
    elif ext in (".csv", ".txt"):
        graph = read_distances_csv(path, sensor_ids, normalized_k, weights)
    elif ext in (".npy", ".npz"):
        graph = read_adjacency_array(path, sensor_ids)
    else:
        graph = None
    if graph is not None:
        graph.source = path
        return graph
    raise file_error(path, "graph must be a DCRNN pickle (.pkl), a distances or edge-list CSV (.csv), "
                     "or an adjacency array (.npy, .npz)")


def align_graph(graph: SensorGraph, sensor_ids: list[str], source: str = "graph") -> SensorGraph:
    """Reorder ``graph`` to the data's column order, matching by sensor id.

    Every data sensor must be in the graph; graph sensors without data are dropped with a
    warning (a data file may hold a subset of a published graph). Two or more sensors must
    share at least one edge between different sensors.
    """
    aligned = graph.subgraph(sensor_ids, source)
    if aligned.num_nodes > 1 and not off_diagonal_edges(aligned.adj):
        raise file_error(source, f"the graph has no edge between any two of the data's {aligned.num_nodes} "
                         "sensors (only self-loops, or nothing): the graph convolution would see nothing; "
                         "check the graph file and its weights")
    dropped = graph.num_nodes - aligned.num_nodes
    if dropped:
        warnings.warn(f"{source}: {dropped} graph sensor(s) have no data column and are dropped",
                      stacklevel=2)
    return aligned
