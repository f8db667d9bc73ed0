"""The benchmark's reference-structured baseline computes exactly what GWNet does.

``experiments/reference_gwnet.py`` is the dense, reference-structured model the speed-ups in
``experiments/benchmark.py`` are measured against; here only numerical equality is checked
(outputs and gradients, both graph-conv kernels, shared weights), never speed.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gwnet.config import GWNetConfig
from gwnet.nn import GWNet, prepare_support

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta",
                                        "ignore:Sparse invariant checks are implicitly disabled")

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference_gwnet = _load("reference_gwnet")
NODES = 25


def _graph(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    adj = (torch.rand(NODES, NODES, generator=g) < 0.15).float() * torch.rand(NODES, NODES, generator=g)
    adj.fill_diagonal_(1.0)
    return [adj / adj.sum(1, keepdim=True), adj.t() / adj.t().sum(1, keepdim=True)]


def _assert_grads_close(model: GWNet, expected: dict[str, torch.Tensor]) -> None:
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads.keys() == expected.keys()
    # Relative to the largest gradient: a bias followed by batch norm has a zero gradient
    # up to rounding, which no relative tolerance of its own can compare.
    scale = max(g.abs().max() for g in expected.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("kernel", ["fast", "dense"])
@pytest.mark.parametrize("change", [{}, dict(cat_feat_gc=False), dict(order=3),
                                    dict(addaptadj=False)], ids=["improved", "original-layout",
                                                                 "order-3", "fixed-only"])
def test_reference_baseline_matches_gwnet(kernel, change):
    torch.manual_seed(0)
    cfg = GWNetConfig.improved(num_nodes=NODES, dropout=0.0, graph_conv=kernel, **change)
    model = GWNet(cfg, _graph())
    ref = reference_gwnet.ReferenceGWNet.from_gwnet(model)
    x = torch.randn(3, 12, NODES, cfg.in_dim)

    out, expected = model(x), ref(x)  # training mode: batch statistics
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    (out.square().sum()).backward()
    (expected.square().sum()).backward()
    _assert_grads_close(model, ref.gwnet_grads(model))

    # Batch norm running statistics were updated alike; eval mode agrees too.
    ref.load_gwnet(model)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_sparse_supports_are_never_densified():
    n = 50_000  # dense, one support would take 10 GB
    idx = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    coo = torch.sparse_coo_tensor(idx, torch.ones(n), (n, n))
    for given in (coo, coo.to_sparse_csr()):
        support = prepare_support(given, "fast")
        assert support.layout == torch.sparse_csr and support._nnz() == n


def test_horner_kernel_matches_block_by_block_products():
    """The fast kernel's written-out backward, against autograd through the plain products."""
    torch.manual_seed(1)
    cfg = GWNetConfig.improved(num_nodes=NODES, dropout=0.0)
    model = GWNet(cfg, _graph())
    conv = model.layers[0].graph_conv
    supports = model.supports()
    x = torch.randn(NODES, 9, 4, conv.in_channels, requires_grad=True)
    weights = [x, conv.weight, conv.bias, model.adaptive.nodevec1]
    out = conv._fast(x, supports)
    got = torch.autograd.grad(out.square().sum(), weights)
    out_b = conv._fast_blocks(x, model.supports())
    torch.testing.assert_close(out, out_b, rtol=1e-5, atol=1e-5)
    expected = torch.autograd.grad(out_b.square().sum(), weights)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


shared_reference = _load("shared_reference")
step_profile = _load("step_profile")


