"""Regenerate the results table of Shleifer et al. (2019) on your data with one command.

    python experiments/paper_table.py --data DIR --out results/            # the paper's budget
    python experiments/paper_table.py --budget smoke --out results/smoke   # minutes on a CPU

Rows (``--rows`` picks some; every trained row has one config file in ``configs/``, read with
gwnet's own config machinery):

=====================  ===================================================================
original               Wu et al. (2019): Graph WaveNet with its published recipe
improved               Shleifer et al.: better hyperparameters, ``cat_feat_gc``, ``fill_zeroes``
finetuned              improved, pretrained on horizons 1-6, then finetuned on 1-12
short                  improved, trained on horizons 1-6 only (the ensemble's short member)
mlp                    no graph: a per-sensor MLP over the input window (gwnet's ``mlp`` model;
                       beyond the paper's table, so only with ``--rows ... mlp``)
ensemble               per horizon, the better on validation of ``short`` and ``finetuned``
distilled              the ``finetuned`` model trained further on the ensemble's forecasts (knowledge
                       distillation, ``gwnet-train --init-from --teacher``; only when asked for)
distilled_mlp          the ``mlp`` model trained on the ensemble's forecasts (only when asked for)
last_value             each sensor's last reading, repeated
historical_average     each sensor's mean speed at the time of day, from the training data
=====================  ===================================================================

The paper ensembled a short-horizon model with a long-horizon one; the long member here is
``finetuned``, the paper's best single model. Asking for ``ensemble`` (or a distilled row,
whose teachers they are) trains both members even when their rows are not asked for.

A *budget* (``--budget``: a file in ``budgets/`` or a path) is an overlay of options applied
on top of every row's config: ``paper`` changes nothing (100 epochs etc.), ``smoke`` trains
six epochs of ten batches on a smaller synthetic dataset (the paper's model sizes). A
budget's ``[model]`` options apply to the rows whose model has them (Graph WaveNet's sizes
leave the ``mlp`` row alone); an option no row's model has is an error.
``--epochs``, ``--device`` and the data flags are applied on top of it.

Run directories are ``OUT/runs/<row>/seed<k>`` (``--seeds N`` trains seeds 0..N-1 and reports
mean +- std). A row whose run directory is complete is not trained again and an interrupted
one resumes where it stopped (gwnet's trainer resume), so rerunning a killed command
continues it. A run directory that was made with other options is refused rather than mixed
into the table.

Outputs, each written atomically: ``OUT/paper_table.md`` and ``OUT/paper_table.csv`` (MAE,
RMSE and MAPE in % at horizons 3, 6, 12 and the mean of horizons 1-12, test split),
``OUT/per_horizon.csv`` (every row, seed and horizon; MAPE as a fraction, as in run
directories) and ``OUT/mae_by_horizon.png``. The ensemble's weights per horizon are in
``OUT/runs/ensemble/seed<k>/ensemble.json``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from gwnet.atomic import atomic_path, atomic_write_text
from gwnet.cli.common import run_cli
from gwnet.config import (Config, DataConfig, fields_filled_from_data, fields_with_role, flatten,
                          read_config_file, update)
from gwnet.data import TrafficData, load_data
from gwnet.engine import Interrupted, MetricAccumulator, RunDir, resolve_device, run_finished
from gwnet.engine.baselines import evaluate_baseline
from gwnet.ensemble import Ensemble, load_members, plot_mae_by_horizon
from gwnet.ensemble.distill import train as distil_train
from gwnet.errors import GWNetError, file_error

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
BUDGETS = HERE / "budgets"

# Row key -> label, in table order. Trained rows have configs/<key>.toml.
TRAINED = {
    "original": "Graph WaveNet (Wu et al. 2019)",
    "improved": "Improved: hyperparameters, cat_feat_gc, fill_zeroes",
    "finetuned": "Improved, pretrained on horizons 1-6, finetuned on 1-12",
    "short": "Improved, horizons 1-6 only (ensemble member)",
    "mlp": "No graph: per-sensor MLP over the input window",
    # Trained against the ensemble row's forecasts (its members of the same seed): after them.
    "distilled": "Distilled: finetuned, trained further on the ensemble's forecasts",
    "distilled_mlp": "Distilled MLP: the per-sensor MLP trained on the ensemble's forecasts",
}
ENSEMBLE_ROW = "ensemble"
ENSEMBLE_MEMBERS = ("short", "finetuned")  # short-horizon first, as the paper combined them
ENSEMBLE_STRATEGY = "per-horizon"  # each horizon takes the member with the lower validation MAE
BASELINES = {
    "last_value": "Last value",
    "historical_average": "Historical average (sensor, time of day)",
}
DISTILLED = ("distilled", "distilled_mlp")  # students of the ensemble row (gwnet-train --teacher)
LABELS = {**{k: v for k, v in TRAINED.items() if k not in DISTILLED},
          ENSEMBLE_ROW: "Ensemble: short (1-6) + finetuned, per horizon",
          **{k: TRAINED[k] for k in DISTILLED}, **BASELINES}
ALL_ROWS = tuple(LABELS)  # table order
# Rows beyond the paper's table, produced when asked for (--rows ... mlp).
BEYOND_PAPER = ("mlp", *DISTILLED)
ROWS = tuple(r for r in ALL_ROWS if r not in BEYOND_PAPER)  # the default: the paper's rows
# The data options of the baselines (horizon 12, the paper's missing-value handling).
BASELINE_DATA_ROW = "improved"

REPORTED = ("3", "6", "12", "mean")  # horizons of the table; "mean" averages horizons 1..12
METRICS = ("mae", "rmse", "mape_pct")
OUTPUTS = ("paper_table.md", "paper_table.csv", "per_horizon.csv", "mae_by_horizon.png")
# Roles of options that may change between invocations without changing what a run directory
# holds: where and how it runs, and what follows from the data.
FREE_ROLES = ("runtime", "derived")

log = logging.getLogger("paper_table")


# --- budgets and configs ------------------------------------------------------------------
@dataclass
class Budget:
    """An overlay ``{section: {option: value}}`` applied on top of every row's config."""

    name: str
    overlay: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, name: str) -> "Budget":
        """``name`` is a file in ``budgets/`` (without ``.toml``) or a path to a config file."""
        path = BUDGETS / f"{name}.toml"
        if not path.exists():
            path = Path(name)
            if not path.is_file():
                known = ", ".join(sorted(p.stem for p in BUDGETS.glob("*.toml")))
                raise GWNetError(f"{name}: no such budget ({known}) nor config file")
        overlay = read_config_file(path)
        if "preset" in overlay or "out" in overlay:
            # A budget scales a row; which model a row trains and where is the row's business.
            raise file_error(path, "a budget may not set preset or out")
        budget = cls(path.stem, overlay)
        budget.check(str(path))  # unknown options fail here, before any training
        return budget

    def check(self, source: str) -> None:
        """Every option must be one of gwnet's, and a model option one that some row's model has."""
        others = {k: v for k, v in self.overlay.items() if k != "model"}
        update(Config(), others, source=source)
        options = self.overlay.get("model", {})
        if not isinstance(options, dict):
            raise GWNetError(f"{source}: section 'model' must be a table of options")
        known = set().union(*(_model_fields(row) for row in TRAINED))
        unknown = sorted(set(options) - known)
        if unknown:
            raise GWNetError(f"{source}: unknown option model.{unknown[0]} (no row's model has it)")

    def for_row(self, cfg: Config) -> dict[str, Any]:
        """The overlay as it applies to a row: model options only where the row's model has them."""
        overlay = copy.deepcopy(self.overlay)
        if "model" in overlay:
            mine = {f.name for f in dataclasses.fields(cfg.model)}
            overlay["model"] = {k: v for k, v in overlay["model"].items() if k in mine}
        return overlay

    def merged(self, overlay: dict[str, Any], name: str | None = None) -> "Budget":
        """This budget with ``overlay``'s options on top (e.g. ``--epochs``, a tiny model)."""
        merged = copy.deepcopy(self.overlay)
        for section, options in overlay.items():
            merged.setdefault(section, {}).update(options)
        budget = Budget(name or self.name, merged)
        budget.check(f"budget {budget.name}")
        return budget

    def describe(self) -> str:
        """``train.epochs=6, ...`` or ``the configs' own values``."""
        items = [f"{section}.{k}={v}" for section, options in self.overlay.items()
                 for k, v in options.items()]
        return ", ".join(items) or "the configs' own values"


