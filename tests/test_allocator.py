"""The CPU heap policy (gwnet.engine.allocator): freed memory kept for the next step.

Kept memory is seen as page faults that do not happen: a block above glibc's mmap ceiling
(32 MiB) is mapped anew on every allocation and faults in every page on first touch,
unless the policy serves it from the heap. The counts are the kernel's (``ru_minflt``), so
the checks do not depend on timing. Each check runs in a fresh process: the policy is
process-wide.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gwnet.config import Config
from gwnet.engine.allocator import MMAP_CEILING, largest_activation_bytes, wants_reuse
from gwnet.errors import GWNetError

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the policy acts on glibc's malloc only")

TESTS = Path(__file__).resolve().parent

# Faults per page of each of twelve 80 MB allocations in a row, each filled. The heap
# settles over the first few: a small block allocated in between can take the start of the
# freed space, and the next large block then extends the heap (seen up to the fifth).
FAULTS = textwrap.dedent("""
    import json, resource, sys
    import torch

    def faults_per_page():
        out = []
        for _ in range(12):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.empty(80 * 2**20 // 4).fill_(1)
            out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (80 * 2**20 / 4096))
        return out
""")


def _run(body: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("GLIBC_TUNABLES", None)
    done = subprocess.run([sys.executable, "-c", FAULTS + textwrap.dedent(body), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check(per_round: list[float], reused: bool) -> None:
    if reused:  # once settled, served from the heap: no page touched for the first time
        assert max(per_round[-4:]) < 0.05, per_round
    else:  # glibc's default: every block above 32 MiB is a fresh mapping, every page faults
        assert min(per_round) > 0.9, per_round


def test_auto_reuses_on_cpu_only_above_the_mmap_ceiling_and_not_under_checkpointing():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    big, small = MMAP_CEILING + 1, MMAP_CEILING
    assert wants_reuse("auto", cpu, activation_bytes=big)
    assert not wants_reuse("auto", cpu, activation_bytes=small)
    assert not wants_reuse("auto", cpu, activation_checkpointing=True, activation_bytes=big)
    assert not wants_reuse("auto", cuda, activation_bytes=big)
    assert wants_reuse("reuse", cuda) and wants_reuse("reuse", cpu, activation_checkpointing=True)
    assert not wants_reuse("system", cpu, activation_bytes=big)
    with pytest.raises(ValueError, match="unknown malloc policy"):
        wants_reuse("jemalloc", cpu)


def test_largest_activation_is_nodes_by_padded_steps_by_batch_by_widest_channels():
    cfg = Config.from_preset("improved").model  # receptive field 13, 40 channels
    assert largest_activation_bytes(cfg, 12, 8600, 4) == 8600 * 13 * 4 * 40 * 4  # 68 MiB: above
    assert largest_activation_bytes(cfg, 12, 207, 64) < MMAP_CEILING  # METR-LA at batch 64: below
    assert largest_activation_bytes(Config.from_preset("mlp").model, 12, 10, 2) == 10 * 12 * 2 * 4


def test_an_unknown_policy_in_a_config_is_one_line():
    cfg = Config.from_preset("improved")
    cfg.train.malloc = "jemalloc"
    with pytest.raises(GWNetError, match="malloc='jemalloc' is not one of auto, reuse, system"):
        cfg.validate()


@glibc_only
@pytest.mark.parametrize("policy", ["reuse", "system"])
def test_reuse_serves_large_blocks_again_without_page_faults(policy):
    faults = _run("""
        import torch
        from gwnet.engine.allocator import apply_policy
        applied = apply_policy(sys.argv[1], torch.device("cpu"))
        print(json.dumps({"applied": applied, "faults": faults_per_page()}))
    """, policy)
    assert faults["applied"] is (policy == "reuse")
    _check(faults["faults"], reused=policy == "reuse")


@glibc_only
@pytest.mark.parametrize("policy,ceiling,reused", [("auto", 0, True), ("auto", None, False),
                                                   ("system", 0, False)])
def test_the_trainer_applies_the_configured_policy(tiny_dataset, tmp_path, policy, ceiling, reused):
    # The tiny run's activations are a few kB: "auto" reuses only with the ceiling lowered.
    faults = _run("""
        import gwnet.engine.allocator
        from gwnet.engine.trainer import Trainer
        from test_train import tiny_config
        if sys.argv[4] != "None":
            gwnet.engine.allocator.MMAP_CEILING = int(sys.argv[4])
        cfg = tiny_config(sys.argv[1], sys.argv[2], epochs=1, device="cpu")
        cfg.train.malloc = sys.argv[3]
        trainer = Trainer(cfg)
        trainer.close()
        print(json.dumps({"reuses": trainer.reuses_memory, "faults": faults_per_page()}))
    """, str(tiny_dataset), str(tmp_path / "run"), policy, str(ceiling))
    assert faults["reuses"] is reused
    _check(faults["faults"], reused)
