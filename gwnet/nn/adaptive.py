"""Adaptive adjacency: a graph learned from two node-embedding matrices."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GWNetError


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
