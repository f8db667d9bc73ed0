"""``gwnet-train``: train Graph WaveNet (or any registered model: ``--model mlp``); with no
arguments, the improved model on the embedded synthetic dataset with a budget of a few
minutes on a CPU."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..config import Config, fields_with_role, flatten, read_config_file
from ..engine.checkpoint import RunDir
from ..errors import file_error
from .common import (ArgumentParser, add_config_flags, config_from_args, metrics_note,
                     model_config_class, results_table, run_cli)

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
    parser = ArgumentParser(
        prog="gwnet-train", description=__doc__,
        epilog="Precedence: preset (--model) < --config file < flags. Defaults are the default "
               f"preset's (improved); with no data arguments the budget is {QUICK_BUDGET['epochs']} "
               f"epochs of {QUICK_BUDGET['batches_per_epoch']} batches unless --epochs or "
               "--batches-per-epoch replaces its half. "
               "Example: gwnet-train --data metr-la.h5 --adj adj_mx.pkl --out runs/improved")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue an interrupted run (flags given override its config)")
    add_config_flags(parser, model=model_config_class(list(argv), base))
    return parser


# What a resumed run may change: where and how it runs, and how long it goes on.
RESUMABLE = {"train.epochs", "train.patience"}


def check_resume_options(saved: Config, cfg: Config, source: Path) -> None:
    """Refuse a ``--resume`` whose flags change what the run computes (its data, windows, model
    or recipe), naming the first such option; runtime options and the epoch budget may change."""
    free = set(RESUMABLE) | {"out"}
    for section, part in (("", cfg), ("data", cfg.data), ("model", cfg.model), ("train", cfg.train)):
        free |= {f"{section}.{n}" if section else n for n in fields_with_role(part, "runtime")}
    before, after = flatten(saved.to_dict()), flatten(cfg.to_dict())
    for key in sorted(set(before) | set(after)):
        if key not in free and before.get(key) != after.get(key):
            raise file_error(source.parent, f"--resume cannot change {key} ({before.get(key)!r} in the run, "
                             f"{after.get(key)!r} given); start a new run, or --init-from this one")


def resolve_config(args: argparse.Namespace) -> tuple[Config, bool]:
    """The run's config, and whether it resumes an existing run directory."""
    if args.resume:
        saved_path = _saved_config(args.resume)
        RunDir(args.resume).check_saved_state()  # a crafted or hand-edited file: one line, before any work
        saved = Config.load(saved_path)
        cfg = config_from_args(args, base=Config.load(saved_path))
        cfg.out = str(RunDir(args.resume).root)
        check_resume_options(saved, cfg, saved_path)
        return cfg, True
    cfg = config_from_args(args)
    given = set(vars(args))  # flags default to SUPPRESS: only those given are here
    file_raw = read_config_file(args.config_file) if args.config_file else {}
    for section in ("data", "train"):
        given |= {f"{section}.{name}" for name in file_raw.get(section) or {}}
    # The quick budget is for the embedded synthetic data; each of its halves gives way to the
    # flag (or config file option) that sets it, the other half stays.
    if not {"data.data", "data.dataset"} & given:
        for name, value in QUICK_BUDGET.items():
            if f"train.{name}" not in given:
                setattr(cfg.train, name, value)
    return cfg, False


@run_cli("gwnet-train")
def main(argv: list[str] | None = None) -> int:
    from ..engine import Interrupted, train
    from ..scale.world import distributed, is_main_process

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    cfg, resume = resolve_config(args)
    if cfg.train.teacher:  # distillation: the teachers' ensemble (gwnet.ensemble) feeds the trainer
        from ..ensemble.distill import train
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
    saved = Config.load(RunDir(result.run_dir).config)
    baselines = _baselines(saved, result.run_dir)
    print(f"\ntest metrics of the best epoch ({result.best_epoch}, validation MAE "
          f"{result.best_val_mae:.4f}); {metrics_note(saved.data)}"
          + ("; baselines beside it" if baselines else "") + ":")
    if saved.data.protocol:
        print(f"protocol: {saved.data.protocol}")
    table = results_table(result.test_metrics, saved.data, baselines)
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"run directory: {Path(result.run_dir)}")
    return 0


def _baselines(cfg: Config, run_dir) -> dict:
    """The last-value and historical-average baselines on the run's test split (none, with a
    warning, when the data cannot be read again)."""
    import warnings

    from ..data import load_data
    from ..data.scaler import StandardScaler
    from ..engine.checkpoint import load_checkpoint
    from ..errors import GWNetError
    from ..engine.baselines import baseline_tables

    try:
        scaler = StandardScaler(**load_checkpoint(RunDir(run_dir).best, kind="best")["scaler"])
        data = load_data(cfg.data, scaler=scaler)
        return baseline_tables(data, "test", cfg.train.null_value)
    except (GWNetError, OSError) as exc:
        warnings.warn(f"baselines not shown: {exc}")
        return {}