def _row_file_config(row: str) -> Config:
    path = CONFIGS / f"{row}.toml"
    return Config.from_dict(read_config_file(path), source=str(path))


def _model_fields(row: str) -> set[str]:
    return {f.name for f in dataclasses.fields(_row_file_config(row).model)}


def row_config(row: str, budget: Budget, source: dict[str, str], seed: int, out: Path) -> Config:
    """The config of a trained row: its file, then the budget, then the data and the seed."""
    cfg = _row_file_config(row)
    update(cfg, budget.for_row(cfg), source=f"budget {budget.name}")
    update(cfg, {"data": source, "train": {"seed": seed}}, source="command line")
    if row in DISTILLED:  # the ensemble row's members of this seed are the teachers
        teachers = [str(run_dir(out, member, seed).resolve()) for member in ENSEMBLE_MEMBERS]
        update(cfg, {"train": {"teacher": teachers, "teacher_strategy": ENSEMBLE_STRATEGY}}, source="ensemble row")
        if row == "distilled":  # one Graph WaveNet: the long member, fine-tuned against the ensemble
            update(cfg, {"train": {"init_from": teachers[-1]}}, source="ensemble row")
    cfg.out = str(run_dir(out, row, seed))
    return cfg.validate()


def run_dir(out: Path, row: str, seed: int) -> Path:
    return out / "runs" / row / f"seed{seed}"


