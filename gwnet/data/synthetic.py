"""A synthetic traffic-speed dataset in the METR-LA formats, the package's default data.

Real loop-detector readings cannot always be downloaded, so :func:`generate` simulates a
road network and its 5-minute speeds, and :func:`write` stores them exactly as METR-LA is
published: ``speeds.h5`` (a pandas frame under key ``df``), DCRNN's ``adj_mx.pkl`` triple,
``distances.csv`` (``from,to,distance`` in meters) and ``locations.csv``.

What is modelled:

* **Network.** A few straight freeways cross a planar region (around Los Angeles); each has
  two carriageways with sensors every 0.3-3 km. A sensor links to the next one downstream;
  where freeways cross, interchange ramps link the last sensor before the crossing to the
  first one after it on the other freeway. Road distances are shortest directed paths,
  unknown (``inf``) beyond a cutoff, and the adjacency is DCRNN's thresholded Gaussian
  kernel of them (about 4% dense at 207 sensors, like METR-LA).
* **Demand.** A daily cycle with morning and evening rush hours, the morning one heavier
  towards the city on one carriageway and the evening one on the other; weekends have a
  weaker midday hump instead. Each day shifts and scales the peaks a little, and each
  sensor's demand wanders slowly around its carriageway's.
* **Congestion.** Sensors whose demand exceeds their capacity (bottlenecks, mostly merges
  after interchanges) break down; a congested sensor slows the sensors upstream of it after
  the time a backward shockwave needs to cover the gap, so queues grow upstream and the
  readings downstream foreshadow those upstream. Random incidents (more in busy hours) cut
  a sensor's capacity for tens of minutes and spread the same way; queues clear gradually.
* **Readings.** Free-flow speed 60-70 mph per sensor, a mild slowdown with traffic volume,
  autocorrelated sensor noise, values clipped to 70 mph like METR-LA and stored as float32.
  Missing readings are 0.0: single dropouts, sensor outages of hours and rare gaps where
  the whole network reports nothing.

The same seed gives byte-identical arrays.
"""
from __future__ import annotations

import operator
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.signal import lfilter
from scipy.sparse.csgraph import dijkstra

from ..atomic import atomic_path
from ..errors import GWNetError
from ..paths import check_plain_name
from .graph import SensorGraph, gaussian_kernel_adjacency

STEPS_PER_DAY = 288  # 5-minute readings
MAX_SPEED = 70.0  # METR-LA clips speeds at 70 mph
MIN_SPEED = 3.0  # valid readings stay above 0, which is reserved for "missing"
MAX_NODES = 10_000  # the adjacency and the distances are dense N x N matrices

# Network layout (meters).
SENSOR_GAP_MIN = 300.0  # gaps are this plus a gamma draw: mean ~1.1 km, rarely above 3 km
SENSOR_GAP_SHAPE, SENSOR_GAP_SCALE = 2.0, 400.0
ROAD_CUTOFF = 13_000.0  # road distances beyond this are unknown, as in DCRNN's file
KERNEL_K = 0.1  # DCRNN's normalized_k
CENTER_LAT, CENTER_LON = 34.08, -118.30
M_PER_DEG_LAT = 110_574.0
M_PER_DEG_LON = 111_320.0 * np.cos(np.radians(CENTER_LAT))

# Traffic dynamics.
SHOCKWAVE_M_PER_STEP = 600.0  # queue tails grow upstream at ~7 km/h
MAX_DELAY = 6  # steps; longer gaps take this long
CHAIN_SPILL = 0.9  # share of a downstream queue felt upstream on the same carriageway
RAMP_SPILL = 0.15  # the same through an interchange ramp (taken from the chain's share)
ONSET_RATE, CLEAR_RATE = 0.6, 0.2  # per step: breakdowns are sudden, recovery gradual
BREAKDOWN_WIDTH = 0.1  # demand above capacity by this much means full congestion
INCIDENTS_PER_SENSOR_DAY = 0.12

# Missing readings.
DROPOUT_RATE = 0.004  # single lost readings
OUTAGES_PER_SENSOR_DAY = 0.1
OUTAGE_MEDIAN_STEPS = 36  # 3 hours
NETWORK_GAPS_PER_DAY = 1 / 30


