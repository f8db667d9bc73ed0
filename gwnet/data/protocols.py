"""Named datasets and their evaluation protocols, as data: one place defines each.

A :class:`Protocol` is how the field evaluates on a dataset: the chronological split of the
windows, the quantity forecast and its unit, the step, the input and output lengths, which
readings the masked metrics skip, and the clamp applied to forecasts. A :class:`DatasetSpec`
says where a named dataset's files lie below the data root (``$GWNET_DATA``, else ``./data``),
how its graph is weighted and where it is published. Every entry is registered in
:data:`gwnet.registry.DATASETS`; a new benchmark is one more ``DATASETS.add(...)``.

A run stamps the protocol it used into its ``config.json`` (``data.protocol``) and commands
print it next to every table of results.
"""
from __future__ import annotations

import os

from dataclasses import dataclass

from ..registry import DATASETS


@dataclass(frozen=True)
class Protocol:
    """How a dataset is evaluated (the defaults: DCRNN's METR-LA / PEMS-BAY protocol)."""

    target: str = "speed"
    unit: str = "mph"
    step_minutes: int = 5
    train_ratio: float = 0.7
    test_ratio: float = 0.2
    seq_len: int = 12
    horizon: int = 12
    null_value: float = 0.0  # readings equal to it are missing: skipped by the masked metrics
    clamp_max: float | None = 70.0  # None: the training split's largest reading
    reference: str = "DCRNN (Li et al. 2018)"

    def describe(self, train_ratio: float | None = None, test_ratio: float | None = None,
                 target: str | None = None, unit: str | None = None, step_minutes: int | None = None,
                 clamp_max: float | None = None, seq_len: int | None = None, horizon: int | None = None) -> str:
        """One line a reader sees next to the numbers, e.g. ``60/20/20 chronological, flow
        (vehicles/5 min), masked where 0, 12 -> 12 steps of 5 min``; arguments override."""
        train = self.train_ratio if train_ratio is None else train_ratio
        test = self.test_ratio if test_ratio is None else test_ratio
        split = "/".join(f"{100 * r:.0f}" for r in (train, 1 - train - test, test))
        unit = self.unit if unit is None else unit
        what = f"{self.target if target is None else target}" + (f" ({unit})" if unit else "")
        step = self.step_minutes if step_minutes is None else step_minutes
        clamp = "" if clamp_max is None else f", forecasts clamped to [0, {clamp_max:g}]"
        return (f"{split} chronological, {what}, masked where {self.null_value:g}, "
                f"{seq_len or self.seq_len} -> {horizon or self.horizon} steps of {step} min{clamp}")


DCRNN = Protocol()
# The PEMS0X flow benchmarks as BasicTS evaluates them: 60/20/20, flow, the mask skips 0.
PEMS_FLOW = Protocol(target="flow", unit="vehicles/5 min", train_ratio=0.6, test_ratio=0.2, clamp_max=None,
                     reference="ASTGCN/STSGCN releases, BasicTS protocol")
# LargeST (Liu et al., NeurIPS 2023): 15-minute flow, 60/20/20, 12 steps (3 hours) in and out.
LARGEST_FLOW = Protocol(target="flow", unit="vehicles/15 min", step_minutes=15, train_ratio=0.6,
                        test_ratio=0.2, clamp_max=None, reference="LargeST (Liu et al. 2023)")
# Your own data: DCRNN's split, the quantity and step the file has, no fixed clamp.
OWN_DATA = Protocol(target="speed", unit="", clamp_max=None, reference="your data")


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its files below the data root, its graph's weighting, its protocol.

    ``graph`` lists candidate file names (the first that exists is used); ``ids`` names a file
    of sensor ids, one per line, for data files without them (PEMS03); ``start`` is the first
    timestamp of a file without timestamps; ``adj_weights`` how the graph file's edges become
    weights (see :func:`gwnet.data.graph.read_graph`).
    """

    name: str
    data: str
    graph: tuple[str, ...]
    protocol: Protocol
    where: str
    key: str | None = None
    ids: str | None = None
    start: str | None = None
    adj_weights: str | None = None
    sensors: int | None = None
    steps: int | None = None
    layout: str = ""


def _add(spec: DatasetSpec) -> None:
    DATASETS.add(spec.name, spec)


DCRNN_WHERE = ("DCRNN's release (github.com/liyaguang/DCRNN: the .h5 readings from its Google Drive / "
               "Baidu links, sensor_graph/ from the repository)")
_add(DatasetSpec("metr-la", "metr-la.h5", ("sensor_graph/adj_mx.pkl",), DCRNN, DCRNN_WHERE, key="df",
                 sensors=207, steps=34_272, layout="pandas HDF5 (key df) + DCRNN adjacency pickle"))
_add(DatasetSpec("pems-bay", "pems-bay.h5", ("sensor_graph/adj_mx_bay.pkl",), DCRNN, DCRNN_WHERE, key="speed",
                 sensors=325, steps=52_116, layout="pandas HDF5 (key speed) + DCRNN adjacency pickle"))

PEMS_WHERE = ("the ASTGCN / STSGCN releases (e.g. github.com/Davidham3/STSGCN: data/PEMS0X/PEMS0X.npz and "
              "PEMS0X.csv)")
for _name, _start, _sensors, _steps, _features in (("PEMS03", "2018-09-01", 358, 26_208, "[flow]"),
                                                   ("PEMS04", "2018-01-01", 307, 16_992, "[flow, occupancy, speed]"),
                                                   ("PEMS07", "2017-05-01", 883, 28_224, "[flow]"),
                                                   ("PEMS08", "2016-07-01", 170, 17_856, "[flow, occupancy, speed]")):
    _add(DatasetSpec(_name.lower(), f"{_name}/{_name}.npz", (f"{_name}/{_name}.csv", f"{_name}/distance.csv"),
                     PEMS_FLOW, PEMS_WHERE, key="data", ids=f"{_name}/{_name}.txt", start=_start,
                     adj_weights="binary", sensors=_sensors, steps=_steps,
                     layout=f"npz key data (steps, sensors, {_features}) + from,to,cost CSV"))

LARGEST_WHERE = "the LargeST release (github.com/liuxu77/LargeST: ca_his_2019.h5 and ca_rn_adj.npy, per region)"
for _region, _sensors in (("sd", 716), ("gba", 2_352), ("gla", 3_834), ("ca", 8_600)):
    _add(DatasetSpec(f"largest-{_region}", f"largest/{_region}_his_2019.h5", (f"largest/{_region}_rn_adj.npy",),
                     LARGEST_FLOW, LARGEST_WHERE, key="t", adj_weights="given", sensors=_sensors, steps=35_040,
                     layout="pandas HDF5 (key t, 15-min flow) + dense (N, N) .npy adjacency"))


def dataset_of_file(path: str | os.PathLike) -> DatasetSpec | None:
    """The named dataset whose readings file has ``path``'s name (``PEMS08.npz`` -> pems08),
    so that a file read on its own gets the same conventions (start, ids) as ``--dataset``."""
    name = os.path.basename(os.fspath(path)).lower()
    return next((spec for spec in DATASETS.values() if os.path.basename(spec.data).lower() == name), None)


def protocol_of(dataset: str, data_given: bool) -> Protocol:
    """The protocol of a named dataset; your own files (``--data`` or a directory) get
    :data:`OWN_DATA`, the synthetic default METR-LA's."""
    if not data_given and dataset in DATASETS:
        return DATASETS[dataset].protocol
    if not data_given and dataset == "synthetic":
        return DCRNN
    return OWN_DATA
