"""Speed of Graph WaveNet against the reference implementation, and where the time goes.

Models with the same weights on the same inputs (improved preset, METR-LA graph from
``../shared`` or a synthetic road-like graph of 207 sensors, batch 64, 12 steps, fp32):

* ``fast``: :class:`gwnet.nn.GWNet` as shipped (sparse CSR fixed supports, Horner graph conv);
* ``fast bf16``: the same under bf16 autocast (fp32 master weights), as ``--precision bf16``;
  on a CPU without native bf16 (AVX512-BF16 or AMX) it is emulated and many times slower,
  so it is left out there unless ``--bf16 on``;
* ``dense``: the same model with ``graph_conv="dense"`` (only the graph conv differs);
* ``reference``: the reference implementation itself (Shleifer et al.'s ``model.py``),
  loaded at run time from ``../shared/reference/sshleifer-gwnet`` (never copied; see
  ``shared_reference.py``), whose freshly initialised weights the gwnet models take through
  gwnet's own checkpoint loader. Without ``../shared`` the baseline is
  ``experiments/reference_gwnet.py``, a re-implementation of the reference's structure,
  and the table says so.

It checks that outputs and gradients agree (1e-4 relative), times a training step (forward,
backward, Adam) and inference with the models interleaved (medians, ratios against the
reference) beside the arithmetic of each (``arithmetic.py``: GFLOP counted with sparse
products by their non-zeros, the rate achieved, its share of this machine's large-GEMM
rate measured in the same run, and ``floor_s``, the time at that rate: how far a model is
from the hardware, and the largest ratio to the reference its arithmetic allows),
profiles one training step of each model by part (``step_profile.py``:
temporal convolutions and gate, graph-conv propagation, graph-conv projections, skip path,
batch norm, dropout, optimizer step, rest), measures the data path (peak memory and batch
assembly over one epoch of a METR-LA-sized series, in a fresh process) and prints a scaling
table of step time against nodes and batch size on sparse random road-like graphs (~8
neighbours per node). ``--background-load`` runs the timings while a second process keeps
one core busy. With ``--device cuda`` the timings run in bf16 autocast (and the GEMM rate
is bf16's). ``--malloc reuse`` keeps glibc's freed memory for reuse in the timing process
(what ``gwnet-train --malloc reuse`` sets), for every model alike: the reference allocates
its concatenations and einsum outputs anew each step, and with glibc's default settings
part of them is mapped and page-faulted anew each time, so its time depends on the
allocator; the default ``system`` leaves the allocator as both codes run out of the box.

    python experiments/benchmark.py [--device cpu|cuda] [--threads 2] [--quick] [--out DIR]
        [--background-load] [--bf16 auto|on|off] [--malloc system|reuse]
        [--skip equal headline profile data scaling] [--overwrite]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared_reference  # noqa: E402
from reference_gwnet import ReferenceGWNet  # noqa: E402
from step_profile import LABEL, profile_step  # noqa: E402
from arithmetic import count_flops  # noqa: E402

from gwnet.config import GWNetConfig  # noqa: E402
from gwnet.data.graph import read_graph  # noqa: E402
from gwnet.data.supports import build_supports, to_torch  # noqa: E402
from gwnet.engine.allocator import reuse_freed_memory  # noqa: E402
from gwnet.engine.device import native_bf16  # noqa: E402
from gwnet.nn import GWNet  # noqa: E402

warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", "Sparse invariant checks are implicitly disabled")
METR_LA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sensor_graph" / "adj_mx.pkl"


def road_graph(nodes: int, neighbours: int = 8, seed: int = 0) -> sp.csr_matrix:
    """Sparse random road-like graph: sensors along a ring of roads, each linked to its
    ``neighbours`` nearest along the road, plus a few random junctions; O(edges) to build."""
    rng = np.random.default_rng(seed)
    src = np.repeat(np.arange(nodes), neighbours)
    offsets = np.tile(np.r_[-(neighbours // 2):0, 1:neighbours // 2 + 1], nodes)
    dst = (src + offsets) % nodes
    junctions = rng.integers(0, nodes, size=(2, max(1, nodes // 20)))
    src, dst = np.r_[src, junctions[0]], np.r_[dst, junctions[1]]
    weights = np.exp(-rng.uniform(0.1, 2.0, size=src.size))
    return sp.csr_matrix((weights, (src, dst)), shape=(nodes, nodes))


def metr_la_graph():
    if METR_LA.is_file():
        return read_graph(METR_LA).adj, "METR-LA"
    return road_graph(207), "synthetic road graph (METR-LA not found)"


def build(adj, device, dropout=0.3, **change):
    torch.manual_seed(0)
    cfg = GWNetConfig.improved(num_nodes=adj.shape[0], dropout=dropout, **change)
    return GWNet(cfg, to_torch(build_supports(adj))).to(device)


def inputs(cfg, batch, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 12, cfg.num_nodes, cfg.in_dim, generator=g)
    y = torch.randn(batch, cfg.out_dim, cfg.num_nodes, generator=g)
    return x.to(device), y.to(device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_steps(model, x, y, device, bf16):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctx = (lambda: torch.autocast(device, torch.bfloat16)) if bf16 else (lambda: torch.autocast(device, enabled=False))

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = torch.nn.functional.l1_loss(model(x).float(), y)
        loss.backward()
        with torch.profiler.record_function(LABEL + "optimizer step"):
            opt.step()

    def infer():
        model.eval()
        with torch.no_grad(), ctx():
            model(x)
    return train, infer


def timed(fns: dict, repeats: int, device: str, reduce=statistics.median) -> dict[str, float]:
    """Seconds per call (the median of ``repeats``, or ``reduce`` of them), the models
    interleaved so that load noise hits all alike."""
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: reduce(v) for k, v in times.items()}


def gemm_rate(device: str, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of a ``size``-cubed matrix product on ``device`` in ``dtype``, with the
    threads the process has: the best of ``repeats`` after one warm-up, as the rate the
    machine reaches (interference only ever slows it)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size ** 3 / timed({"gemm": lambda: a @ b}, repeats, device, reduce=min)["gemm"]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach())


def check_equal(adj, device):
    """Largest relative differences of fast and dense against the reference (no dropout)."""
    fast = build(adj, device, dropout=0.0)
    dense = build(adj, device, dropout=0.0, graph_conv="dense")
    dense.load_state_dict(fast.state_dict())
    ref = ReferenceGWNet.from_gwnet(fast)
    x, _ = inputs(fast.config, 8, device)
    out = {}
    expected = ref(x)
    expected.square().mean().backward()
    ref_grads = ref.gwnet_grads(fast)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, model in (("fast", fast), ("dense", dense)):
        y = model(x)
        y.square().mean().backward()
        grad = max(float((p.grad - ref_grads[n]).abs().max()) for n, p in model.named_parameters()) / scale
        model.eval(), ref.eval()
        with torch.no_grad():
            ev = max_rel(model(x), ref(x))
        ref.train()
        out[name] = dict(train_out=max_rel(y, expected), grad=grad, eval_out=ev)
    return out


def models(adj, device, bf16_copy=False):
    """{name: model} sharing one set of weights, the reference's, and the baseline's name.
    With ``bf16_copy``, also ``fast bf16``: a second copy of ``fast`` to run under autocast."""
    supports = to_torch(build_supports(adj))
    real = shared_reference.SharedReference.build(supports, device=device)
    if real is not None:
        def gwnet_copy(**change):
            return real.as_gwnet(**change)
        ref, baseline = real, "reference implementation (../shared, Shleifer et al.'s model.py)"
    else:
        first = build(adj, device)

        def gwnet_copy(**change):
            model = build(adj, device, **change)
            model.load_state_dict(first.state_dict())
            return model
        ref = ReferenceGWNet.from_gwnet(first)
        baseline = "re-implementation of the reference structure (experiments/reference_gwnet.py; ../shared absent)"
    out = {"fast": gwnet_copy(), "dense": gwnet_copy(graph_conv="dense"), "reference": ref}
    if bf16_copy:
        out["fast bf16"] = gwnet_copy()
    return {k: m.to(device) for k, m in out.items()}, baseline


def check_reference(adj):
    """Largest relative difference of ``fast`` to the real reference, outputs and gradients."""
    supports = to_torch(build_supports(adj))
    ref = shared_reference.SharedReference.build(supports)
    if ref is None:
        return None
    fast = ref.as_gwnet(dropout=0.0)
    for conv in ref.model.graph_convs:
        conv.dropout = 0.0
    x, _ = inputs(fast.config, 8, "cpu")
    expected, got = ref(x), fast(x)
    expected.square().mean().backward()
    got.square().mean().backward()
    theirs = dict(ref.model.named_parameters())
    grad = max(float((fast.adaptive.nodevec1.grad - theirs["nodevec1"].grad).abs().max())
               / float(theirs["nodevec1"].grad.abs().max()),
               float((fast.end_conv_1.weight.grad - theirs["end_conv_1.weight"].grad.flatten(1)).abs().max())
               / float(theirs["end_conv_1.weight"].grad.abs().max()))
    return dict(model="fast vs reference implementation", train_out=max_rel(got, expected), grad=grad)


def want_bf16(args) -> bool:
    """Whether ``fast bf16`` is timed beside the fp32 models: on the CPU only (on CUDA every
    model runs under bf16 autocast), where the CPU has native bf16 or ``--bf16 on``."""
    return args.device == "cpu" and (args.bf16 == "on" or (args.bf16 == "auto" and native_bf16()))


def headline(adj, args, device, bf16, measure_rate):
    """Timings with the arithmetic of each step: counted GFLOP, the rate achieved, its share
    of this machine's large-GEMM FLOP/s in the model's precision (``measure_rate(dtype)``,
    the better of a measurement before and one after the timings), the time the arithmetic
    would take at that rate (``floor_s``) and the reference's measured time over that floor.
    Returns the rows, the baseline's name and the GEMM rate of each precision."""
    nets, baseline = models(adj, device, bf16_copy=want_bf16(args))
    x, y = inputs(nets["fast"].config, args.batch, device)
    steps = {name: make_steps(m, x, y, device, bf16 or name == "fast bf16") for name, m in nets.items()}
    precision = {name: "bf16" if bf16 or name == "fast bf16" else "fp32" for name in nets}
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    rates = {p: measure_rate(dtypes[p]) for p in sorted(set(precision.values()))}
    measured = []
    for kind, index in (("train step", 0), ("inference", 1)):
        fns = {name: s[index] for name, s in steps.items()}
        measured.append((kind, timed(fns, args.repeats, device), {n: count_flops(f) for n, f in fns.items()}))
    rates = {p: max(r, measure_rate(dtypes[p])) for p, r in rates.items()}
    rows = []
    for kind, t, flops in measured:
        for name in t:
            rate = rates[precision[name]]
            floor = flops[name] / rate
            rows.append(dict(measure=kind, model=name, seconds=t[name], samples_s=args.batch / t[name],
                             vs_reference=t["reference"] / t[name], vs_dense=t["dense"] / t[name],
                             gflop=flops[name] / 1e9, gflop_s=flops[name] / t[name] / 1e9,
                             gemm_gflop_s=rate / 1e9, of_gemm_rate=floor / t[name], floor_s=floor,
                             vs_reference_at_floor=t["reference"] / floor))
    return rows, baseline, rates


