"""``gwnet-data``: make synthetic datasets (METR-LA, PEMS0X or LargeST layouts), inspect files,
export DCRNN-style ``.npz`` splits."""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_directory, atomic_path
from ..config import DataConfig
from ..data import synthetic
from ..data.graph import read_graph
from ..data.protocols import dataset_of_file
from ..data.readers import ReadOptions, infer_step, read_speeds
from ..data.windows import build_series, count_windows, split_ranges
from ..errors import GWNetError
from ..paths import check_input_file
from .common import ArgumentParser, run_cli

GRAPH_HINTS = (".pkl", ".pickle")


EXPORT_FILES = ("train.npz", "val.npz", "test.npz")


def check_export_options(cfg: DataConfig) -> None:
    for flag, value in (("--seq-len", cfg.seq_len), ("--horizon", cfg.horizon)):
        if not isinstance(value, int) or value < 1:
            raise GWNetError(f"{flag} must be at least 1, not {value}")


def export_npz(data: str, out: str, key: str | None = None, cfg: DataConfig | None = None,
               overwrite: bool = False) -> dict[str, Path]:
    """Write ``train/val/test.npz`` with ``x, y, x_offsets, y_offsets`` as DCRNN's
    ``generate_training_data.py`` does (float64, unscaled, zeros kept).

    ``out`` must be new or empty, or hold an earlier export and ``overwrite`` be given; the
    three files are written beside it and then take its place together
    (:func:`gwnet.atomic.atomic_directory`), so a kill never leaves splits of two exports."""
    cfg = cfg or DataConfig()
    check_export_options(cfg)
    with atomic_directory(out, overwrite, EXPORT_FILES, "gwnet-data export-npz") as stage:
        speeds = read_speeds(data, key, dtype=np.float64)
        series = build_series(speeds, cfg, dtype=np.float64).to_numpy()
        x_offsets = np.arange(-(cfg.seq_len - 1), 1)
        y_offsets = np.arange(cfg.first_offset, cfg.first_offset + cfg.horizon)
        paths = {}
        for name, r in split_ranges(len(series), cfg, data).items():
            origins = np.arange(r.start, r.stop) + cfg.seq_len - 1
            with atomic_path(stage / f"{name}.npz") as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, x=series[origins[:, None] + x_offsets],
                                    y=series[origins[:, None] + y_offsets],
                                    x_offsets=x_offsets.reshape(-1, 1), y_offsets=y_offsets.reshape(-1, 1))
            paths[name] = Path(out) / f"{name}.npz"
    return paths


def _is_graph_file(path: Path) -> bool:
    """Graph files by name and content: pickles, ``.npy``, a sparse ``.npz``, a CSV whose first
    line starts ``from,to`` or whose name says distance (readings CSVs start with timestamps)."""
    ext = path.suffix.lower()
    if ext in GRAPH_HINTS or ext == ".npy" or path.name.startswith("distance"):
        return True
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return "indptr" in npz.files or "row" in npz.files or "adj" in npz.files
        except Exception:
            return False
    if ext == ".csv":
        with open(path, errors="replace") as fh:
            return fh.readline().strip().lower().startswith("from,to")
    return False


def inspect(path: str, key: str | None = None, target: str | None = None, start: str | None = None) -> str:
    """A few lines describing a readings file or a graph file of any supported format. A file
    without timestamps starts at ``start``, else at its named dataset's conventional start (by
    file name: ``PEMS08.npz`` as ``--dataset pems08``), else at an assumed 2000-01-01 (said)."""
    if os.path.lexists(path):
        check_input_file(path)  # a FIFO would block the peek at its first line
    buf = io.StringIO()
    if _is_graph_file(Path(path)):
        g = read_graph(path)
        edges = int(np.count_nonzero(g.adj))
        listed = f"; {g.report.describe()}" if g.report is not None else ""
        buf.write(f"{path}: sensor graph\n  sensors   {g.num_nodes} ({g.isolated} in no edge)\n  edges     "
                  f"{edges} (density {g.density:.2%}){listed}\n  symmetric {bool(np.allclose(g.adj, g.adj.T))}\n")
        return buf.getvalue()
    ids = str(Path(path).with_suffix(".txt"))
    spec = dataset_of_file(path)
    start = start or (spec.start if spec is not None else None)
    df = read_speeds(path, key, options=ReadOptions(key=key, target=target, ids=ids, start=start))
    values = df.to_numpy()
    present = values[values > 0]
    step = infer_step(df.index, path) if len(df) > 1 else pd.Timedelta(minutes=5)
    minutes = step // pd.Timedelta(minutes=1)
    cfg = DataConfig()
    span = (cfg.seq_len + cfg.horizon) * minutes
    what = target or ("flow" if Path(path).suffix.lower() == ".npz" else "reading")
    buf.write(f"{path}: readings\n  sensors   {df.shape[1]}\n  steps     {df.shape[0]} ({minutes} min)\n"
              f"  span      {df.index[0]} .. {df.index[-1]}{_start_note(path, start, spec)}\n"
              f"  missing   {np.mean(values == 0):.2%} of readings\n"
              f"  {what:<9} mean {present.mean() if present.size else float('nan'):.2f}, "
              f"min {present.min() if present.size else float('nan'):.2f}, max {values.max():.2f}\n"
              f"  windows   {max(count_windows(df.shape[0], cfg), 0)} of 12 -> 12 steps ({span} min)\n")
    return buf.getvalue()


