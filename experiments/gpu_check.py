"""The one command to run on a GPU machine: gwnet's speed against the reference code, the
8,600-sensor rows, a METR-LA-size training run, FSDP over NCCL, intervals and distillation.

    PYTHONPATH=. python experiments/gpu_check.py --out DIR [--smoke] [--budget 450]

Parts, in order, each printed as it finishes and kept in ``DIR/gpu_check.json`` and
``DIR/gpu_check.md`` (rewritten after every part, so a run cut short keeps what it measured):

* ``steps``: the training step (forward, masked MAE, backward, clipping at 3, Adam) and the
  inference of the improved preset at batch 64 on the METR-LA graph (``../shared``, else a
  synthetic road graph of 207 sensors), medians after warm-up, for every kernel (``fast``,
  ``dense``, ``auto``), precision (fp32 = PyTorch's defaults, TF32 matmuls and convolutions,
  bf16 autocast) and mode (eager, CUDA graphs of :mod:`gwnet.engine.step`, dropout 0.3 inside
  the graph), against the reference code's fp32 step and inference (Shleifer et al.'s
  ``model.py`` from ``../shared/reference/sshleifer-gwnet``; its rows are left out, and the
  ratios with them, when ``../shared`` is absent);
* ``large``: 8,600 sensors (a synthetic road graph, ``graph_conv=auto``, eager fp32) for the
  ``topk``, ``lowrank`` and dense adaptive adjacencies: step time and peak memory at batch 4,
  8, 16, ... up to the largest that fits (or a step over 3 s), and the epoch time that step
  gives for LargeST's CA split (21,010 training windows of 2019 at 15 minutes);
* ``train``: ``gwnet train --device cuda`` for 2 epochs on a synthetic METR-LA-size set (207
  sensors, 34,272 five-minute steps, DCRNN's 0.7/0.2 split: METR-LA's 23,974 training
  windows) with the defaults (``auto`` kernel, CUDA graphs), epoch seconds and the 100-epoch
  projection from the second epoch; the same in bf16, and the test MAE of both;
* ``fsdp``: ``torchrun`` (1 process; NCCL on a GPU, gloo on the CPU) training with ``--fsdp
  --precision bf16``: stopped by SIGTERM once ``best.pt`` exists, resumed, then predicted;
* ``intervals`` and ``distill``: ``gwnet predict --interval 0.9`` on the ``train`` run and a
  1-epoch ``gwnet train --teacher`` from it, where this gwnet has those flags.

Only torch, numpy, pandas, scipy and the standard library are imported (besides gwnet), so
it runs on a machine with nothing else installed. ``--smoke`` runs every part at toy size on
the CPU: 1.3 to 2.5 minutes on a 2-core machine (``python -m pytest -q -m slow
tests/test_gpu_check.py`` runs it; see docs/gpu.md); ``--budget`` seconds bound the whole
run: a part that would start after it is skipped and says so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared_reference  # noqa: E402
from benchmark import metr_la_graph, road_graph  # noqa: E402

from gwnet.atomic import atomic_write_text  # noqa: E402
from gwnet.config import GWNetConfig  # noqa: E402
from gwnet.data.supports import build_supports, to_torch  # noqa: E402
from gwnet.engine.device import autocast  # noqa: E402
from gwnet.engine.metrics import masked_mae  # noqa: E402
from gwnet.engine.step import Forecaster, GraphedStep, TrainStep  # noqa: E402
from gwnet.nn import GWNet  # noqa: E402

warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", "Sparse invariant checks are implicitly disabled")
ROOT = Path(__file__).resolve().parents[1]
# METR-LA: 34,272 five-minute steps, 23,974 training windows (DCRNN's split).
METR_LA_STEPS, METR_LA_TRAIN = 34272, 23974
# LargeST CA, 2019 at 15 minutes: 35,040 steps, 0.6 of its windows for training.
LARGEST_TRAIN = 21010


class Check:
    """Results by part, printed as they come and rewritten to ``out`` after each part."""

    def __init__(self, out: Path, budget: float):
        self.out, self.budget, self.start = out, budget, time.perf_counter()
        self.results: dict = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def part(self, name: str, fn, *args) -> None:
        if self.elapsed() > self.budget:
            self.results[name] = {"skipped": f"over the budget of {self.budget:.0f} s"}
            self.say(f"{name}: skipped (over the budget)")
        else:
            self.say(f"{name}: starting")
            started = time.perf_counter()
            try:
                self.results[name] = fn(self, *args)
            except Exception as exc:  # one part's failure must not hide the others' figures
                self.results[name] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}",
                                      "traceback": traceback.format_exc()[-2000:]}
                self.say(f"{name}: FAILED {self.results[name]['error']}")
            self.results[name + "_seconds"] = round(time.perf_counter() - started, 1)
        self.write()

    def write(self) -> None:
        # Atomic: a run killed while writing keeps the previous part's complete files.
        atomic_write_text(self.out / "gpu_check.json", json.dumps(self.results, indent=2, default=str) + "\n")
        atomic_write_text(self.out / "gpu_check.md", markdown(self.results))


# --- the step table ------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Precision:
    """fp32 (PyTorch's defaults: TF32 off for matmuls, on for cuDNN convolutions), tf32 (both
    on) or bf16 (autocast); restores the flags on exit."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        if self.name == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def gwnet_model(adj, device: torch.device, kernel: str, channels: dict, **change) -> GWNet:
    torch.manual_seed(0)
    cfg = GWNetConfig.improved(num_nodes=adj.shape[0], graph_conv=kernel, **channels, **change)
    model = GWNet(cfg, to_torch(build_supports(adj))).to(device)
    model.select_kernel(device)
    return model


