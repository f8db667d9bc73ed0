"""bf16 on the CPU: autocast with fp32 master weights, close to fp32, and a warning where the
CPU only emulates bf16 (no AVX512-BF16 or AMX), which makes it many times slower."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from gwnet.config import GWNetConfig
from gwnet.engine import device as device_module
from gwnet.engine import load_trained, train
from gwnet.nn import GWNet

from test_train import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta",
                                        "ignore:Sparse invariant checks are implicitly disabled")


def _model(nodes=12):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    adj = (torch.rand(nodes, nodes, generator=g) < 0.3).float() + torch.eye(nodes)
    supports = [adj / adj.sum(1, keepdim=True), adj.t() / adj.t().sum(1, keepdim=True)]
    cfg = GWNetConfig.improved(num_nodes=nodes, dropout=0.0, residual_channels=8, dilation_channels=8,
                               skip_channels=16, end_channels=16, apt_size=4)
    return GWNet(cfg, supports)


def _loss_and_grads(model, x, y, bf16):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = model(x)
    loss = F.l1_loss(out.float(), y)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_bf16_cpu_step_is_finite_and_close_to_fp32():
    model = _model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 12, 12, 2, generator=g)
    y = torch.randn(4, 12, 12, generator=g)
    loss32, grad32 = _loss_and_grads(model, x, y, bf16=False)
    loss16, grad16 = _loss_and_grads(model, x, y, bf16=True)
    # Master weights stay fp32; only the computation is bf16 (8 bits of mantissa).
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(loss16) and torch.isfinite(grad16).all()
    assert abs(loss16 - loss32) / loss32 < 0.02
    cosine = F.cosine_similarity(grad16, grad32, dim=0)
    assert cosine > 0.99
    # ... and it is bf16 that ran: the results differ from fp32's beyond float32 rounding.
    assert (grad16 - grad32).abs().max() > 1e-6


def test_bf16_is_refused_nowhere_but_warned_about_where_emulated(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device_module, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        device_module.check_precision(cpu, "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        device_module.check_precision(cpu, "fp32")
        monkeypatch.setattr(device_module, "native_bf16", lambda: True)
        device_module.check_precision(cpu, "bf16")


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    device_module.native_bf16.cache_clear()
    fake = tmp_path / "cpuinfo"
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(fake if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    try:
        fake.write_text("processor : 0\nflags : fpu avx2 fma\n")
        assert device_module.native_bf16() is False
        device_module.native_bf16.cache_clear()
        fake.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16 amx_tile\n")
        assert device_module.native_bf16() is True
    finally:
        device_module.native_bf16.cache_clear()


def test_training_in_bf16_on_cpu_runs_and_warns_where_emulated(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(device_module, "native_bf16", lambda: False)
    cfg = tiny_config(tiny_dataset, tmp_path / "run", epochs=1, precision="bf16")
    cfg.train.batches_per_epoch = 2
    with pytest.warns(UserWarning, match="emulated"):
        result = train(cfg)
    assert torch.isfinite(torch.tensor(result.test_metrics.loc["mean", "mae"]))
    # Its forecasts run in bf16 too: loading the run for prediction says so as well.
    with pytest.warns(UserWarning, match="emulated"):
        load_trained(result.run_dir)
