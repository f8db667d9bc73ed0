"""Latency and throughput of gwnet-serve against a real server on 127.0.0.1.

For each sensor count it writes a run directory of the improved Graph WaveNet preset (full
size, random weights: the time a forecast takes does not depend on the weights) over a random
road-like graph, starts ``gwnet-serve`` on a free loopback port with ``--threads`` CPU
threads, fills the window, then loops ``POST /readings`` (the next step of every sensor) +
``GET /forecast`` (JSON, every sensor), bounded by ``--requests`` and ``--seconds``. It
reports the p50/p99 latency of ``GET /forecast`` (and of ``POST /readings``), forecasts per
second over the whole loop, and the serving process's resident memory (peak); beside them the
same forecast computed in the bench's own process (``in-process``: the model and the window's
input, no HTTP), so that what the server adds shows whatever the machine's load. The baseline,
measured in the same run: one ``gwnet-predict --latest`` call on the same readings (loads the
run and forecasts once, what each forecast cost before a server held the model).

Targets: p99 of ``GET /forecast`` under 50 ms at 207 sensors on 2 CPU threads; the serving
process under 1 GB at 2,000 sensors.

    python experiments/serve_bench.py --sensors 207 2000 --requests 200 --seconds 60 --threads 2
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gwnet.config import Config
from gwnet.data import build_supports
from gwnet.data.scaler import StandardScaler
from gwnet.engine.checkpoint import RunDir, save_checkpoint
from gwnet.models import build_model_from_config

STEP = pd.Timedelta(minutes=5)
START = pd.Timestamp("2012-03-01 06:00")


def road_graph(n: int, seed: int = 0) -> np.ndarray:
    """Each sensor linked to its 8 nearest neighbours on a plane, DCRNN-style kernel weights."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1, (n, 2))
    dist = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    adj = np.zeros((n, n), dtype=np.float32)
    near = np.argsort(dist, axis=1)[:, :9]
    sigma = dist[np.arange(n)[:, None], near].std()
    for i in range(n):
        adj[i, near[i]] = np.exp(-(dist[i, near[i]] / sigma) ** 2)
    return adj


def write_run(root: Path, n: int) -> tuple[Path, list[str]]:
    cfg = Config.from_preset("improved")
    cfg.data.step_minutes, cfg.data.unit, cfg.data.target = 5, "mph", "speed"
    cfg.model.resolve(cfg.data, n)
    ids = [str(400000 + i) for i in range(n)]
    adj = road_graph(n)
    torch.manual_seed(0)
    model = build_model_from_config(cfg, build_supports(adj, cfg.data.adjtype)).eval()
    run = root / f"run-{n}"
    run.mkdir(parents=True)
    cfg.out = str(run)
    save_checkpoint(RunDir(run).best, {"config": cfg.to_dict(), "model": model.state_dict(),
                                       "scaler": StandardScaler(58.0, 12.0, True).to_dict(),
                                       "sensor_ids": ids, "adjacency": torch.from_numpy(adj), "epoch": 1,
                                       "val_mae": 0.0}, kind="best")
    return run, ids