def gwnet_steps(model: GWNet, x, y, device: torch.device, precision: str, graphs: bool):
    """``(train, infer)`` closures: the trainer's step (gwnet.engine.step) on fixed batches."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    amp = "bf16" if precision == "bf16" else "fp32"

    def forward(inp):
        with autocast(device, amp):
            out = model(inp)
        return out.float() * 10.0 + 50.0  # the scaler's inverse transform

    step = TrainStep(model, optimizer, forward, lambda pred, target: (masked_mae(pred, target),) * 2, 3.0)
    if graphs:
        graphed = GraphedStep(step, x, y)
        if device.type == "cuda":
            graphed.capture(x, y)
        train = lambda: graphed(x, y)  # noqa: E731
    else:
        train = lambda: step(x, y)  # noqa: E731
    forecaster = Forecaster(lambda inp: forward(inp).clamp(0.0, 70.0), graphs and device.type == "cuda")
    return train, lambda: forecaster(x)


def reference_steps(ref, x, y):
    optimizer = torch.optim.Adam(ref.parameters(), lr=1e-3, weight_decay=1e-4)

    def train():
        optimizer.zero_grad(set_to_none=True)
        masked_mae(ref(x) * 10.0 + 50.0, y).backward()
        optimizer.step()

    @torch.no_grad()
    def infer():
        ref(x)
    return train, infer


def part_env(check: Check, device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "cpu_count": os.cpu_count(), "shared": shared_reference.available()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1))
    check.say(", ".join(f"{k} {v}" for k, v in env.items()))
    return env


def part_steps(check: Check, device: torch.device, smoke: bool) -> dict:
    adj, graph = (road_graph(12), "toy road graph") if smoke else metr_la_graph()
    batch, repeats = (4, 2) if smoke else (64, 30)
    channels = dict(residual_channels=8, dilation_channels=8, skip_channels=16, end_channels=16) if smoke else {}
    torch.manual_seed(1)
    probe = gwnet_model(adj, device, "fast", channels)
    x = torch.randn(batch, 12, adj.shape[0], 2, device=device)
    y = (50 + 10 * torch.randn(batch, 12, adj.shape[0], device=device)).relu()
    rows = []
    ref = None
    if shared_reference.available() and not smoke:
        ref = shared_reference.SharedReference.build(to_torch(build_supports(adj)), device=str(device))
    elif shared_reference.available():
        ref = shared_reference.SharedReference.build(
            to_torch(build_supports(adj)), device=str(device), residual_channels=8, dilation_channels=8,
            skip_channels=16, end_channels=16)
    if ref is not None:
        train, infer = reference_steps(ref.train(), x, y)
        t_train = median_time(train, device, repeats)
        ref.eval()
        t_infer = median_time(infer, device, repeats)
        rows.append(dict(model="reference code", kernel="-", precision="fp32", mode="eager",
                         train_ms=1e3 * t_train, infer_ms=1e3 * t_infer))
        check.say(f"  reference code fp32: train {1e3 * t_train:.1f} ms, inference {1e3 * t_infer:.1f} ms")
        del ref
    base = rows[0] if rows else None
    for kernel in ("fast", "dense", "auto"):
        for precision in ("fp32", "tf32", "bf16"):
            if precision == "tf32" and device.type != "cuda":
                continue  # TF32 is an NVIDIA tensor-core format
            for mode in ("eager", "graphs"):
                model = train = infer = None
                shown_mode = mode if device.type == "cuda" or mode == "eager" else "graphs (eager on cpu)"
                try:
                    with Precision(precision):
                        model = gwnet_model(adj, device, kernel, channels)
                        model.load_state_dict(probe.state_dict())
                        model.train()
                        train, infer = gwnet_steps(model, x, y, device, precision, mode == "graphs")
                        t_train = median_time(train, device, repeats)
                        model.eval()
                        t_infer = median_time(infer, device, repeats)
                except Exception as exc:  # e.g. a capture that fails: the row says so, the others run
                    error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                    rows.append(dict(model="gwnet", kernel=kernel, precision=precision, mode=shown_mode,
                                     error=error))
                    check.say(f"  gwnet {kernel} {precision} {shown_mode}: FAILED {error}")
                    del model, train, infer
                    continue
                row = dict(model="gwnet", kernel=kernel if kernel != "auto" else f"auto ({model.kernel})",
                           precision=precision, mode=shown_mode, train_ms=1e3 * t_train, infer_ms=1e3 * t_infer)
                if base:
                    row.update(train_vs_ref=base["train_ms"] / row["train_ms"],
                               infer_vs_ref=base["infer_ms"] / row["infer_ms"])
                rows.append(row)
                check.say(f"  gwnet {row['kernel']} {precision} {row['mode']}: train {row['train_ms']:.1f} ms, "
                          f"inference {row['infer_ms']:.1f} ms"
                          + (f" ({row['train_vs_ref']:.2f}x / {row['infer_vs_ref']:.2f}x the reference)"
                             if base else ""))
                del model, train, infer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return {"graph": graph, "batch": batch, "repeats": repeats, "rows": rows,
            "baseline": "reference code fp32" if base else "none (../shared absent: no reference rows)"}


# --- 8,600 sensors -------------------------------------------------------------------------
def part_large(check: Check, device: torch.device, smoke: bool) -> dict:
    nodes = 300 if smoke else 8600
    batches = (2, 4) if smoke else (4, 8, 16, 32, 64, 128)
    channels = dict(residual_channels=8, dilation_channels=8, skip_channels=16, end_channels=16) if smoke else {}
    adj = road_graph(nodes)
    rows = []
    for adaptive in ("topk", "lowrank", "dense"):
        for batch in batches:
            model = None
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                model = gwnet_model(adj, device, "auto", channels, adaptive=adaptive)
                x = torch.randn(batch, 12, nodes, 2, device=device)
                y = (50 + 10 * torch.randn(batch, 12, nodes, device=device)).relu()
                train, _ = gwnet_steps(model.train(), x, y, device, "fp32", graphs=False)
                seconds = median_time(train, device, 2 if smoke else 5, warmup=1)
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(adaptive=adaptive, batch=batch, fits=False))
                check.say(f"  {adaptive} batch {batch}: out of memory")
                del model
                break
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            epoch = math.ceil(LARGEST_TRAIN / batch) * seconds
            rows.append(dict(adaptive=adaptive, kernel=model.kernel, batch=batch, fits=True, step_ms=1e3 * seconds,
                             peak_gib=peak, epoch_s_projected=epoch))
            check.say(f"  {adaptive} ({model.kernel}) batch {batch}: {1e3 * seconds:.1f} ms a step, peak "
                      f"{peak:.1f} GiB, epoch ~{epoch:.0f} s ({LARGEST_TRAIN} windows)")
            del model, train
            if seconds > 3.0:
                break
    largest = {}
    for r in rows:
        if r.get("fits"):
            largest[r["adaptive"]] = r
    return {"nodes": nodes, "rows": rows, "largest_batch": largest}


# --- gwnet train / torchrun / predict ----------------------------------------------------------
def gwnet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gwnet", *args]


def run(check: Check, cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    check.say("  $ " + " ".join(cmd[1:] if cmd[0] == sys.executable else cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    for line in res.stderr.splitlines():
        if line.startswith(("graph convolution", "CUDA graphs", "resuming")) or "Error" in line:
            check.say("    " + line)
    if res.returncode != 0:
        raise RuntimeError(f"exit {res.returncode}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ''}")
    return res


def dataset(check: Check, smoke: bool) -> Path:
    """The synthetic METR-LA-size set (.npz layout: no PyTables needed), written once."""
    from gwnet.data import synthetic

    days = 3 if smoke else METR_LA_STEPS // 288
    nodes = 12 if smoke else 207
    folder = check.out / "data"
    if not (folder / "synthetic.npz").exists():
        synthetic.write(folder, nodes=nodes, days=days, seed=0, layout="pems")
    return folder


def size_flags(smoke: bool) -> list[str]:
    flags = ["--target", "speed", "--train-ratio", "0.7", "--test-ratio", "0.2", "--no-progress"]
    if smoke:
        flags += ["--residual-channels", "8", "--dilation-channels", "8", "--skip-channels", "16",
                  "--end-channels", "16", "--blocks", "2", "--batch-size", "16", "--batches-per-epoch", "4"]
    return flags


def part_train(check: Check, device: torch.device, smoke: bool) -> dict:
    data = dataset(check, smoke)
    out = {}
    for precision in ("fp32", "bf16"):
        run_dir = check.out / f"train-{precision}"
        run(check, gwnet_cmd("train", "--device", device.type, "--dataset", str(data), "--epochs", "2",
                             "--precision", precision, "--out", str(run_dir), "--seed", "0",
                             *size_flags(smoke)), timeout=900)
        history = pd.read_csv(run_dir / "metrics.csv")
        test = pd.read_csv(run_dir / "test_metrics.csv", index_col=0)
        config = json.loads((run_dir / "config.json").read_text())
        windows = METR_LA_TRAIN if not smoke else None
        steady = float(history["seconds"].iloc[-1])
        out[precision] = dict(epoch_seconds=[round(s, 2) for s in history["seconds"]],
                              test_mae=float(test.loc["mean", "mae"]),
                              projected_100_epochs_min=round(100 * steady / 60, 1),
                              train_windows=windows, graph_conv=config["model"]["graph_conv"])
        check.say(f"  {precision}: epochs {out[precision]['epoch_seconds']} s, test MAE "
                  f"{out[precision]['test_mae']:.4f}, 100 epochs ~{out[precision]['projected_100_epochs_min']} min")
    out["bf16_mae_vs_fp32"] = out["bf16"]["test_mae"] / out["fp32"]["test_mae"]
    return out


def part_fsdp(check: Check, device: torch.device, smoke: bool) -> dict:
    data = dataset(check, smoke)
    run_dir = check.out / "fsdp"
    epochs = "4" if smoke else "3"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "gwnet",
              "train", "--fsdp", "--precision", "bf16", "--device", device.type, "--dataset", str(data),
              *size_flags(smoke)]
    if not smoke:
        launch += ["--batches-per-epoch", "100"]
    cmd = launch + ["--epochs", epochs, "--out", str(run_dir)]
    check.say("  $ torchrun ... " + " ".join(cmd[9:]))
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.perf_counter() + 600
    while not (run_dir / "best.pt").exists() and proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.02)
    stopped = proc.poll() is None
    if stopped:
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun and its worker: a clean stop at the next batch
    _, err = proc.communicate(timeout=300)
    result = {"backend": "nccl" if device.type == "cuda" else "gloo", "stopped_by_signal": stopped,
              "first_exit": proc.returncode}
    if not (run_dir / "best.pt").exists():
        raise RuntimeError(f"no best.pt (exit {proc.returncode}): {err.strip().splitlines()[-1:]}")
    result["wrote_best"] = True
    if stopped and not (run_dir / "test_metrics.csv").exists():
        run(check, launch + ["--resume", str(run_dir)], timeout=900)
        result["resumed"] = True
    else:
        result["resumed"] = "not exercised: the run finished before the signal landed"
    history = pd.read_csv(run_dir / "metrics.csv")
    result["epochs"] = list(history["epoch"])
    run(check, gwnet_cmd("predict", str(run_dir), "--out", str(check.out / "fsdp-predict"), "--device", device.type,
                         "--no-plots"), timeout=600)
    metrics = pd.read_csv(check.out / "fsdp-predict" / "metrics.csv")
    result["predicted"] = True
    result["predict_metrics_rows"] = len(metrics)
    check.say(f"  fsdp ({result['backend']}, bf16): best.pt written, resumed {result['resumed']}, "
              f"epochs {result['epochs']}, predicted")
    return result


def has_flag(command: str, flag: str) -> bool:
    res = subprocess.run(gwnet_cmd(command, "--help"), capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return flag in res.stdout


def part_intervals(check: Check, device: torch.device, smoke: bool) -> dict:
    if not has_flag("predict", "--interval"):
        return {"skipped": "this gwnet's predict has no --interval"}
    source = check.out / "train-fp32"
    if not (source / "best.pt").exists():
        return {"skipped": "the train part wrote no run"}
    out = check.out / "intervals"
    run(check, gwnet_cmd("predict", str(source), "--interval", "0.9", "--out", str(out), "--device", device.type,
                         "--no-plots"), timeout=600)
    files = sorted(p.name for p in out.iterdir())
    check.say(f"  intervals: wrote {', '.join(files)}")
    return {"files": files}


def part_distill(check: Check, device: torch.device, smoke: bool) -> dict:
    if not has_flag("train", "--teacher"):
        return {"skipped": "this gwnet's train has no --teacher"}
    source = check.out / "train-fp32"
    if not (source / "best.pt").exists():
        return {"skipped": "the train part wrote no run"}
    data = dataset(check, smoke)
    out = check.out / "distill"
    flags = size_flags(smoke) + ([] if smoke else ["--batches-per-epoch", "100"])
    run(check, gwnet_cmd("train", "--teacher", str(source), "--device", device.type, "--dataset", str(data),
                         "--epochs", "1", "--out", str(out), *flags), timeout=900)
    test = pd.read_csv(out / "test_metrics.csv", index_col=0)
    check.say(f"  distilled 1 epoch: test MAE {float(test.loc['mean', 'mae']):.4f}")
    return {"test_mae": float(test.loc["mean", "mae"])}


# --- the report ---------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    lines = ["# gwnet GPU check", ""]
    env = results.get("env", {})
    if env:
        lines += [", ".join(f"{k}: {v}" for k, v in env.items() if k != "traceback"), ""]
    steps = results.get("steps", {})
    if steps.get("rows"):
        lines += [f"## Training step and inference ({steps['graph']}, batch {steps['batch']}, "
                  f"medians of {steps['repeats']}; baseline: {steps['baseline']})", "",
                  "| model | kernel | precision | mode | train step | inference | vs reference (train / inference) |",
                  "|---|---|---|---|---:|---:|---|"]
        for r in steps["rows"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['kernel']} | {r['precision']} | {r['mode']} | failed | | "
                             f"{r['error'][:80]} |")
                continue
            ratio = (f"{r['train_vs_ref']:.2f}x / {r['infer_vs_ref']:.2f}x" if "train_vs_ref" in r
                     else ("1.00x / 1.00x" if r["model"] == "reference code" else "-"))
            lines.append(f"| {r['model']} | {r['kernel']} | {r['precision']} | {r['mode']} | "
                         f"{r['train_ms']:.1f} ms | {r['infer_ms']:.1f} ms | {ratio} |")
        lines.append("")
    large = results.get("large", {})
    if large.get("rows"):
        lines += [f"## {large['nodes']} sensors (eager fp32, graph_conv auto)", "",
                  "| adaptive | kernel | batch | step | peak memory | epoch (projected) |", "|---|---|---:|---:|---:|---:|"]
        for r in large["rows"]:
            if r.get("fits"):
                lines.append(f"| {r['adaptive']} | {r['kernel']} | {r['batch']} | {r['step_ms']:.1f} ms | "
                             f"{r['peak_gib']:.1f} GiB | {r['epoch_s_projected']:.0f} s |")
            else:
                lines.append(f"| {r['adaptive']} | | {r['batch']} | out of memory | | |")
        lines.append("")
    train = results.get("train", {})
    if "fp32" in train:
        lines += ["## gwnet train, 2 epochs on the METR-LA-size synthetic set", "",
                  "| precision | epoch seconds | 100 epochs (projected) | test MAE |", "|---|---|---:|---:|"]
        for p in ("fp32", "bf16"):
            if p in train:
                r = train[p]
                lines.append(f"| {p} | {', '.join(map(str, r['epoch_seconds']))} | {r['projected_100_epochs_min']} min | "
                             f"{r['test_mae']:.4f} |")
        if "bf16_mae_vs_fp32" in train:
            lines.append(f"\nbf16 test MAE / fp32: {train['bf16_mae_vs_fp32']:.4f}")
        lines.append("")
    for name in ("fsdp", "intervals", "distill"):
        if name in results:
            shown = {k: v for k, v in results[name].items() if k != "traceback"}
            lines += [f"## {name}", "", "```text", json.dumps(shown, indent=1, default=str), "```", ""]
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    lines.append(f"Parts that failed: {', '.join(failed)}" if failed else "Every part ran.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.json, gpu_check.md and the runs")
    ap.add_argument("--smoke", action="store_true", help="every part at toy size on the CPU")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds after which no part starts")
    ap.add_argument("--parts", nargs="+", default=["steps", "large", "train", "fsdp", "intervals", "distill"],
                    help="the parts to run (default: all)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"gpu_check: {out} is not empty; choose a new --out", file=sys.stderr)
        return 2
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("gpu_check: no CUDA device (use --smoke for the CPU run of every part)", file=sys.stderr)
        return 2
    check = Check(out, args.budget)
    check.part("env", part_env, device)
    parts = {"steps": part_steps, "large": part_large, "train": part_train, "fsdp": part_fsdp,
             "intervals": part_intervals, "distill": part_distill}
    for name in args.parts:
        check.part(name, parts[name], device, args.smoke)
    check.say(f"done: {out / 'gpu_check.md'}")
    print((out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
