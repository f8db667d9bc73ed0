"""What the scaled presets cost per process: memory of parameters, gradients and optimizer
state, sharded over 1 and 2 processes, with fp32 and 8-bit AdamW, and training throughput.

Each configuration runs the real sharded training step (``gwnet-train --fsdp``'s Trainer, on
the synthetic dataset with 207 sensors like METR-LA) for one warm-up and ``--steps`` timed
batches. Byte counts are those of the local shards and do not depend on the batch; the
throughput does, and with a CPU's worth of compute the default batch is tiny. torchao's
8-bit update runs eagerly unless ``--compile`` is given: compiling costs about a minute per
preset and process, and then makes the 8-bit step several times faster on CPU.

    python experiments/scale_benchmark.py [--presets base large xl] [--batch-size 2] [--steps 1]
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

from gwnet.config import SCALED_SIZES, Config
from gwnet.engine import make_trainer
from gwnet.scale import World, launch
from gwnet.scale.optim import optimizer_state_bytes, tensor_bytes

OPTIMIZERS = ("adamw", "adamw8bit")
MB = 2**20


def measure(preset: str, optimizer: str, args: argparse.Namespace, world: World, out: Path) -> dict[str, float]:
    """One configuration on this world: bytes per process and samples per second."""
    cfg = Config.from_preset(preset)
    cfg.out = str(out / f"{preset}-{optimizer}-{world.size}")
    cfg.data.synth_nodes, cfg.data.synth_days = args.nodes, 2
    cfg.model.stable_embedding = True
    t = cfg.train
    t.fsdp, t.device, t.optimizer, t.batch_size, t.progress = True, "cpu", optimizer, args.batch_size, False
    trainer = make_trainer(cfg)
    t.batches_per_epoch = 1
    trainer._train_epoch(1)  # warm-up: allocations, optimizer states, compilation
    t.batches_per_epoch = args.steps
    world.barrier()
    started = time.perf_counter()
    trainer._train_epoch(2)
    world.barrier()
    seconds = time.perf_counter() - started
    params = list(trainer.model.parameters())
    local = torch.tensor([sum(map(tensor_bytes, params)),
                          sum(tensor_bytes(p.grad) for p in params if p.grad is not None),
                          optimizer_state_bytes(trainer.optimizer)], dtype=torch.float64)
    largest = torch.stack(world.gather(local)).max(dim=0).values.tolist()
    return {"params": sum(p.numel() for p in params),  # a shard's numel is its whole parameter's
            "param_mb": largest[0] / MB, "grad_mb": largest[1] / MB, "optim_mb": largest[2] / MB,
            "samples_s": args.batch_size * args.steps / seconds}


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: Path, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    # One process group for every configuration: reopening one on the same port races.
    with launch("cpu") as group:
        for preset in args.presets:
            for optimizer in OPTIMIZERS:
                row = measure(preset, optimizer, args, group, out)
                if group.is_main:
                    results.put((preset, world, optimizer, row))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(SCALED_SIZES), choices=list(SCALED_SIZES))
    parser.add_argument("--nodes", type=int, default=207, help="sensors of the synthetic graph")
    parser.add_argument("--batch-size", type=int, default=2, help="global batch (windows)")
    parser.add_argument("--steps", type=int, default=1, help="timed batches after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--compile", action="store_true", help="compile torchao's 8-bit step")
    args = parser.parse_args()

    if not args.compile:
        os.environ["TORCH_COMPILE_DISABLE"] = "1"  # read by torch when the ranks import it
    results = mp.get_context("spawn").Queue()
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            mp.spawn(_rank, args=(world, free_port(), args, Path(out), results), nprocs=world, join=True)
            for _ in range(len(args.presets) * len(OPTIMIZERS)):
                preset, w, optimizer, row = results.get()
                rows[preset, w, optimizer] = row
    print(f"{args.nodes} sensors, global batch {args.batch_size}, {args.steps} timed step(s), "
          f"{args.threads} CPU thread(s) per process, 8-bit step {'compiled' if args.compile else 'eager'}; "
          "MiB per process (largest shard)")
    print(f"{'preset':7} {'params':>11} {'procs':>5} {'optimizer':>9} {'params':>8} {'grads':>8} "
          f"{'optim':>8} {'samples/s':>9}")
    for preset in args.presets:
        for world in (1, 2):
            for optimizer in OPTIMIZERS:
                r = rows[preset, world, optimizer]
                params = rows[preset, 1, optimizer]["params"]
                print(f"{preset:7} {params:>11,} {world:>5} {optimizer:>9} {r['param_mb']:8.2f} "
                      f"{r['grad_mb']:8.2f} {r['optim_mb']:8.2f} {r['samples_s']:9.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