def profile(adj, args, device):
    """Seconds and shares of one training step by part, for each model (fp32, and bf16 for
    ``fast`` where the CPU has native bf16 or ``--bf16 on``)."""
    nets, _ = models(adj, device, bf16_copy=want_bf16(args))
    x, y = inputs(nets["fast"].config, args.batch, device)
    nodes = nets["fast"].config.num_nodes
    rows = []
    for name, model in nets.items():
        train, _ = make_steps(model, x, y, device, name == "fast bf16" or device == "cuda")
        parts = profile_step(model, train, nodes, repeats=1 if args.quick else 2)
        total = sum(parts.values())
        row = dict(model=name, step_s=total)
        row.update({p: f"{v:.3f} s ({100 * v / total:.0f}%)" for p, v in parts.items()})
        rows.append(row)
    return rows


class BackgroundLoad:
    """A second process keeping one core busy while the timings run."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


DATA_PATH = r"""
import json, sys, time
import pandas as pd
import torch
from gwnet.config import DataConfig, GWNetConfig
from gwnet.data import synthetic
from gwnet.data.windows import build_series, make_splits
from gwnet.nn import GWNet


def rss_mb(field):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(field + ":")) / 1024


torch.set_num_threads(int(sys.argv[1]))
data = synthetic.generate(nodes=207, days=int(sys.argv[2]))
speeds, index = data.speeds.astype("float32"), data.speeds.index
del data
cfg = DataConfig()
series = build_series(speeds, cfg)
raw_mb = speeds.to_numpy().nbytes / 2**20
del speeds
model = GWNet(GWNetConfig.improved(num_nodes=207, num_supports=0))
model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
windows, scaler = make_splits(series, index, cfg)
# Peak from here on: the series and the model are resident, the generator's frames freed.
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
base = rss_mb("VmRSS")
start = time.perf_counter()
n = 0
for x, y in windows["train"].batches(64, shuffle=True, generator=torch.Generator().manual_seed(0)):
    n += 1
