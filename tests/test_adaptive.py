"""The scalable adaptive adjacencies (adaptive=topk, lowrank): selection, semantics,
gradients, the model with them, and that no N x N tensor is ever built."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gwnet.config import GWNetConfig
from gwnet.errors import GWNetError
from gwnet.nn import GWNet
from gwnet.nn.adaptive import (AdaptiveAdjacency, LowRankAdaptiveAdjacency, LowRankSupport,
                               TopKAdaptiveAdjacency, TopKSupport, build_adaptive,
                               positive_features, topk_indices)
from gwnet.nn.graph_conv import DiffusionGraphConv

warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")


def tiny(**kw) -> GWNetConfig:
    base = dict(num_nodes=6, in_dim=2, out_dim=3, num_supports=2, residual_channels=8,
                dilation_channels=8, skip_channels=16, end_channels=16, blocks=2, layers=2,
                apt_size=3, dropout=0.0)
    return GWNetConfig(**{**base, **kw})


def random_supports(n: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        a = torch.rand(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.4) + torch.eye(n)
        out.append(a / a.sum(1, keepdim=True))
    return out


def build(cfg: GWNetConfig, seed: int = 0) -> GWNet:
    torch.manual_seed(seed)
    return GWNet(cfg, random_supports(cfg.num_nodes, cfg.num_supports))


def inputs(cfg: GWNetConfig, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 12, cfg.num_nodes, cfg.in_dim,
                       generator=torch.Generator().manual_seed(seed))


def dense_topk(src: torch.Tensor, dst: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k semantics on the dense matrix: softmax(relu(logits)) restricted to the k
    largest logits of each row and renormalised."""
    logits = src @ dst.t()
    index = logits.topk(k, dim=1).indices
    kept = torch.full_like(logits, float("-inf")).scatter(1, index, F.relu(logits).gather(1, index))
    return torch.softmax(kept, dim=1)


@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 50])
def test_chunked_topk_equals_dense_topk(chunk):
    g = torch.Generator().manual_seed(0)
    src, dst = torch.randn(23, 4, generator=g), torch.randn(19, 4, generator=g)
    got = topk_indices(src, dst, 5, chunk)
    values, index = (src @ dst.t()).topk(5, dim=1)
    assert got.shape == (23, 5) and got.dtype == torch.long
    assert torch.equal(got, index.sort(1).values)  # continuous data: no ties
    torch.testing.assert_close((src @ dst.t()).gather(1, got).sort(1).values, values.sort(1).values)


def test_topk_rows_are_renormalised_restriction_of_dense():
    torch.manual_seed(0)
    for stable in (False, True):
        adp = TopKAdaptiveAdjacency(11, 3, k=4, stable=stable)
        support = adp()
        assert isinstance(support, TopKSupport) and support.values.shape == (11, 4)
        src, dst = adp.embeddings()
        torch.testing.assert_close(adp.dense(), dense_topk(src, dst, 4))
        torch.testing.assert_close(adp.dense().sum(1), torch.ones(11))
        assert (adp.dense() > 0).sum(1).eq(4).all()
    # k = N: the dense adjacency itself.
    full = TopKAdaptiveAdjacency(8, 3, k=8)
    dense = AdaptiveAdjacency(8, 3)
    dense.load_state_dict(full.state_dict())
    torch.testing.assert_close(full.dense(), dense())


@pytest.mark.parametrize("sddmm", [True, False])
def test_topk_propagation_gradcheck(sddmm, monkeypatch):
    if not sddmm:  # the chunked-gather fallback for devices without sampled_addmm
        def missing(*args, **kwargs):
            raise NotImplementedError
        monkeypatch.setattr(torch.sparse, "sampled_addmm", missing)
        monkeypatch.setattr("gwnet.nn.adaptive.CHUNK_ENTRIES", 10)
    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(7)]).sort(1).values
    values = torch.rand(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v, x: TopKSupport(index, v).propagate(x), (values, h))
    # And against the dense formula A^T h.
    support = TopKSupport(index, values)
    torch.testing.assert_close(support.propagate(h), support.dense().t() @ h)