@dataclass
class SyntheticTraffic:
    """A generated dataset; ``speeds`` columns, ``graph`` and ``locations`` share one order.

    ``flow`` (vehicles per step) and ``occupancy`` (share of time a detector is covered) are
    the same traffic seen as PEMS counts it; ``links`` are the road links between sensors
    (upstream, downstream column positions) with ``link_m`` their lengths.
    """

    speeds: pd.DataFrame
    graph: SensorGraph
    distances: pd.DataFrame
    locations: pd.DataFrame
    flow: pd.DataFrame | None = None
    occupancy: pd.DataFrame | None = None
    links: np.ndarray | None = None
    link_m: np.ndarray | None = None
    lanes: np.ndarray | None = None

    def resampled(self, step_minutes: int) -> "SyntheticTraffic":
        """The same traffic at a coarser step (a multiple of 5 minutes): flows summed, speeds
        and occupancies averaged over the readings present; missing where all are."""
        if step_minutes % 5 or step_minutes < 5 or 1440 % step_minutes:
            raise GWNetError(f"synthetic data: step must be a multiple of 5 minutes dividing a day, got {step_minutes}")
        k = step_minutes // 5
        if k == 1:
            return self
        steps = len(self.speeds) // k * k

        def pool(frame: pd.DataFrame, how: str) -> pd.DataFrame:
            return pd.DataFrame(_pool(frame.to_numpy()[:steps], k, how), index=frame.index[:steps:k],
                                columns=frame.columns)

        return SyntheticTraffic(pool(self.speeds, "mean"), self.graph, self.distances, self.locations,
                                pool(self.flow, "sum"), pool(self.occupancy, "mean"), self.links, self.link_m,
                                self.lanes)