def data_source(data: str | None = None, adj: str | None = None, key: str | None = None) -> dict[str, str]:
    """Data options from ``--data`` (a dataset name or directory, or a speeds file), ``--adj``
    and ``--key``; empty means each config's own data (the embedded synthetic dataset)."""
    source = {"adj": adj, "key": key}
    if data is not None:
        source["data" if Path(data).is_file() else "dataset"] = data
    return {k: v for k, v in source.items() if v is not None}


def describe_data(cfg: DataConfig) -> str:
    if cfg.data is None and cfg.dataset == "synthetic":
        return (f"the embedded synthetic dataset ({cfg.synth_nodes} sensors, {cfg.synth_days} days, "
                f"seed {cfg.synth_seed})")
    return Path(cfg.data or cfg.dataset).name


# --- rows ---------------------------------------------------------------------------------
def check_same_run(cfg: Config) -> None:
    """Refuse a run directory made with other options: its numbers would not be this row's."""
    root = Path(cfg.out)
    # A pretrain-then-finetune run records its whole pipeline; a plain run its config.
    saved_path = RunDir(root).saved_config
    if not saved_path.exists():
        return
    saved = flatten(json.loads(saved_path.read_text()))
    ours = flatten(copy.deepcopy(cfg).resolve().to_dict())
    free = {f"{section}.{name}" if section else name
            for section, part in (("", cfg), ("data", cfg.data), ("model", cfg.model), ("train", cfg.train))
            for name in fields_with_role(part, *FREE_ROLES)}
    # Options the data decides when left unset: the run directory holds the decided value.
    filled = {f"{section}.{name}" for section, part in (("data", cfg.data), ("train", cfg.train))
              for name in fields_filled_from_data(part)}
    differ = [k for k in sorted(set(saved) | set(ours))
              if k not in free and saved.get(k) != ours.get(k) and not (k in filled and ours.get(k) is None)]
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)!r} there, {ours.get(k)!r} now" for k in differ[:3])
        raise file_error(root, f"holds a run made with other options ({shown}); "
                         "choose another --out or delete it")


