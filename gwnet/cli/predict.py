"""``gwnet-predict``: forecast with one trained model or an ensemble of several.

Loads run directories (of any registered model), checks that they read the same windows of the same sensors, combines
them per horizon (mean, the best member per horizon on validation, or NNLS weights fitted on
validation) and writes OUT_DIR: predictions.csv or .parquet (origin_time, target_time,
sensor_id, horizon, prediction, actual), metrics.csv, ensemble.json/.csv (the weights each
horizon used) and PNG plots. See gwnet.ensemble for the layout.

With --latest it forecasts the horizons after the last readings: --data may then be a file of
just those readings (at least seq_len steps, the run's sensors and step), and the graph is the
one saved in the runs' best.pt unless --adj is given.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

import pandas as pd

from ..atomic import check_output_directory
from ..config import MALLOC_POLICIES, DataConfig
from ..ensemble import FORMATS, STRATEGIES, Ensemble, load_members, run
from ..ensemble.members import ENSEMBLE, SOURCE_FIELDS
from ..ensemble.report import OUTPUT_FILES
from ..ensemble.bands import IntervalOptions
from ..errors import GWNetError
from ..intervals.online import DEFAULT_STEP
from ..registry import INTERVALS
from .common import ArgumentParser, add_field, lead_label, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="gwnet-predict", description=__doc__,
        epilog="Without --data/--dataset the data of the first run's config is used. With --latest, "
               "--data may hold only the last readings (at least seq_len steps) and the graph comes "
               "from the runs' best.pt unless --adj is given. Example: "
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
                       help="windows to predict")
    which.add_argument("--latest", action="store_true",
                       help="forecast the next horizons after the last readings (no actuals); --data may "
                            "then hold just the last readings")
    parser.add_argument("--strategy", choices=STRATEGIES, default="per-horizon",
                        metavar="{" + ",".join(STRATEGIES) + "}",
                        help="how members combine per horizon; per-horizon and weighted are fitted "
                             "on the data's validation split (with one member: that member)")
    parser.add_argument("--format", choices=FORMATS, default="csv", help="predictions file format")
    parser.add_argument("--sensors", nargs="+", metavar="ID", default=None,
                        help="sensors to plot (default: the first 3); give it after the run directories")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="windows per batch; default: the first run's")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--malloc", choices=MALLOC_POLICIES, default="auto",
                        help="CPU heap, as gwnet-train's --malloc: reuse keeps freed memory for the next "
                             "batch; auto does so where one activation is above glibc's 32 MiB mapping "
                             "ceiling (thousands of sensors)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--beside", nargs="+", metavar="RUN_DIR", default=[],
                        help="runs scored on the same windows beside the ensemble, not members of it (a "
                             "distilled student beside its teachers): extra columns of the MAE table")
    bands = parser.add_argument_group("intervals (see docs/intervals.md)")
    bands.add_argument("--interval", type=float, default=None, metavar="LEVEL",
                       help="calibrated intervals of this coverage (e.g. 0.9), fitted on the validation split: "
                            "lower and upper columns, interval metrics; with --latest they adapt online "
                            "(state in OUT_DIR/intervals_state.json, continued by the next --latest --overwrite)")
    bands.add_argument("--interval-method", choices=("auto", *INTERVALS), default="auto",
                       metavar="{" + ",".join(("auto", *INTERVALS)) + "}",
                       help="auto: cqr for quantile runs (gwnet-train --quantiles), normalized otherwise; "
                            "split: one width per horizon")
    bands.add_argument("--online-step", type=float, default=DEFAULT_STEP, metavar="ETA",
                       help="--latest --interval: step of the online width update (larger adapts faster)")
    parser.add_argument("--fill-zeroes", action=argparse.BooleanOptionalAction, default=None,
                        help="reference (.pth) members: feed missing inputs as the mean (on) or as 0 "
                             "(off); default: the first run's setting, else on. Run directories "
                             "always keep their own")
    group = parser.add_argument_group("data (as gwnet-train takes it)")
    for f in fields(DataConfig):
        if f.name in SOURCE_FIELDS:
            add_field(group, "data", f, show_default=False)  # default: the first run's
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


def mae_table(metrics: pd.DataFrame, ensemble: Ensemble, data, baselines: dict) -> pd.DataFrame:
    """Minutes ahead x models (members, the ensemble when there are several, the baselines)."""
    mae = metrics.pivot(index="horizon", columns="model", values="mae")
    names = [m.name for m in ensemble.members] + ([ENSEMBLE] if len(ensemble.members) > 1 else [])
    mae = mae[names]
    for label, table in baselines.items():
        mae[label] = table["mae"].drop("mean").to_numpy()[:len(mae)]
    mae.index = [lead_label(h, data.config) for h in mae.index]
    mae.index.name, mae.columns.name = "ahead", None
    return mae


def interval_table(bands, data) -> pd.DataFrame:
    """Minutes ahead x interval metrics (and the mean row), units in the column names."""
    table = bands.scores.per_horizon()
    unit = f" ({data.config.unit})" if data.config.unit else ""
    shown = pd.DataFrame({"coverage %": table["coverage"] * 100, f"width{unit}": table["width"],
                          f"interval score{unit}": table["interval_score"], f"pinball{unit}": table["pinball"]})
    if bands.scores.has_crps:
        shown[f"CRPS{unit}"] = table["crps"]
    shown.loc["mean"] = shown.mean()
    shown.index = [lead_label(h, data.config) for h in shown.index]
    shown.index.name = "ahead"
    return shown


def print_intervals(report, data, split: str) -> None:
    bands = report.bands
    print(f"\n{bands.describe()} for {bands.model}, calibrated on the validation split "
          f"({', '.join(str(n) for n in bands.method.calibration_size[:1])} readings per horizon):")
    if report.metrics is not None:
        print(f"on the {split} split (interval score: Winkler's, alpha {1 - bands.options.level:.2g}):")
        print(interval_table(bands, data).to_string(float_format=lambda v: f"{v:.4f}", na_rep=""))
    elif bands.online is not None:
        cov = bands.online.coverage()
        seen = "no readings scored yet" if cov != cov else f"online coverage so far {cov:.1%}"
        print(f"online update: {bands.online_readings} new readings scored; {seen}")


@run_cli("gwnet-predict")
def main(argv: list[str] | None = None) -> int:
    from ..engine.allocator import apply_policy as apply_malloc, largest_activation_bytes
    from ..engine.device import resolve_device

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    # An --out that cannot take the result is refused before any work.
    check_output_directory(args.out, args.overwrite, OUTPUT_FILES, "gwnet-predict")
    interval = None
    if args.interval is not None:
        interval = IntervalOptions(args.interval, args.interval_method, args.online_step)
        if not args.online_step > 0:
            raise GWNetError(f"--online-step must be above 0, got {args.online_step}")
    source = {name.split(".", 1)[1]: value for name, value in vars(args).items() if name.startswith("data.")}
    # Several members combined by a fitted strategy need the validation split even for --latest:
    # then the whole file is read; otherwise the last readings are enough.
    fitted = len(args.runs) > 1 and STRATEGIES.get_entry(args.strategy).needs_validation
    fitted = fitted or interval is not None  # intervals calibrate on the validation split
    device = resolve_device(args.device)
    try:
        members, data = load_members(args.runs, device, latest=args.latest and not fitted,
                                     fill_zeroes=args.fill_zeroes, **source)
    except GWNetError as exc:
        if not (args.latest and fitted):
            raise
        if interval is not None:
            raise GWNetError(f"{exc} (intervals calibrate on the validation split, so --latest --interval "
                             "needs the readings with their history)") from None
        # A file of the last readings only: run() then says the strategy has nothing to fit on.
        members, data = load_members(args.runs, device, latest=True, fill_zeroes=args.fill_zeroes, **source)
    batch_size = args.batch_size or members[0].config.train.batch_size
    apply_malloc(args.malloc, device, activation_bytes=max(
        largest_activation_bytes(m.config.model, m.config.data.seq_len, data.num_nodes, batch_size)
        for m in members))
    ensemble = Ensemble(members, args.strategy)
    split = "latest" if args.latest else args.split
    if args.beside and split == "latest":
        raise GWNetError("--beside scores runs on a split's readings; not with --latest")
    report = run(ensemble, data, args.out, split=split, fmt=args.format, sensors=args.sensors,
                 batch_size=batch_size, plots=args.plots,
                 overwrite=args.overwrite, interval=interval)
    number = lambda v: "" if pd.isna(v) else f"{v:.4f}"  # noqa: E731
    weights = weights_table(ensemble)
    weights.index = [lead_label(h, data.config) for h in weights.index]
    weights.index.name, weights.columns.name = "ahead", None
    if len(members) == 1:
        print(f"model {members[0].name} ({members[0].source}), horizons 1-{members[0].horizon}")
    else:
        print(f"{args.strategy} ensemble of {len(members)} members; weights per horizon:")
        print(weights.to_string(float_format=number, na_rep=""))
    if report.metrics is not None:
        unit = f" in {data.config.unit}" if data.config.unit else ""
        print(f"\nMAE{unit} on the {split} split of {data.source} "
              f"({data.config.protocol}):")
        table = mae_table(report.metrics, ensemble, data, report.baselines)
        if args.beside:  # after the members and their ensemble, before the baselines
            from ..ensemble.distill import score_beside
            from ..ensemble.report import split_windows

            at = len(members) + int(len(members) > 1)
            scored = score_beside(args.beside, ensemble, split_windows(data, split), batch_size, device)
            for name, frame in scored.items():
                table.insert(at, f"{name} (beside)", frame["mae"].reindex(range(1, len(table) + 1)).to_numpy())
                at += 1
        print(table.to_string(float_format=number, na_rep=""))
    if report.bands is not None:
        print_intervals(report, data, split)
    print(f"\n{report.rows} rows: {report.predictions}")
    for path in report.files[1:]:
        print(f"wrote {path}")
    return 0
