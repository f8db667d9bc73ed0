"""Sharded training (FSDP2 over gloo on CPU, two processes) and 8-bit AdamW.

Multi-process checks spawn their ranks with torch.multiprocessing (one thread each) on a
free localhost port, or run ``torchrun`` itself. torchao's update step runs eagerly here
(``TORCH_COMPILE_DISABLE``): compiling it costs tens of seconds per parameter shape, and the
compiled path has its own slow test.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from test_train import tiny_config

from gwnet.config import Config, GWNetConfig
from gwnet.engine import RunDir, Trainer, evaluate, load_checkpoint, load_trained
from gwnet.engine.trainer import Interrupted, make_optimizer
from gwnet.errors import GWNetError
from gwnet.nn import GWNet
from gwnet.scale import distributed, is_main_process
from gwnet.scale.backbone import mixed_precision
from gwnet.scale.trainer import ShardedTrainer

# Checked without importing torchao, which every spawned rank would then import too.
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="the 8-bit optimizer needs torchao (gwnet[scale])")


# --- running ranks ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, target, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    target(*args)


def run_ranks(target, *args, world: int = 2) -> None:
    """``target(*args)`` in ``world`` fresh processes that torchrun's environment describes."""
    mp.spawn(_rank_main, args=(world, free_port(), target, args), nprocs=world, join=True)


class Recorder:
    """Records every step's loss over the whole batch; rank 0 sends itself SIGTERM after
    ``stop_after`` steps, as a scheduler killing the job would."""

    def __init__(self, *args, stop_after: int | None = None, **kwargs):
        self.losses: list[float] = []
        self.stop_after = stop_after
        super().__init__(*args, **kwargs)

    def _global_loss(self, loss, target):
        loss, objective = super()._global_loss(loss, target)
        self.losses.append(loss.item())
        if len(self.losses) == self.stop_after and self.is_main:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss, objective


class RecordingTrainer(Recorder, Trainer):
    pass


class RecordingShardedTrainer(Recorder, ShardedTrainer):
    pass


def train_sharded(cfg: Config, result: Path, resume: bool = False, stop_after: int | None = None) -> None:
    """One rank of a sharded run; rank 0 saves the losses and what the optimizer state holds."""
    with distributed(cfg):
        trainer = RecordingShardedTrainer(cfg, resume=resume, stop_after=stop_after)
        try:
            trainer.fit()
        except Interrupted:
            pass
        states = [v.to_local() for s in trainer.optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0]
        if is_main_process():
            torch.save({"losses": trainer.losses,
                        "quantized": sum(hasattr(v, "__tensor_flatten__") for v in states)}, result)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from gwnet.data import synthetic

    root = tmp_path_factory.mktemp("scale") / "data"
    synthetic.write(root, nodes=6, days=3, seed=1)
    return root


@pytest.fixture
def eager_optimizer(monkeypatch):
    """torchao's step without compilation, here and in spawned ranks."""
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")
    with torch.compiler.set_stance("force_eager"):
        yield


# --- acceptance: FSDP matches one process, resume is exact ------------------------------
def test_two_processes_match_one_process(dataset, tmp_path):
    cfg = tiny_config(dataset, tmp_path / "one", epochs=2, batches_per_epoch=5)
    cfg.model.dropout = 0.0  # masks drawn per process cannot match one process's masks
    one = RecordingTrainer(cfg)
    one.fit()
    sharded = tiny_config(dataset, tmp_path / "two", epochs=2, batches_per_epoch=5, fsdp=True,
                          activation_checkpointing=True)
    sharded.model.dropout = 0.0
    run_ranks(train_sharded, sharded, tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt")["losses"]
    assert len(two) == len(one.losses) == 10
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one.losses), rtol=1e-4, atol=0)

    # best.pt is consolidated: single-process code reads it, and batch-norm statistics (global,
    # updated once per step despite the recomputation) match the one-process run's.
    a, b = (load_checkpoint(RunDir(tmp_path / n).best) for n in ("one", "two"))
    assert a["model"].keys() == b["model"].keys() and b["config"]["train"]["fsdp"]
    for key in a["model"]:
        # Biases just before a batch norm get gradients of rounding noise only, which Adam
        # turns into steps of up to lr: they agree to 1e-4, everything else far closer.
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-4, atol=1e-4, msg=key)
    test = pd.read_csv(RunDir(tmp_path / "two").test_metrics, index_col=0)
    pd.testing.assert_frame_equal(evaluate(tmp_path / "two"), test, check_dtype=False,
                                  check_index_type=False, atol=1e-5)
    pd.testing.assert_frame_equal(test, pd.read_csv(RunDir(tmp_path / "one").test_metrics, index_col=0),
                                  atol=1e-3, rtol=1e-3)
    assert list(pd.read_csv(RunDir(tmp_path / "two").metrics)["epoch"]) == [1, 2]