@pytest.mark.skipif(not shared_reference.available(), reason="../shared/reference absent")
def test_benchmark_baseline_is_the_real_reference_with_our_weights():
    """The benchmark's baseline is the reference implementation itself, and the gwnet model it
    is timed against holds its weights (through gwnet's checkpoint loader) and computes the
    same function: outputs and every gradient."""
    ref = shared_reference.SharedReference.build(_graph(), seed=3)
    assert type(ref.model).__module__ == "sshleifer_gwnet_model"
    model = ref.as_gwnet(dropout=0.0)
    for conv in ref.model.graph_convs:
        conv.dropout = 0.0
    x = torch.randn(3, 12, NODES, 2)
    out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    theirs = {n: p.grad for n, p in ref.model.named_parameters() if p.grad is not None}
    # The reference's temporal convolutions are separate filter and gate convolutions;
    # gwnet's hold both, filter rows first.
    for i, layer in enumerate(model.layers):
        both = torch.cat([theirs[f"filter_convs.{i}.weight"], theirs[f"gate_convs.{i}.weight"]])
        torch.testing.assert_close(layer.temporal.weight.grad, both.flatten(1, 2), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.adaptive.nodevec1.grad, theirs["nodevec1"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.end_conv_1.weight.grad, theirs["end_conv_1.weight"].flatten(1),
                               rtol=1e-4, atol=1e-6)


def _profiled(model, nodes):
    x = torch.randn(4, 12, nodes, 2)
    y = torch.randn(4, 12, nodes)
    opt = torch.optim.Adam(model.parameters())

    def step():
        opt.zero_grad()
        torch.nn.functional.l1_loss(model(x), y).backward()
        with torch.profiler.record_function(step_profile.LABEL + "optimizer step"):
            opt.step()
    return step_profile.profile_step(model, step, nodes, repeats=1)


@pytest.mark.parametrize("which", ["fast", "dense", "reference"])
def test_step_profile_puts_each_part_where_it_belongs(which):
    torch.manual_seed(0)
    model = GWNet(GWNetConfig.improved(num_nodes=NODES, graph_conv="dense" if which == "dense" else "fast"),
                  _graph())
    if which == "reference":
        if not shared_reference.available():
            pytest.skip("../shared/reference absent")
        model = shared_reference.SharedReference.build(_graph())
    parts = _profiled(model, NODES)
    assert list(parts) == list(step_profile.PARTS)
    # Every part the model has shows up; what is left over is small.
    for part in ("temporal conv + gate", "graph conv: propagation", "graph conv: projections",
                 "skip path", "batch norm", "dropout", "start/end convs", "optimizer step"):
        assert parts[part] > 0, part
    assert parts["rest"] < 0.35 * sum(parts.values())


def test_step_profile_backward_follows_its_forward():
    """A backward GEMM is charged to the part whose forward recorded it: with the graph
    convolutions' modules unlabelled, their time (forward and backward) moves to rest."""
    torch.manual_seed(0)
    model = GWNet(GWNetConfig.improved(num_nodes=NODES, dropout=0.0), _graph())
    full = _profiled(model, NODES)
    x = torch.randn(4, 12, NODES, 2)
    y = torch.randn(4, 12, NODES)

    def step():
        torch.nn.functional.l1_loss(model(x), y).backward()
    no_graph = step_profile.profile_step(
        model, step, NODES, part_of=lambda n: None if "graph_conv" in n else step_profile.gwnet_part(n))
    assert full["graph conv: projections"] > 0 and no_graph["graph conv: projections"] == 0
    assert no_graph["graph conv: propagation"] == 0


def test_benchmark_runs_end_to_end_and_writes_its_tables(tmp_path, capsys):
    """The benchmark's own command at the smallest size: every table written, the baseline
    named, the ratios computed against it (figures are not checked: they are machine-bound)."""
    benchmark = _load("benchmark")
    benchmark.main(["--quick", "--batch", "2", "--repeats", "1", "--threads", "1", "--skip", "data",
                    "scaling", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for table in ("equality", "headline", "profile"):
        assert (tmp_path / f"{table}.csv").exists() and (tmp_path / f"{table}.md").exists()
    import csv
    rows = list(csv.DictReader(open(tmp_path / "headline.csv")))
    assert {r["model"] for r in rows} >= {"fast", "dense", "reference"}
    ref_rows = [r for r in rows if r["model"] == "reference"]
    assert all(float(r["vs_reference"]) == 1.0 for r in ref_rows)
    # Each step's arithmetic beside its time: fast's sparse fixed supports and Horner scheme
    # do less of it than the reference's dense einsums; the floor is the same count at the
    # GEMM rate the run measured, and the reference's time is read against it.
    for measure in ("train step", "inference"):
        by = {r["model"]: r for r in rows if r["measure"] == measure}
        assert 0 < float(by["fast"]["gflop"]) < float(by["reference"]["gflop"])
        for r in by.values():
            floor = float(r["floor_s"])
            assert floor == pytest.approx(float(r["gflop"]) / float(r["gemm_gflop_s"]), rel=1e-2)
            assert float(r["of_gemm_rate"]) == pytest.approx(floor / float(r["seconds"]), rel=1e-2)
            assert float(r["vs_reference_at_floor"]) == pytest.approx(
                float(by["reference"]["seconds"]) / floor, rel=1e-2)
    assert "GEMM rate" in printed
    expected = "reference implementation (../shared" if shared_reference.available() else "re-implementation"
    assert expected in printed
    profile = list(csv.DictReader(open(tmp_path / "profile.csv")))
    assert [r["model"] for r in profile][:3] == ["fast", "dense", "reference"]
    # A second run over the same tables is refused in one line unless --overwrite.
    before = (tmp_path / "headline.csv").read_bytes()
    with pytest.raises(SystemExit) as stop:
        benchmark.main(["--quick", "--skip", "equal", "headline", "profile", "data", "scaling",
                        "--out", str(tmp_path)])
    assert stop.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "headline.csv").read_bytes() == before


def test_benchmark_malloc_reuse_is_applied_to_the_timing_process(tmp_path):
    """--malloc reuse sets glibc's reuse of freed memory in the benchmark's process (all models
    alike) and says so in the headline table; in a child process, as it is process-wide."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("reuse of freed memory is a glibc setting")
    script = Path(__file__).resolve().parents[1] / "experiments" / "benchmark.py"
    done = subprocess.run([sys.executable, str(script), "--malloc", "reuse", "--quick", "--batch", "2",
                           "--repeats", "1", "--threads", "1", "--skip", "equal", "profile", "data",
                           "scaling", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "freed memory kept for reuse" in (tmp_path / "headline.md").read_text()


def test_arithmetic_counts_the_graph_convs_products_as_computed():
    """The benchmark's FLOP count of one fast graph convolution, forward and backward, is
    the arithmetic of its products worked out by hand: the in-place accumulations
    (``addmm_``) counted, the CSR support by its non-zeros, the dense (adaptive) one as
    N x N, with its gradient. torch's own table misses the accumulations and counts sparse
    products as dense."""
    from gwnet.nn import DiffusionGraphConv

    arithmetic = _load("arithmetic")
    torch.manual_seed(0)
    n, length, batch, cin, cout, order = NODES, 3, 4, 6, 5, 2
    sparse = (_graph()[0] * (torch.rand(n, n) < 0.3)).to_sparse_csr()
    nnz = sparse._nnz()
    assert 0 < nnz < n * n / 4
    adaptive = torch.softmax(torch.randn(n, n), 1).requires_grad_()
    conv = DiffusionGraphConv(cin, cout, num_supports=2, order=order, kernel="fast")
    x = torch.randn(n, length, batch, cin, requires_grad=True)
    rows, width = n * length * batch, length * batch * cout

    projections = 2 * rows * cin * cout * (1 + 2 * order)
    forward = projections + order * (2 * nnz * width + 2 * n * n * width)
    assert arithmetic.count_flops(lambda: conv(x, [sparse, adaptive])) == forward
    # Backward: the input and weight gradients of every projection, each propagation again
    # (transposed), and the adaptive adjacency's gradient, one N x N product per power.
    backward = 2 * projections + order * (2 * nnz * width + 2 * 2 * n * n * width)
    assert arithmetic.count_flops(lambda: conv(x, [sparse, adaptive]).sum().backward()) == forward + backward