def _start_note(path: str, start: str | None, spec) -> str:
    """Where a file without timestamps got its start from ("" for a file with timestamps)."""
    if Path(path).suffix.lower() != ".npz":
        return ""
    if spec is not None and start == spec.start:
        return f" (no timestamps in the file: {spec.name}'s conventional start)"
    return " (no timestamps in the file: start from --start)" if start else \
        " (no timestamps in the file: start assumed, set --start)"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="gwnet-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write a synthetic dataset in a published layout")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--format", dest="layout", choices=synthetic.LAYOUTS, default="metr-la",
                       help="metr-la (speeds.h5 + adj_mx.pkl), pems (NAME.npz + NAME.csv from,to,cost) or "
                            "largest (NAME_his_2019.h5 + NAME_rn_adj.npy + NAME_meta.csv)")
    synth.add_argument("--step", type=int, default=None, help="minutes between readings, a multiple of 5; "
                       "default: 5, largest: 15")
    synth.add_argument("--target", choices=synthetic.TARGETS, default=None,
                       help="what a one-quantity file holds; default: speed, largest: flow")
    synth.add_argument("--name", default=None, help="file name stem for pems/largest; default: synthetic")
    synth.add_argument("--nodes", type=int, default=DataConfig.synth_nodes, help="sensors")
    synth.add_argument("--days", type=int, default=DataConfig.synth_days, help="days of readings")
    synth.add_argument("--seed", type=int, default=DataConfig.synth_seed, help="generator seed")
    synth.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    ins = sub.add_parser("inspect", help="summarise a readings file or a graph file")
    ins.add_argument("files", nargs="+")
    ins.add_argument("--key", default=None, help="HDF5 or npz key")
    ins.add_argument("--target", default=None, help="feature of a multi-feature .npz (flow, occupancy, speed)")
    ins.add_argument("--start", default=None, help="first timestamp of a file without timestamps (.npz); "
                     "default: the named dataset's whose file this is (PEMS08.npz: 2016-07-01)")
    exp = sub.add_parser("export-npz", help="write DCRNN-format train/val/test.npz")
    exp.add_argument("--data", required=True, help="speeds file")
    exp.add_argument("--key", default=None, help="HDF5 key")
    exp.add_argument("--out", required=True, help="output directory (new or empty, or an earlier export "
                     "with --overwrite)")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace the earlier export in --out (all three files at once)")
    exp.add_argument("--seq-len", type=int, default=DataConfig.seq_len, help="past steps per window")
    exp.add_argument("--horizon", type=int, default=DataConfig.horizon, help="future steps per window")
    exp.add_argument("--day-of-week", action=argparse.BooleanOptionalAction, default=DataConfig.day_of_week,
                     help=f"add a one-hot day of week (default: {str(DataConfig.day_of_week).lower()})")
    return parser


@run_cli("gwnet-data")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        # The dataset appears whole: written beside --out, then swapped in (an earlier one only
        # with --overwrite, and never a folder holding files of anything else).
        with atomic_directory(args.out, args.overwrite, synthetic.layout_files(args.layout, args.name),
                              "gwnet-data synth") as stage:
            paths = synthetic.write(stage, nodes=args.nodes, days=args.days, seed=args.seed, layout=args.layout,
                                    step=args.step, target=args.target, name=args.name)
        for path in paths.values():
            print(Path(args.out) / path.name)
    elif args.command == "inspect":
        for path in args.files:
            print(inspect(path, args.key, args.target, args.start), end="")
    else:
        cfg = DataConfig(seq_len=args.seq_len, horizon=args.horizon, day_of_week=args.day_of_week)
        check_export_options(cfg)
        for name, path in export_npz(args.data, args.out, args.key, cfg, overwrite=args.overwrite).items():
            print(f"{name}: {path}")
    return 0