def readings(ids: list[str], steps: int, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = np.clip(58 + 12 * rng.standard_normal((steps, len(ids))), 0, 80).round(2)
    return pd.DataFrame(values, index=pd.date_range(START, periods=steps, freq=STEP), columns=ids)


def rss_mb(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of ``pid`` in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    get = lambda key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024  # noqa: E731
    return get("VmRSS"), get("VmHWM")


def start_server(run: Path, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "gwnet.cli.serve", str(run), "--port", "0",
                             "--threads", str(threads)], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"gwnet-serve exited with {proc.returncode}")
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise SystemExit("gwnet-serve did not start within 300 s")


def baseline_seconds(run: Path, frame: pd.DataFrame, root: Path, repeats: int = 3) -> float:
    """Median wall time of one in-process gwnet-predict --latest call (no interpreter start)."""
    from gwnet.cli.predict import main as predict

    data = root / f"latest-{frame.shape[1]}.csv"
    frame.to_csv(data, index_label="time")
    times = []
    for k in range(repeats):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = predict([str(run), "--latest", "--data", str(data), "--out", str(root / f"pred-{k}"),
                          "--no-plots", "--device", "cpu", "--overwrite"])
        times.append(time.perf_counter() - t0)
        assert rc == 0
    return float(np.median(times))


def in_process_ms(run: Path, frame: pd.DataFrame, count: int, seconds: float) -> float:
    """p50 of the same forecast computed in this process (no HTTP, no JSON): what the server
    adds on top of the model is the difference."""
    from gwnet.serve import Forecaster

    def measure() -> list[float]:
        forecaster = Forecaster([run])
        forecaster.forecast(frame)  # warm-up
        times, start = [], time.perf_counter()
        while len(times) < count and time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            forecaster.forecast(frame)
            times.append(time.perf_counter() - t0)
        return times

    # On the thread that did this process's other torch work, as the server loads and forecasts
    # on one thread (gwnet.serve.service.ModelThread): torch work split between two threads
    # keeps two OpenMP teams on the same cores, and a forecast then takes twice as long.
    return float(np.median(measure()) * 1000)


def bench(n: int, args, root: Path) -> dict:
    import httpx

    run, ids = write_run(root, n)
    seq_len = 12
    frame = readings(ids, seq_len + args.requests + 1)
    model_ms = in_process_ms(run, frame.iloc[:seq_len], 30, args.seconds / 4)
    proc, url = start_server(run, args.threads)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            def post(i: int) -> float:
                row = frame.iloc[i]
                body = {"time": frame.index[i].isoformat(), "values": dict(zip(ids, row.tolist()))}
                t0 = time.perf_counter()
                r = client.post("/readings", json=body)
                assert r.status_code == 200, r.text
                return time.perf_counter() - t0

            for i in range(seq_len):
                post(i)
            client.get("/forecast").raise_for_status()  # warm-up
            gets, posts = [], []
            t_start = time.perf_counter()
            i = seq_len
            while i < len(frame) and time.perf_counter() - t_start < args.seconds:
                posts.append(post(i))
                t0 = time.perf_counter()
                r = client.get("/forecast")
                gets.append(time.perf_counter() - t0)
                assert r.status_code == 200 and len(r.json()["forecast"]) == n
                i += 1
            elapsed = time.perf_counter() - t_start
        rss, peak = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    base = baseline_seconds(run, frame.iloc[:seq_len], root)
    gets_ms = np.array(gets) * 1000
    return {"sensors": n, "loops": len(gets), "in-process p50 ms": model_ms, "get p50 ms": np.percentile(gets_ms, 50),
            "get p99 ms": np.percentile(gets_ms, 99), "post p50 ms": np.percentile(np.array(posts) * 1000, 50),
            "forecasts/s": len(gets) / elapsed, "RSS MB": rss, "peak RSS MB": peak,
            "gwnet-predict --latest s": base, "predict / GET p50": base * 1000 / np.percentile(gets_ms, 50)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sensors", type=int, nargs="+", default=[207, 2000])
    parser.add_argument("--requests", type=int, default=200, help="most POST + GET loops per size")
    parser.add_argument("--seconds", type=float, default=60, help="longest loop per size")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the server")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        for n in args.sensors:
            rows.append(bench(n, args, Path(tmp)))
            print(f"{n} sensors done", file=sys.stderr, flush=True)
    table = pd.DataFrame(rows).set_index("sensors")
    print(f"gwnet-serve on 127.0.0.1, improved preset (random weights), {args.threads} CPU threads, "
          f"POST /readings + GET /forecast (all sensors, JSON) per loop; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs")
    print(table.to_string(float_format=lambda v: f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"))
    for n, row in table.iterrows():
        if n == 207:
            print(f"target p99 GET /forecast < 50 ms at 207 sensors: {row['get p99 ms']:.1f} ms "
                  f"{'met' if row['get p99 ms'] < 50 else 'NOT met'}")
        if n == 2000:
            print(f"target serving process < 1 GB at 2,000 sensors: peak {row['peak RSS MB']:.0f} MB "
                  f"{'met' if row['peak RSS MB'] < 1024 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
