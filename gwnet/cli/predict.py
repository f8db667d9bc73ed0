"""``gwnet-predict``: forecast with one trained model or an ensemble of several.

Loads run directories (of any registered model), checks that they read the same windows of the same sensors, combines
them per horizon (mean, the best member per horizon on validation, or NNLS weights fitted on
validation) and writes OUT_DIR: predictions.csv or .parquet (origin_time, target_time,
sensor_id, horizon, prediction, actual), metrics.csv, ensemble.json/.csv (the weights each
horizon used) and PNG plots. See gwnet.ensemble for the layout.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

import pandas as pd

from ..atomic import check_output_directory
from ..config import DataConfig
from ..ensemble import FORMATS, STRATEGIES, Ensemble, load_members, run
from ..ensemble.report import OUTPUT_FILES
from ..ensemble.members import SOURCE_FIELDS
from .common import add_field, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gwnet-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="Without --data/--dataset the data of the first run's config is used. Example: "
               "gwnet-predict runs/h3 runs/h12 --strategy per-horizon --out predictions/")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (gwnet-train --out); a file is taken as a reference "
                             "implementation's state_dict (.pth)")
    parser.add_argument("--out", required=True, metavar="OUT_DIR",
                        help="output directory: new or empty, or an earlier result with --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the earlier result in OUT_DIR (as a whole, once the new one is complete)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--split", choices=("test", "val", "all"), default="test",
                       help="windows to predict (default: test)")
    which.add_argument("--latest", action="store_true",
                       help="forecast the next horizons after the last readings (no actuals)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="per-horizon",
                        metavar="{" + ",".join(STRATEGIES) + "}",
                        help="how members combine per horizon; per-horizon and weighted are fitted "
                             "on the data's validation split (default: per-horizon)")
    parser.add_argument("--format", choices=FORMATS, default="csv", help="predictions file format")
    parser.add_argument("--sensors", nargs="+", metavar="ID", default=None,
                        help="sensors to plot (default: the first 3); give it after the run directories")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="windows per batch (default: the first run's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    group = parser.add_argument_group("data (as gwnet-train takes it)")
    for f in fields(DataConfig):
        if f.name in SOURCE_FIELDS:
            add_field(group, "data", f)
    return parser


def weights_table(ensemble: Ensemble) -> pd.DataFrame:
    """Horizon x member weights (blank where a member does not forecast), val MAE if fitted."""
    sel = ensemble.selection()
    table = sel.pivot(index="horizon", columns="member", values="weight")
    table = table[[m.name for m in ensemble.members]]
    if sel["val_mae"].notna().any():
        mae = sel.pivot(index="horizon", columns="member", values="val_mae")
        table = table.join(mae[list(table.columns)].add_prefix("val mae "))
    return table


@run_cli("gwnet-predict")
def main(argv: list[str] | None = None) -> int:
    from ..engine.device import resolve_device

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    # An --out that cannot take the result is refused before any work.
    check_output_directory(args.out, args.overwrite, OUTPUT_FILES, "gwnet-predict")
    source = {name.split(".", 1)[1]: value for name, value in vars(args).items() if name.startswith("data.")}
    members, data = load_members(args.runs, resolve_device(args.device), **source)
    ensemble = Ensemble(members, args.strategy)
    split = "latest" if args.latest else args.split
    report = run(ensemble, data, args.out, split=split, fmt=args.format, sensors=args.sensors,
                 batch_size=args.batch_size or members[0].config.train.batch_size, plots=args.plots,
                 overwrite=args.overwrite)
    number = lambda v: "" if pd.isna(v) else f"{v:.4f}"  # noqa: E731
    print(f"{args.strategy} ensemble of {len(members)} member(s); weights per horizon:")
    print(weights_table(ensemble).to_string(float_format=number, na_rep=""))
    if report.metrics is not None:
        mae = report.metrics.pivot(index="horizon", columns="model", values="mae")
        print(f"\nMAE on the {split} split of {data.source} ({data.config.protocol}):")
        print(mae[list(report.metrics["model"].unique())].to_string(float_format=number, na_rep=""))
    print(f"\n{report.rows} rows: {report.predictions}")
    for path in report.files[1:]:
        print(f"wrote {path}")
    return 0