elapsed = time.perf_counter() - start
print(json.dumps(dict(steps=len(series), raw_series_mb=raw_mb, series_with_features_mb=series.nbytes / 2**20,
                      model_mb=model_mb, rss_before_epoch_mb=base, peak_rss_epoch_mb=rss_mb("VmHWM"),
                      batches=n, ms_per_batch=1e3 * elapsed / n)))
"""


def data_path(args):
    """One epoch of training batches (64) from a METR-LA-sized series, in a fresh process.

    Memory: the growth of the peak RSS over the epoch beyond what holds the series and the
    model (batches are gathered one at a time; windows are never materialised)."""
    days = 14 if args.quick else 119
    out = subprocess.run([sys.executable, "-c", DATA_PATH, str(args.threads), str(days)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def scaling(args, device, bf16):
    """Step time against nodes and batch on road-like graphs, with and without the adaptive
    adjacency (which is dense by definition: O(N^2) per propagation; the fixed supports
    are CSR, O(edges)). One timed call per cell after a warm-up. Inference is always run
    unless a smaller batch of the same row took over a quarter of the budget; the training
    step only where inference took under a third of it (8 s, 2 s with ``--quick``)."""
    rows = []
    node_list = (207, 325, 1000, 4000)
    batches = (16, 64, 256)
    limit = 2.0 if args.quick else 8.0  # seconds one measurement may take
    for nodes in node_list:
        for fixed_only in (False, True):
            adj = road_graph(nodes)
            change = dict(addaptadj=False) if fixed_only else {}
            skip_rest = False
            for batch in batches:
                row = dict(nodes=nodes, batch=batch, adaptive=not fixed_only,
                           edges=int(adj.nnz), train_ms=None, infer_ms=None)
                if skip_rest:
                    rows.append(row)
                    continue
                model = build(adj, device, **change)
                x, y = inputs(model.config, batch, device)
                train, infer = make_steps(model, x, y, device, bf16)
                t = timed({"infer": infer}, 1, device)["infer"]
                row["infer_ms"] = 1e3 * t
                if 3 * t < limit:
                    row["train_ms"] = 1e3 * timed({"train": train}, 1, device)["train"]
                rows.append(row)
                skip_rest = 4 * t > limit
                del model, x, y, train, infer
    return rows


def write_table(rows, path: Path, title: str) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    md = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    path.with_suffix(".md").write_text(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller scaling budget")
    p.add_argument("--out", default="benchmark-results")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=("equal", "headline", "profile", "data", "scaling"))
    p.add_argument("--background-load", action="store_true",
                   help="time while a second process keeps one core busy")
    p.add_argument("--overwrite", action="store_true", help="replace the tables of an earlier run in --out")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="also time fast under bf16 autocast on the CPU (auto: where the CPU has native bf16)")
    p.add_argument("--malloc", choices=("system", "reuse"), default="system",
                   help="glibc's allocator as it comes (system) or keeping freed memory (reuse), for all models")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    device, bf16 = args.device, args.device == "cuda"
    out = Path(args.out)
    tables = ("equality", "headline", "profile", "data_path", "scaling")
    earlier = [f for f in [out / "benchmark.md"] + [out / f"{t}.{ext}" for t in tables for ext in ("csv", "md")]
               if f.exists()]
    if earlier and not args.overwrite:
        print(f"benchmark.py: error: {earlier[0]} exists; pass --overwrite to replace it", file=sys.stderr)
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    adj, graph = metr_la_graph()
    allocator = "glibc's default allocator"
    if args.malloc == "reuse":
        allocator = ("freed memory kept for reuse" if reuse_freed_memory()
                     else "the C library's own allocator (not glibc: --malloc reuse has no effect)")
    print(f"gwnet benchmark: {device}{' bf16 autocast' if bf16 else ' fp32'}, {args.threads} threads, "
          f"improved preset, {graph}, batch {args.batch}, 12 steps, median of {args.repeats}, {allocator}"
          f"{', one core loaded by a second process' if args.background_load else ''}")
    if device == "cpu":
        print(f"CPU bf16: {'native' if native_bf16() else 'none native (AVX512-BF16/AMX absent): emulated'}; "
              f"fast bf16 {'timed' if want_bf16(args) else 'not timed (--bf16 on to time it)'}")
    load = BackgroundLoad() if args.background_load else contextlib.nullcontext()
    report, headline_rows = [], []
    if "equal" not in args.skip:
        eq = check_equal(adj, "cpu")
        rows = [dict(model=k, **v) for k, v in eq.items()]
        real = check_reference(adj)
        if real:
            rows.append(real)
        report.append(write_table(rows, out / "equality", "Max relative difference to the reference-structured model (fp32, no dropout)"))
        print(report[-1])
    if "headline" not in args.skip:
        with load:
            size = 512 if args.quick else 8192 if device == "cuda" else 2048
            rows, baseline, rates = headline(adj, args, device, bf16,
                                             lambda dtype: gemm_rate(device, dtype, size=size))
        gemm = ", ".join(f"{p} {r / 1e9:.0f}" for p, r in rates.items())
        print(f"GEMM rate, GFLOP/s: {gemm} ({size}^3 matrix product, {args.threads} threads, "
              "the better of before and after the timings)")
        headline_rows = rows
        report.append(write_table(rows, out / "headline", f"Training step and inference, batch {args.batch}, "
                                                           f"{allocator}; reference = {baseline}; "
                                                           f"GEMM rate, GFLOP/s: {gemm}"))
        print(report[-1])
    if "profile" not in args.skip:
        with load:
            rows = profile(adj, args, device)
        report.append(write_table(rows, out / "profile", f"One training step by part (batch {args.batch}, "
                                                         f"{allocator}, self time of every operator, "
                                                         "forward and backward)"))
        print(report[-1])
    if "data" not in args.skip:
        d = data_path(args)
        resident = d["series_with_features_mb"] + d["model_mb"]
        d["epoch_peak_growth_mb"] = d["peak_rss_epoch_mb"] - d["rss_before_epoch_mb"]
        d["peak_over_series_plus_model"] = (resident + d["epoch_peak_growth_mb"]) / resident
        d["peak_over_raw_speeds_plus_model"] = (resident + d["epoch_peak_growth_mb"]) / (
            d["raw_series_mb"] + d["model_mb"])
        fast = [r for r in headline_rows if r["model"] == "fast" and r["measure"] == "train step"]
        if fast:
            d["batch_share_of_train_step"] = d["ms_per_batch"] / 1e3 / fast[0]["seconds"]
        report.append(write_table([d], out / "data_path", "Data path: one training epoch of batches (64)"))
        print(report[-1])
    if "scaling" not in args.skip:
        rows = scaling(args, device, bf16)
        report.append(write_table(rows, out / "scaling", "Scaling (ms per step; — = not run, over the time budget)"))
        print(report[-1])
    (out / "benchmark.md").write_text("\n".join(report))


if __name__ == "__main__":
    main()