@needs_torchao
def test_kill_and_resume_continues_exactly_with_8bit_states(dataset, tmp_path, eager_optimizer):
    def config(out):
        cfg = tiny_config(dataset, out, epochs=2, batches_per_epoch=4, fsdp=True, optimizer="adamw8bit")
        # end_conv_1 (128 x 64) is the one weight whose half per process is big enough to quantize.
        cfg.model.skip_channels, cfg.model.end_channels = 64, 128
        cfg.model.stable_embedding = True
        return cfg

    run_ranks(train_sharded, config(tmp_path / "a"), tmp_path / "a.pt")
    whole = torch.load(tmp_path / "a.pt")
    assert len(whole["losses"]) == 8 and whole["quantized"] > 0

    cfg = config(tmp_path / "b")
    run_ranks(train_sharded, cfg, tmp_path / "b1.pt", False, 3)  # killed after step 3 of epoch 1
    first = torch.load(tmp_path / "b1.pt")["losses"]
    last = load_checkpoint(RunDir(cfg.out).last)
    assert last["partial"]["next_batch"] == 3 and (Path(cfg.out) / last["sharded"] / ".metadata").exists()
    single = config(cfg.out)
    single.train.fsdp = False
    with pytest.raises(GWNetError, match=r"train.fsdp is False, but .*last.pt trained with True"):
        Trainer(single, resume=True)

    run_ranks(train_sharded, cfg, tmp_path / "b2.pt", True)
    resumed = torch.load(tmp_path / "b2.pt")["losses"]
    assert first + resumed == whole["losses"]
    model, _, _, _ = load_trained(cfg.out)
    assert model.config.stable_embedding