def train_row(cfg: Config) -> pd.DataFrame:
    """Test metrics of a trained row: read when its run directory is complete, else trained
    (or resumed where an earlier invocation stopped)."""
    check_same_run(cfg)
    root = Path(cfg.out)
    if run_finished(root):
        log.info("%s: complete, skipped", root)
        return pd.read_csv(RunDir(root).test_metrics, index_col=0)
    resuming = RunDir(root).last.exists() or RunDir(root).pipeline.exists()
    log.info("%s: %s", root, "resuming" if resuming else "training")
    started = time.perf_counter()
    # resume=True also starts a fresh run: the trainer restarts when there is nothing to resume.
    result = distil_train(cfg, resume=True)  # gwnet's trainer; with the teachers' forecasts for students
    log.info("%s: done in %.0f s", root, time.perf_counter() - started)
    return result.test_metrics


def ensemble_row(out: Path, seed: int, device: str) -> pd.DataFrame:
    """Fit the per-horizon ensemble of the members' seed-``seed`` runs on validation and score
    it on test; its weights and table go to ``OUT/runs/ensemble/seed<k>``."""
    paths = [run_dir(out, row, seed) for row in ENSEMBLE_MEMBERS]
    members, data = load_members(paths, resolve_device(device))
    for member, row in zip(members, ENSEMBLE_MEMBERS):
        member.name = row  # the run directories are all called seed<k>
    ensemble = Ensemble(members, ENSEMBLE_STRATEGY)
    batch_size = members[0].config.train.batch_size
    ensemble.fit(data.windows["val"], batch_size, source=data.source)
    acc = MetricAccumulator(ensemble.horizon, ensemble.null_value)
    for forecast in ensemble.predict(data.windows["test"], batch_size):
        acc.update(forecast.prediction, forecast.actual)
    table = acc.table()
    where = run_dir(out, ENSEMBLE_ROW, seed)
    atomic_write_text(where / "ensemble.json", json.dumps(ensemble.describe(), indent=2) + "\n")
    with atomic_path(where / "test_metrics.csv") as tmp:
        table.to_csv(tmp)
    return table


def baseline_rows(names: Sequence[str], data: TrafficData) -> dict[str, pd.DataFrame]:
    """Test metrics of the baselines (deterministic: one table each, whatever the seeds)."""
    return {name: evaluate_baseline(data, name, "test").table() for name in names}


# --- the table ----------------------------------------------------------------------------
@dataclass
class Table:
    """Every row's test metrics, and the files written from them."""

    scores: pd.DataFrame  # long: row, seed, horizon (1..H, mean), mae, rmse, mape_pct
    summary: pd.DataFrame  # one line per row: label, seeds, <metric>_<h> and <metric>_<h>_std
    markdown: str
    files: list[Path]