@pytest.mark.parametrize("kind", ["topk", "lowrank"])
@pytest.mark.parametrize("stable", [False, True])
def test_embedding_gradients_match_dense_formula(kind, stable):
    torch.manual_seed(0)
    adp = build_adaptive(kind, 9, 3, stable=stable, k=4, rank=16).double()
    h = torch.randn(9, 2, 5, dtype=torch.float64)
    weight = torch.randn(9, 2, 5, dtype=torch.float64)

    def grads(loss):
        adp.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in adp.parameters()]

    support = adp()
    out = support.propagate(h)
    assert out.shape == h.shape
    fast = grads((out * weight).sum())
    dense = adp.dense()
    reference = torch.einsum("vw,vbc->wbc", dense, h)
    torch.testing.assert_close(out, reference)
    for a, b in zip(fast, grads((reference * weight).sum())):
        torch.testing.assert_close(a, b)


def test_lowrank_propagation_gradcheck():
    g = torch.Generator().manual_seed(0)
    q = torch.rand(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.rand(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b, x: LowRankSupport(a, b).propagate(x), (q, k, h))


def test_lowrank_is_row_stochastic_and_estimates_the_softmax():
    torch.manual_seed(0)
    adp = LowRankAdaptiveAdjacency(10, 3, rank=8)
    a = adp.dense()
    assert a.shape == (10, 10) and (a > 0).all()
    torch.testing.assert_close(a.sum(1), torch.ones(10))
    assert "features" in adp.state_dict() and adp.features.shape == (8, 3)
    # Many features: close to softmax(E1 E2) (no ReLU: the kernel form has none).
    with torch.no_grad():
        adp.nodevec1.mul_(0.5), adp.nodevec2.mul_(0.5)
        wide = LowRankAdaptiveAdjacency(10, 3, rank=200_000)
        wide.load_state_dict({**adp.state_dict(), "features": wide.features})
        target = torch.softmax(adp.nodevec1 @ adp.nodevec2, dim=1)
        torch.testing.assert_close(wide.dense(), target, rtol=0, atol=0.02)
    # The stabilisers of positive_features cancel in the normalisation.
    x, w = torch.randn(5, 3), torch.randn(4, 3)
    shifted = positive_features(x, w, per_row=True)
    raw = torch.exp(x @ w.t() - 0.5 * x.square().sum(1, keepdim=True)) / 2
    torch.testing.assert_close(shifted / shifted.sum(1, keepdim=True),
                               raw / raw.sum(1, keepdim=True))
    before = adp.features.clone()
    adp.reset_parameters()
    assert not torch.equal(adp.features, before)


@pytest.mark.parametrize("kind", ["topk", "lowrank"])
@pytest.mark.parametrize("kernel", ["fast", "dense"])
def test_model_with_scalable_adaptive_trains_a_step(kind, kernel):
    cfg = tiny(adaptive=kind, adaptive_k=3, adaptive_rank=8, graph_conv=kernel)
    model = build(cfg)
    assert type(model.adaptive) is {"topk": TopKAdaptiveAdjacency,
                                    "lowrank": LowRankAdaptiveAdjacency}[kind]
    x = inputs(cfg)
    y = torch.randn(3, cfg.out_dim, cfg.num_nodes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    out = model(x)
    assert out.shape == (3, cfg.out_dim, cfg.num_nodes)
    loss = F.l1_loss(out, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.adaptive.nodevec1.grad.abs().sum() > 0
    before = model.adaptive.nodevec1.detach().clone()
    opt.step()
    assert not torch.equal(model.adaptive.nodevec1, before)
    assert F.l1_loss(model(x), y) < loss  # a small step downhill


@pytest.mark.parametrize("kernel", ["fast", "dense"])
def test_topk_with_k_equal_n_matches_dense_model(kernel):
    cfg = tiny(graph_conv=kernel)
    dense = build(cfg)
    topk = build(dataclasses.replace(cfg, adaptive="topk", adaptive_k=cfg.num_nodes))
    topk.load_state_dict(dense.state_dict())
    x = inputs(cfg)
    expected, got = dense(x), topk(x)
    torch.testing.assert_close(got, expected)
    expected.square().mean().backward()
    got.square().mean().backward()
    grads = dict(dense.named_parameters())
    for name, p in topk.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


def test_graph_conv_takes_operator_supports_anywhere():
    # An operator between two tensor supports: the weight blocks still line up.
    torch.manual_seed(0)
    a1, a2 = random_supports(5, 2)
    topk = TopKAdaptiveAdjacency(5, 2, k=5)
    x = torch.randn(5, 2, 3, 3)
    for kernel in ("fast", "dense"):
        conv = DiffusionGraphConv(3, 4, num_supports=3, order=2, kernel=kernel)
        expected = conv(x, [a1, topk.dense(), a2])
        torch.testing.assert_close(conv(x, [a1, topk(), a2]), expected)
        with torch.autocast("cpu", torch.bfloat16):
            mixed = conv(x, [a1, topk(), a2])
        torch.testing.assert_close(mixed.float(), expected, rtol=0.05, atol=0.05)


class _LargestSquare(TorchDispatchMode):
    """Records every strided tensor an op returns with two dimensions equal to ``n``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.found = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided \
                    and sum(d == self.n for d in t.shape) >= 2:
                self.found.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("kind", ["topk", "lowrank"])
def test_no_n_by_n_tensor_in_forward_and_backward(kind, monkeypatch):
    n = 37  # no other size of the model is 37
    monkeypatch.setattr("gwnet.nn.adaptive.CHUNK_ENTRIES", 8 * n)  # 8-row selection chunks
    cfg = tiny(num_nodes=n, num_supports=0, aptonly=True, adaptive=kind, adaptive_k=5,
               adaptive_rank=8)
    model = build(cfg)
    x = inputs(cfg, batch=2)
    spy = _LargestSquare(n)
    with spy:
        model(x).square().mean().backward()
    assert spy.found == []
    # The spy does see the dense form's matrix.
    dense = build(tiny(num_nodes=n, num_supports=0, aptonly=True))
    with _LargestSquare(n) as spy:
        dense(x).square().mean().backward()
    assert spy.found


def test_large_graph_forward_holds_no_n_by_n_tensor():
    n = 3000
    torch.manual_seed(0)
    h = torch.randn(n, 4)
    for adp in (TopKAdaptiveAdjacency(n, 10, k=20), LowRankAdaptiveAdjacency(n, 10, rank=16)):
        with _LargestSquare(n) as spy:
            out = adp().propagate(h)
            out.sum().backward()
        assert out.shape == (n, 4) and spy.found == []


def test_config_validation_and_build_time_checks():
    for bad in (dict(adaptive="sparse"), dict(adaptive_k=0), dict(adaptive_rank=0)):
        with pytest.raises(GWNetError):
            tiny(**bad).validate()
    tiny(adaptive="topk", adaptive_k=50).validate()  # k <= N is checked at build time
    with pytest.raises(GWNetError, match="adaptive_k must be in"):
        build(tiny(adaptive="topk", adaptive_k=7))
    with pytest.raises(GWNetError, match="not one of"):
        build_adaptive("sparse", 4, 2)
    assert GWNetConfig().adaptive == "dense"
    assert type(build(tiny()).adaptive) is AdaptiveAdjacency


def test_svd_init_and_plot_dense_for_scalable_forms():
    (support,) = random_supports(6, 1)
    for kind in ("topk", "lowrank"):
        adp = build_adaptive(kind, 6, 6, init_support=support, k=3, rank=4)
        torch.testing.assert_close(adp.nodevec1 @ adp.nodevec2, support, rtol=1e-4, atol=1e-5)
    from gwnet.ensemble.plots import adaptive_adjacency
    model = build(tiny(adaptive="topk", adaptive_k=2))
    a = adaptive_adjacency(model)
    assert a.shape == (6, 6) and ((a > 0).sum(1) == 2).all()
    assert adaptive_adjacency(build(tiny())).shape == (6, 6)
