"""Graph WaveNet, as improved by Shleifer, McCreery and Chitters (2019)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GWNetConfig
from ..data.supports import to_torch
from ..errors import GWNetError
from .adaptive import build_adaptive
from .graph_conv import DiffusionGraphConv, auto_kernel, prepare_support, support_density
from .temporal import GatedTemporalConv


class GWNetLayer(nn.Module):
    r"""One residual layer of Graph WaveNet.

    .. math::
        \mathbf{H} = \mathrm{GatedTCN}(\mathbf{X}), \qquad
        \mathbf{S} = \mathbf{W}_s \mathbf{H}_{t_{last}}, \qquad
        \mathbf{X}' = \mathrm{BN}\big(\mathbf{X}_{[-L':]} + G(\mathbf{H})\big)

    where :math:`G(\mathbf{H})` is the diffusion graph convolution (plus :math:`\mathbf{H}`
    itself with ``cat_feat_gc``), or a 1x1 convolution without graph convolution, and
    :math:`L'` the length of :math:`\mathbf{H}`. Only the newest step of the skip output is
    computed: it is the only one that reaches the model's output. The last layer of the
    model only feeds the skip path, so it has no graph convolution and no batch norm.

    Shapes:
        input :math:`(N, L, B, C_{res})`; outputs :math:`(N, L', B, C_{res})` (``None`` for
        the last layer) and the skip term :math:`(N, B, C_{skip})`.
    """

    def __init__(self, config: GWNetConfig, dilation: int, num_supports: int,
                 last: bool) -> None:
        super().__init__()
        c = config
        self.cat_feat_gc = c.cat_feat_gc
        self.temporal = GatedTemporalConv(c.residual_channels, c.dilation_channels,
                                          c.kernel_size, dilation)
        self.skip = nn.Linear(c.dilation_channels, c.skip_channels)
        self.graph_conv = self.residual = self.norm = None
        if last:
            return
        if c.do_graph_conv:
            self.graph_conv = DiffusionGraphConv(c.dilation_channels, c.residual_channels,
                                                 num_supports, c.order, c.dropout, c.graph_conv)
        else:
            self.residual = nn.Linear(c.dilation_channels, c.residual_channels)
        # BatchNorm1d on a (positions, channels) view: the statistics of the reference's
        # BatchNorm2d (over batch, nodes and time), the same parameters and buffers.
        self.norm = nn.BatchNorm1d(c.residual_channels)

    def forward(self, x: Tensor, supports: Sequence[Tensor]) -> tuple[Optional[Tensor], Tensor]:
        h = self.temporal(x)
        skip = self.skip(h[:, -1])
        if self.norm is None:
            return None, skip
        if self.graph_conv is not None:
            g = self.graph_conv(h, supports)
            h = h + g if self.cat_feat_gc else g
        else:
            h = self.residual(h)
        h = h + x[:, -h.size(1):]
        # reshape: a view wherever the convolutions hand back channels-last memory (oneDNN,
        # cuDNN), a copy on a backend that does not (the meta device of the fake-device test).
        return self.norm(h.reshape(-1, h.size(-1))).view_as(h), skip


class GWNet(nn.Module):
    r"""Graph WaveNet (Wu et al. 2019) with the improvements of Shleifer et al. (2019).

    .. math::
        \mathbf{X}^{(0)} = \mathrm{start}(\mathbf{X}), \qquad
        (\mathbf{X}^{(i+1)}, \mathbf{S}^{(i)}) = \mathrm{layer}_i(\mathbf{X}^{(i)}), \qquad
        \hat{\mathbf{Y}} = \mathbf{W}_2\,\mathrm{ReLU}\Big(\mathbf{W}_1\,
        \mathrm{ReLU}\big(\textstyle\sum_i \mathbf{S}^{(i)}\big) + \mathbf{b}_1\Big)
        + \mathbf{b}_2

    over ``blocks * layers`` layers (:class:`GWNetLayer`) whose dilations run 1, 2, 4, ...
    within each block. The input is left-padded with zeros to the receptive field. With
    ``cat_feat_gc`` the start is :math:`\mathbf{W}_0\mathbf{x}_{speed} +
    \mathrm{LeakyReLU}(\mathbf{W}_c\mathbf{x}_{other})`, else one 1x1 convolution over all
    features. The graph convolutions see the fixed supports (unless ``aptonly``) and then
    the adaptive adjacency (with ``addaptadj``), computed once per forward pass: dense
    :math:`N \times N` by default, or with ``adaptive="topk"`` / ``"lowrank"`` a form that
    never holds an :math:`N \times N` tensor (:mod:`gwnet.nn.adaptive`).

    Only modules the forward pass uses are built, so every parameter gets a gradient; the
    reference's unused ones are dropped by :func:`gwnet.nn.load_reference_checkpoint`.

    Args:
        config: the hyperparameters; ``config.num_supports`` counts the fixed supports.
        supports: ``config.num_supports`` fixed :math:`N \times N` supports (dense or sparse
            tensors, or the scipy matrices of ``TrafficData.supports()``; row = source node).
            They are kept as non-persistent buffers: moved by ``.to()``, never saved in the
            state_dict.

    Shapes:
        input :math:`(B, L, N, F)` (batch, steps, nodes, features); output
        :math:`(B, H, N)` (batch, horizons, nodes), the forecast from the newest step.
    """

    def __init__(self, config: GWNetConfig, supports: Optional[Sequence[Tensor]] = None) -> None:
        super().__init__()
        self.config = c = dataclasses.replace(config)
        # The scipy matrices gwnet.data gives (TrafficData.supports()) are taken as they are.
        supports = [to_torch([s], dense=c.graph_conv == "dense")[0] if sp.issparse(s) else s
                    for s in (supports if supports is not None else [])]
        if len(supports) != c.num_supports:
            raise GWNetError(f"the model expects {c.num_supports} fixed supports "
                             f"(num_supports), got {len(supports)}")
        for s in supports:
            if tuple(s.shape) != (c.num_nodes, c.num_nodes):
                raise GWNetError(f"supports must be {c.num_nodes}x{c.num_nodes} "
                                 f"(num_nodes), got {tuple(s.shape)}")
        if c.aptonly and not c.addaptadj:
            raise GWNetError("aptonly needs the adaptive adjacency (addaptadj)")
        if c.do_graph_conv and c.cat_feat_gc and c.dilation_channels != c.residual_channels:
            raise GWNetError("cat_feat_gc adds the graph-conv output to its input: "
                             "dilation_channels must equal residual_channels")

        if c.cat_feat_gc:
            if c.in_dim < 2:
                raise GWNetError("cat_feat_gc needs at least 2 input features")
            self.start_conv = nn.Linear(1, c.residual_channels)
            self.cat_feature_conv = nn.Linear(c.in_dim - 1, c.residual_channels)
        else:
            self.start_conv = nn.Linear(c.in_dim, c.residual_channels)
            self.cat_feature_conv = None

        depth = c.blocks * c.layers
        # The last layer has no graph convolution: a single layer needs no graph at all.
        graph = c.do_graph_conv and depth > 1
        used = supports if graph and not c.aptonly else []
        self.num_fixed = len(used)
        # The kernel in use: graph_conv="auto" starts with the CPU's choice and is decided
        # for the device by select_kernel once the model is there.
        self.kernel = "fast" if c.graph_conv == "auto" else c.graph_conv
        for i, s in enumerate(used):
            self.register_buffer(f"support_{i}", prepare_support(s, self.kernel),
                                 persistent=False)
        self.adaptive = None
        if graph and c.addaptadj:
            if not c.randomadj and not supports:
                raise GWNetError("randomadj=False initialises the adaptive adjacency from "
                                 "the first fixed support, but there is none")
            init = None if c.randomadj else supports[0]
            self.adaptive = build_adaptive(c.adaptive, c.num_nodes, c.apt_size, init,
                                           c.stable_embedding, c.adaptive_k, c.adaptive_rank)

        num_supports = self.num_fixed + int(self.adaptive is not None)
        self.layers = nn.ModuleList(
            GWNetLayer(c, 2 ** (i % c.layers), num_supports, last=i == depth - 1)
            for i in range(depth))
        self.end_conv_1 = nn.Linear(c.skip_channels, c.end_channels)
        self.end_conv_2 = nn.Linear(c.end_channels, c.out_dim)

    @property
    def receptive_field(self) -> int:
        """Input steps one output sees; shorter inputs are left-padded with zeros."""
        return self.config.receptive_field

    def supports(self) -> list:
        """The supports the graph convolutions see: fixed ones, then the adaptive one (an
        :math:`N \\times N` tensor for ``adaptive="dense"``, else a support object with
        ``propagate``, see :mod:`gwnet.nn.adaptive`)."""
        out = [getattr(self, f"support_{i}") for i in range(self.num_fixed)]
        if self.adaptive is not None:
            out.append(self.adaptive())
        return out

    def select_kernel(self, device: torch.device | str | None = None) -> str | None:
        """With ``graph_conv="auto"``, switch every graph convolution to the kernel
        :func:`~gwnet.nn.graph_conv.auto_kernel` picks for ``device`` (default: where the
        model's parameters are) and this graph, re-preparing the fixed supports for it.
        Returns a line saying what was picked and why (``None`` for a fixed kernel). The
        parameters are the same for every kernel: only how they are computed changes."""
        if self.config.graph_conv != "auto":
            return None
        if device is None:
            device = next(self.parameters()).device
        fixed = [getattr(self, f"support_{i}") for i in range(self.num_fixed)]
        kernel, why = auto_kernel(device, self.config.num_nodes, support_density(fixed))
        if kernel != self.kernel:
            self.kernel = kernel
            for i, s in enumerate(fixed):
                setattr(self, f"support_{i}", prepare_support(s, kernel).to(s.dtype))
            for layer in self.layers:
                if layer.graph_conv is not None:
                    layer.graph_conv.kernel = kernel
        return f"graph convolution: {kernel} (auto; {why})"

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if x.dim() != 4 or x.size(2) != c.num_nodes or x.size(3) != c.in_dim:
            raise GWNetError(f"input must be (batch, steps, {c.num_nodes} nodes, {c.in_dim} "
                             f"features), got {tuple(x.shape)}")
        # Node-major, channels last: every 1x1 convolution is one GEMM over the last axis
        # and every graph propagation one matmul over a free (nodes, rest) view.
        x = x.permute(2, 1, 0, 3)
        if x.size(1) < self.receptive_field:
            x = F.pad(x, (0, 0, 0, 0, self.receptive_field - x.size(1), 0))
        if self.cat_feature_conv is not None:
            x = self.start_conv(x[..., :1]) + F.leaky_relu(self.cat_feature_conv(x[..., 1:]))
        else:
            x = self.start_conv(x)

        supports = self.supports()
        skip = 0
        for layer in self.layers:
            x, s = layer(x, supports)
            skip = s + skip
        out = self.end_conv_2(F.relu(self.end_conv_1(F.relu(skip))))
        return out.permute(1, 2, 0)

    def __repr__(self) -> str:
        c = self.config
        params = sum(p.numel() for p in self.parameters())
        return (f"{self.__class__.__name__}(nodes={c.num_nodes}, in_dim={c.in_dim}, "
                f"out_dim={c.out_dim}, layers={c.blocks}x{c.layers}, "
                f"channels={c.residual_channels}/{c.dilation_channels}/{c.skip_channels}/"
                f"{c.end_channels}, supports={self.num_fixed}"
                f"{'+adaptive' if self.adaptive is not None else ''}, "
                f"graph_conv={self.kernel!r}{' (auto)' if c.graph_conv == 'auto' else ''}, "
                f"params={params:,})")