def run_table(out: str | Path, rows: Sequence[str] = ROWS, budget: Budget | None = None, seeds: int = 1,
              source: dict[str, str] | None = None) -> Table:
    """Train (or reuse) every row asked for, score it, and write the table into ``out``."""
    out = Path(out)
    budget = budget or Budget.load("paper")
    source = source or {}
    unknown = [r for r in rows if r not in LABELS]
    if unknown:
        raise GWNetError(f"unknown row {unknown[0]!r}; choose from {', '.join(ALL_ROWS)}")
    if seeds < 1:
        raise GWNetError(f"--seeds must be at least 1, got {seeds}")
    rows = [r for r in ALL_ROWS if r in rows]  # table order, each once
    with_members = ENSEMBLE_ROW in rows or any(r in DISTILLED for r in rows)
    needed = {r for r in rows if r in TRAINED} | (set(ENSEMBLE_MEMBERS) if with_members else set())
    tables: dict[str, dict[int, pd.DataFrame]] = {r: {} for r in rows}
    # Seed-major: each seed's rows complete before the next seed starts, so an interrupted
    # table run has whole seeds to show.
    for seed in range(seeds):
        configs = {r: row_config(r, budget, source, seed, out) for r in TRAINED if r in needed}
        for row, cfg in configs.items():
            table = train_row(cfg)
            if row in tables:
                tables[row][seed] = table
        if ENSEMBLE_ROW in rows:
            device = configs[ENSEMBLE_MEMBERS[-1]].train.device
            tables[ENSEMBLE_ROW][seed] = ensemble_row(out, seed, device)
    # The data as the rows read it, with what its protocol decides (split, target, unit, step).
    data = load_data(row_config(BASELINE_DATA_ROW, budget, source, 0, out).data)
    reference = data.config
    for name, table in baseline_rows([r for r in rows if r in BASELINES], data).items():
        tables[name][0] = table
    scores = long_scores(tables, reference.horizon)
    summary = summarize(scores, rows)
    markdown = to_markdown(summary, table_caption(budget, reference, seeds))
    files = write_outputs(out, scores, summary, markdown, reference)
    return Table(scores, summary, markdown, files)


def long_scores(tables: dict[str, dict[int, pd.DataFrame]], horizon: int) -> pd.DataFrame:
    """One frame of every row's per-seed tables, in table order. A row that forecasts fewer
    than ``horizon`` horizons (``short``) keeps its horizons but not its mean, which would
    average other horizons than the table's mean column."""
    parts = []
    for row, by_seed in tables.items():
        for seed, table in by_seed.items():
            if len(table) - 1 < horizon:
                table = table.drop(index="mean")
            parts.append(table.rename_axis("horizon").reset_index().assign(row=row, seed=seed))
    scores = pd.concat(parts, ignore_index=True)[["row", "seed", "horizon", *METRICS]]
    scores["horizon"] = scores["horizon"].astype(str)
    return scores


def summarize(scores: pd.DataFrame, rows: Sequence[str]) -> pd.DataFrame:
    """Mean and std over seeds at the reported horizons, one line per row; MAPE in %."""
    picked = scores[scores["horizon"].isin(REPORTED)].copy()
    stats = picked.groupby(["row", "horizon"])[list(METRICS)].agg(["mean", "std"])
    # Horizons a row lacks (the short model's 12 and mean) become empty cells.
    stats = stats.reindex(pd.MultiIndex.from_product([rows, REPORTED], names=["row", "horizon"]))
    summary = pd.DataFrame(index=pd.Index(rows, name="row"))
    summary["label"] = [LABELS[r] for r in rows]
    summary["seeds"] = scores.groupby("row")["seed"].nunique().reindex(rows)
    for h in REPORTED:
        at = stats.xs(h, level="horizon")
        tag = "mean" if h == "mean" else f"h{h}"
        for metric in METRICS:
            name = f"{metric}_{tag}"
            summary[name] = at[(metric, "mean")]
            summary[f"{name}_std"] = at[(metric, "std")]
    return summary


def table_caption(budget: Budget, data: DataConfig, seeds: int) -> str:
    seeds_text = "one seed" if seeds == 1 else f"mean \u00b1 std over {seeds} seeds (0-{seeds - 1})"
    shrunk = " Model sizes differ from the paper's (set by the budget)." if "model" in budget.overlay else ""
    ahead = ", ".join(str((data.first_offset + h - 1) * data.step_minutes) for h in (3, 6))
    ahead += f" and {(data.first_offset + 11) * data.step_minutes}"
    return (f"Test split of {describe_data(data)} (protocol: {data.protocol}): MAE, RMSE and MAPE (%) at "
            f"horizons 3, 6 and 12 ({ahead} minutes ahead) and their mean over horizons 1-{data.horizon}; "
            f"{seeds_text} "
            f"for the trained rows, baselines are deterministic. Budget {budget.name}: {budget.describe()}."
            f"{shrunk} The ensemble takes, per horizon, whichever of the short (1-6) and finetuned "
            f"(1-12) models has the lower validation MAE.")


