"""Graph WaveNet at LargeST scale: step time, inference time and peak memory per adaptive
adjacency variant from 207 to 8,600 sensors, and the halo a node-partitioned split needs.

Graphs are the synthetic LargeST-layout road networks of ``gwnet-data synth --format
largest`` (the dense ``*_rn_adj.npy`` turned into doubletransition supports, as LargeST's GWNet
row uses), inputs random, the improved preset in fp32 on the CPU. Every cell runs in a fresh
process so that its peak RSS is its own; cells whose projected time exceeds the budget are
skipped and marked. "largest batch in 16 GB" is read off gwnet's memory estimate
(:func:`gwnet.engine.memory.estimate`, printed beside the measured peak RSS, which also holds
the interpreter and torch: about 0.5 GB), not searched by trial.

    python experiments/large_graph.py [--sizes 207 1000 2000 4000 8600] [--threads 2]
        [--batch 4] [--checkpointing] [--malloc auto|reuse|system] [--budget 600] [--out DIR] [--overwrite] [--halo-only]

The halo: the graph is split into 2, 4 and 8 parts of contiguous sensors (recursive
bisection along the longer geographic axis, from the layout's ``*_meta.csv``); a part's
halo for one diffusion step is the set of sensors outside it that send to a sensor inside
it (a non-zero in the fixed supports); a layer of order-K diffusion needs the K-step halo.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from gwnet.config import MALLOC_POLICIES

warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", "Sparse invariant checks are implicitly disabled")

SIZES = (207, 1000, 2000, 4000, 8600)
GIB = 1024 ** 3


def graph_dir(nodes: int, root: Path) -> Path:
    """A synthetic LargeST-layout dataset of ``nodes`` sensors (one day: only the graph is used)."""
    from gwnet.data import synthetic

    out = root / f"largest-{nodes}"
    if not (out / "g_rn_adj.npy").exists():
        synthetic.write(out, nodes=nodes, days=1, seed=0, layout="largest", name="g")
    return out


def supports(nodes: int, root: Path) -> list[sp.csr_matrix]:
    from gwnet.data.supports import build_supports

    adj = np.load(graph_dir(nodes, root) / "g_rn_adj.npy")
    return build_supports(adj, "doubletransition")


# --- one cell, in its own process --------------------------------------------------------
def cell(nodes: int, variant: str, batch: int, threads: int, root: Path, repeats: int,
         checkpointing: bool = False, malloc: str = "auto") -> dict:
    import torch

    from gwnet.config import GWNetConfig
    from gwnet.data.supports import to_torch
    from gwnet.engine.allocator import apply_policy, largest_activation_bytes
    from gwnet.engine.memory import peak_rss_bytes
    from gwnet.nn import GWNet

    torch.set_num_threads(threads)
    sup = supports(nodes, root)
    options = {"addaptadj": variant != "none"}
    if variant not in ("none", "dense"):
        options["adaptive"] = variant
    torch.manual_seed(0)
    cfg = GWNetConfig.improved(num_nodes=nodes, **options)
    model = GWNet(cfg, to_torch(sup))
    reuse = apply_policy(malloc, torch.device("cpu"), checkpointing,  # as gwnet-train --malloc does
                         largest_activation_bytes(cfg, 12, nodes, batch))
    if checkpointing:  # what --activation-checkpointing does: each residual layer recomputed in backward
        from gwnet.scale.backbone import checkpoint_layers

        checkpoint_layers(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 12, nodes, cfg.in_dim)
    y = torch.randn(batch, cfg.out_dim, nodes)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = (model(x) - y).abs().mean()
        loss.backward()
        optimizer.step()

    def infer():
        with torch.no_grad():
            model(x)

    timings = {}
    for name, fn in (("train_s", train_step), ("infer_s", infer)):
        model.train(name == "train_s")
        fn()  # warm-up
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - started)
        timings[name] = float(np.median(seconds))
    peak = peak_rss_bytes()
    edges = sum(s.nnz for s in sup) / len(sup) / nodes
    return {"nodes": nodes, "variant": variant, "batch": batch, "checkpointing": checkpointing,
            "heap_reuse": reuse, **timings,
            "peak_rss_gb": peak / GIB,
            "edges_per_node": edges, "params": sum(p.numel() for p in model.parameters())}


def memory(nodes: int, variant: str, batch: int, limit_gb: float = 16.0) -> tuple[float, int | None]:
    """gwnet's estimate of a training step's memory at ``batch`` (GB) and the largest batch
    whose estimate fits ``limit_gb``."""
    from gwnet.config import Config
    from gwnet.engine.memory import estimate

    cfg = Config.from_preset("improved")
    cfg.model.addaptadj = variant != "none"
    if variant not in ("none", "dense"):
        cfg.model.adaptive = variant
    cfg.resolve(num_nodes=nodes)
    found = estimate(cfg, nodes, batch)
    return found.total_bytes / GIB, found.fits(limit_gb * GIB)


def run_cell(args, nodes: int, variant: str) -> dict:
    command = [sys.executable, __file__, "--cell", str(nodes), variant, "--batch", str(args.batch),
               "--threads", str(args.threads), "--root", str(args.root), "--repeats", str(args.repeats)]
    if args.checkpointing:
        command.append("--checkpointing")
    command += ["--malloc", args.malloc]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"nodes": nodes, "variant": variant, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the halo of a node-partitioned split -------------------------------------------------
def bisect(xy: np.ndarray, index: np.ndarray, parts: int) -> list[np.ndarray]:
    """Recursive bisection along the longer axis into ``parts`` (a power of 2) equal parts."""
    if parts == 1:
        return [index]
    pts = xy[index]
    axis = int(np.ptp(pts, axis=0).argmax())
    order = index[np.argsort(pts[:, axis], kind="stable")]
    half = len(order) // 2
    return bisect(xy, order[:half], parts // 2) + bisect(xy, order[half:], parts // 2)


def halo_table(nodes: int, root: Path, hops=(1, 2)) -> pd.DataFrame:
    folder = graph_dir(nodes, root)
    meta = pd.read_csv(folder / "g_meta.csv")
    xy = meta[["Lng", "Lat"]].to_numpy()
    sup = supports(nodes, root)
    reach = (sum(abs(s) for s in sup) > 0).astype(np.int8).tocsr()  # u -> v where u sends to v
    rows = []
    for parts in (2, 4, 8):
        for part_hops in hops:
            sizes = []
            for part in bisect(xy, np.arange(nodes), parts):
                inside = np.zeros(nodes, dtype=bool)
                inside[part] = True
                frontier = inside.copy()
                for _ in range(part_hops):  # senders into the current set
                    frontier = frontier | (reach @ frontier.astype(np.int8) > 0)
                sizes.append(int((frontier & ~inside).sum()))
            rows.append({"parts": parts, "hops": part_hops, "part_size": nodes // parts,
                         "halo_max": max(sizes), "halo_mean": float(np.mean(sizes)),
                         "halo_share_of_part": max(sizes) / (nodes // parts)})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """The table as GitHub markdown (no extra dependency)."""
    def cell(v) -> str:
        return "" if pd.isna(v) else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--variants", nargs="+", default=["none", "dense", "topk", "lowrank"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds a cell may take (projected)")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "gwnet-large-graph")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--halo-only", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace the tables of an earlier run in --out")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    parser.add_argument("--malloc", choices=MALLOC_POLICIES, default="auto",
                        help="CPU heap policy, as gwnet-train --malloc (auto: reuse when an activation is above "
                             "32 MiB, unless --checkpointing)")
    parser.add_argument("--cell", nargs=2, metavar=("NODES", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(cell(int(args.cell[0]), args.cell[1], args.batch, args.threads, args.root,
                              args.repeats, args.checkpointing, args.malloc)))
        return 0
    outputs = [args.out / name for name in ("large_graph_halo.csv", "large_graph.csv", "large_graph.md")]
    earlier = [p for p in outputs if p.exists()]
    if earlier and not args.overwrite:
        print(f"large_graph.py: error: {earlier[0]} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    halo = halo_table(max(args.sizes), args.root)
    print(f"halo of a node-partitioned split, {max(args.sizes)} sensors (synthetic LargeST layout):")
    print(halo.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    halo.to_csv(args.out / "large_graph_halo.csv", index=False)
    if args.halo_only:
        return 0
    rows = []
    last: dict[str, dict] = {}
    for nodes in args.sizes:
        for variant in args.variants:
            prev = last.get(variant)
            if prev is not None and "train_s" in prev:
                # project with the quadratic growth of dense, linear of the others
                power = 2 if variant == "dense" else 1.2
                projected = (prev["train_s"] + prev["infer_s"]) * (args.repeats + 1) * (nodes / prev["nodes"]) ** power
                if projected > args.budget:
                    rows.append({"nodes": nodes, "variant": variant, "skipped": f"projected {projected:.0f} s"})
                    print(rows[-1], flush=True)
                    continue
            started = time.perf_counter()
            result = run_cell(args, nodes, variant)
            result["cell_s"] = time.perf_counter() - started
            result["estimate_gb"], result["largest_batch_16gb"] = memory(nodes, variant, args.batch)
            rows.append(result)
            last[variant] = result
            print(result, flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "large_graph.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    (args.out / "large_graph.md").write_text(markdown(table))
    print(f"threads {args.threads}, batch {args.batch}, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