def _pool(values: np.ndarray, k: int, how: str) -> np.ndarray:
    """Every ``k`` rows into one: the sum (counts) or the mean of the readings present (0 where
    none is)."""
    values = values.reshape(len(values) // k, k, -1)
    count = (values > 0).sum(axis=1)
    total = values.sum(axis=1)
    out = total if how == "sum" else total / np.maximum(count, 1)
    return np.where(count > 0, out, 0.0).astype(np.float32)


@dataclass
class _Network:
    """Sensors in layout order: grouped by carriageway, each in driving order."""

    xy: np.ndarray  # (N, 2) meters east/north of the centre
    carriageway: np.ndarray  # (N,) index into the carriageway profiles
    inbound: np.ndarray  # (n_carriageways,) True where the morning rush is the heavy one
    links: np.ndarray  # (L, 2) upstream -> downstream sensor of each road link
    link_m: np.ndarray  # (L,) road length of each link
    ramp: np.ndarray  # (L,) True for interchange ramps
    bottleneck: np.ndarray  # (N,) True where capacity is low
    distances: np.ndarray  # (N, N) directed road distance, inf beyond the cutoff


def generate(nodes: int = 40, days: int = 14, seed: int = 0,
             start: str = "2012-03-01") -> SyntheticTraffic:
    """Simulate ``days`` of 5-minute speeds at ``nodes`` sensors, starting at ``start``."""
    nodes, days, seed = _check_arguments(nodes, days, seed)
    try:
        index = pd.date_range(pd.Timestamp(start), periods=days * STEPS_PER_DAY, freq="5min",
                              unit="ns")  # METR-LA's resolution
    except (TypeError, ValueError):
        raise GWNetError(f"synthetic data: start {start!r} is not a date") from None
    rng = np.random.default_rng(seed)
    net = _road_network(nodes, rng)
    speeds, demand, capacity, congestion = _simulate_traffic(net, index, rng)
    # Counts draw from their own stream, so the speeds of a seed are those of earlier versions.
    count_rng = np.random.default_rng([seed, 1])
    lanes = count_rng.integers(2, 7, nodes)
    flow, occupancy = _counts(speeds, demand, capacity, congestion, lanes, count_rng)
    # Publish the sensors in a random order with random ids, as real files are: neither the
    # column position nor the id may tell a model which sensors are neighbours.
    order = rng.permutation(nodes)
    ids = [str(i) for i in 400_000 + rng.choice(600_000, size=nodes, replace=False)]
    dist = np.round(net.distances[np.ix_(order, order)], 1)
    src, dst = np.nonzero(np.isfinite(dist))
    lat = CENTER_LAT + net.xy[order, 1] / M_PER_DEG_LAT
    lon = CENTER_LON + net.xy[order, 0] / M_PER_DEG_LON
    position = np.argsort(order)  # layout index -> published column
    return SyntheticTraffic(
        speeds=pd.DataFrame(speeds[:, order], index=index, columns=ids),
        flow=pd.DataFrame(flow[:, order], index=index, columns=ids),
        occupancy=pd.DataFrame(occupancy[:, order], index=index, columns=ids),
        links=position[net.links], link_m=net.link_m.copy(), lanes=lanes[order],
        graph=SensorGraph(ids, gaussian_kernel_adjacency(dist, KERNEL_K)),
        distances=pd.DataFrame({"from": [ids[i] for i in src], "to": [ids[j] for j in dst],
                                "distance": dist[src, dst]}),
        locations=pd.DataFrame({"sensor_id": ids, "latitude": np.round(lat, 6),
                                "longitude": np.round(lon, 6)}),
    )


LAYOUTS = ("metr-la", "pems", "largest")
TARGETS = ("speed", "flow", "occupancy")


def layout_files(layout: str, name: str | None = None) -> tuple[str, ...]:
    """The file names :func:`write` writes for ``layout`` (and file stem ``name``, a plain file
    name: ``../x`` would write beside the output folder)."""
    name = check_plain_name("synthetic" if name is None else name, "synthetic data: --name")
    return {"metr-la": ("distances.csv", "locations.csv", "adj_mx.pkl", "speeds.h5"),
            "pems": (f"{name}.csv", f"{name}.npz"),
            "largest": (f"{name}_meta.csv", f"{name}_rn_adj.npy", f"{name}_his_2019.h5")}[layout]


def write(out_dir: str | os.PathLike, nodes: int = 40, days: int = 14, seed: int = 0,
          layout: str = "metr-la", step: int | None = None, target: str | None = None,
          name: str | None = None) -> dict[str, Path]:
    """Generate a dataset and write it in one published layout into ``out_dir``.

    ``metr-la`` (default: 5-minute speeds): ``speeds.h5`` (pandas frame, key ``df``), DCRNN's
    ``adj_mx.pkl``, ``distances.csv`` and ``locations.csv``; with ``target`` flow or
    occupancy, the frame holds that quantity instead.
    ``pems`` (PEMS04/08, 5 minutes): ``NAME.npz`` with key ``data`` of shape (steps, sensors,
    3) holding flow, occupancy and speed, and ``NAME.csv`` with ``from,to,cost`` (meters)
    for every road link, sensors numbered 0..N-1 (default NAME: synthetic).
    ``largest`` (LargeST, 15 minutes, flow): ``NAME_his_2019.h5`` (pandas frame, key ``t``),
    ``NAME_rn_adj.npy`` (the dense adjacency in the frame's column order) and ``NAME_meta.csv``
    (ID, Lat, Lng, District, County, Fwy, Lane, Type, Direction). It is simulated a week at a
    time and streamed into the file, so a year of 8,600 sensors needs memory of the order of
    the file, not of the whole simulation (the weeks share the network and the sensors; each
    week draws its own days, noise, incidents and outages).

    Returns the written paths by role (``speeds`` is the readings file, ``adj`` the graph).
    Each file appears complete or not at all, and the readings file is written last.
    """
    nodes, days, seed = _check_arguments(nodes, days, seed)  # before anything touches the disk
    if layout not in LAYOUTS:
        raise GWNetError(f"synthetic data: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    target = target or ("flow" if layout == "largest" else "speed")
    if target not in TARGETS:
        raise GWNetError(f"synthetic data: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if step is None:
        step = 15 if layout == "largest" else 5
    elif isinstance(step, bool) or not isinstance(step, int) or step < 5 or step % 5 or 1440 % step:
        raise GWNetError(f"synthetic data: step must be a multiple of 5 minutes dividing a day, got {step!r}")
    name = check_plain_name("synthetic" if name is None else name, "synthetic data: --name")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GWNetError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    if layout == "largest":
        return _write_largest(out, nodes, days, seed, step, target, name)
    data = generate(nodes, days, seed).resampled(step)
    ids = data.graph.sensor_ids
    readings = {"speed": data.speeds, "flow": data.flow, "occupancy": data.occupancy}[target]
    writers: dict[str, tuple[str, Callable[[Path], None]]]
    if layout == "metr-la":
        triple = [list(ids), {s: i for i, s in enumerate(ids)}, data.graph.adj]

        def dump_pickle(path: Path) -> None:
            with open(path, "wb") as fh:
                pickle.dump(triple, fh, protocol=2)  # protocol 2: what DCRNN's files use

        # The speeds go last: a folder that holds speeds.h5 holds the whole dataset.
        writers = {
            "distances": ("distances.csv", lambda p: data.distances.to_csv(p, index=False)),
            # METR-LA's graph_sensor_locations.csv carries the row number as an "index" column.
            "locations": ("locations.csv", lambda p: data.locations.to_csv(p, index_label="index")),
            "adj": ("adj_mx.pkl", dump_pickle),
            "speeds": ("speeds.h5", lambda p: readings.to_hdf(p, key="df", mode="w", format="fixed")),
        }
    elif layout == "pems":
        edges = pd.DataFrame({"from": data.links[:, 0], "to": data.links[:, 1], "cost": np.round(data.link_m, 1)})
        array = np.stack([data.flow.to_numpy(), data.occupancy.to_numpy(), data.speeds.to_numpy()], axis=-1)

        def dump_npz(path: Path) -> None:
            with open(path, "wb") as fh:
                np.savez_compressed(fh, data=array.astype(np.float32))

        writers = {"adj": (f"{name}.csv", lambda p: edges.to_csv(p, index=False)),
                   "speeds": (f"{name}.npz", dump_npz)}
    else:
        return _write_largest(out, nodes, days, seed, step, target, name)
    paths = {}
    for key, (filename, write_to) in writers.items():
        paths[key] = _atomic_write(out / filename, write_to)
    return paths


CHUNK_DAYS = 7


def _write_largest(out: Path, nodes: int, days: int, seed: int, step: int, target: str,
                   name: str) -> dict[str, Path]:
    """The LargeST layout, simulated a week at a time and streamed into the frame."""
    if step % 5 or 1440 % step:
        raise GWNetError(f"synthetic data: step must be a multiple of 5 minutes dividing a day, got {step}")
    rng = np.random.default_rng(seed)
    net = _road_network(nodes, rng)
    order = rng.permutation(nodes)  # published in a random order with random ids, as in generate()
    ids = [int(i) for i in 400_000 + rng.choice(600_000, size=nodes, replace=False)]
    constants = _sensor_constants(net, np.random.default_rng([seed, 2]))
    count_rng = np.random.default_rng([seed, 1])
    lanes = count_rng.integers(2, 7, nodes)
    adjacency = gaussian_kernel_adjacency(np.round(net.distances[np.ix_(order, order)], 1), KERNEL_K)
    del net.distances  # the largest array; the simulation needs only the links
    lat = CENTER_LAT + net.xy[order, 1] / M_PER_DEG_LAT
    lon = CENTER_LON + net.xy[order, 0] / M_PER_DEG_LON
    meta = pd.DataFrame({"ID": ids, "Lat": np.round(lat, 6), "Lng": np.round(lon, 6), "District": 7,
                         "County": "Los Angeles", "Fwy": "I-5", "Lane": lanes[order], "Type": "Mainline",
                         "Direction": "N"})
    paths = {"meta": _atomic_write(out / f"{name}_meta.csv", lambda p: meta.to_csv(p, index=False))}

    def dump_npy(path: Path, adjacency: np.ndarray = adjacency) -> None:
        with open(path, "wb") as fh:
            np.save(fh, adjacency)

    paths["adj"] = _atomic_write(out / f"{name}_rn_adj.npy", dump_npy)
    del adjacency, dump_npy  # N x N: not kept while the weeks are simulated
    k = step // 5
    start = pd.Timestamp("2019-01-01")
    index = pd.date_range(start, periods=days * STEPS_PER_DAY // k, freq=f"{step}min", unit="ns")
    how = "sum" if target == "flow" else "mean"

    def stream(path: Path) -> None:
        with FixedFrameWriter(path, "t", ids, index) as frame:
            for chunk, day in enumerate(range(0, days, CHUNK_DAYS)):
                span = pd.date_range(start + pd.Timedelta(days=day), freq="5min", unit="ns",
                                     periods=min(CHUNK_DAYS, days - day) * STEPS_PER_DAY)
                crng = np.random.default_rng([seed, 3, chunk])
                speed, demand, capacity, congestion = _simulate_traffic(net, span, crng, constants)
                if target == "speed":
                    values = speed
                else:
                    flow, occupancy = _counts(speed, demand, capacity, congestion, lanes, crng)
                    values = flow if target == "flow" else occupancy
                frame.write(_pool(values[:, order], k, how))

    paths["speeds"] = _atomic_write(out / f"{name}_his_2019.h5", stream)
    return paths


class FixedFrameWriter:
    """Writes a float32 frame in pandas' fixed HDF5 format row block by row block, so a frame
    larger than memory can be written: ``pandas.read_hdf`` and gwnet's reader both read it.

    The layout is what ``DataFrame.to_hdf(format="fixed")`` writes for one float block: a group
    with ``pandas_type=frame``, ``axis0`` (column labels), ``axis1`` (timestamps as int64 ns),
    ``block0_items`` and ``block0_values`` (rows x columns), with PyTables' node attributes.
    """

    def __init__(self, path: Path, key: str, columns: list, index: pd.DatetimeIndex):
        self.path, self.key, self.columns, self.index = path, key, columns, index
        self.row = 0

    def __enter__(self) -> "FixedFrameWriter":
        import h5py

        self.file = h5py.File(self.path, "w")
        for name, value in (("CLASS", b"GROUP"), ("PYTABLES_FORMAT_VERSION", b"2.1"), ("TITLE", b""),
                            ("VERSION", b"1.0")):
            _text_attr(self.file, name, value)
        group = self.file.create_group(self.key)
        for name, value in (("CLASS", b"GROUP"), ("TITLE", b""), ("VERSION", b"1.0"),
                            ("axis0_variety", b"regular"), ("axis1_variety", b"regular"),
                            ("block0_items_variety", b"regular"), ("encoding", b"UTF-8"),
                            ("errors", b"strict"), ("pandas_type", b"frame")):
            _text_attr(group, name, value)
        group.attrs["nblocks"], group.attrs["ndim"] = np.int64(1), np.int64(2)
        integer = all(isinstance(c, (int, np.integer)) for c in self.columns)
        labels = np.array(self.columns, dtype=np.int64 if integer else "S")
        self._array(group, "axis0", labels, kind=b"integer" if integer else b"string")
        self._array(group, "block0_items", labels, kind=b"integer" if integer else b"string")
        stamps = self._array(group, "axis1", self.index.as_unit("ns").asi8, kind=b"datetime64[ns]")
        _text_attr(stamps, "index_class", b"datetime")
        rows, cols = len(self.index), len(self.columns)
        self.values = group.create_dataset("block0_values", shape=(rows, cols), dtype=np.float32,
                                           chunks=(max(1, min(rows, 1 << 20 // max(cols, 1))), cols))
        self._attrs(self.values)
        return self

    @staticmethod
    def _attrs(dataset, kind: bytes | None = None) -> None:
        for name, value in (("CLASS", b"ARRAY"), ("FLAVOR", b"numpy"), ("TITLE", b""), ("VERSION", b"2.4")):
            _text_attr(dataset, name, value)
        dataset.attrs["transposed"] = np.uint8(1)
        if kind is not None:
            _text_attr(dataset, "kind", kind)
            _text_attr(dataset, "name", b"N.")

    def _array(self, group, name: str, values: np.ndarray, kind: bytes):
        dataset = group.create_dataset(name, data=values)
        self._attrs(dataset, kind)
        return dataset

    def write(self, rows: np.ndarray) -> None:
        end = self.row + len(rows)
        if end > len(self.index) or rows.shape[1:] != (len(self.columns),):
            raise ValueError(f"rows {self.row}..{end} of shape {rows.shape} do not fit the frame")
        self.values[self.row:end] = rows
        self.row = end

    def __exit__(self, *exc) -> None:
        self.file.close()
        if exc[0] is None and self.row != len(self.index):
            raise ValueError(f"wrote {self.row} of {len(self.index)} rows")


def _text_attr(node, name: str, value: bytes) -> None:
    """A string attribute as PyTables writes one (UTF-8, fixed length; empty ones null), so
    that PyTables, and pandas through it, read it back as text."""
    import h5py

    if not value:
        node.attrs[name] = h5py.Empty(dtype="S1")
        return
    node.attrs.create(name, np.array(value, dtype=h5py.string_dtype("utf-8", len(value))))


def _check_arguments(nodes: int, days: int, seed: int) -> tuple[int, int, int]:
    values = []
    for name, value, low in (("nodes", nodes, 2), ("days", days, 1), ("seed", seed, 0)):
        if isinstance(value, bool):
            raise GWNetError(f"synthetic data: {name} must be an integer, got {value!r}")
        try:
            value = operator.index(value)
        except TypeError:
            raise GWNetError(f"synthetic data: {name} must be an integer, got {value!r}") from None
        if value < low:
            raise GWNetError(f"synthetic data: {name} must be at least {low}, got {value}")
        values.append(value)
    if values[0] > MAX_NODES:
        raise GWNetError(f"synthetic data: nodes must be at most {MAX_NODES}, got {values[0]}")
    return values[0], values[1], values[2]


def _atomic_write(path: Path, write_to: Callable[[Path], None]) -> Path:
    """``write_to`` a temporary file beside ``path``, then rename it over ``path``."""
    try:
        with atomic_path(path) as tmp:
            write_to(tmp)
    except OSError as exc:
        raise GWNetError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def _road_network(nodes: int, rng: np.random.Generator) -> _Network:
    """Lay out freeways, place sensors along both carriageways and link them into roads."""
    n_freeways = max(1, round(np.sqrt(nodes) / 3))
    n_cw = 2 * n_freeways  # carriageway 2f drives up the freeway's axis, 2f + 1 down it
    per_cw = np.full(n_cw, nodes // n_cw)
    per_cw[rng.permutation(n_cw)[: nodes % n_cw]] += 1

    # Sensor positions along each carriageway's axis, in meters from the freeway's start.
    gaps = SENSOR_GAP_MIN + rng.gamma(SENSOR_GAP_SHAPE, SENSOR_GAP_SCALE, size=nodes)
    first = rng.uniform(200.0, 1500.0, size=n_cw)
    axis_pos, bounds = [], np.cumsum(np.concatenate([[0], per_cw]))
    for c in range(n_cw):
        axis_pos.append(first[c] + np.cumsum(gaps[bounds[c]:bounds[c + 1]]) - gaps[bounds[c]])
    # Every carriageway has a sensor, as 2 * max(1, round(sqrt(n) / 3)) <= n for n >= 2.
    length = np.array([max(axis_pos[2 * f][-1], axis_pos[2 * f + 1][-1])
                       for f in range(n_freeways)]) + rng.uniform(200.0, 1500.0, size=n_freeways)
    # The downward carriageway meets its sensors in reverse axis order.
    for f in range(n_freeways):
        axis_pos[2 * f + 1] = length[f] - axis_pos[2 * f + 1]

    # Freeways at spread-out angles through points near the centre, so that most cross.
    angle = np.pi * np.arange(n_freeways) / n_freeways + rng.normal(0.0, 0.15, n_freeways)
    direction = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    middle = rng.normal(0.0, 0.15, (n_freeways, 2)) * length.mean()
    origin = middle - direction * length[:, None] / 2

    freeway = np.repeat(np.arange(n_cw) // 2, per_cw)
    carriageway = np.repeat(np.arange(n_cw), per_cw)
    pos = np.concatenate(axis_pos)
    sign = np.where(carriageway % 2 == 0, 1.0, -1.0)  # travel direction along the axis
    normal = np.stack([direction[freeway, 1], -direction[freeway, 0]], axis=1)
    xy = origin[freeway] + direction[freeway] * pos[:, None] + normal * (15.0 * sign)[:, None]

    links, link_m, ramp = [], [], []
    for c in range(n_cw):
        s = np.arange(bounds[c], bounds[c + 1])
        links += list(zip(s[:-1], s[1:]))
        link_m += list(np.abs(np.diff(pos[s])))
        ramp += [False] * (len(s) - 1)

    bottleneck = rng.random(nodes) < 0.08
    for a in range(n_freeways):
        for b in range(a + 1, n_freeways):
            cross = direction[a, 0] * direction[b, 1] - direction[a, 1] * direction[b, 0]
            if abs(cross) < 0.2:  # nearly parallel: no interchange
                continue
            delta = origin[b] - origin[a]
            at_a = (delta[0] * direction[b, 1] - delta[1] * direction[b, 0]) / cross
            at_b = (delta[0] * direction[a, 1] - delta[1] * direction[a, 0]) / cross
            if not (0 <= at_a <= length[a] and 0 <= at_b <= length[b]):
                continue
            for (f, at_f), (g, at_g) in (((a, at_a), (b, at_b)), ((b, at_b), (a, at_a))):
                for c_from in (2 * f, 2 * f + 1):
                    for c_to in (2 * g, 2 * g + 1):
                        u = _last_before(pos, sign, bounds, c_from, at_f)
                        v = _first_after(pos, sign, bounds, c_to, at_g)
                        if u is None or v is None:
                            continue
                        links.append((u, v))
                        link_m.append(abs(at_f - pos[u]) + abs(pos[v] - at_g)
                                      + rng.uniform(200.0, 800.0))
                        ramp.append(True)
                        # Merging traffic makes the sensor after a ramp a likely bottleneck.
                        bottleneck[v] |= rng.random() < 0.5

    links = np.array(links, dtype=np.int64).reshape(-1, 2)
    link_m = np.round(np.array(link_m, dtype=np.float64), 1)
    roads = sp.csr_matrix((link_m, (links[:, 0], links[:, 1])), shape=(nodes, nodes))
    distances = dijkstra(roads, directed=True, limit=ROAD_CUTOFF)
    return _Network(xy=xy, carriageway=carriageway, inbound=rng.random(n_cw) < 0.5,
                    links=links, link_m=link_m, ramp=np.array(ramp, dtype=bool),
                    bottleneck=bottleneck, distances=distances)


def _last_before(pos: np.ndarray, sign: np.ndarray, bounds: np.ndarray, c: int,
                 at: float) -> int | None:
    """The last sensor of carriageway ``c`` before driving past axis position ``at``."""
    s = np.arange(bounds[c], bounds[c + 1])
    before = s[sign[s] * (pos[s] - at) < 0]
    return int(before[-1]) if before.size else None


def _first_after(pos: np.ndarray, sign: np.ndarray, bounds: np.ndarray, c: int,
                 at: float) -> int | None:
    """The first sensor of carriageway ``c`` after driving past axis position ``at``."""
    s = np.arange(bounds[c], bounds[c + 1])
    after = s[sign[s] * (pos[s] - at) > 0]
    return int(after[0]) if after.size else None


def _demand_profiles(index: pd.DatetimeIndex, inbound: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """``(T, carriageways)`` traffic demand relative to a typical bottleneck's capacity."""
    n_cw = inbound.size
    hour = (index.hour + index.minute / 60.0).to_numpy()[:, None]
    day = (index.normalize() - index[0].normalize()).days.to_numpy()
    weekday = index.day_of_week.to_numpy()[:, None]
    n_days = day[-1] + 1
    # Every day its rush hours come a little earlier or later and heavier or lighter.
    shift = rng.normal(0.0, 0.3, (n_days, n_cw))[day]
    scale = rng.lognormal(0.0, 0.07, (n_days, n_cw))[day]
    am_peak = np.where(inbound, 0.5, 0.15)
    pm_peak = np.where(inbound, 0.2, 0.45)
    h = hour - shift

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-x))

    weekday_demand = (0.55 * sigmoid((h - 6.0) / 0.6) * sigmoid((21.5 - h) / 1.2)
                      + am_peak * np.exp(-0.5 * ((h - 7.75) / 0.8) ** 2)
                      + pm_peak * np.exp(-0.5 * ((h - 17.25) / 1.1) ** 2))
    weekend_demand = (0.45 * sigmoid((h - 8.0) / 1.0) * sigmoid((22.0 - h) / 1.2)
                      + 0.25 * np.exp(-0.5 * ((h - 14.5) / 2.5) ** 2))
    weekend_demand = weekend_demand * np.where(weekday == 6, 0.9, 1.0)  # Sundays are quieter
    return 0.1 + scale * np.where(weekday >= 5, weekend_demand, weekday_demand)


def _simulate(net: _Network, index: pd.DatetimeIndex, rng: np.random.Generator) -> np.ndarray:
    """``(T, N)`` float32 speeds in layout order, 0.0 where a reading is missing."""
    return _simulate_traffic(net, index, rng)[0]


def _simulate_traffic(net: _Network, index: pd.DatetimeIndex, rng: np.random.Generator,
                      constants: dict[str, np.ndarray] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Speeds (as :func:`_simulate`), and the demand, capacity and congestion behind them;
    ``constants`` (see :func:`_sensor_constants`) fixes the per-sensor draws."""
    steps, nodes = len(index), net.xy.shape[0]

    # Demand per sensor: its carriageway's profile, a local factor and a slow wander.
    c = constants  # given when a long series is simulated in chunks: the sensors stay the same
    demand = _demand_profiles(index, net.inbound, rng)[:, net.carriageway]
    demand *= rng.uniform(0.9, 1.1, nodes) if c is None else c["local"]
    demand += _ar1(rng, (steps, nodes), phi=0.97, sd=0.04)

    # Breakdown where demand exceeds capacity; incidents cut capacity for a while.
    capacity = (np.where(net.bottleneck, rng.uniform(0.8, 0.95, nodes), rng.uniform(1.05, 1.4, nodes))
                if c is None else c["capacity"])
    drive = np.clip((demand - capacity) / BREAKDOWN_WIDTH, 0.0, 1.0)
    n_incidents = rng.poisson(INCIDENTS_PER_SENSOR_DAY * nodes * steps / STEPS_PER_DAY)
    t0 = rng.integers(0, steps, n_incidents)
    sensor = rng.integers(0, nodes, n_incidents)
    durations = np.clip(rng.lognormal(np.log(8.0), 0.5, n_incidents), 2, 30).astype(np.int64)
    severity = rng.uniform(0.5, 1.0, n_incidents)
    happens = rng.random(n_incidents) < demand[t0, sensor]  # busy roads have more crashes
    for t, i, d, s in zip(t0[happens], sensor[happens], durations[happens], severity[happens]):
        np.maximum(drive[t:t + d, i], s, out=drive[t:t + d, i])

    congestion = _propagate(net, drive, demand)

    free_flow = rng.uniform(60.0, 71.0, nodes) if c is None else c["free_flow"]  # some sit at the 70 mph clip
    depth = rng.uniform(0.65, 0.8, nodes) if c is None else c["depth"]  # jammed speeds of about 10-25 mph
    speed = free_flow * (1.0 - 0.1 * np.clip(demand, 0.0, 1.2)) * (1.0 - depth * congestion)
    speed += (1.2 + 2.0 * congestion) * _ar1(rng, (steps, nodes), phi=0.5, sd=1.0)
    speed = np.clip(speed, MIN_SPEED, MAX_SPEED).astype(np.float32)
    speed[_missing_mask(rng, steps, nodes)] = 0.0
    return speed, demand, capacity, congestion


def _sensor_constants(net: _Network, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What :func:`_simulate_traffic` draws per sensor, drawn once for a chunked simulation."""
    nodes = net.xy.shape[0]
    return {"local": rng.uniform(0.9, 1.1, nodes),
            "capacity": np.where(net.bottleneck, rng.uniform(0.8, 0.95, nodes), rng.uniform(1.05, 1.4, nodes)),
            "free_flow": rng.uniform(60.0, 71.0, nodes), "depth": rng.uniform(0.65, 0.8, nodes)}


def _counts(speed: np.ndarray, demand: np.ndarray, capacity: np.ndarray, congestion: np.ndarray,
            lanes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flow (vehicles per 5 minutes) and occupancy (fraction) from the simulated traffic.

    A sensor passes the demand up to its capacity (2,000 vehicles an hour per lane at a
    relative capacity of 1); a queue discharges below capacity (the capacity drop), so flow
    falls as congestion deepens while occupancy rises: the density, flow / speed, times an
    effective vehicle length of 20 ft. Missing speeds are missing counts too.
    """
    served = np.minimum(np.clip(demand, 0.0, None), capacity) * (1.0 - 0.35 * congestion)
    per_hour_lane = 2000.0 * served * rng.lognormal(0.0, 0.05, served.shape)
    flow = np.maximum(np.round(per_hour_lane * lanes / 12.0), 1.0)  # 0 is reserved for "missing"
    density = per_hour_lane / np.maximum(speed, MIN_SPEED)  # vehicles per mile and lane
    occupancy = np.clip(density * 20.0 / 5280.0, 0.0, 1.0)
    missing = speed == 0
    flow[missing] = 0.0
    occupancy[missing] = 0.0
    return flow.astype(np.float32), occupancy.astype(np.float32)


def _propagate(net: _Network, drive: np.ndarray, demand: np.ndarray) -> np.ndarray:
    """Congestion level in [0, 1] per step and sensor, spreading upstream along the links.

    A sensor heads for the larger of its own breakdown and the delayed congestion of its
    downstream links; a queue spreads upstream only while there is traffic to join it.
    """
    steps, nodes = drive.shape
    up, down = net.links[:, 0], net.links[:, 1]
    # A sensor before an interchange feels queues on its ramps' far ends as well as on its
    # own carriageway; the shares sum below 1 so that queues fade as they spread.
    ramps_out = np.bincount(up[net.ramp], minlength=nodes)
    chain_weight = np.where(ramps_out > 0, CHAIN_SPILL - RAMP_SPILL, CHAIN_SPILL)
    weight = np.where(net.ramp, RAMP_SPILL / np.maximum(ramps_out, 1)[up], chain_weight[up])
    delay = np.clip(np.round(net.link_m / SHOCKWAVE_M_PER_STEP), 1, MAX_DELAY).astype(np.int64)
    # The loop reads the last MAX_DELAY rows flattened; link k looks at row t - delay[k].
    history_col = (MAX_DELAY - delay) * nodes + down
    joining = np.clip((demand - 0.25) / 0.5, 0.0, 1.0)  # no queue forms on an empty road

    level = np.zeros((steps + MAX_DELAY, nodes))
    for t in range(steps):
        recent = level[t:t + MAX_DELAY].ravel()
        spill = np.bincount(up, weights=recent[history_col] * weight, minlength=nodes)
        target = np.maximum(drive[t], spill * joining[t])
        previous = level[t + MAX_DELAY - 1]
        rate = np.where(target > previous, ONSET_RATE, CLEAR_RATE)
        level[t + MAX_DELAY] = previous + rate * (target - previous)
    return level[MAX_DELAY:]


def _ar1(rng: np.random.Generator, shape: tuple[int, int], phi: float, sd: float) -> np.ndarray:
    """Stationary AR(1) noise along axis 0 with standard deviation ``sd``."""
    shocks = rng.standard_normal(shape)
    shocks[0] /= np.sqrt(1.0 - phi**2)  # start in the stationary distribution
    return lfilter([sd * np.sqrt(1.0 - phi**2)], [1.0, -phi], shocks, axis=0)


def _missing_mask(rng: np.random.Generator, steps: int, nodes: int) -> np.ndarray:
    """Readings lost to single dropouts, sensor outages and network-wide gaps."""
    missing = np.zeros((steps, nodes), dtype=bool)
    n_drop = rng.binomial(steps * nodes, DROPOUT_RATE)
    missing[rng.integers(0, steps, n_drop), rng.integers(0, nodes, n_drop)] = True
    n_out = rng.poisson(OUTAGES_PER_SENSOR_DAY * nodes * steps / STEPS_PER_DAY)
    starts = rng.integers(0, steps, n_out)
    sensors = rng.integers(0, nodes, n_out)
    lengths = np.clip(rng.lognormal(np.log(OUTAGE_MEDIAN_STEPS), 1.0, n_out), 3, 2 * STEPS_PER_DAY)
    for t, i, d in zip(starts, sensors, lengths.astype(np.int64)):
        missing[t:t + d, i] = True
    n_gaps = rng.poisson(NETWORK_GAPS_PER_DAY * steps / STEPS_PER_DAY)
    for t, d in zip(rng.integers(0, steps, n_gaps), rng.integers(12, 72, n_gaps)):
        missing[t:t + d] = True
    return missing