@needs_torchao
def test_resume_on_another_number_of_processes(dataset, tmp_path, eager_optimizer):
    def config(out, fsdp):
        cfg = tiny_config(dataset, out, epochs=2, batches_per_epoch=4, fsdp=fsdp, optimizer="adamw8bit")
        cfg.model.skip_channels, cfg.model.end_channels = 64, 128
        cfg.model.stable_embedding, cfg.model.dropout = True, 0.0
        return cfg

    one = RecordingTrainer(config(tmp_path / "one", fsdp=False))
    one.fit()
    cfg = config(tmp_path / "run", fsdp=True)
    run_ranks(train_sharded, cfg, tmp_path / "first.pt", False, 3)
    run_ranks(train_sharded, cfg, tmp_path / "second.pt", True, world=1)  # shards of two, read by one
    losses = torch.load(tmp_path / "first.pt")["losses"] + torch.load(tmp_path / "second.pt")["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one.losses), rtol=1e-4, atol=0)


# --- acceptance: 8-bit AdamW ------------------------------------------------------------
def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()


@needs_torchao
def test_8bit_state_is_under_30_percent_on_the_large_preset(eager_optimizer):
    from gwnet.scale.optim import optimizer_state_bytes

    cfg = Config.from_preset("large")
    cfg.train.optimizer = "adamw8bit"
    cfg.model.stable_embedding = True
    model = GWNet(cfg.model, [torch.eye(cfg.model.num_nodes)] * cfg.model.num_supports)
    eight = make_optimizer(model, cfg)
    _step(model, eight)
    full = torch.optim.AdamW(model.parameters())
    _step(model, full)
    ratio = optimizer_state_bytes(eight) / optimizer_state_bytes(full)
    assert ratio <= 0.30, ratio


@needs_torchao
def test_node_embeddings_keep_32bit_states(eager_optimizer):
    cfg = Config.from_preset("improved")
    cfg.train.optimizer = "adamw8bit"
    cfg.model.num_nodes, cfg.model.apt_size, cfg.model.stable_embedding = 256, 16, True
    model = GWNet(cfg.model, [torch.eye(256)] * 2)
    optimizer = make_optimizer(model, cfg)
    _step(model, optimizer)
    # 256 x 16 embeddings are big enough for torchao to quantize; they stay fp32.
    for p in (model.adaptive.nodevec1, model.adaptive.nodevec2):
        assert type(optimizer.state[p]["exp_avg"]) is torch.Tensor
        assert optimizer.state[p]["exp_avg_sq"].dtype == torch.float32
    assert hasattr(optimizer.state[model.end_conv_1.weight]["exp_avg"], "__tensor_flatten__")


@needs_torchao
def test_8bit_adamw_validation_mae_within_3_percent_of_fp32(tmp_path, eager_optimizer):
    from gwnet.data import synthetic
    from gwnet.scale.optim import optimizer_state_bytes

    synthetic.write(tmp_path / "data", nodes=8, days=4, seed=3)
    results, state = {}, {}
    for name in ("adamw", "adamw8bit"):
        cfg = tiny_config(tmp_path / "data", tmp_path / name, epochs=6, batch_size=64, optimizer=name)
        m = cfg.model
        m.residual_channels = m.dilation_channels = 32
        m.skip_channels, m.end_channels, m.stable_embedding = 64, 128, True
        trainer = Trainer(cfg)
        results[name] = trainer.fit().best_val_mae
        state[name] = optimizer_state_bytes(trainer.optimizer)
    assert state["adamw8bit"] < 0.5 * state["adamw"]  # most of the state is quantized
    assert abs(results["adamw8bit"] / results["adamw"] - 1) <= 0.03, results


# --- the command line -------------------------------------------------------------------
def test_torchrun_cli_writes_a_run_single_process_code_reads(dataset, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "gwnet", "train", "--fsdp", "--dataset", str(dataset), "--out", str(out), "--epochs", "1",
         "--residual-channels", "4", "--dilation-channels", "4", "--skip-channels", "8",
         "--end-channels", "8", "--blocks", "1", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("test metrics") == 1  # rank 0 only
    pred = subprocess.run([sys.executable, "-m", "gwnet", "predict", str(out), "--out", str(tmp_path / "p"),
                           "--no-plots"], capture_output=True, text=True, timeout=300)
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert (tmp_path / "p" / "metrics.csv").exists()


@pytest.mark.parametrize("argv,env,message", [
    (["--fsdp"], {}, "needs the processes that torchrun starts"),
    (["--fsdp", "--device", "cuda:1"], {}, "use --device auto, cuda or cpu"),
    ([], {"WORLD_SIZE": "2"}, "without --fsdp"),
])
def test_cli_launch_mistakes_are_one_line(dataset, tmp_path, capsys, monkeypatch, argv, env, message):
    from gwnet.cli.train import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["--dataset", str(dataset), "--out", str(tmp_path / "x"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("gwnet-train: error:")


def test_8bit_without_torchao_is_a_clear_error(monkeypatch):
    from gwnet.scale import optim

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    optim.adamw8bit_class.cache_clear()
    cfg = Config.from_preset("improved")
    cfg.train.optimizer = "adamw8bit"
    try:
        with pytest.raises(GWNetError, match=r"needs torchao: pip install 'gwnet\[scale\]'"):
            make_optimizer(torch.nn.Linear(2, 2), cfg)
    finally:
        optim.adamw8bit_class.cache_clear()


# --- presets and precision --------------------------------------------------------------
def test_largest_preset_is_ten_times_the_improved_model():
    def params(model_cfg: GWNetConfig) -> int:
        return sum(p.numel() for p in GWNet(model_cfg, [torch.eye(207)] * 2).parameters())

    improved = params(GWNetConfig.improved())
    assert improved == 453_472
    assert params(GWNetConfig.scaled("xl")) >= 10 * improved


def test_mixed_precision_is_bf16_on_gpu_only():
    gpu = mixed_precision(torch.device("cuda"), "bf16")
    assert gpu.param_dtype == gpu.reduce_dtype == torch.bfloat16
    assert mixed_precision(torch.device("cpu"), "bf16").param_dtype is None
    assert mixed_precision(torch.device("cuda"), "fp32").param_dtype is None


# --- the compiled 8-bit step --------------------------------------------------------------
@pytest.mark.slow
@needs_torchao
def test_compiled_8bit_step_on_shards_survives_resume(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    cfg = tiny_config(dataset, tmp_path / "run", epochs=2, batches_per_epoch=2, fsdp=True,
                      optimizer="adamw8bit")
    cfg.model.blocks = cfg.model.layers = 1  # few parameter shapes: few compilations
    cfg.model.skip_channels, cfg.model.end_channels = 64, 128
    cfg.model.stable_embedding = True
    run_ranks(train_sharded, cfg, tmp_path / "first.pt", False, 3)
    run_ranks(train_sharded, cfg, tmp_path / "second.pt", True)
    first, second = (torch.load(tmp_path / n) for n in ("first.pt", "second.pt"))
    assert len(first["losses"]) == 3 and len(second["losses"]) == 1 and second["quantized"] > 0
    assert load_checkpoint(RunDir(cfg.out).last)["finished"]
