"""``gwnet-train``: train Graph WaveNet (or any registered model: ``--model mlp``); with no
arguments, the improved model on the embedded synthetic dataset with a budget of a few
minutes on a CPU."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..config import Config
from ..engine.checkpoint import RunDir
from ..errors import file_error
from .common import add_config_flags, config_from_args, model_config_class, run_cli

# The no-argument run must finish in minutes on a laptop CPU; real data uses the paper's budget.
QUICK_BUDGET = {"epochs": 8, "batches_per_epoch": 30}


def _saved_config(run_dir: str) -> Path:
    """The config file of a run directory to resume (the whole pipeline's, if it has one)."""
    rd = RunDir(run_dir)
    if not rd.root.is_dir():
        raise file_error(rd.root, "no such run directory")
    if not rd.saved_config.exists():
        raise file_error(rd.root, "not a gwnet run directory (no config.json)")
    return rd.saved_config


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``: the model flags are those of the model it asks for (``--model``,
    a ``--config`` file's preset, or the resumed run's model)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--resume", default=None)
    resumed = pre.parse_known_args(list(argv))[0].resume
    base = Config.load(_saved_config(resumed)) if resumed else None
    parser = argparse.ArgumentParser(
        prog="gwnet-train", description=__doc__, allow_abbrev=False,
        epilog="Precedence: preset (--model) < --config file < flags. "
               "Example: gwnet-train --data metr-la.h5 --adj adj_mx.pkl --out runs/improved")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue an interrupted run (flags given override its config)")
    add_config_flags(parser, model=model_config_class(list(argv), base))
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, bool]:
    """The run's config, and whether it resumes an existing run directory."""
    if args.resume:
        cfg = config_from_args(args, base=Config.load(_saved_config(args.resume)))
        cfg.out = str(RunDir(args.resume).root)
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
    from ..engine import Interrupted, train
    from ..scale.world import distributed, is_main_process

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
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
    saved = Config.load(RunDir(result.run_dir).config).data
    unit = f" in {saved.unit}" if saved.unit else ""
    print(f"\ntest metrics of the best epoch ({result.best_epoch}, validation MAE "
          f"{result.best_val_mae:.4f}); MAE and RMSE{unit}, MAPE in %:")
    if saved.protocol:
        print(f"protocol: {saved.protocol}")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"run directory: {Path(result.run_dir)}")
    return 0
