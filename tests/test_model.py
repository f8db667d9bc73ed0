"""GWNet and its layers: shapes, parameter counts, gradients, the two graph-conv kernels."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gwnet.config import GWNetConfig
from gwnet.errors import GWNetError
from gwnet.nn import (AdaptiveAdjacency, DiffusionGraphConv, GatedTemporalConv, GWNet,
                      load_for_more_horizons, prepare_support)




def tiny(**kw) -> GWNetConfig:
    base = dict(num_nodes=6, in_dim=2, out_dim=3, num_supports=2, residual_channels=8,
                dilation_channels=8, skip_channels=16, end_channels=16, blocks=2, layers=2,
                apt_size=3, dropout=0.0)
    return GWNetConfig(**{**base, **kw})


def random_supports(n: int, k: int, density: float = 0.4, seed: int = 0) -> list[torch.Tensor]:
    """Row-normalised random adjacencies with self-loops (row = source node)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        a = torch.rand(n, n, generator=g) * (torch.rand(n, n, generator=g) < density)
        a = a + torch.eye(n)
        out.append(a / a.sum(1, keepdim=True))
    return out


def build(cfg: GWNetConfig, seed: int = 0, supports=None) -> GWNet:
    torch.manual_seed(seed)
    if supports is None:
        supports = random_supports(cfg.num_nodes, cfg.num_supports)
    return GWNet(cfg, supports)


def inputs(cfg: GWNetConfig, steps: int = 12, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, steps, cfg.num_nodes, cfg.in_dim,
                       generator=torch.Generator().manual_seed(seed))


OPTIONS = {
    "default": {},
    "no-cat-feat-gc": dict(cat_feat_gc=False),
    "no-graph-conv": dict(do_graph_conv=False),
    "no-graph-conv-no-cat": dict(do_graph_conv=False, cat_feat_gc=False),
    "no-adaptive": dict(addaptadj=False),
    "aptonly": dict(aptonly=True, num_supports=0),
    "aptonly-svd": dict(aptonly=True, num_supports=1, randomadj=False),
    "svd-init": dict(randomadj=False),
    "stable-embedding": dict(stable_embedding=True),
    "order-1": dict(order=1),
    "order-3": dict(order=3),
    "kernel-3": dict(kernel_size=3),
    "blocks-1x3": dict(blocks=1, layers=3),
    "blocks-3x1": dict(blocks=3, layers=1),
    "single-layer": dict(blocks=1, layers=1),
    "0-supports": dict(num_supports=0),
    "0-supports-no-adaptive": dict(num_supports=0, addaptadj=False),
    "1-support": dict(num_supports=1),
    "3-features": dict(in_dim=3),
    "1-feature": dict(in_dim=1, cat_feat_gc=False),
    "wider-dilation": dict(cat_feat_gc=False, dilation_channels=12),
    "dropout": dict(dropout=0.3),
}


