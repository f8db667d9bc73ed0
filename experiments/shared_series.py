"""Two torchrun processes on one machine share one memory-mapped series (``--memmap``).

Trains one short epoch of the improved preset (FSDP over 2 gloo processes, 1 thread each)
on a synthetic METR-LA-layout dataset of ``--nodes`` sensors, once with ``--memmap`` and
once without, and once in a single process with the same global batch. While each runs, it
samples every worker's ``/proc/PID/status`` (anonymous and file-backed resident memory) and
``/proc/PID/smaps_rollup`` (PSS, where pages shared by both processes count half in each).
With the series memory-mapped, its pages are file-backed and shared: each process's
anonymous memory should not hold the series, while without ``--memmap`` each holds a copy.
The training MAE of the epoch must match the single process's (dropout 0, same batches).
The runs use ``--malloc system`` (glibc's default heap), so that resident memory follows
what each process holds, not freed blocks kept for reuse.

    python experiments/shared_series.py [--nodes 2000] [--days 60] [--batches 2] [--out DIR] [--overwrite]
        [--modes memmap in_memory one_process]

Memory figures are medians over the second half of each worker's samples (steady training
and evaluation: the pandas frame the reader builds first is gone by then) and peaks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

FIELDS = ("RssAnon", "RssFile", "VmRSS")
MODES = ("memmap", "in_memory", "one_process")


def _children(root: int) -> list[int]:
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _sample(pid: int) -> dict[str, float] | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "gwnet" not in cmd or "torch.distributed.run" in cmd:
            return None
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        pss = next(int(l.split()[1]) for l in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                   if l.startswith("Pss:"))
    except (OSError, StopIteration):
        return None
    row = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in status if l.split(":")[0] in FIELDS}
    row["Pss"] = pss / 1024
    return row


def run(cmd: list[str], env: dict) -> tuple[dict[int, list[dict]], float]:
    samples: dict[int, list[dict]] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while proc.poll() is None:
        for pid in _children(proc.pid) + [proc.pid]:
            row = _sample(pid)
            if row:
                samples.setdefault(pid, []).append(row)
        time.sleep(0.5)
    out = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return samples, time.perf_counter() - start


def summary(samples: dict[int, list[dict]]) -> list[dict]:
    rows = []
    for rank, (pid, rows_) in enumerate(sorted(samples.items())):
        late = rows_[len(rows_) // 2:]
        row = dict(process=rank)
        for f in FIELDS + ("Pss",):
            row[f"{f}_MB"] = round(statistics.median(r[f] for r in late))
            row[f"peak_{f}_MB"] = round(max(r[f] for r in rows_))
        rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2000)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="global batch (split over the processes)")
    p.add_argument("--out", default="shared-series-results")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = p.parse_args(argv)
    out = Path(args.out)
    summary_file = out / "summary.json"
    earlier = [f for f in [summary_file] + [out / f"run-{m}" for m in args.modes] if f.exists()]
    if earlier and not args.overwrite:
        print(f"shared_series.py: error: {earlier[0]} exists; pass --overwrite to replace it", file=sys.stderr)
        sys.exit(2)
    from gwnet.data import synthetic

    data = out / "data"
    if not (data / "speeds.h5").exists():
        synthetic.write(data, nodes=args.nodes, days=args.days, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GWNET_CACHE": str(out / "cache")}
    common = ["--dataset", str(data), "--epochs", "1", "--batches-per-epoch", str(args.batches),
              "--batch-size", str(args.batch), "--dropout", "0", "--train-ratio", "0.99",
              "--test-ratio", "0.005", "--no-progress", "--seed", "0",
              # glibc's own heap policy, so that resident memory follows what the processes
              # hold rather than the blocks gwnet-train's default keeps for reuse
              "--malloc", "system"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "gwnet", "train", "--fsdp"]
    result = dict(nodes=args.nodes, days=args.days, series_MB=round(args.nodes * args.days * 288 * 4 / 2**20))
    commands = {"memmap": torchrun + ["--memmap"], "in_memory": torchrun,
                "one_process": [sys.executable, "-m", "gwnet", "train"]}
    for name in args.modes:
        cmd = commands[name]
        run_dir = out / f"run-{name}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        samples, seconds = run(cmd + common + ["--out", str(run_dir)], env)
        metrics = pd.read_csv(run_dir / "metrics.csv")
        result[name] = dict(seconds=round(seconds, 1), train_mae=float(metrics["train_mae"].iloc[0]),
                            val_mae=float(metrics["val_mae"].iloc[0]), processes=summary(samples))
        print(name, json.dumps(result[name]), flush=True)
    if "one_process" in result:
        one = result["one_process"]["train_mae"]
        for name in ("memmap", "in_memory"):
            if name in result:
                result[name]["train_mae_rel_diff_to_one_process"] = abs(result[name]["train_mae"] / one - 1)
    summary_file.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
