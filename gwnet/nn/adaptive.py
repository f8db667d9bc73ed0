r"""Adaptive adjacency: a graph learned from two node-embedding matrices.

Three forms share the node embeddings (``nodevec1``, ``nodevec2``) and their initialisations:
:class:`AdaptiveAdjacency` (``dense``, the reference's :math:`N \times N` softmax),
:class:`TopKAdaptiveAdjacency` (``topk``, the :math:`k` largest entries of each row) and
:class:`LowRankAdaptiveAdjacency` (``lowrank``, a kernelised softmax of rank :math:`m`).
The dense one returns its matrix; the other two return a support object
(:class:`TopKSupport`, :class:`LowRankSupport`) whose ``propagate(h)`` computes
:math:`\mathbf{A}^\top \mathbf{h}` for a node-major ``(N, ...)`` tensor without ever
holding an :math:`N \times N` tensor, and whose ``dense()`` builds the matrix (for plots and
tests at small :math:`N`).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GWNetError

ADAPTIVE_KINDS = ("dense", "topk", "lowrank")
# Entries of the largest temporary a top-k selection or its backward holds at a time
# (a chunk of rows x N logits; 16 MiB in float32).
CHUNK_ENTRIES = 1 << 22


class AdaptiveAdjacency(nn.Module):
    r"""Learned adjacency of Graph WaveNet.

    .. math::
        \tilde{\mathbf{A}}_{adp} = \mathrm{softmax}\big(\mathrm{ReLU}(\mathbf{E}_1
        \mathbf{E}_2)\big)

    with source embeddings :math:`\mathbf{E}_1 \in \mathbb{R}^{N \times k}` (``nodevec1``),
    target embeddings :math:`\mathbf{E}_2 \in \mathbb{R}^{k \times N}` (``nodevec2``) and the
    softmax over each row (dim 1): row :math:`v` is the distribution of what source node
    :math:`v` sends to every node.

    Initialisation is standard normal, as in the reference, or, given ``init_support``, the
    rank-:math:`k` SVD factors of that support,
    :math:`\mathbf{E}_1 = \mathbf{U}_{:k}\,\mathrm{diag}(\mathbf{s}_{:k})^{1/2}` and
    :math:`\mathbf{E}_2 = \mathrm{diag}(\mathbf{s}_{:k})^{1/2}\,\mathbf{V}_{:k}^\top`.

    With ``stable=True`` the embeddings behave as a stable embedding, the form 8-bit
    optimizers handle well: Xavier-uniform random initialisation, and a layer norm over the
    embedding dimension of :math:`\mathbf{E}_1` and :math:`\mathbf{E}_2^\top` before the
    product, :math:`\mathrm{softmax}(\mathrm{ReLU}(\mathrm{LN}_1(\mathbf{E}_1)\,
    \mathrm{LN}_2(\mathbf{E}_2^\top)^\top))`.

    Args:
        num_nodes: nodes :math:`N` of the graph.
        apt_size: embedding size :math:`k`.
        init_support: optional :math:`N \times N` support for the SVD initialisation.
        stable: stable-embedding form (see above).
    """

    def __init__(self, num_nodes: int, apt_size: int, init_support: Optional[Tensor] = None,
                 stable: bool = False) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.apt_size = apt_size
        self.stable = stable
        self.nodevec1 = nn.Parameter(torch.empty(num_nodes, apt_size))
        self.nodevec2 = nn.Parameter(torch.empty(apt_size, num_nodes))
        self.norm1 = nn.LayerNorm(apt_size) if stable else None
        self.norm2 = nn.LayerNorm(apt_size) if stable else None
        # Kept outside the state_dict: reset_parameters needs them, a checkpoint does not.
        self._svd_init = None if init_support is None else self._svd_factors(init_support)
        self.reset_parameters()

    def _svd_factors(self, support: Tensor) -> tuple[Tensor, Tensor]:
        support = support.to_dense() if support.layout != torch.strided else support
        if support.shape != (self.num_nodes, self.num_nodes):
            raise GWNetError(f"SVD initialisation needs a {self.num_nodes}x{self.num_nodes} "
                             f"support, got {tuple(support.shape)}")
        if self.apt_size > self.num_nodes:
            raise GWNetError(f"apt_size {self.apt_size} exceeds the {self.num_nodes} nodes "
                             "that an SVD initialisation can provide")
        u, s, vh = torch.linalg.svd(support.detach().float().cpu(), full_matrices=False)
        root = s[:self.apt_size].sqrt()
        return u[:, :self.apt_size] * root, root[:, None] * vh[:self.apt_size]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self._svd_init is not None:
            self.nodevec1.copy_(self._svd_init[0])
            self.nodevec2.copy_(self._svd_init[1])
        elif self.stable:
            nn.init.xavier_uniform_(self.nodevec1)
            nn.init.xavier_uniform_(self.nodevec2)
        else:
            self.nodevec1.normal_()
            self.nodevec2.normal_()
        if self.stable:
            self.norm1.reset_parameters()
            self.norm2.reset_parameters()

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """Source and target features, each :math:`N \\times k`: :math:`\\mathbf{E}_1` and
        :math:`\\mathbf{E}_2^\\top` (layer-normed with ``stable``); logits = src @ dst.T."""
        if self.stable:
            return self.norm1(self.nodevec1), self.norm2(self.nodevec2.t())
        return self.nodevec1, self.nodevec2.t()

    def dense(self) -> Tensor:
        """The :math:`N \\times N` matrix of this adjacency (for plots; O(N^2) memory)."""
        return self.forward()

    def forward(self) -> Tensor:
        """The :math:`N \\times N` adaptive support (row = source node)."""
        if self.stable:
            logits = self.norm1(self.nodevec1) @ self.norm2(self.nodevec2.t()).t()
        else:
            logits = self.nodevec1 @ self.nodevec2
        return F.softmax(F.relu(logits), dim=1)

    def __repr__(self) -> str:
        init = "svd" if self._svd_init is not None else "random"
        return (f"{self.__class__.__name__}({self.num_nodes}, apt_size={self.apt_size}, "
                f"init={init}, stable={self.stable})")


def _csr_transposed(csr: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return csr.t().to_sparse_csr()


@torch.no_grad()
def topk_indices(src: Tensor, dst: Tensor, k: int, chunk_rows: Optional[int] = None) -> Tensor:
    """Column indices of the :math:`k` largest logits :math:`s_v \\cdot d_w` of every row,
    sorted ascending, as an ``(N, k)`` long tensor.

    Rows are taken ``chunk_rows`` at a time (default: as many as fit in
    :data:`CHUNK_ENTRIES` logits), so only a ``chunk x N`` block of logits is ever held.
    The raw logits are ranked: their top :math:`k` are a top :math:`k` of
    :math:`\\mathrm{ReLU}` of them too, and ties at zero are broken by the raw value.
    """
    nodes, targets = src.size(0), dst.size(0)
    if not 1 <= k <= targets:
        raise GWNetError(f"top-k adjacency needs 1 <= k <= {targets} nodes, got k={k}")
    rows = chunk_rows or max(1, CHUNK_ENTRIES // targets)
    out = torch.empty(nodes, k, dtype=torch.long, device=src.device)
    with torch.autocast(src.device.type, enabled=False):
        src, dst = src.float(), dst.float()
        for start in range(0, nodes, rows):
            logits = src[start:start + rows] @ dst.t()
            out[start:start + rows] = logits.topk(k, dim=1).indices
            del logits
    return out.sort(dim=1).values


class TopKSupport:
    r"""A row-sparse support: row :math:`v` holds ``values[v]`` at the columns ``index[v]``.

    ``propagate(h)`` is :math:`\mathbf{A}^\top \mathbf{h}` for node-major ``h`` of shape
    ``(N, ...)`` (a CSR product), with the gradient reaching ``values`` (and, through them,
    the node embeddings) by a custom backward: :math:`\partial h = \mathbf{A}\,\mathbf{g}` and
    :math:`\partial A_{v, w} = \mathbf{h}_v \cdot \mathbf{g}_w` on the kept entries only,
    a sampled product on the CSR pattern (:math:`O(N k M)`, no :math:`N \times N` tensor).
    """

    def __init__(self, index: Tensor, values: Tensor) -> None:
        self.index, self.values = index, values
        # The sparse products run in float32 at least (no half-precision CSR kernels).
        self.dtype = torch.promote_types(values.dtype, torch.float32)
        nodes, k = index.shape
        self.shape = (nodes, nodes)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            crow = torch.arange(0, nodes * k + 1, k, device=index.device)
            weights = values.detach().reshape(-1).to(self.dtype, copy=True)
            self.csr = torch.sparse_csr_tensor(crow, index.reshape(-1), weights, self.shape,
                                               check_invariants=False)
            self.csr_t = _csr_transposed(self.csr)

    def propagate(self, h: Tensor) -> Tensor:
        """:math:`\\mathbf{A}^\\top \\mathbf{h}` for ``h`` of shape ``(N, ...)``."""
        out = _TopKPropagate.apply(self.values, h.reshape(self.shape[0], -1), self)
        return out.view(self.shape[0], *h.shape[1:])

    def dense(self) -> Tensor:
        """The :math:`N \\times N` matrix (O(N^2) memory: plots and tests)."""
        zeros = self.values.new_zeros(self.shape)
        return zeros.scatter(1, self.index, self.values)


class _TopKPropagate(torch.autograd.Function):
    """:math:`A^\\top h` for a :class:`TopKSupport`, differentiable in its values and ``h``.
    Runs in the values' precision (MKL's sparse product has no bfloat16 kernel), returns
    the gradient of ``h`` in ``h``'s."""

    @staticmethod
    def forward(ctx, values: Tensor, h: Tensor, support: TopKSupport) -> Tensor:
        ctx.support, ctx.dtype, ctx.values_dtype = support, h.dtype, values.dtype
        h = h.to(support.dtype)
        ctx.save_for_backward(h)
        with torch.autocast(h.device.type, enabled=False):
            return support.csr_t @ h

    @staticmethod
    def backward(ctx, grad: Tensor):
        (h,) = ctx.saved_tensors
        support = ctx.support
        grad = grad.to(h.dtype).contiguous()
        dvalues = dh = None
        with torch.autocast(h.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                dh = (support.csr @ grad).to(ctx.dtype)
            if ctx.needs_input_grad[0]:
                dvalues = _sampled_dots(support, h, grad)
                dvalues = dvalues.to(ctx.values_dtype)
        return dvalues, dh, None


def _sampled_dots(support: TopKSupport, h: Tensor, grad: Tensor) -> Tensor:
    """``(N, k)`` dots :math:`\\mathbf{h}_v \\cdot \\mathbf{g}_w` for the kept entries
    :math:`(v, w)`: a sampled dense-dense product (SDDMM) on the support's CSR pattern, or,
    where torch has no kernel for it, gathers in row chunks of :data:`CHUNK_ENTRIES`."""
    index = support.index
    nodes, k = index.shape
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            dots = torch.sparse.sampled_addmm(support.csr, h, grad.t(), beta=0.0)
        return dots.values().view(nodes, k)
    except (RuntimeError, NotImplementedError):
        pass
    out = torch.empty(nodes, k, dtype=h.dtype, device=h.device)
    rows = max(1, CHUNK_ENTRIES // max(1, k * h.size(1)))
    for start in range(0, nodes, rows):
        end = min(nodes, start + rows)
        g = grad[index[start:end]]  # (rows, k, M): what each kept target received
        out[start:end] = torch.bmm(g, h[start:end, :, None]).squeeze(2)
    return out


class TopKAdaptiveAdjacency(AdaptiveAdjacency):
    r"""Adaptive adjacency sparsified to the :math:`k` largest entries of each row (as the
    graph-learning layer of MTGNN, Wu et al. 2020).

    .. math::
        (\tilde{\mathbf{A}}_{topk})_{vw} =
        \frac{\exp\big(\mathrm{ReLU}(l_{vw})\big)}
             {\sum_{u \in \mathcal{T}_v} \exp\big(\mathrm{ReLU}(l_{vu})\big)}
        \;\text{for}\; w \in \mathcal{T}_v, \quad 0 \;\text{otherwise},

    with logits :math:`l_{vw} = (\mathbf{E}_1)_v \cdot (\mathbf{E}_2)_{:, w}` and
    :math:`\mathcal{T}_v` the :math:`k` columns of the largest logits of row :math:`v`. The
    softmax is renormalised over the kept entries: this is the dense
    :math:`\mathrm{softmax}(\mathrm{ReLU}(\mathbf{E}_1\mathbf{E}_2))` restricted to the top
    :math:`k` of each row and renormalised; with :math:`k = N` it is the dense adjacency.

    The selection runs in row chunks without gradient (:func:`topk_indices`, never an
    :math:`N \times N` tensor); the kept logits are then recomputed with autograd as row-wise
    dot products (:math:`O(N k d)`), so the gradient reaches the embeddings through the kept
    entries (the choice of :math:`\mathcal{T}_v` itself is piecewise constant). Memory and
    propagation cost are :math:`O(N k)` per channel; the selection costs :math:`O(N^2 d)`
    time but :math:`O(\text{chunk} \cdot N)` memory. ``forward()`` returns a
    :class:`TopKSupport`; :meth:`dense` the matrix. Parameters, ``stable`` and the SVD
    initialisation are those of :class:`AdaptiveAdjacency`.

    Args:
        k: entries kept per row, :math:`1 \le k \le N`.
        chunk_rows: rows per selection chunk (default: ``CHUNK_ENTRIES // N``).
    """

    def __init__(self, num_nodes: int, apt_size: int, k: int = 20,
                 init_support: Optional[Tensor] = None, stable: bool = False,
                 chunk_rows: Optional[int] = None) -> None:
        if not 1 <= k <= num_nodes:
            raise GWNetError(f"adaptive_k must be in [1, {num_nodes}] (the nodes), got {k}")
        super().__init__(num_nodes, apt_size, init_support, stable)
        self.k = k
        self.chunk_rows = chunk_rows

    def forward(self) -> TopKSupport:  # type: ignore[override]
        src, dst = self.embeddings()
        index = topk_indices(src.detach(), dst.detach(), self.k, self.chunk_rows)
        with torch.autocast(src.device.type, enabled=False):
            logits = torch.einsum("vd,vkd->vk", src, dst[index])
            return TopKSupport(index, F.softmax(F.relu(logits), dim=1))

    def dense(self) -> Tensor:
        return self.forward().dense()

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", k={self.k})"


def positive_features(x: Tensor, features: Tensor, per_row: bool) -> Tensor:
    r"""Positive random features of the softmax kernel (FAVOR+, Choromanski et al. 2021):
    :math:`\phi(\mathbf{x}) = \exp(\boldsymbol{\Omega}\mathbf{x} - \|\mathbf{x}\|^2/2 - c)
    / \sqrt{m}` for the :math:`m \times d` Gaussian ``features`` :math:`\boldsymbol{\Omega}`,
    so that :math:`\mathbb{E}[\phi(\mathbf{x})\cdot\phi(\mathbf{y})] = e^{-c_x - c_y}
    \exp(\mathbf{x}\cdot\mathbf{y})`. The stabiliser :math:`c` (no gradient) is the maximum
    of each row (``per_row``) or of the whole tensor: both cancel in a row-normalised kernel.
    """
    proj = x @ features.t() - 0.5 * x.square().sum(1, keepdim=True)
    c = proj.amax(1, keepdim=True) if per_row else proj.amax()
    return torch.exp(proj - c.detach()) / math.sqrt(features.size(0))


class LowRankSupport:
    r""":math:`\mathbf{A} = \mathrm{diag}(\mathbf{Q}\mathbf{K}^\top\mathbf{1})^{-1}
    \mathbf{Q}\mathbf{K}^\top` for positive :math:`\mathbf{Q}, \mathbf{K}` of shape
    :math:`N \times m`, never formed: ``propagate(h)`` is
    :math:`\mathbf{A}^\top\mathbf{h} = \mathbf{K}\big((\mathbf{D}^{-1}\mathbf{Q})^\top
    \mathbf{h}\big)`, :math:`O(N m)` per channel, all with autograd."""

    def __init__(self, q: Tensor, k: Tensor) -> None:
        self.key = k
        self.shape = (q.size(0), k.size(0))
        norm = q @ k.sum(0)  # row sums D of Q K^T
        self.query = q / norm.clamp_min(torch.finfo(norm.dtype).tiny)[:, None]

    def propagate(self, h: Tensor) -> Tensor:
        """:math:`\\mathbf{A}^\\top \\mathbf{h}` for ``h`` of shape ``(N, ...)``."""
        h2 = h.reshape(self.shape[0], -1)
        return (self.key @ (self.query.t() @ h2)).view(self.shape[1], *h.shape[1:])

    def dense(self) -> Tensor:
        """The :math:`N \\times N` matrix (O(N^2) memory: plots and tests)."""
        return self.query @ self.key.t()


class LowRankAdaptiveAdjacency(AdaptiveAdjacency):
    r"""Adaptive adjacency as a kernelised softmax of rank :math:`m` (linearised attention,
    as BigST, Han et al. VLDB 2024, does for its graph).

    .. math::
        \tilde{\mathbf{A}}_{lowrank} = \mathbf{D}^{-1}\,\phi(\mathbf{E}_1)\,
        \phi(\mathbf{E}_2^\top)^\top, \qquad
        \mathbf{D} = \mathrm{diag}\big(\phi(\mathbf{E}_1)\,\phi(\mathbf{E}_2^\top)^\top
        \mathbf{1}\big),

    with the positive random features :math:`\phi` of :func:`positive_features` over a fixed
    Gaussian draw :math:`\boldsymbol{\Omega} \in \mathbb{R}^{m \times d}` (the ``features``
    buffer, saved with the model, redrawn by :meth:`reset_parameters`). Rows are
    distributions, as in the dense form. What is approximated: :math:`\phi(\mathbf{x})\cdot
    \phi(\mathbf{y})` is an unbiased estimate of :math:`\exp(\mathbf{x}\cdot\mathbf{y})`, so
    :math:`\tilde{\mathbf{A}}_{lowrank}` estimates :math:`\mathrm{softmax}(\mathbf{E}_1
    \mathbf{E}_2)` (variance :math:`O(1/m)` relative, larger for large logits). What differs
    from the dense original: the ReLU is dropped (it has no kernel form; negative logits
    keep their softmax weight instead of weight :math:`e^0`), the matrix has rank at most
    :math:`m`, and for a finite draw it is a different (though positive, row-stochastic)
    graph; it is learned end to end, so the embeddings adapt to the draw. Propagation
    :math:`\mathbf{A}^\top\mathbf{h} = \phi(\mathbf{E}_2^\top)\,(\mathbf{D}^{-1}
    \phi(\mathbf{E}_1))^\top\mathbf{h}` costs :math:`O(N m)` per channel and memory
    :math:`O(N m)`; no :math:`N \times N` tensor is built (:class:`LowRankSupport`).

    Args:
        rank: random features :math:`m` (default 64: the estimate's relative variance
            falls as :math:`1/m`, and :math:`m` should be well above the embedding size
            :math:`d` (10 by default); the propagations stay a small part of a step: at
            4,000 nodes, batch 8, one thread, a training step took about 11 s with
            :math:`m = 64`, 7 s without an adaptive adjacency and 34 s with the dense one).
    """

    def __init__(self, num_nodes: int, apt_size: int, rank: int = 64,
                 init_support: Optional[Tensor] = None, stable: bool = False) -> None:
        if rank < 1:
            raise GWNetError(f"adaptive_rank must be at least 1, got {rank}")
        super().__init__(num_nodes, apt_size, init_support, stable)
        self.rank = rank
        self.register_buffer("features", torch.randn(rank, apt_size))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "features" in self._buffers:
            self.features.normal_()

    def forward(self) -> LowRankSupport:  # type: ignore[override]
        src, dst = self.embeddings()
        with torch.autocast(src.device.type, enabled=False):
            features = self.features.to(src.dtype)
            return LowRankSupport(positive_features(src, features, per_row=True),
                                  positive_features(dst, features, per_row=False))

    def dense(self) -> Tensor:
        return self.forward().dense()

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", rank={self.rank})"


AdaptiveSupport = Union[Tensor, TopKSupport, LowRankSupport]


def build_adaptive(kind: str, num_nodes: int, apt_size: int, init_support: Optional[Tensor] = None,
                   stable: bool = False, k: int = 20, rank: int = 64) -> AdaptiveAdjacency:
    """The adaptive adjacency of form ``kind`` (one of :data:`ADAPTIVE_KINDS`)."""
    if kind == "dense":
        return AdaptiveAdjacency(num_nodes, apt_size, init_support, stable)
    if kind == "topk":
        return TopKAdaptiveAdjacency(num_nodes, apt_size, k, init_support, stable)
    if kind == "lowrank":
        return LowRankAdaptiveAdjacency(num_nodes, apt_size, rank, init_support, stable)
    raise GWNetError(f"adaptive={kind!r} is not one of {', '.join(ADAPTIVE_KINDS)}")
