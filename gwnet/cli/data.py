"""``gwnet-data``: make the synthetic dataset, inspect files, export DCRNN-style ``.npz`` splits."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..config import DataConfig
from ..data.graph import read_graph
from ..data.readers import read_speeds
from ..data.windows import build_series, count_windows, split_ranges
from .common import run_cli

GRAPH_HINTS = (".pkl", ".pickle")


def export_npz(data: str, out: str, key: str | None = None, cfg: DataConfig | None = None) -> dict[str, Path]:
    """Write ``train/val/test.npz`` with ``x, y, x_offsets, y_offsets`` as DCRNN's
    ``generate_training_data.py`` does (float64, unscaled, zeros kept)."""
    cfg = cfg or DataConfig()
    speeds = read_speeds(data, key, dtype=np.float64)
    series = build_series(speeds, cfg, dtype=np.float64).to_numpy()
    x_offsets = np.arange(-(cfg.seq_len - 1), 1)
    y_offsets = np.arange(cfg.first_offset, cfg.first_offset + cfg.horizon)
    paths = {}
    for name, r in split_ranges(len(series), cfg, data).items():
        origins = np.arange(r.start, r.stop) + cfg.seq_len - 1
        path = Path(out) / f"{name}.npz"
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, x=series[origins[:, None] + x_offsets],
                                y=series[origins[:, None] + y_offsets],
                                x_offsets=x_offsets.reshape(-1, 1), y_offsets=y_offsets.reshape(-1, 1))
        paths[name] = path
    return paths


def inspect(path: str, key: str | None = None) -> str:
    """A few lines describing a speeds file or a graph file."""
    buf = io.StringIO()
    if Path(path).suffix.lower() in GRAPH_HINTS or Path(path).name.startswith("distances"):
        g = read_graph(path)
        edges = int(np.count_nonzero(g.adj))
        buf.write(f"{path}: sensor graph\n  sensors   {g.num_nodes}\n  edges     {edges} "
                  f"(density {g.density:.2%})\n  symmetric {bool(np.allclose(g.adj, g.adj.T))}\n")
        return buf.getvalue()
    df = read_speeds(path, key)
    values = df.to_numpy()
    present = values[values > 0]
    buf.write(f"{path}: speeds\n  sensors   {df.shape[1]}\n  steps     {df.shape[0]} (5 min)\n"
              f"  span      {df.index[0]} .. {df.index[-1]}\n"
              f"  missing   {np.mean(values == 0):.2%} of readings\n"
              f"  speed     mean {present.mean() if present.size else float('nan'):.2f}, "
              f"min {present.min() if present.size else float('nan'):.2f}, max {values.max():.2f}\n"
              f"  windows   {max(count_windows(df.shape[0], DataConfig()), 0)} of 12 -> 12 steps\n")
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gwnet-data", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write the synthetic dataset (METR-LA formats)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--nodes", type=int, default=DataConfig.synth_nodes)
    synth.add_argument("--days", type=int, default=DataConfig.synth_days)
    synth.add_argument("--seed", type=int, default=DataConfig.synth_seed)
    ins = sub.add_parser("inspect", help="summarise a speeds file or a graph file")
    ins.add_argument("files", nargs="+")
    ins.add_argument("--key", default=None, help="HDF5 key")
    exp = sub.add_parser("export-npz", help="write DCRNN-format train/val/test.npz")
    exp.add_argument("--data", required=True, help="speeds file")
    exp.add_argument("--key", default=None, help="HDF5 key")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--seq-len", type=int, default=DataConfig.seq_len)
    exp.add_argument("--horizon", type=int, default=DataConfig.horizon)
    exp.add_argument("--day-of-week", action=argparse.BooleanOptionalAction, default=DataConfig.day_of_week)
    return parser


@run_cli("gwnet-data")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from ..data import synthetic

        paths = synthetic.write(args.out, nodes=args.nodes, days=args.days, seed=args.seed)
        for path in paths.values():
            print(path)
    elif args.command == "inspect":
        for path in args.files:
            print(inspect(path, args.key), end="")
    else:
        cfg = DataConfig(seq_len=args.seq_len, horizon=args.horizon, day_of_week=args.day_of_week)
        for name, path in export_npz(args.data, args.out, args.key, cfg).items():
            print(f"{name}: {path}")
    return 0