def to_markdown(summary: pd.DataFrame, caption: str) -> str:
    """The table as GitHub markdown: value, or value \u00b1 std when several seeds ran."""
    header = ["model"]
    for h in REPORTED:
        where = "mean" if h == "mean" else f"h{h}"
        header += [f"MAE {where}", f"RMSE {where}", f"MAPE {where}"]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    columns = [c for c in summary.columns if c not in ("label", "seeds") and not c.endswith("_std")]
    for _, line in summary.iterrows():
        cells = [line["label"], *(_cell(line[c], line[f"{c}_std"]) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float, std: float) -> str:
    if pd.isna(value):
        return "\u2013"  # a horizon the row does not forecast
    return f"{value:.2f}" if pd.isna(std) else f"{value:.2f} \u00b1 {std:.2f}"


def write_outputs(out: Path, scores: pd.DataFrame, summary: pd.DataFrame, markdown: str,
                  data: DataConfig) -> list[Path]:
    files = [out / name for name in OUTPUTS]
    atomic_write_text(files[0], markdown)
    with atomic_path(files[1]) as tmp:
        summary.to_csv(tmp)
    with atomic_path(files[2]) as tmp:
        scores.to_csv(tmp, index=False)
    # The plot shows each row's MAE per horizon, averaged over seeds; the ensemble stands out.
    per_horizon = scores[scores["horizon"] != "mean"].astype({"horizon": int})
    mae = per_horizon.groupby(["row", "horizon"], sort=False)["mae"].mean().reset_index()
    lead = data.first_offset + np.arange(int(mae["horizon"].max()))  # steps after the last input
    minutes = lead * data.step_minutes
    plot_mae_by_horizon(mae.rename(columns={"row": "model"}), files[3], minutes)
    return files


# --- command line -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paper_table.py", description=__doc__.split("\n\n")[0],
                                     epilog="Example: python experiments/paper_table.py --data metr-la "
                                            "--out results/metr-la --seeds 3")
    parser.add_argument("--data", metavar="DIR|NAME|FILE", default=None,
                        help="dataset directory or name (synthetic, metr-la, pems-bay), or a speeds file "
                             "with --adj (default: the embedded synthetic dataset)")
    parser.add_argument("--adj", metavar="FILE", default=None,
                        help="sensor graph (DCRNN pickle or distances CSV)")
    parser.add_argument("--key", metavar="KEY", default=None, help="HDF5 key of the speeds frame")
    parser.add_argument("--out", metavar="DIR", default="results", help="output directory (default: results)")
    parser.add_argument("--rows", nargs="+", choices=ALL_ROWS, default=list(ROWS), metavar="ROW",
                        help=f"rows to produce: {', '.join(ALL_ROWS)} (default: the paper's, all but "
                             f"{', '.join(BEYOND_PAPER)})")
    parser.add_argument("--budget", default="paper", metavar="NAME|FILE",
                        help="paper (the configs' values), smoke (minutes on a CPU), or an overlay file")
    parser.add_argument("--epochs", type=int, default=None, metavar="N", help="override every row's epochs")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train seeds 0..N-1 and report mean +- std (default: 1)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the configs')")
    return parser


@run_cli("paper_table")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="paper_table: %(message)s", stream=sys.stderr)
    budget = Budget.load(args.budget)
    extra = {k: v for k, v in (("epochs", args.epochs), ("device", args.device)) if v is not None}
    if extra:
        budget = budget.merged({"train": extra})
    started = time.perf_counter()
    try:
        source = data_source(args.data, args.adj, args.key)
        table = run_table(args.out, args.rows, budget, args.seeds, source)
    except Interrupted:
        print("paper_table: interrupted; run the same command again to continue the table", file=sys.stderr)
        return 130
    print(table.markdown)
    for path in table.files:
        print(f"wrote {path}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
