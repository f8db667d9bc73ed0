"""The GPU path, as far as a CPU can prove it: the per-device kernel choice (graph_conv=auto),
the data path on the training device, the static-buffer training step that CUDA graphs
capture (run eagerly here), and the dense path under fake CUDA tensors. Tests that need a
real GPU skip without one; experiments/gpu_check.py measures the GPU itself."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gwnet.config import Config, GWNetConfig
from gwnet.nn import GWNet
from gwnet.nn.graph_conv import CUDA_DENSE_NODES, auto_kernel, support_density
from test_train import tiny_config

CUDA = torch.cuda.is_available()


def tiny(**kw) -> GWNetConfig:
    base = dict(num_nodes=12, in_dim=2, out_dim=3, num_supports=2, residual_channels=8,
                dilation_channels=8, skip_channels=16, end_channels=16, blocks=2, layers=2,
                apt_size=3, dropout=0.0)
    return GWNetConfig(**{**base, **kw})


def sparse_supports(n: int, k: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Row-normalised ring graphs with self-loops: 3 non-zeros a row (sparse for n > 30)."""
    out = []
    for shift in range(1, k + 1):
        a = torch.eye(n) + torch.roll(torch.eye(n), shift, 1) + torch.roll(torch.eye(n), -shift, 1)
        out.append(a / a.sum(1, keepdim=True))
    return out


def x_of(cfg: GWNetConfig, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 12, cfg.num_nodes, cfg.in_dim, generator=torch.Generator().manual_seed(seed))


# --- graph_conv=auto ---------------------------------------------------------------------
def test_auto_kernel_rule():
    assert auto_kernel("cpu", 207, 0.02)[0] == "fast"
    assert auto_kernel("cpu", 8600, 0.5)[0] == "fast"
    # METR-LA's size on CUDA: dense whatever the density (launch-bound step).
    assert auto_kernel("cuda", 207, 0.02)[0] == "dense"
    assert auto_kernel("cuda", CUDA_DENSE_NODES, 0.001)[0] == "dense"
    # Large and sparse: sparse products; large and full: dense.
    kernel, why = auto_kernel("cuda:1", 8600, 0.002)
    assert kernel == "fast" and "8600 nodes" in why
    assert auto_kernel("cuda", 8600, 0.5)[0] == "dense"


def test_support_density_counts_sparse_and_dense_supports():
    ring = sparse_supports(40)
    assert support_density(ring) == pytest.approx(3 / 40)
    assert support_density([ring[0].to_sparse_csr(), torch.ones(40, 40)]) == 1.0
    assert support_density([]) == 1.0  # no fixed graph: nothing sparse to exploit


def test_auto_is_the_default_and_fixed_kernels_still_load(tmp_path):
    assert GWNetConfig().graph_conv == "auto" and Config().model.graph_conv == "auto"
    for kernel in ("fast", "dense"):  # config.json of runs from before auto existed
        cfg = Config.from_dict({"model": {"graph_conv": kernel}})
        path = tmp_path / f"{kernel}.json"
        cfg.save(path)
        assert Config.load(path).validate().model.graph_conv == kernel


def test_select_kernel_switches_the_supports_and_keeps_the_function():
    cfg = tiny(num_nodes=40, dropout=0.0)
    torch.manual_seed(0)
    model = GWNet(cfg, sparse_supports(40)).eval()
    x = x_of(cfg)
    assert model.kernel == "fast" and model.support_0.layout == torch.sparse_csr  # auto before placement
    before = model(x).detach()
    line = model.select_kernel("cuda")  # decided for CUDA, run here on the CPU
    assert line.startswith("graph convolution: dense (auto; cuda, 40 nodes")
    assert model.kernel == "dense" and model.support_0.layout == torch.strided
    assert all(layer.graph_conv.kernel == "dense" for layer in model.layers if layer.graph_conv is not None)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert model.select_kernel("cpu").startswith("graph convolution: fast (auto; cpu")
    assert model.support_0.layout == torch.sparse_csr and model.kernel == "fast"
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert "graph_conv='fast' (auto)" in repr(model)
    fixed = GWNet(dataclasses.replace(cfg, graph_conv="fast"), sparse_supports(40))
    assert fixed.select_kernel("cuda") is None and fixed.kernel == "fast"