@pytest.mark.parametrize("kernel", ["fast", "dense"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_output_shape_and_every_parameter_learns(name, kernel):
    cfg = tiny(graph_conv=kernel, **OPTIONS[name])
    model = build(cfg).train()
    for steps in (3, cfg.receptive_field, cfg.receptive_field + 4):
        out = model(inputs(cfg, steps))
        assert out.shape == (3, cfg.out_dim, cfg.num_nodes)
        assert torch.isfinite(out).all()
    out.square().mean().backward()
    # Only modules the forward pass uses are built, so each parameter gets a gradient.
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


def test_parameter_counts_of_the_presets():
    supports = random_supports(207, 2)
    count = lambda cfg: sum(p.numel() for p in GWNet(cfg, supports).parameters())
    assert count(GWNetConfig.original()) == 293_688
    assert count(GWNetConfig.improved()) == 453_472


def test_modules_the_forward_pass_never_uses_are_not_built():
    model = build(tiny())
    *inner, last = model.layers
    assert all(layer.residual is None and layer.graph_conv is not None for layer in inner)
    assert last.graph_conv is None and last.norm is None and last.residual is None
    plain = build(tiny(do_graph_conv=False))
    assert plain.adaptive is None and plain.num_fixed == 0
    assert all(layer.graph_conv is None for layer in plain.layers)
    assert all(layer.residual is not None for layer in plain.layers[:-1])


def test_graph_conv_input_width_counts_fixed_and_adaptive_supports():
    assert build(tiny(order=3)).layers[0].graph_conv.weight.shape == (8, (3 * 3 + 1) * 8)
    assert build(tiny(addaptadj=False)).layers[0].graph_conv.weight.shape == (8, 5 * 8)
    assert build(tiny(aptonly=True, num_supports=0)).layers[0].graph_conv.weight.shape == (8, 3 * 8)


def test_receptive_field():
    assert GWNetConfig.improved().receptive_field == 13
    assert build(tiny()).receptive_field == 7
    assert build(tiny(kernel_size=3, blocks=4, layers=2)).receptive_field == 25
    assert build(tiny(blocks=3, layers=1)).receptive_field == 4


def test_output_sees_exactly_the_receptive_field():
    cfg = tiny(kernel_size=3)
    model = build(cfg).eval()
    rf = cfg.receptive_field
    x = inputs(cfg, rf + 4)
    base = model(x)
    older = x.clone()
    older[:, :4] += 5.0
    assert torch.equal(model(older), base)
    oldest_seen = x.clone()
    oldest_seen[:, 4] += 5.0
    assert not torch.allclose(model(oldest_seen), base)


def test_short_inputs_are_left_padded_with_zeros():
    cfg = tiny()
    model = build(cfg).eval()
    x = inputs(cfg, 4)
    padded = torch.cat([torch.zeros(3, cfg.receptive_field - 4, cfg.num_nodes, cfg.in_dim), x], 1)
    torch.testing.assert_close(model(x), model(padded), rtol=0, atol=0)


def test_gradient_reaches_the_start_convolutions():
    cfg = tiny()
    model = build(cfg)
    x = inputs(cfg).requires_grad_()
    model(x).sum().backward()
    assert model.start_conv.weight.grad.abs().sum() > 0
    assert model.cat_feature_conv.weight.grad.abs().sum() > 0
    assert x.grad[..., 0].abs().sum() > 0 and x.grad[..., 1].abs().sum() > 0


def test_construction_is_deterministic_given_the_torch_seed():
    cfg = tiny()
    a, b, c = build(cfg, seed=3), build(cfg, seed=3), build(cfg, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    x = inputs(cfg)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_reset_parameters_redraws_everything_but_svd_embeddings():
    model = build(tiny(randomadj=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_parameters()
    after = model.state_dict()
    same = {k for k in before if torch.equal(before[k], after[k])}
    # Batch norms start from constants and SVD factors are deterministic; the rest is redrawn.
    assert {k for k in same if ".norm." not in k} == {"adaptive.nodevec1", "adaptive.nodevec2"}


def _fast_and_dense(cfg: GWNetConfig, supports) -> tuple[GWNet, GWNet]:
    fast = build(dataclasses.replace(cfg, graph_conv="fast"), supports=supports)
    dense = GWNet(dataclasses.replace(cfg, graph_conv="dense"), supports)
    dense.load_state_dict(fast.state_dict())
    return fast, dense


def _forward_backward(model: GWNet, x: torch.Tensor):
    torch.manual_seed(7)  # the same dropout masks for both kernels
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


@pytest.mark.parametrize("layout", ["dense", "csr", "coo"])
@pytest.mark.parametrize("name", ["default", "no-cat-feat-gc", "order-3", "aptonly", "dropout",
                                  "kernel-3"])
def test_fast_and_dense_kernels_agree(name, layout):
    cfg = tiny(num_nodes=40, **OPTIONS[name])
    # ~7% non-zero (self-loops included): sparse enough for the fast kernel's CSR path.
    supports = random_supports(40, cfg.num_supports, density=0.04)
    given = {"dense": supports, "csr": [s.to_sparse_csr() for s in supports],
             "coo": [s.to_sparse() for s in supports]}[layout]
    fast, dense = _fast_and_dense(cfg, given)
    if cfg.num_supports and not cfg.aptonly:
        assert fast.support_0.layout == torch.sparse_csr
        assert dense.support_0.layout == torch.strided
    x = inputs(cfg, 10)
    out_f, grads_f = _forward_backward(fast.train(), x)
    out_d, grads_d = _forward_backward(dense.train(), x)
    assert _rel(out_f, out_d) < 1e-4
    # Relative to each gradient, floored for the biases right before a batch norm: their
    # gradient is 0 up to rounding (the norm removes per-channel constants).
    floor = 1e-3 * max(g.norm() for g in grads_d.values())
    for n in grads_d:
        assert _rel(grads_f[n], grads_d[n], floor) < 1e-4, n
    torch.testing.assert_close(fast.eval()(x), dense.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["fast", "dense"])
def test_bfloat16_autocast_runs_both_kernels(kernel):
    cfg = tiny(num_nodes=40, graph_conv=kernel)
    model = build(cfg, supports=random_supports(40, 2, density=0.04))
    x = inputs(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert _rel(out.float(), model(x).detach()) < 0.05


def test_supports_are_buffers_outside_the_state_dict():
    cfg = tiny()
    model = build(cfg)
    assert "support_0" in dict(model.named_buffers())
    assert not any(k.startswith("support") for k in model.state_dict())
    model = model.to(torch.float64)
    assert model.support_0.dtype == torch.float64
    assert model(inputs(cfg).double()).dtype == torch.float64


def test_dense_graphs_stay_dense_in_the_fast_kernel():
    dense = torch.ones(5, 5) / 5
    assert prepare_support(dense, "fast").layout == torch.strided
    sparse = torch.eye(40)
    assert prepare_support(sparse, "fast").layout == torch.sparse_csr
    assert prepare_support(sparse.to_sparse(), "dense").layout == torch.strided


@pytest.mark.parametrize("change, message", [
    (dict(supports=1), "expects 2 fixed supports"),
    (dict(shape=5), "supports must be 6x6"),
    (dict(cfg=dict(aptonly=True, addaptadj=False, num_supports=0)), "aptonly needs"),
    (dict(cfg=dict(randomadj=False, num_supports=0)), "there is none"),
    (dict(cfg=dict(dilation_channels=4)), "dilation_channels must equal"),
    (dict(cfg=dict(graph_conv="sparse")), "graph_conv='sparse'"),
    (dict(cfg=dict(in_dim=1)), "at least 2 input features"),
    (dict(cfg=dict(randomadj=False, apt_size=7)), "apt_size 7 exceeds"),
])
def test_configuration_mistakes_are_gwnet_errors(change, message):
    cfg = tiny(**change.get("cfg", {}))
    supports = random_supports(change.get("shape", cfg.num_nodes),
                               change.get("supports", cfg.num_supports))
    with pytest.raises(GWNetError, match=message):
        GWNet(cfg, supports)


def test_wrong_input_shape_is_a_gwnet_error():
    cfg = tiny()
    model = build(cfg)
    with pytest.raises(GWNetError, match="6 nodes, 2 features"):
        model(torch.randn(2, 12, 5, 2))
    with pytest.raises(GWNetError):
        model(torch.randn(12, 6, 2))


def test_more_horizons_copy_the_known_rows_and_keep_the_rest():
    short, long = build(tiny(out_dim=3), seed=0), build(tiny(out_dim=5), seed=1)
    fresh = long.end_conv_2.weight.detach().clone(), long.end_conv_2.bias.detach().clone()
    load_for_more_horizons(long, short.state_dict())
    for key, value in short.state_dict().items():
        if not key.startswith("end_conv_2."):
            assert torch.equal(long.state_dict()[key], value), key
    assert torch.equal(long.end_conv_2.weight[:3], short.end_conv_2.weight)
    assert torch.equal(long.end_conv_2.weight[3:], fresh[0][3:])
    assert torch.equal(long.end_conv_2.bias[:3], short.end_conv_2.bias)
    assert torch.equal(long.end_conv_2.bias[3:], fresh[1][3:])
    x = inputs(tiny())
    torch.testing.assert_close(long.eval()(x)[:, :3], short.eval()(x), rtol=1e-6, atol=1e-6)


def test_more_horizons_refuses_other_differences():
    long = build(tiny(out_dim=5))
    with pytest.raises(GWNetError, match="run.pt: layers.0.skip.weight has shape"):
        load_for_more_horizons(long, build(tiny(skip_channels=8)).state_dict(), source="run.pt")
    with pytest.raises(GWNetError, match="end_conv_2.weight has shape"):
        load_for_more_horizons(build(tiny(out_dim=3)), long.state_dict())
    state = build(tiny(out_dim=3)).state_dict()
    del state["layers.1.skip.bias"]
    with pytest.raises(GWNetError, match="missing key.*layers.1.skip.bias"):
        load_for_more_horizons(long, state)
    state = build(tiny(out_dim=3)).state_dict()
    state["extra"] = torch.zeros(1)
    with pytest.raises(GWNetError, match="unexpected key.*extra"):
        load_for_more_horizons(long, state)


# --- the layers on their own ---------------------------------------------------------------

def test_gated_temporal_conv_is_a_dilated_conv2d_without_padding():
    torch.manual_seed(0)
    conv = GatedTemporalConv(4, 5, kernel_size=3, dilation=2)
    x = torch.randn(6, 11, 2, 4)  # (nodes, time, batch, channels)
    out = conv(x)
    assert out.shape == (6, 11 - 4, 2, 5)
    ref = F.conv2d(x.permute(2, 3, 0, 1), conv.weight.unsqueeze(2), conv.bias, dilation=(1, 2))
    filt, gate = ref.chunk(2, dim=1)
    torch.testing.assert_close(out, (torch.tanh(filt) * torch.sigmoid(gate)).permute(2, 3, 0, 1))
    assert repr(conv) == "GatedTemporalConv(4, 5, kernel_size=3, dilation=2)"
    # gradients of the weights and the input: those of the plain formula
    x.requires_grad_()
    probe = torch.randn(out.shape)
    got = torch.autograd.grad((conv(x) * probe).sum(), [x, conv.weight, conv.bias])
    ref = F.conv2d(x.permute(2, 3, 0, 1), conv.weight.unsqueeze(2), conv.bias, dilation=(1, 2))
    filt, gate = ref.chunk(2, dim=1)
    plain = (torch.tanh(filt) * torch.sigmoid(gate)).permute(2, 3, 0, 1)
    torch.testing.assert_close(got, torch.autograd.grad((plain * probe).sum(),
                                                        [x, conv.weight, conv.bias]))


def test_gated_temporal_conv_keeps_tanh_of_small_inputs_under_bf16_autocast():
    # 2 sigmoid(2f) - 1 is for fp32 only: in bf16 it would round tanh of small f away
    torch.manual_seed(0)
    conv = GatedTemporalConv(4, 5)
    with torch.no_grad():
        conv.weight.mul_(0.01), conv.bias.zero_()
    x = torch.randn(6, 11, 2, 4)
    exact = conv.double()(x.double()).detach()
    conv.float()
    with torch.autocast("cpu", torch.bfloat16):
        got = conv(x).detach()
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() / exact.abs()).median() < 0.02


def test_gate_is_tanh_times_sigmoid_with_its_gradients():
    from gwnet.nn.temporal import _Gate

    torch.manual_seed(0)
    f = torch.randn(300, dtype=torch.float64, requires_grad=True) * 4
    g = torch.randn(300, dtype=torch.float64, requires_grad=True) * 4
    # _Gate takes z = 2f
    assert torch.autograd.gradcheck(_Gate.apply, (2 * f.detach().requires_grad_(), g))
    out = _Gate.apply(2 * f, g)
    torch.testing.assert_close(out, torch.tanh(f) * torch.sigmoid(g), rtol=1e-12, atol=1e-12)
    # float32: near f = 0, 2 sigmoid(2f) - 1 loses relative precision, not absolute
    f32, g32 = f.detach().float(), g.detach().float()
    assert (_Gate.apply(2 * f32, g32) - torch.tanh(f32) * torch.sigmoid(g32)).abs().max() < 1e-6


def test_graph_conv_dropout_drops_p_independently_and_keeps_the_mean():
    from gwnet.nn.graph_conv import _dropout

    x = torch.ones(200_001)  # odd: the last draw gives one element
    torch.manual_seed(3)
    y = _dropout(x, 0.3, training=True)
    dropped = y == 0
    n, p = x.numel(), 9830 / 32768  # 0.3 rounded to a multiple of 2^-15
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.float().mean() - p) < 4 * sigma
    torch.testing.assert_close(y[~dropped], torch.full_like(y[~dropped], 1 / (1 - p)))
    assert abs(y.mean() - 1) < 4 * sigma / (1 - p)
    # the two elements of one 31-bit draw are independent: both dropped with probability p^2
    pairs = dropped[:-1].view(-1, 2)
    both = pairs.all(1).float().mean()
    assert abs(both - p * p) < 4 * (p * p * (1 - p * p) / pairs.size(0)) ** 0.5
    torch.manual_seed(3)
    assert torch.equal(_dropout(x, 0.3, training=True), y)  # one seed, one mask
    assert _dropout(x, 0.3, training=False) is x
    # a p that rounds to 0 in 2^-15 steps still drops (about 20 of 2 million elements)
    assert 0 < (_dropout(torch.ones(2_000_000), 1e-5, training=True) == 0).sum() < 60
    assert not _dropout(x, 1.0, training=True).any()


@pytest.mark.parametrize("kernel", ["fast", "dense"])
def test_diffusion_graph_conv_sums_over_source_nodes(kernel):
    torch.manual_seed(0)
    conv = DiffusionGraphConv(3, 4, num_supports=2, order=2, kernel=kernel)
    a1, a2 = random_supports(5, 2)
    x = torch.randn(5, 2, 3, 3)  # (nodes, time, batch, channels)
    # The reference's block order: x, A1 x, A1^2 x, A2 x, A2^2 x with (A x)_w = sum_v A_vw x_v.
    blocks = [x, *(torch.einsum("vw,vlbc->wlbc", torch.linalg.matrix_power(a, k), x)
                   for a in (a1, a2) for k in (1, 2))]
    expected = torch.cat(blocks, -1) @ conv.weight.t() + conv.bias
    torch.testing.assert_close(conv(x, [prepare_support(a1, kernel), a2]), expected)
    with pytest.raises(GWNetError, match="built for 2 supports"):
        conv(x, [a1])
    assert repr(conv) == f"DiffusionGraphConv(3, 4, num_supports=2, order=2, kernel='{kernel}')"


def test_cpu_products_through_convolutions_equal_the_gemms(monkeypatch):
    from gwnet.nn import graph_conv

    torch.manual_seed(0)
    a, h = torch.rand(7, 7), torch.randn(7, 30)
    torch.testing.assert_close(graph_conv._matmul(a, h), a @ h)
    torch.testing.assert_close(graph_conv._matmul(a.t(), h), a.t() @ h)  # a transposed view
    # a CSR support writes into a fresh buffer with beta=0: whatever the buffer held is ignored
    sparse = torch.zeros(7, 7)
    sparse[0, 3], sparse[4, 1], sparse[6, 6] = 0.5, 2.0, 1.5
    csr = prepare_support(sparse)
    assert csr.layout == torch.sparse_csr
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *size, **kw: torch.full(size, float("nan"), **kw))
    torch.testing.assert_close(graph_conv._matmul(csr, h), sparse @ h)
    monkeypatch.undo()
    x2, w, b = torch.randn(50, 4), torch.randn(3, 8), torch.randn(3)
    torch.testing.assert_close(graph_conv._project(x2, w[:, 4:], b), x2 @ w[:, 4:].t() + b)
    torch.testing.assert_close(graph_conv._project(x2, w[:, :4]), x2 @ w[:, :4].t())
    # the fast kernel's output and gradients are those of the plain GEMMs (above the size
    # limit every dense product is one)
    conv = DiffusionGraphConv(4, 3, num_supports=2, order=2)
    x = torch.randn(7, 5, 2, 4, requires_grad=True)
    adaptive = torch.softmax(torch.randn(7, 7), 1).requires_grad_()

    def run():
        out = conv(x, [prepare_support(torch.rand(7, 7)), adaptive])
        grads = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(),
                                    [x, adaptive, conv.weight])
        return out, grads

    torch.manual_seed(1)
    with_conv = run()
    monkeypatch.setattr(graph_conv, "CONV_MATMUL_NODES", 0)
    torch.manual_seed(1)
    with_gemm = run()
    torch.testing.assert_close(with_conv, with_gemm)


def test_adaptive_adjacency_rows_are_distributions():
    torch.manual_seed(0)
    for stable in (False, True):
        adp = AdaptiveAdjacency(7, 3, stable=stable)()
        assert adp.shape == (7, 7) and (adp >= 0).all()
        torch.testing.assert_close(adp.sum(1), torch.ones(7))


def test_adaptive_adjacency_svd_init_factors_the_support():
    (support,) = random_supports(6, 1)
    full = AdaptiveAdjacency(6, 6, init_support=support)
    torch.testing.assert_close(full.nodevec1 @ full.nodevec2, support, rtol=1e-4, atol=1e-5)
    low = AdaptiveAdjacency(6, 2, init_support=support.to_sparse_csr())
    u, s, vh = torch.linalg.svd(support)
    torch.testing.assert_close(low.nodevec1 @ low.nodevec2, (u[:, :2] * s[:2]) @ vh[:2],
                               rtol=1e-4, atol=1e-5)
    assert repr(low) == "AdaptiveAdjacency(6, apt_size=2, init=svd, stable=False)"


def test_stable_embedding_uses_xavier_init_and_layer_norm():
    torch.manual_seed(0)
    emb = AdaptiveAdjacency(50, 10, stable=True)
    bound = (6 / (50 + 10)) ** 0.5
    assert emb.nodevec1.abs().max() <= bound and emb.nodevec2.abs().max() <= bound
    assert isinstance(emb.norm1, torch.nn.LayerNorm) and emb.norm1.normalized_shape == (10,)
    assert {n for n, _ in emb.named_parameters()} == {
        "nodevec1", "nodevec2", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"}
    # A layer norm per node makes the logits blind to each embedding's scale (up to its eps).
    before = emb()
    with torch.no_grad():
        emb.nodevec1.mul_(3.0)
    torch.testing.assert_close(emb(), before, rtol=0, atol=1e-3)


def test_model_repr_is_one_line_summary():
    text = repr(build(tiny()))
    assert text.startswith("GWNet(nodes=6, in_dim=2, out_dim=3, layers=2x2")
    assert "supports=2+adaptive" in text and "graph_conv='fast'" in text
