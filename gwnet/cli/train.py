"""``gwnet-train``: train Graph WaveNet; with no arguments, the improved model on the
embedded synthetic dataset with a budget of a few minutes on a CPU."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import Config
from ..engine.checkpoint import RunDir
from ..errors import file_error
from .common import add_config_flags, config_from_args, run_cli

# The no-argument run must finish in minutes on a laptop CPU; real data uses the paper's budget.
QUICK_BUDGET = {"epochs": 8, "batches_per_epoch": 30}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gwnet-train", description=__doc__, allow_abbrev=False,
        epilog="Precedence: preset (--model) < --config file < flags. "
               "Example: gwnet-train --data metr-la.h5 --adj adj_mx.pkl --out runs/improved")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue an interrupted run (flags given override its config)")
    add_config_flags(parser)
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, bool]:
    """The run's config, and whether it resumes an existing run directory."""
    if args.resume:
        rd = RunDir(args.resume)
        saved = rd.root / "pipeline.json" if (rd.root / "pipeline.json").exists() else rd.config
        if not rd.root.is_dir():
            raise file_error(rd.root, "no such run directory")
        if not saved.exists():
            raise file_error(rd.root, "not a gwnet run directory (no config.json)")
        cfg = config_from_args(args, base=Config.load(saved))
        cfg.out = str(rd.root)
        return cfg, True
    cfg = config_from_args(args)
    given = vars(args)  # flags default to SUPPRESS: only those given are here
    data_given = args.config_file or "data.data" in given or "data.dataset" in given
    budget_given = args.config_file or "train.epochs" in given or "train.batches_per_epoch" in given
    if not data_given and not budget_given:
        for name, value in QUICK_BUDGET.items():
            setattr(cfg.train, name, value)
    return cfg, False


@run_cli("gwnet-train")
def main(argv: list[str] | None = None) -> int:
    from ..engine.trainer import Interrupted, train
    from ..scale.world import distributed, is_main_process

    args = build_parser().parse_args(argv)
    cfg, resume = resolve_config(args)
    # Under torchrun (--fsdp) every process trains; only rank 0 prints.
    with distributed(cfg):
        main_process = is_main_process()
        if main_process and not resume and cfg.data.dataset == "synthetic" and cfg.data.data is None:
            print(f"gwnet-train: training on the embedded synthetic dataset "
                  f"({cfg.data.synth_nodes} sensors, {cfg.data.synth_days} days); "
                  f"pass --data/--adj or --dataset for real data", file=sys.stderr)
        try:
            result = train(cfg, resume=resume)
        except Interrupted as exc:
            if main_process:
                print(f"gwnet-train: {exc}", file=sys.stderr)
            return 130
    if not main_process:
        return 0
    table = result.test_metrics.copy()
    table["mape"] = table["mape"] * 100
    print(f"\ntest metrics of the best epoch ({result.best_epoch}, validation MAE "
          f"{result.best_val_mae:.4f}); MAPE in %:")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"run directory: {Path(result.run_dir)}")
    return 0