def test_training_prints_its_kernel_choice(tiny_dataset, tmp_path, capsys):
    from gwnet.engine import Trainer

    cfg = small_run(tiny_dataset, tmp_path / "run")
    Trainer(cfg).fit()
    err = capsys.readouterr().err
    assert "graph convolution: fast (auto; cpu" in err
    cfg = small_run(tiny_dataset, tmp_path / "run2")
    cfg.model.graph_conv = "dense"
    Trainer(cfg).fit()
    assert "graph convolution:" not in capsys.readouterr().err


def small_run(dataset, out, **train) -> Config:
    """tests/test_train.py's tiny run, one epoch of two batches."""
    return tiny_config(dataset, out, **{"epochs": 1, "batches_per_epoch": 2, **train})


# --- the step on the device --------------------------------------------------------------
from gwnet.engine.step import (Forecaster, GraphedStep, StepStats, StepResult, TrainStep,  # noqa: E402
                               bf16_advice, device_windows, graphs_decision, make_capturable,
                               portable_optimizer_state, state_kept, windows_with_targets)
from gwnet.engine.metrics import masked_mae  # noqa: E402
from gwnet.errors import GWNetError  # noqa: E402


def model_and_optimizer(dropout: float = 0.3, seed: int = 0):
    cfg = tiny(dropout=dropout)
    torch.manual_seed(seed)
    model = GWNet(cfg, sparse_supports(cfg.num_nodes))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4), cfg


def step_of(model, optimizer, clip=3.0) -> TrainStep:
    return TrainStep(model, optimizer, lambda x: model(x) * 10 + 50,
                     lambda pred, y: (masked_mae(pred, y), masked_mae(pred, y)), clip)


def batches(cfg, n=3, batch=4):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 12, cfg.num_nodes, cfg.in_dim, generator=g),
             (50 + 10 * torch.randn(batch, cfg.out_dim, cfg.num_nodes, generator=g)).relu()) for _ in range(n)]


