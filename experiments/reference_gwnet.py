"""A straightforward dense Graph WaveNet in the reference's structure, for benchmarks and checks.

``ReferenceGWNet`` computes exactly the function of a :class:`gwnet.nn.GWNet` (improved or
original layout, with the graph convolution on) the way the reference implementations do:
``Conv2d`` in the ``(batch, channels, nodes, time)`` layout, separate filter and gate
convolutions, one ``einsum`` per support and diffusion power over dense
:math:`N \\times N` supports, ``torch.cat`` then a 1x1 convolution, skip convolutions over the
full time length, ``BatchNorm2d``. It is the baseline of ``experiments/benchmark.py`` and is
checked against ``GWNet`` in ``tests/test_perf.py``.

    ref = ReferenceGWNet.from_gwnet(model)   # same weights, dense supports
    ref(x)                                   # x (B, L, N, F) -> (B, horizons, N), as GWNet
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gwnet.nn import GWNet


class ReferenceGWNet(nn.Module):
    def __init__(self, model: GWNet) -> None:
        super().__init__()
        c = model.config
        if not c.do_graph_conv:
            raise ValueError("the reference baseline covers models with graph convolution")
        self.config = c
        self.depth = c.blocks * c.layers
        self.cat_feat_gc = c.cat_feat_gc
        res, dil = c.residual_channels, c.dilation_channels
        if c.cat_feat_gc:
            self.start_conv = nn.Conv2d(1, res, 1)
            self.cat_feature_conv = nn.Conv2d(c.in_dim - 1, res, 1)
        else:
            self.start_conv = nn.Conv2d(c.in_dim, res, 1)
            self.cat_feature_conv = None
        self.dilations = [2 ** (i % c.layers) for i in range(self.depth)]
        self.filter_convs = nn.ModuleList(nn.Conv2d(res, dil, (1, c.kernel_size), dilation=(1, d))
                                          for d in self.dilations)
        self.gate_convs = nn.ModuleList(nn.Conv2d(res, dil, (1, c.kernel_size), dilation=(1, d))
                                        for d in self.dilations)
        self.skip_convs = nn.ModuleList(nn.Conv2d(dil, c.skip_channels, 1) for _ in self.dilations)
        self.num_fixed = model.num_fixed
        num_supports = model.num_fixed + int(model.adaptive is not None)
        width = (c.order * num_supports + 1) * dil
        self.graph_convs = nn.ModuleList(nn.Conv2d(width, res, 1) for _ in range(self.depth - 1))
        self.bn = nn.ModuleList(nn.BatchNorm2d(res) for _ in range(self.depth - 1))
        self.end_conv_1 = nn.Conv2d(c.skip_channels, c.end_channels, 1)
        self.end_conv_2 = nn.Conv2d(c.end_channels, c.out_dim, 1)
        self.nodevec1 = self.nodevec2 = None
        if model.adaptive is not None:
            if model.adaptive.stable:
                raise ValueError("the reference baseline has no stable embedding")
            self.nodevec1 = nn.Parameter(torch.empty(c.num_nodes, c.apt_size))
            self.nodevec2 = nn.Parameter(torch.empty(c.apt_size, c.num_nodes))
        for i, s in enumerate(model.supports()[:model.num_fixed]):
            dense = s.to_dense() if s.layout != torch.strided else s
            self.register_buffer(f"support_{i}", dense.detach().clone(), persistent=False)
        self.order, self.dropout = c.order, c.dropout
        self.receptive_field = model.receptive_field

    @classmethod
    def from_gwnet(cls, model: GWNet) -> "ReferenceGWNet":
        ref = cls(model)
        ref.load_gwnet(model)
        return ref.train(model.training)

    def _pairs(self, model: GWNet):
        """(reference tensor, GWNet tensor, GWNet -> reference reshaping) for every weight."""
        def conv(m, lin):
            return [(m.weight, lin.weight, lambda w: w[:, :, None, None]), (m.bias, lin.bias, None)]
        pairs = conv(self.start_conv, model.start_conv)
        if self.cat_feature_conv is not None:
            pairs += conv(self.cat_feature_conv, model.cat_feature_conv)
        for i, layer in enumerate(model.layers):
            t, c = layer.temporal, layer.temporal.out_channels
            pairs += [(self.filter_convs[i].weight, t.weight, lambda w, c=c: w[:c, :, None, :]),
                      (self.gate_convs[i].weight, t.weight, lambda w, c=c: w[c:, :, None, :]),
                      (self.filter_convs[i].bias, t.bias, lambda b, c=c: b[:c]),
                      (self.gate_convs[i].bias, t.bias, lambda b, c=c: b[c:])]
            pairs += conv(self.skip_convs[i], layer.skip)
            if layer.graph_conv is not None:
                pairs += conv(self.graph_convs[i], layer.graph_conv)
                bn, norm = self.bn[i], layer.norm
                pairs += [(getattr(bn, k), getattr(norm, k), None) for k in
                          ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        pairs += conv(self.end_conv_1, model.end_conv_1) + conv(self.end_conv_2, model.end_conv_2)
        if self.nodevec1 is not None:
            pairs += [(self.nodevec1, model.adaptive.nodevec1, None),
                      (self.nodevec2, model.adaptive.nodevec2, None)]
        return pairs

    @torch.no_grad()
    def load_gwnet(self, model: GWNet) -> None:
        """Copy ``model``'s weights and batch-norm statistics into the reference layout."""
        for mine, theirs, shape in self._pairs(model):
            mine.copy_(shape(theirs) if shape else theirs)

    def gwnet_grads(self, model: GWNet) -> dict[str, Tensor]:
        """This model's gradients in ``model``'s parameter layout, keyed by its names."""
        names = {id(p): n for n, p in model.named_parameters()}
        out: dict[str, Tensor] = {}
        for mine, theirs, shape in self._pairs(model):
            if id(theirs) not in names or mine.grad is None:
                continue
            g = mine.grad
            name = names[id(theirs)]
            if name.endswith("temporal.weight") or name.endswith("temporal.bias"):
                g = g.flatten(1, 2) if g.dim() == 4 else g
                out[name] = torch.cat([out[name], g]) if name in out else g
            else:
                out[name] = g.reshape(theirs.shape)
        return out

    def supports(self) -> list[Tensor]:
        out = [getattr(self, f"support_{i}") for i in range(self.num_fixed)]
        if self.nodevec1 is not None:
            out.append(F.softmax(F.relu(self.nodevec1 @ self.nodevec2), dim=1))
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 3, 2, 1)  # (B, F, N, L), the reference's input layout
        if x.size(3) < self.receptive_field:
            x = F.pad(x, (self.receptive_field - x.size(3), 0))
        if self.cat_feature_conv is not None:
            x = self.start_conv(x[:, :1]) + F.leaky_relu(self.cat_feature_conv(x[:, 1:]))
        else:
            x = self.start_conv(x)
        adjacency = self.supports()
        skip = 0
        for i in range(self.depth):
            residual = x
            h = torch.tanh(self.filter_convs[i](residual)) * torch.sigmoid(self.gate_convs[i](residual))
            s = self.skip_convs[i](h)
            skip = s + (skip[..., -s.size(3):] if torch.is_tensor(skip) else skip)
            if i == self.depth - 1:
                break
            parts = [h]
            for a in adjacency:
                p = h
                for _ in range(self.order):
                    p = torch.einsum("ncvl,vw->ncwl", p, a).contiguous()
                    parts.append(p)
            g = F.dropout(self.graph_convs[i](torch.cat(parts, dim=1)), self.dropout, self.training)
            h = h + g if self.cat_feat_gc else g
            x = self.bn[i](h + residual[..., -h.size(3):])
        out = self.end_conv_2(F.relu(self.end_conv_1(F.relu(skip))))
        return out[..., -1]
