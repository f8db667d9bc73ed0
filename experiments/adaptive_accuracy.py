"""Test MAE of each adaptive adjacency variant against the dense original, on the embedded
synthetic data, same budget and seeds (the large-graph issue's accuracy check).

    python experiments/adaptive_accuracy.py [--nodes 40] [--days 14] [--seeds 3]
        [--epochs 8] [--batches 30] [--out DIR] [--overwrite]

Each variant trains the improved preset into ``OUT/<variant>/seed<k>`` (a finished run is
reused, an interrupted one resumed) and the table gives the mean test MAE over horizons
1-12, its spread over seeds and the ratio to ``dense``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from gwnet import Config, train
from gwnet.engine import RunDir, run_finished


def run(variant: str, seed: int, args) -> float:
    out = args.out / variant / f"seed{seed}"
    if run_finished(out):
        return float(pd.read_csv(RunDir(out).test_metrics, index_col=0).loc["mean", "mae"])
    cfg = Config.from_preset("improved")
    cfg.data.synth_nodes, cfg.data.synth_days = args.nodes, args.days
    cfg.train.epochs, cfg.train.batches_per_epoch, cfg.train.seed = args.epochs, args.batches, seed
    cfg.train.progress = False
    if variant != "dense":
        cfg.model.adaptive = variant
    cfg.out = str(out)
    result = train(cfg, resume=RunDir(out).last.exists())
    return float(result.test_metrics.loc["mean", "mae"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["dense", "topk", "lowrank"])
    parser.add_argument("--nodes", type=int, default=40)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("results/adaptive-accuracy"))
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier adaptive_accuracy.csv")
    args = parser.parse_args()
    table_path = args.out / "adaptive_accuracy.csv"
    if table_path.exists() and not args.overwrite:
        print(f"adaptive_accuracy.py: error: {table_path} exists; pass --overwrite to replace it "
              "(finished runs are reused either way)", file=sys.stderr)
        return 2
    rows = [{"variant": v, "seed": s, "test_mae": run(v, s, args)} for v in args.variants
            for s in range(args.seeds)]
    table = pd.DataFrame(rows).groupby("variant", sort=False)["test_mae"].agg(["mean", "std", "count"])
    table["ratio_to_dense"] = table["mean"] / table.loc["dense", "mean"] if "dense" in table.index else float("nan")
    print(f"synthetic data, {args.nodes} sensors x {args.days} days, improved preset, {args.epochs} epochs x "
          f"{args.batches} batches, seeds 0-{args.seeds - 1}; test MAE (mean of horizons 1-12):")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(table_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
