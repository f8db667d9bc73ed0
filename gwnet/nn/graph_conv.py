"""Diffusion graph convolution over several supports (fixed and adaptive)."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GWNetError

KERNELS = ("fast", "dense")
# What a config may ask for: a kernel, or ``auto`` (one picked per device and graph by
# auto_kernel when the model is placed, see GWNet.place).
KERNEL_CHOICES = ("auto", *KERNELS)

# Share of non-zero entries below which a CSR support beats a dense matmul on CPU
# (measured on a 207-node graph: CSR is ~3x faster at 4%, break-even near 10%).
SPARSE_DENSITY = 0.1
# Up to this many nodes a dense support's product runs as a oneDNN convolution on CPU
# (its N x N weight, copied and reordered per call, stays within a few MB).
CONV_MATMUL_NODES = 1024


# On CUDA the dense kernel is taken up to this many nodes whatever the graph's density: at
# road-network sizes a training step is bound by kernel launches, not arithmetic, and the
# cuBLAS products of ``dense`` launch fewer, faster kernels than the cuSPARSE ones of
# ``fast``. On one H200 (PyTorch 2.11, batch 64, the improved preset, METR-LA's 207 nodes):
# dense 37.5 ms a training step and 9.9 ms an inference, fast (CSR supports) 47.1 and
# 19.7 ms. Above it, a sparse graph (below SPARSE_DENSITY) takes ``fast``: a dense support's
# product costs 2 N^2 multiply-adds per column against 2 nnz, i.e. N / (degree) times more
# (about 400x at 8,600 nodes of ~20 neighbours), and an N x N fp32 support holds 4 N^2 bytes
# (296 MB at 8,600 nodes). Where between the two sizes the crossing lies is an estimate:
# at 2,048 nodes a dense propagation of a batch-64 step already costs ~100x its sparse one.
# experiments/gpu_check.py measures both kernels and ``auto`` at 207 and 8,600 nodes.
CUDA_DENSE_NODES = 2048


def _check_kernel(kernel: str, allowed: tuple[str, ...] = KERNEL_CHOICES) -> None:
    if kernel not in allowed:
        raise GWNetError(f"graph_conv={kernel!r} is not one of {', '.join(allowed)}")


def support_density(supports: Sequence) -> float:
    """The largest share of non-zero entries among ``supports`` (1.0 when there is none or
    one is an operator object: nothing sparse to exploit)."""
    densest = 0.0 if supports else 1.0
    for s in supports:
        if _is_operator(s):
            return 1.0
        nnz = s._nnz() if s.layout != torch.strided else int(s.count_nonzero())
        densest = max(densest, nnz / max(s.numel(), 1))
    return densest


def auto_kernel(device: torch.device | str, num_nodes: int, density: float) -> tuple[str, str]:
    """``(kernel, why)``: the kernel ``graph_conv="auto"`` runs on ``device`` for a graph of
    ``num_nodes`` whose densest fixed support has ``density`` non-zero entries.

    CPU: ``fast`` (Horner's scheme, CSR supports below SPARSE_DENSITY, oneDNN products; the
    CPU's fastest, see the performance docs). CUDA: ``dense`` up to CUDA_DENSE_NODES nodes
    or for a dense graph, ``fast`` above it for a sparse one (the figures are at
    CUDA_DENSE_NODES).
    """
    kind = torch.device(device).type
    if kind != "cuda":
        return "fast", f"{kind}: Horner's scheme with CSR supports is this device's fastest"
    if num_nodes <= CUDA_DENSE_NODES:
        return "dense", (f"cuda, {num_nodes} nodes <= {CUDA_DENSE_NODES}: dense products launch fewer "
                         "kernels than sparse ones (launch-bound step)")
    if density >= SPARSE_DENSITY:
        return "dense", f"cuda, graph {density:.1%} non-zero: too full for sparse products"
    return "fast", (f"cuda, {num_nodes} nodes > {CUDA_DENSE_NODES} and graph {density:.2%} non-zero: "
                    "sparse products")


def prepare_support(support: Tensor, kernel: str = "fast") -> Tensor:
    """Put an :math:`N \\times N` support (dense or sparse) in the form ``kernel`` runs fastest.

    ``dense`` gets a strided tensor; ``fast`` gets a CSR tensor when the support is sparse
    enough to profit from it, else a strided one.
    """
    _check_kernel(kernel)
    kernel = "fast" if kernel == "auto" else kernel  # auto before placement: the CPU's choice
    dtype = torch.get_default_dtype()
    if support.layout != torch.strided:
        # Sparse input stays sparse (O(edges) memory) unless the dense kernel needs it dense
        # or it is too full to profit from CSR.
        if support.layout == torch.sparse_coo:
            support = support.coalesce()
        nnz = support._nnz()
        if kernel == "fast" and nnz < SPARSE_DENSITY * support.numel():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
                return support.to_sparse_csr().to(dtype)
        support = support.to_dense()
    dense = support.to(dtype)
    if kernel == "fast" and dense.count_nonzero() < SPARSE_DENSITY * dense.numel():
        with warnings.catch_warnings():
            # torch calls all of CSR "beta"; the one product used here is covered by tests.
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            return dense.to_sparse_csr()
    return dense.contiguous()


def _is_operator(support) -> bool:
    """A support given as an object with ``propagate`` (a scalable adaptive adjacency of
    :mod:`gwnet.nn.adaptive`) rather than an :math:`N \\times N` tensor."""
    return not isinstance(support, Tensor)


def _propagate(support: Tensor, h: Tensor) -> Tensor:
    """:math:`A^\\top h` for node-major ``h``: what every node receives from its sources."""
    if _is_operator(support):
        return support.propagate(h)
    if support.layout == torch.strided:
        return support.t() @ h
    return _SparsePropagate.apply(support, h)


class _SparsePropagate(torch.autograd.Function):
    """:math:`A^\\top h` and its gradient :math:`A g` as CSR products.

    Both run on CSR matrices: the product with a CSC view (the free transpose of a CSR
    matrix) is about 3x slower on CPU, and converting :math:`A^\\top` to CSR costs less than
    a tenth of a millisecond on road graphs. MKL's sparse product has no bfloat16 kernel,
    so it runs in the support's precision even under autocast.
    """

    @staticmethod
    def forward(ctx, support: Tensor, h: Tensor) -> Tensor:
        ctx.support, ctx.dtype = support, h.dtype
        with torch.autocast(h.device.type, enabled=False):
            return _transposed(support) @ h.to(support.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        with torch.autocast(grad.device.type, enabled=False):
            return None, (ctx.support @ grad.to(ctx.support.dtype)).to(ctx.dtype)


def _transposed(support: Tensor) -> Tensor:
    """:math:`A^\\top` in the form the forward product runs fastest (a CSR copy for CSR)."""
    if support.layout == torch.strided:
        return support.t()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return support.t().to_sparse_csr()


def _matmul(a: Tensor, h: Tensor) -> Tensor:
    """``a @ h`` as a new tensor, for an :math:`N \\times N` support (or its transpose) and
    node-major ``h`` (the backward pass's propagations and the forward's first Horner step).

    A dense one on CPU goes through oneDNN as a width-1 convolution with the nodes as
    channels (``h`` as one ``(1, N, M)`` sequence, no copy): about 1.4x the BLAS GEMM for
    these ``N x N`` by ``N x M`` products at ``N`` of a few hundred (the contiguous copy of
    ``a`` it needs is cheap there). A CSR one on CPU with MKL writes into a fresh buffer with
    ``beta=0`` (MKL never reads it): ``a @ h`` zero-fills its output and copies it once more,
    which costs more than the product itself here. Larger graphs, other sparse backends and
    GPUs keep ``a @ h``.
    """
    if a.layout != torch.strided:
        if a.device.type == "cpu" and torch.backends.mkl.is_available():
            out = h.new_empty(a.size(0), h.size(1))
            return torch.addmm(out, a, h, beta=0, out=out)
        return a @ h
    if a.device.type != "cpu" or a.size(1) > CONV_MATMUL_NODES:
        return a @ h
    return F.conv1d(h.unsqueeze(0), a.contiguous().unsqueeze(-1)).squeeze(0)


def _project(x2: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x2 @ weight.T (+ bias)`` for ``(rows, C_in)`` ``x2``, as a new ``(rows, C_out)`` tensor.

    On CPU as a 1x1 convolution over a channels-last view (no copy of ``x2``): oneDNN runs
    these skinny products (C_in, C_out of a few dozen, hundreds of thousands of rows) about
    1.5x faster than the BLAS GEMM. Products that accumulate into an existing buffer stay
    GEMMs (``addmm_``): a convolution plus an addition loses that margin.
    """
    if x2.device.type != "cpu":
        return x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
    rows, cin = x2.shape
    out = F.conv2d(x2.view(1, rows, 1, cin).permute(0, 3, 1, 2),
                   weight.contiguous()[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(rows, -1)


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    r"""Inverted dropout whose mask takes two elements from each 31-bit random integer.

    ``random_`` on int32 draws uniform integers in :math:`[0, 2^{31})` at less than half
    the cost per element of ``rand_like`` on CPU (and ``bernoulli_`` costs 3x more still):
    bits 0-14 and 16-30 of each draw, seen as two int16 numbers, are two independent
    uniform integers in :math:`[0, 2^{15})`. An element is dropped where its number is
    below :math:`q = \mathrm{round}(2^{15} p)`, so the drop probability is ``p`` rounded to
    a multiple of :math:`2^{-15}` (0.3 becomes 0.29999), and the kept elements are scaled by
    :math:`2^{15} / (2^{15} - q)`, which keeps the expectation exact (in the precision of
    ``x``). A ``p`` that would round to 0 or 1 draws from ``rand_like`` instead.
    """
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    drop = round(p * 32768)
    if drop in (0, 32768):
        keep = torch.rand_like(x) >= p
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))
    n = x.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_()
    numbers = bits.bitwise_and_(0x7FFF7FFF).view(torch.int16)[:n].view(x.shape)
    keep = (numbers >= drop).to(x.dtype).mul_(32768 / (32768 - drop))
    return x * keep


class _HornerGraphConv(torch.autograd.Function):
    r"""The ``fast`` kernel: project first, then propagate by Horner's scheme.

    Propagation is linear over nodes and the projection linear over channels, so
    :math:`\mathbf{W}_k (\mathbf{A}^{\top})^k \mathbf{X} = (\mathbf{A}^{\top})^k
    \mathbf{X}\mathbf{W}_k^\top` and, per support,
    :math:`\sum_{k=1}^K (\mathbf{A}^{\top})^k \mathbf{Y}_k = \mathbf{A}^{\top}(\mathbf{Y}_1
    + \mathbf{A}^{\top}(\mathbf{Y}_2 + \dots))` with :math:`\mathbf{Y}_k = \mathbf{X}
    \mathbf{W}_k^\top`: the same number of propagations (on :math:`C_{out}`-wide blocks), no
    concatenation, and every sum accumulated in place into one buffer. The backward pass is
    written out for the same reason: :math:`\partial \mathbf{Y}_k = \mathbf{A}^k \mathbf{G}`
    one propagation after the other, :math:`\partial \mathbf{X}` accumulated in place, and
    for supports that need a gradient (the adaptive one) :math:`\partial \mathbf{A} =
    \sum_k \mathbf{Z}_k (\mathbf{A}^{k-1}\mathbf{G})^\top` from the saved Horner partial
    sums :math:`\mathbf{Z}_k`. ``x2`` is the ``(N L B, C_{in})`` node-major input.
    """

    @staticmethod
    def forward(ctx, x2: Tensor, weight: Tensor, bias: Tensor, order: int, nodes: int,
                *supports: Tensor) -> Tensor:
        cin = x2.size(1)
        blocks = weight.split(cin, dim=1)
        out = _project(x2, blocks[0], bias)
        acc = out.view(nodes, -1)
        saved: list[Tensor] = []
        for s, support in enumerate(supports):
            at = _transposed(support)
            first = 1 + s * order
            z = _project(x2, blocks[first + order - 1])
            partial = [z]
            for k in range(order - 2, -1, -1):
                # Z_k = X W_k^T + A^T Z_{k+1}: the projection makes the new tensor and the
                # propagation accumulates into it, the faster way round for both.
                y = _project(x2, blocks[first + k])
                y.view(nodes, -1).addmm_(at, z.view(nodes, -1))
                z = y
                partial.append(z)
            acc.addmm_(at, z.view(nodes, -1))
            if ctx.needs_input_grad[5 + s]:
                saved.extend(partial[::-1])  # Z_1 .. Z_K
        ctx.order, ctx.nodes = order, nodes
        ctx.grads = [ctx.needs_input_grad[5 + s] for s in range(len(supports))]
        ctx.save_for_backward(x2, weight, *supports, *saved)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight, *rest = ctx.saved_tensors
        order, nodes = ctx.order, ctx.nodes
        supports, saved = rest[:len(ctx.grads)], iter(rest[len(ctx.grads):])
        cin = x2.size(1)
        grad = grad.contiguous()
        blocks = weight.split(cin, dim=1)
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        dx = _project(grad, blocks[0].t()) if want_x else None
        dw = torch.empty_like(weight) if want_w else None
        if want_w:
            torch.mm(grad.t(), x2, out=dw[:, :cin])
        dsupports = []
        for s, support in enumerate(supports):
            partial = [next(saved) for _ in range(order)] if ctx.grads[s] else None
            dsupport = torch.zeros_like(support) if ctx.grads[s] else None
            d = grad
            for k in range(order):
                if dsupport is not None:
                    dsupport.addmm_(partial[k].view(nodes, -1), d.view(nodes, -1).t())
                d = _matmul(support, d.view(nodes, -1)).view(-1, d.size(1))
                j = 1 + s * order + k
                if want_x:
                    dx.addmm_(d, blocks[j])
                if want_w:
                    dw[:, j * cin:(j + 1) * cin] = d.t() @ x2
            dsupports.append(dsupport)
        db = grad.sum(0) if want_b else None
        return (dx, dw, db, None, None, *dsupports)


def _operator_horner(x2: Tensor, blocks: Sequence[Tensor], support, nodes: int) -> Tensor:
    r""":math:`\sum_{k=1}^K (\mathbf{A}^\top)^k \mathbf{X}\mathbf{W}_k^\top` for a support
    object with ``propagate`` (Horner's scheme, autograd): ``x2`` is ``(N L B, C_{in})``
    node-major, ``blocks`` the :math:`K` weight blocks :math:`\mathbf{W}_k`."""
    z = x2 @ blocks[-1].t()
    for w in reversed(blocks[:-1]):
        z = torch.addmm(support.propagate(z.view(nodes, -1)).view_as(z).to(z.dtype), x2, w.t())
    return support.propagate(z.view(nodes, -1)).view_as(z)


class DiffusionGraphConv(nn.Module):
    r"""Diffusion convolution of Graph WaveNet (Wu et al. 2019, Eq. 7).

    .. math::
        \mathbf{Z} = \mathrm{Dropout}\Big(\mathbf{W}\,\big[\mathbf{X},\,
        \mathbf{A}_1\mathbf{X},\, \dots,\, \mathbf{A}_1^K\mathbf{X},\, \mathbf{A}_2\mathbf{X},\,
        \dots,\, \mathbf{A}_S^K\mathbf{X}\big] + \mathbf{b}\Big)

    where :math:`K` is ``order``, the :math:`S` supports come in the order given (fixed ones,
    then the adaptive one) and :math:`\mathbf{A}\mathbf{X}` aggregates over source nodes as in
    the reference, :math:`(\mathbf{A}\mathbf{X})_w = \sum_v A_{vw}\,\mathbf{X}_v`, i.e. row
    :math:`v` of a support holds what node :math:`v` sends. :math:`\mathbf{W}` is a
    :math:`1 \times 1` convolution over the :math:`(KS + 1)\,C_{in}` concatenated channels.

    Two kernels compute the same function with the same parameters. ``dense`` is the reference
    math (einsum per support and power in the reference layout, concatenation, 1x1
    convolution), kept to check ``fast`` against. ``fast`` propagates node-major 2-D views,
    :math:`\mathbf{A}^\top \mathbf{X}` with :math:`\mathbf{X}` as :math:`N \times (L B C)`
    (sparse CSR supports welcome), and accumulates :math:`\mathbf{W}_k (\mathbf{A}^k
    \mathbf{X})` block by block instead of materialising the concatenation.

    A support may also be an object with ``propagate(h)`` computing :math:`\mathbf{A}^\top
    \mathbf{h}` for node-major ``(N, ...)`` ``h`` (the ``topk`` and ``lowrank`` adaptive
    adjacencies, :mod:`gwnet.nn.adaptive`). It never goes through the ``fast`` kernel's
    hand-written backward, whose support gradient is a dense :math:`N \times N` matrix:
    its term :math:`\sum_k (\mathbf{A}^\top)^k \mathbf{X}\mathbf{W}_k^\top` is computed by
    Horner's scheme on :math:`C_{out}`-wide blocks with autograd, the gradient reaching its
    parameters through ``propagate``; the ``dense`` kernel propagates it in the reference
    layout's node-major view.

    Args:
        in_channels: channels :math:`C_{in}` of the input.
        out_channels: channels of the output.
        num_supports: supports :math:`S` passed to each call.
        order: diffusion steps :math:`K` per support.
        dropout: dropout probability on the output.
        kernel: ``"fast"`` or ``"dense"`` (``"auto"``: ``fast``, the CPU's choice; a model
            placed on a device by :meth:`gwnet.nn.GWNet.place` sets ``kernel`` for it).

    Shapes:
        input :math:`(N, L, B, C_{in})` (nodes, time, batch, channels) and :math:`S` supports
        of shape :math:`(N, N)`; output :math:`(N, L, B, C_{out})`.
    """

    def __init__(self, in_channels: int, out_channels: int, num_supports: int, order: int = 2,
                 dropout: float = 0.0, kernel: str = "fast") -> None:
        super().__init__()
        _check_kernel(kernel)
        kernel = "fast" if kernel == "auto" else kernel
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_supports = num_supports
        self.order = order
        self.dropout = dropout
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(out_channels, (order * num_supports + 1) * in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The default initialisation of the reference's 1x1 Conv2d.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight.size(1))
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, supports: Sequence[Tensor]) -> Tensor:
        if len(supports) != self.num_supports:
            raise GWNetError(f"graph convolution built for {self.num_supports} supports, "
                             f"got {len(supports)}")
        out = self._fast(x, supports) if self.kernel == "fast" else self._dense(x, supports)
        # Dropout in the shared layout, so both kernels draw the same mask from one seed.
        return _dropout(out, self.dropout, self.training)

    def _fast(self, x: Tensor, supports: Sequence[Tensor]) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # Mixed precision: per-op autocast rules, block by block.
            return self._fast_blocks(x, supports)
        x2 = x.reshape(-1, self.in_channels)
        nodes = x.size(0)
        if not any(_is_operator(s) for s in supports):
            out = _HornerGraphConv.apply(x2, self.weight, self.bias, self.order, nodes, *supports)
            return out.view(*x.shape[:-1], self.out_channels)
        # Tensor supports through the fused kernel (with their weight blocks), operators
        # by Horner's scheme with autograd.
        blocks = self.weight.split(self.in_channels, dim=1)
        order = self.order
        keep = [blocks[0]] + [blocks[1 + s * order + k] for s, sup in enumerate(supports)
                              if not _is_operator(sup) for k in range(order)]
        tensors = [s for s in supports if not _is_operator(s)]
        out = _HornerGraphConv.apply(x2, torch.cat(keep, dim=1), self.bias, order, nodes, *tensors)
        for s, support in enumerate(supports):
            if _is_operator(support):
                out = out + _operator_horner(x2, blocks[1 + s * order:1 + (s + 1) * order],
                                             support, nodes)
        return out.view(*x.shape[:-1], self.out_channels)

    def _fast_blocks(self, x: Tensor, supports: Sequence[Tensor]) -> Tensor:
        nodes, channels = x.size(0), self.in_channels
        blocks = iter(self.weight.split(channels, dim=1))
        out = torch.addmm(self.bias, x.reshape(-1, channels), next(blocks).t())
        node_major = x.reshape(nodes, -1)
        for support in supports:
            h = node_major
            for _ in range(self.order):
                h = _propagate(support, h)
                out = torch.addmm(out, h.view(-1, channels), next(blocks).t())
        return out.view(*x.shape[:-1], self.out_channels)

    def _dense(self, x: Tensor, supports: Sequence[Tensor]) -> Tensor:
        h = x.permute(2, 3, 0, 1)  # (B, C, N, L), the reference layout
        out = [h]
        for support in supports:
            if _is_operator(support):
                h_k = h
                for _ in range(self.order):
                    b, c, n, l = h_k.shape
                    node_major = h_k.permute(2, 0, 1, 3).reshape(n, -1)
                    h_k = support.propagate(node_major).view(n, b, c, l).permute(1, 2, 0, 3)
                    out.append(h_k)
                continue
            a = support.to_dense() if support.layout != torch.strided else support
            h_k = h
            for _ in range(self.order):
                h_k = torch.einsum("ncvl,vw->ncwl", h_k, a)
                out.append(h_k)
        z = F.conv2d(torch.cat(out, dim=1), self.weight[:, :, None, None], self.bias)
        return z.permute(2, 3, 0, 1).contiguous()

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"num_supports={self.num_supports}, order={self.order}, kernel={self.kernel!r})")
