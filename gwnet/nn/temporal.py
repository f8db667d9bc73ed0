"""Gated dilated temporal convolution (the WaveNet unit of Graph WaveNet)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class GatedTemporalConv(nn.Module):
    r"""Gated dilated convolution along the time axis, without padding.

    .. math::
        \mathbf{h}_t = \tanh\Big(\mathbf{b}_f + \sum_{j=0}^{k-1} \mathbf{W}_{f,j}\,
        \mathbf{x}_{t + j d}\Big) \odot \sigma\Big(\mathbf{b}_g + \sum_{j=0}^{k-1}
        \mathbf{W}_{g,j}\,\mathbf{x}_{t + j d}\Big)

    for :math:`t = 0, \dots, L - (k-1)d - 1`, so the output is :math:`(k-1)d` steps shorter
    than the input. Filter and gate are two ``(1, k)`` convolutions in the reference; here
    they share one weight, filter rows first, then gate rows.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output (of the filter and of the gate each).
        kernel_size: taps :math:`k` per output step.
        dilation: distance :math:`d` in steps between taps.

    Shapes:
        input :math:`(N, L, B, C_{in})` (nodes, time, batch, channels),
        output :math:`(N, L - (k-1)d, B, C_{out})`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2,
                 dilation: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.weight = nn.Parameter(torch.empty(2 * out_channels, in_channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(2 * out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The default initialisation of the reference's Conv2d (fan_in = in_channels * k).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_channels * self.kernel_size)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        steps = x.size(1) - (self.kernel_size - 1) * self.dilation
        # One GEMM per tap on a time-shifted view, accumulated: cheaper than one wide GEMM
        # over all taps whose outputs would then be shifted and summed.
        out = self.bias
        for j in range(self.kernel_size):
            start = j * self.dilation
            shifted = x[:, start:start + steps].reshape(-1, self.in_channels)
            out = torch.addmm(out, shifted, self.weight[:, :, j].t())
        filt, gate = out.view(x.size(0), steps, x.size(2), -1).chunk(2, dim=-1)
        return torch.tanh(filt) * torch.sigmoid(gate)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, dilation={self.dilation})")
