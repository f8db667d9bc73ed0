"""One model from the ensemble: the distillation targets, measured.

    python experiments/distill.py --out results/distill              # reduced budget, minutes on a CPU
    python experiments/distill.py --out results/distill --seeds 3    # mean of 3 seeds

Per seed it trains the ensemble's two members (Graph WaveNet, improved recipe: ``short`` on
horizons 1-6, ``long`` on 1-12), combines them per horizon on validation (``gwnet-predict
--strategy per-horizon``), and trains four students of that ensemble and one control:

==============  ==========================================================================
distilled       the long member fine-tuned against the ensemble: ``--init-from long --teacher
                short long`` (knowledge distillation, ``--distill-alpha``)
long_ft         the control: the long member fine-tuned for the same budget on the readings
                alone (``--init-from long``)
shrunk          a Graph WaveNet with half the blocks, ``--shrink-from long``, then fine-tuned
                with ``--teacher short long``
mlp             the per-sensor MLP on the readings alone (the graph-free baseline)
mlp_distilled   the same MLP with ``--teacher short long``
==============  ==========================================================================

It prints one table (mean over seeds, test split): MAE per horizon group, parameters and CPU
inference samples/s (one thread, batches of 64 windows, best of a few passes; the ensemble runs
both members), then each target of the distillation issue with the figures it compares.
``OUT/distill.md`` and ``OUT/distill.csv`` hold the same. Finished runs in
``OUT/runs/<row>/seed<k>`` are reused by a second invocation with the same options.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gwnet.atomic import atomic_path, atomic_write_text
from gwnet.cli.common import run_cli
from gwnet.config import Config
from gwnet.data import load_data
from gwnet.engine import MetricAccumulator, RunDir, load_trained, run_finished
from gwnet.ensemble import Ensemble, load_members
from gwnet.ensemble.distill import train as distil_train
from gwnet.errors import GWNetError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_options import check_same_options  # noqa: E402

# Horizon groups of the table (1-based, inclusive) and the mean over 1-12.
GROUPS = {"MAE 1-3": (1, 3), "MAE 4-6": (4, 6), "MAE 7-12": (7, 12), "MAE mean": (1, 12)}
ROWS = ("short", "long", "ensemble", "long_ft", "distilled", "shrunk", "mlp", "mlp_distilled")
MEMBERS = ("short", "long")

log = logging.getLogger("distill")


def base_config(args: argparse.Namespace, preset: str = "improved") -> Config:
    """The reduced budget every row trains with (the improved recipe otherwise)."""
    cfg = Config.from_preset(preset)
    if args.data:
        cfg.data.dataset = args.data
    cfg.data.synth_nodes, cfg.data.synth_days = args.nodes, args.days
    t = cfg.train
    t.epochs, t.batches_per_epoch, t.progress, t.device = args.epochs, args.batches, False, "cpu"
    t.lr = args.lr
    if preset == "improved":  # the reduced budget's Graph WaveNet: the improved layout, fewer channels
        m = cfg.model
        m.residual_channels = m.dilation_channels = args.channels
        m.skip_channels, m.end_channels = 8 * args.channels, 16 * args.channels
    return cfg


def row_config(row: str, args: argparse.Namespace, seed: int, out: Path) -> Config:
    cfg = base_config(args, "mlp" if row.startswith("mlp") else "improved")
    cfg.train.seed = seed
    cfg.out = str(run_path(out, row, seed))
    if row == "short":
        cfg.data.horizon = 6
    if row in MEMBERS and args.member_epochs is not None:
        cfg.train.epochs = args.member_epochs
    teachers = [str(run_path(out, m, seed).resolve()) for m in MEMBERS]
    if row in ("distilled", "shrunk", "mlp_distilled"):
        t = cfg.train
        t.teacher, t.teacher_strategy = teachers, "per-horizon"
        t.distill_mode, t.distill_alpha = args.mode, args.alpha
    if row in ("distilled", "long_ft"):
        # The GWNet student fine-tunes the long member against the ensemble; long_ft gets the same
        # extra budget on the readings alone, so the difference is what the teachers taught.
        cfg.train.init_from = teachers[1]
    if row == "shrunk":
        cfg.model.blocks //= 2  # half the residual layers: blocks 1 and 4 of the member's 4 (see gwnet.nn.shrink)
        cfg.train.shrink_from = teachers[1]
    return cfg.validate()


def run_path(out: Path, row: str, seed: int) -> Path:
    return out / "runs" / row / f"seed{seed}"


def trained(cfg: Config) -> pd.DataFrame:
    """Test metrics of a row: read when its run is finished, else trained (or resumed)."""
    check_same_options(cfg)
    if run_finished(cfg.out):
        log.info("%s: finished, reused", cfg.out)
        return pd.read_csv(RunDir(cfg.out).test_metrics, index_col=0)
    started = time.perf_counter()
    result = distil_train(cfg, resume=True)
    log.info("%s: trained in %.0f s", cfg.out, time.perf_counter() - started)
    return result.test_metrics


def ensemble_metrics(out: Path, seed: int) -> pd.DataFrame:
    members, data = load_members([run_path(out, m, seed) for m in MEMBERS])
    ensemble = Ensemble(members, "per-horizon")
    batch = members[0].config.train.batch_size
    ensemble.fit(data.windows["val"], batch, source=data.source)
    acc = MetricAccumulator(ensemble.horizon, ensemble.null_value)
    for forecast in ensemble.predict(data.windows["test"], batch):
        acc.update(forecast.prediction, forecast.actual)
    return acc.table()


def groups(table: pd.DataFrame) -> dict[str, float]:
    """Mean per-horizon MAE of each horizon group (NaN where the row lacks a horizon)."""
    mae = table.drop(index="mean")["mae"]
    mae.index = mae.index.astype(int)
    return {name: float(mae.reindex(range(lo, hi + 1)).mean(skipna=False)) for name, (lo, hi) in GROUPS.items()}


def throughput(groups: dict[str, list[torch.nn.Module]], x: torch.Tensor, passes: int = 15) -> dict[str, float]:
    """Windows per second of each group of models run one after the other (an ensemble runs
    all its members): one thread, the groups interleaved (a burst of load on a shared machine
    hits them alike), best of ``passes``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {name: np.inf for name in groups}
    try:
        with torch.no_grad():
            for models in groups.values():
                for m in models:
                    m.eval()(x)
            for _ in range(passes):
                for name, models in groups.items():
                    started = time.perf_counter()
                    for m in models:
                        m(x)
                    best[name] = min(best[name], time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return {name: len(x) / seconds for name, seconds in best.items()}


def test_batch(out: Path, seed: int, batch: int = 64) -> torch.Tensor:
    cfg = load_trained(run_path(out, "long", seed))[1]
    data = load_data(cfg.data)
    return data.windows["test"].batch(torch.arange(min(batch, len(data.windows["test"]))))[0]


def measure(out: Path, seed: int) -> dict[str, tuple[int, float]]:
    """``{row: (parameters, samples/s)}`` of every trained row and the ensemble."""
    models = {row: load_trained(run_path(out, row, seed))[0] for row in ROWS if row != "ensemble"}
    params = {row: sum(p.numel() for p in m.parameters()) for row, m in models.items()}
    params["ensemble"] = params["short"] + params["long"]
    groups = {row: [m] for row, m in models.items()}
    groups["ensemble"] = [models["short"], models["long"]]
    rates = throughput(groups, test_batch(out, seed))
    return {row: (params[row], rates[row]) for row in groups}


def paper_width_shrink(out: Path) -> dict[str, float]:
    """Samples/s of the long member's model at the paper's channels (40/40/320/640, 4 blocks)
    and with half the blocks: untrained weights, the same input (speed does not depend on them)."""
    from gwnet.config import GWNetConfig
    from gwnet.models import build_model_from_config

    cfg = load_trained(run_path(out, "long", 0))[1]
    data = load_data(cfg.data)
    x = data.windows["test"].batch(torch.arange(min(64, len(data.windows["test"]))))[0]
    full = copy.deepcopy(cfg)
    full.model = GWNetConfig(**{**vars(cfg.model), **{k: v for k, v in vars(GWNetConfig()).items()
                                                       if k.endswith("channels") or k == "blocks"}})
    half = copy.deepcopy(full)
    half.model.blocks //= 2
    torch.manual_seed(0)
    return throughput({"member": [build_model_from_config(full, data.supports())],
                       "shrunk": [build_model_from_config(half, data.supports())]}, x)


def run(args: argparse.Namespace) -> tuple[pd.DataFrame, str]:
    out = Path(args.out)
    lines = []
    for seed in range(args.seeds):
        tables = {}
        for row in ROWS:
            if row != "ensemble":
                tables[row] = trained(row_config(row, args, seed, out))
            elif all(r in tables for r in MEMBERS):
                tables[row] = ensemble_metrics(out, seed)
        speed = measure(out, seed)
        for row in ROWS:
            params, rate = speed[row]
            lines.append({"row": row, "seed": seed, **groups(tables[row]), "parameters": params, "samples/s": rate})
    per_seed = pd.DataFrame(lines)
    summary = per_seed.drop(columns="seed").groupby("row", sort=False).mean()
    return per_seed, report(summary, per_seed, args, paper_width_shrink(out))


def _pass(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(summary: pd.DataFrame, per_seed: pd.DataFrame, args: argparse.Namespace,
           paper_width: dict[str, float]) -> str:
    """The table and the targets, as markdown."""
    seeds = per_seed["seed"].nunique()
    std = per_seed.drop(columns="seed").groupby("row", sort=False).std()
    shown = summary.copy()
    for col in GROUPS:
        shown[col] = [f"{m:.3f}" + (f" \u00b1 {s:.3f}" if seeds > 1 and s == s else "") if m == m else "\u2013"
                      for m, s in zip(summary[col], std[col])]
    shown["parameters"] = summary["parameters"].map(lambda v: f"{v:,.0f}")
    shown["samples/s"] = summary["samples/s"].map(lambda v: f"{v:,.0f}")
    header = "| model | " + " | ".join(shown.columns) + " |"
    rows = [header, "|---" + "|---:" * len(shown.columns) + "|"]
    rows += ["| " + " | ".join([row, *map(str, shown.loc[row])]) + " |" for row in shown.index]
    mae, rate = summary["MAE mean"], summary["samples/s"]
    best, ens = mae["long"], mae["ensemble"]  # the best member covering horizons 1-12
    gain = best - ens
    short_gain = summary.loc["long", "MAE 1-3"] - summary.loc["ensemble", "MAE 1-3"]
    text = [f"Test split, {'mean of %d seeds' % seeds if seeds > 1 else 'one seed'} "
            f"(\u00b1 std over seeds); budget: {args.epochs} epochs of {args.batches} batches"
            f"{f' ({args.member_epochs} for the members)' if args.member_epochs else ''}, lr {args.lr}, "
            f"Graph WaveNet channels {args.channels}/{args.channels}/{8 * args.channels}/{16 * args.channels}; "
            f"students: --distill-mode {args.mode} --distill-alpha {args.alpha}; "
            f"data: {args.data or f'embedded synthetic, {args.nodes} sensors, {args.days} days'}.", "", *rows, "",
            f"Room to distil: the ensemble's mean MAE is {ens:.3f}, the best member's (long, horizons 1-12) "
            f"{best:.3f}: a gain of {gain:.3f} ({100 * gain / best:.1f}%), {short_gain:.3f} at horizons 1-3.", ""]
    same = rate[["long", "long_ft", "distilled"]]  # one architecture: their spread is the timing noise
    text += [f"Samples/s of one architecture (long, long_ft, distilled) range {same.min():,.0f}-{same.max():,.0f} "
             f"({100 * (same.max() / same.min() - 1):.0f}%): read the speed ratios below with that noise.", ""]
    d = mae["distilled"]
    closed = (best - d) / gain if gain > 0 else float("nan")
    way = f"{closed:.0%} of the way" if gain > 0 else "the ensemble has no gain over it to close"
    text.append(f"- GWNet student: MAE {d:.3f} vs best member {best:.3f} and ensemble {ens:.3f} "
                f"({way}), inference cost {rate['ensemble'] / rate['distilled']:.2f}x the "
                f"ensemble's: no worse than the best member {_pass(d <= best)}, half-way {_pass(closed >= 0.5)}, "
                f"half the cost {_pass(rate['distilled'] >= 2 * rate['ensemble'])} (parameters "
                f"{summary.loc['distilled', 'parameters'] / summary.loc['ensemble', 'parameters']:.2f}x). Control, "
                f"the long member fine-tuned as long on the readings alone (long_ft): MAE {mae['long_ft']:.3f}; "
                f"the student is {d - mae['long_ft']:+.3f} against it, which is what the teachers' forecasts "
                f"did {'for' if d < mae['long_ft'] else 'to'} it")
    s = mae["shrunk"]
    text.append(f"- Shrunk GWNet (half the blocks): {rate['shrunk'] / rate['long']:.2f}x one member's samples/s "
                f"{_pass(rate['shrunk'] >= 2 * rate['long'])}; MAE {s:.3f}, {100 * (s - best) / best:+.1f}% vs best "
                f"member {_pass(s <= 1.02 * best)}. At the paper's channels (40/40/320/640, untrained weights) "
                f"the same shrink is {paper_width['shrunk'] / paper_width['member']:.2f}x one member's samples/s "
                f"({paper_width['shrunk']:,.0f} vs {paper_width['member']:,.0f})")
    m, mk = mae["mlp"], mae["mlp_distilled"]
    mgap = m - ens
    mclosed = (m - mk) / mgap if mgap > 0 else float("nan")
    text.append(f"- MLP student: {rate['mlp_distilled'] / rate['ensemble']:.0f}x the ensemble's samples/s "
                f"{_pass(rate['mlp_distilled'] >= 10 * rate['ensemble'])}; MAE {mk:.3f} vs {m:.3f} on readings "
                f"alone and {ens:.3f} for the ensemble: {mclosed:.0%} of the gap closed {_pass(mclosed >= 0.3)}")
    return "\n".join(text) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/distill", help="output directory (default: results/distill)")
    parser.add_argument("--data", default=None, help="dataset name or directory (default: embedded synthetic)")
    parser.add_argument("--nodes", type=int, default=20, help="synthetic sensors (default: 20)")
    parser.add_argument("--days", type=int, default=7, help="synthetic days (default: 7)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1, averaged (default: 1)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run (default: 8)")
    parser.add_argument("--batches", type=int, default=20, help="batches per epoch (default: 20)")
    parser.add_argument("--member-epochs", type=int, default=None,
                        help="epochs of the ensemble's members (default: --epochs): stronger teachers")
    parser.add_argument("--channels", type=int, default=16,
                        help="Graph WaveNet residual channels (skip 8x, end 16x; the paper's: 40) (default: 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training (default: 1)")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: 0.002)")
    parser.add_argument("--mode", choices=("kd", "pseudo", "fill"), default="kd", help="students' distill mode")
    parser.add_argument("--alpha", type=float, default=0.5, help="kd: weight of the readings (default: 0.5)")
    return parser


@run_cli("distill.py")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise GWNetError(f"--seeds must be at least 1, got {args.seeds}")
    logging.basicConfig(level=logging.INFO, format="distill: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    per_seed, text = run(args)
    out = Path(args.out)
    atomic_write_text(out / "distill.md", text)
    with atomic_path(out / "distill.csv") as tmp:
        per_seed.to_csv(tmp, index=False)
    print(text)
    print(f"wrote {out / 'distill.md'} and {out / 'distill.csv'}; wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