def test_static_buffer_step_is_bit_identical_to_the_plain_step():
    model_a, opt_a, cfg = model_and_optimizer()
    model_b, opt_b, _ = model_and_optimizer()
    plain, graphed = step_of(model_a, opt_a), None
    data = batches(cfg, 3) + batches(cfg, 1, batch=3)  # a last, smaller batch
    outs = []
    for i, (x, y) in enumerate(data):
        torch.manual_seed(100 + i)  # the same dropout masks for both
        a = plain(x, y)
        torch.manual_seed(100 + i)
        if graphed is None:
            graphed = GraphedStep(step_of(model_b, opt_b), x, y)
        b = graphed(x, y) if graphed.fits(x, y) else graphed.step(x, y)
        outs.append((a, b))
        assert torch.equal(a.loss, b.loss) and torch.equal(a.grad_norm, b.grad_norm) and torch.equal(a.pred, b.pred)
    assert not graphed.fits(*data[-1]) and graphed.graph is None  # on the CPU: eager, never captured
    for (na, pa), (nb, pb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(pa, pb), na


@pytest.mark.parametrize("fresh", [True, False])
def test_state_kept_puts_back_what_warm_up_steps_change(fresh):
    model_a, opt_a, cfg = model_and_optimizer()
    model_b, opt_b, _ = model_and_optimizer()
    step_a, step_b = step_of(model_a, opt_a), step_of(model_b, opt_b)
    data = batches(cfg, 4)
    if not fresh:  # a resumed run: the optimizer has state already
        torch.manual_seed(1)
        step_a(*data[3])
        torch.manual_seed(1)
        step_b(*data[3])
    torch.manual_seed(2)
    rng = torch.get_rng_state()
    with state_kept(model_b, opt_b, torch.device("cpu")):
        for x, y in data[:3]:
            step_b(x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    # The next step from the kept state is the step of a run that never warmed up.
    torch.manual_seed(2)
    step_a(*data[0])
    torch.manual_seed(2)
    step_b(*data[0])
    for (na, pa), (nb, pb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(pa, pb), na
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        for k, v in opt_a.state[pa].items():
            assert torch.equal(v, opt_b.state[pb][k]), k


def test_step_stats_record_the_first_non_finite_step_and_read_once():
    stats = StepStats(torch.device("cpu"), [1.0, 2.0, 1, 0])
    one = torch.tensor(1.0)
    stats.add(0, StepResult(one, torch.tensor(3.0), one))
    assert stats.first_bad() is None
    stats.add(1, StepResult(one, torch.tensor(float("inf")), one))
    stats.add(2, StepResult(torch.tensor(float("nan")), torch.tensor(float("nan")), one))
    assert stats.first_bad() == (1, "gradient")
    assert stats.values() == [4.0, 3.0, 2, 0]  # the non-finite steps count nowhere
    loss_first = StepStats(torch.device("cpu"), [0.0, 0.0, 0, 0])
    loss_first.add(4, StepResult(torch.tensor(float("nan")), torch.tensor(float("nan")), one))
    assert loss_first.first_bad() == (4, "loss")


def test_graph_decision_and_bf16_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert graphs_decision("auto", cpu) == (False, "off (they need a CUDA device (this run is on cpu))")
    assert graphs_decision("auto", cuda)[0]
    assert graphs_decision("off", cuda) == (False, "off")
    assert "nan_policy skip" in graphs_decision("auto", cuda, nan_policy="skip")[1]
    assert not graphs_decision("auto", cuda, sharded=True)[0]
    assert not graphs_decision("auto", cuda, optimizer="adamw8bit")[0]
    with pytest.raises(GWNetError, match="--cuda-graphs on: they need a CUDA device"):
        graphs_decision("on", cpu)
    with pytest.raises(GWNetError, match="not one of"):
        graphs_decision("yes", cuda)
    assert bf16_advice(cuda, "bf16", graphs=False) is not None
    assert bf16_advice(cuda, "bf16", graphs=True) is None
    assert bf16_advice(cpu, "bf16", graphs=False) is None and bf16_advice(cuda, "fp32", False) is None


def test_optimizer_state_in_last_pt_is_that_of_an_eager_run():
    model, opt, cfg = model_and_optimizer()
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    step_of(model, opt)(*batches(cfg, 1)[0])
    make_capturable(opt, torch.device("cpu"))  # what capture does (on CUDA)
    assert torch.is_tensor(opt.param_groups[0]["lr"]) and opt.param_groups[0]["capturable"]
    sched.step()  # the scheduler fills the tensor in place (the graph keeps reading it)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(5e-3)
    state = portable_optimizer_state(opt)
    assert state["param_groups"][0]["lr"] == pytest.approx(5e-3) and not state["param_groups"][0]["capturable"]
    fresh_model, fresh_opt, _ = model_and_optimizer()
    fresh_opt.load_state_dict(state)
    step_of(fresh_model, fresh_opt)(*batches(cfg, 1)[0])  # an eager CPU step runs from it


def test_windows_with_targets_and_device_windows(tiny_dataset):
    from gwnet.config import DataConfig
    from gwnet.data import load_data

    data = load_data(DataConfig(dataset=str(tiny_dataset)))
    windows = data.windows["train"]
    speeds = windows.series.speeds.clone()
    speeds[40:70] = 0.0  # a stretch of missing readings: some windows have no target at all
    windows.series.speeds[:] = speeds
    flags = windows_with_targets(windows, 0.0)
    expected = torch.stack([windows.batch(torch.tensor([i]))[1].ne(0).any() for i in range(len(windows))])
    assert torch.equal(flags, expected) and not flags.all() and flags.any()
    assert device_windows(data.windows, torch.device("cpu")) is data.windows
    moved = windows.with_series(windows.series.to("cpu"))
    positions = torch.tensor([0, 5, 9])
    for a, b in zip(moved.batch(positions), windows.batch(positions)):
        assert torch.equal(a, b)


class Replay:
    """Stands in for a captured forecast graph on the CPU: a replay recomputes the output
    from the static input."""

    def __init__(self, forecaster):
        self.f = forecaster

    def replay(self):
        self.f.out = self.f.forecast(self.f.x)


def fake_capture(forecaster, x):
    forecaster.x, forecaster.graph = x.clone(), Replay(forecaster)


def test_forecaster_replays_the_full_shape_and_runs_others_eagerly():
    calls = []

    def forecast(x):
        calls.append(tuple(x.shape))
        return x * 2

    f = Forecaster(forecast, graphs=True)
    f._capture = lambda x: fake_capture(f, x)
    a, b = torch.ones(4, 3), torch.ones(2, 3)
    assert torch.equal(f(a), a * 2) and torch.equal(f(a + 1), (a + 1) * 2) and torch.equal(f(b), b * 2)
    assert calls == [(4, 3), (4, 3), (2, 3)]


def test_training_through_the_graph_path_matches_the_plain_path(tiny_dataset, tmp_path, monkeypatch):
    """The trainer's CUDA-graph wiring (static buffers, the last smaller batch eager, the
    forecast replayed), run on the CPU with capture replaced by eager replays: the same run."""
    from gwnet.engine import Trainer, load_checkpoint
    from gwnet.engine import trainer as trainer_module

    def run(out):
        cfg = small_run(tiny_dataset, out, epochs=2, batches_per_epoch=None, batch_size=128)
        cfg.model.dropout = 0.3
        return Trainer(cfg).fit(), load_checkpoint(out / "last.pt")

    plain, plain_last = run(tmp_path / "plain")
    captured = []

    def capture(self, x, y):  # what capture leaves: static buffers holding the batch
        captured.append(tuple(x.shape))
        self.x.copy_(x)
        self.y.copy_(y)

    monkeypatch.setattr(trainer_module, "graphs_decision", lambda *a, **k: (True, "on"))
    monkeypatch.setattr(GraphedStep, "capture", capture)
    monkeypatch.setattr(Forecaster, "_capture", fake_capture)
    graphed, graphed_last = run(tmp_path / "graphed")
    assert captured == [(128, 12, 5, 2)]  # once, at the first full batch
    assert graphed.best_val_mae == plain.best_val_mae
    assert graphed.test_metrics.equals(plain.test_metrics)
    for k, v in plain_last["model"].items():
        assert torch.equal(v, graphed_last["model"][k]), k


def test_nan_policy_stop_names_the_batch_and_keeps_last_pt(tiny_dataset, tmp_path):
    from gwnet.engine import Trainer, load_checkpoint

    calls = []

    def late_nan(pred, y, null):
        calls.append(1)
        return masked_mae(pred, y, null) * (float("nan") if len(calls) == 5 else 1.0)

    cfg = small_run(tiny_dataset, tmp_path / "run", epochs=3, batches_per_epoch=3)
    with pytest.raises(GWNetError, match="non-finite loss at epoch 2, batch 2"):
        Trainer(cfg, loss_fn=late_nan).fit()
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())

    def inf_gradient(pred, y, null):  # a finite loss (0 added) whose gradient is infinite
        return masked_mae(pred, y, null) + (pred - pred.detach()).abs().sqrt().sum()

    cfg = small_run(tiny_dataset, tmp_path / "grad")
    with pytest.raises(GWNetError, match="non-finite gradient at epoch 1, batch 1"):
        Trainer(cfg, loss_fn=inf_gradient).fit()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_step_matches_the_eager_step():
    device = torch.device("cuda")
    model_a, opt_a, cfg = model_and_optimizer(dropout=0.0)
    model_b, opt_b, _ = model_and_optimizer(dropout=0.0)
    for model in (model_a, model_b):
        model.to(device)
        model.select_kernel(device)  # dense products, as training picks on a GPU at this size
    data = [(x.to(device), y.to(device)) for x, y in batches(cfg, 4)]
    plain = step_of(model_a, opt_a)
    make_capturable(opt_a, device)
    graphed = GraphedStep(step_of(model_b, opt_b), *data[0])
    graphed.capture(*data[0])
    for x, y in data:
        a, b = plain(x, y), graphed(x, y)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


# --- the dense path with no tensor left on the CPU ----------------------------------------
def _fake_device_run(leave: str | None) -> None:
    """A training step (forward, masked MAE, backward, clipping, Adam, the on-device
    statistics) and a validation pass of the dense path, the trainer's own methods, with
    every parameter, buffer and the series as fake tensors of a device other than the CPU;
    ``leave`` names one tensor left a real CPU tensor instead."""
    import pandas as pd
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gwnet.config import TrainConfig
    from gwnet.data.scaler import StandardScaler
    from gwnet.data.windows import Series, Windows
    from gwnet.engine.trainer import Trainer

    cfg = tiny(dropout=0.3, graph_conv="auto")
    torch.manual_seed(0)
    model = GWNet(cfg, sparse_supports(cfg.num_nodes))
    model.select_kernel("cuda")  # dense products, as on a GPU at this size
    series = Series(50 + torch.rand(200, cfg.num_nodes), torch.rand(200, 1))
    index = pd.date_range("2020-01-01", periods=200, freq="5min")
    windows = {name: Windows(series, StandardScaler(50.0, 10.0, True), a, b, 12, 3, 1, index)
               for name, (a, b) in {"train": (0, 100), "val": (100, 150)}.items()}
    device = torch.device("meta")

    class Stub(Trainer):
        def __init__(self):  # only what _forward, _batch_loss, _forecast and evaluate read
            self.cfg = Config()
            self.cfg.train = TrainConfig(batch_size=16, clamp_max=70.0)
            self.cfg.model = cfg
            self.device, self.model, self.extra_targets, self.loss_fn = device, model, None, masked_mae
            self.data = type("Data", (), {"scaler": windows["train"].scaler})()
            self._graph_decision = (False, "off")

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:
        def fake(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(t.shape, dtype=t.dtype, device=device)

        for module in model.modules():
            for name, p in list(module._parameters.items()):
                module._parameters[name] = torch.nn.Parameter(fake(p))
            for name, b in list(module._buffers.items()):
                if name != leave:
                    module._buffers[name] = fake(b)
        on_device = series if leave == "series" else Series(fake(series.speeds), fake(series.calendar))
        trainer = Stub()
        trainer._on_device = {name: w.with_series(on_device) for name, w in windows.items()}
        x, y = trainer._on_device["train"].batch(torch.arange(16, device=device))
        trainer._positions = None
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        step = TrainStep(model, optimizer, trainer._forward, trainer._batch_loss, 3.0)
        model.train()
        out = step(x, y)
        stats = StepStats(device, [0.0, 0.0, 0, 0])
        stats.add(0, out)
        acc = trainer.evaluate("val")  # forecasts and metric sums on the device
        assert out.pred.device == device and acc.sums.device == device and stats.sum.device == device
        assert all(p.grad.device == device for p in model.parameters())


def test_dense_step_and_forecast_keep_every_tensor_on_the_device():
    """Run under FakeTensorMode(allow_non_fake_inputs=False): a real tensor reaching any
    operation fails, and a fake one on the CPU fails beside fake device tensors, as a CPU
    tensor beside CUDA ones does on a GPU.

    The fake device is ``meta``, not ``cuda``: on a PyTorch built without CUDA, fake CUDA
    tensors can be made, but Python indexing, einsum and autograd on them enter CUDA device
    guards that such a build lacks (autograd aborts the process), so no training step can
    run on them; meta tensors follow the same device rule. The sparse (``fast``) path cannot
    be faked this way at all: CSR tensors have no fake or meta form for its products (and
    ``auto`` takes the dense path on a GPU at this size)."""
    _fake_device_run(None)


@pytest.mark.parametrize("leave", ["support_0", "series"])
def test_the_fake_device_run_fails_when_a_tensor_stays_on_the_cpu(leave):
    # The check above is only worth something if a forgotten tensor breaks it.
    with pytest.raises((AssertionError, RuntimeError), match="FakeTensor|device"):
        _fake_device_run(leave)


def test_cuda_graphs_on_without_cuda_is_refused_before_anything_is_written(tiny_dataset, tmp_path):
    from gwnet.engine import Trainer

    cfg = small_run(tiny_dataset, tmp_path / "run", cuda_graphs="on")
    with pytest.raises(GWNetError, match="--cuda-graphs on: they need a CUDA device"):
        Trainer(cfg)
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_capture_that_fails_runs_eagerly_with_auto_and_stops_with_on(tiny_dataset, tmp_path, monkeypatch):
    from gwnet.engine import Trainer
    from gwnet.engine import trainer as trainer_module

    plain = Trainer(small_run(tiny_dataset, tmp_path / "plain", epochs=2, batch_size=64)).fit()

    def fail(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(trainer_module, "graphs_decision", lambda *a, **k: (True, "on"))
    monkeypatch.setattr(GraphedStep, "capture", fail)
    monkeypatch.setattr(Forecaster, "_capture", fail)
    with pytest.warns(UserWarning) as record:
        eager = Trainer(small_run(tiny_dataset, tmp_path / "auto", epochs=2, batch_size=64)).fit()
    said = " ".join(str(w.message) for w in record)
    assert "capture of the training step failed" in said and "capture of the forecast failed" in said
    assert said.count("running it eagerly") == 2  # once each: no second attempt
    assert eager.best_val_mae == plain.best_val_mae and eager.test_metrics.equals(plain.test_metrics)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        Trainer(small_run(tiny_dataset, tmp_path / "on", epochs=1, batch_size=64, cuda_graphs="on")).fit()
