"""Gated dilated temporal convolution (the WaveNet unit of Graph WaveNet)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class _Gate(torch.autograd.Function):
    r""":math:`\tanh(f) \odot \sigma(g)` from :math:`z = 2f` as :math:`(2\sigma(z) - 1) \odot
    \sigma(g)`: on CPU ``tanh`` costs about 3.7x ``sigmoid`` per element, and doubling
    :math:`f` is free in the convolution's weights. The backward pass uses the fused
    ``tanh_backward`` and ``sigmoid_backward`` kernels on the saved :math:`\tanh(f)` and
    :math:`\sigma(g)`, four passes like autograd's; :math:`\partial z = \tfrac12 \partial f`.
    Agrees with ``tanh(f) * sigmoid(g)`` to about 2e-7 absolute in float32; used on CPU in
    float32 only (on GPUs tanh is not the cost, and in bfloat16 the cancellation in
    :math:`2\sigma(z) - 1` loses most of a small :math:`\tanh(f)`)."""

    @staticmethod
    def forward(ctx, z: Tensor, g: Tensor) -> Tensor:
        t = torch.sigmoid(z).mul_(2).sub_(1)
        s = torch.sigmoid(g)
        ctx.save_for_backward(t, s)
        return t * s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        t, s = ctx.saved_tensors
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        # 0 + grad * s / 2 in one pass; tanh_backward then multiplies by 1 - t^2
        dz = torch.ops.aten.tanh_backward(torch.addcmul(zero, grad, s, value=0.5), t)
        return dz, torch.ops.aten.sigmoid_backward(grad * t, s)


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
        # Each tap set in one convolution over a (nodes, channels, time, batch) view whose
        # memory is the node-major, channels-last input: no copy in, and the output's memory
        # is (nodes, time', batch, C_out) again. On CPU this runs in oneDNN, whose kernels
        # beat a GEMM per tap by about 1.8x for these skinny shapes (forward and backward).
        # Filter and gate apart, so that the activations read contiguous memory (on the two
        # halves of one output they ran about 1.5x slower).
        x = x.permute(0, 3, 1, 2)
        c, w, b, dilation = self.out_channels, self.weight.unsqueeze(-1), self.bias, (self.dilation, 1)
        gate = F.conv2d(x, w[c:], b[c:], dilation=dilation).permute(0, 2, 3, 1)
        if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            # tanh by sigmoid (_Gate), the filter's weights doubled: fp32 only, as 2 sigmoid(2f) - 1
            # in bf16 would round tanh of small f to steps of about 0.004.
            z = F.conv2d(x, w[:c] * 2, b[:c] * 2, dilation=dilation).permute(0, 2, 3, 1)
            return _Gate.apply(z, gate)
        filt = F.conv2d(x, w[:c], b[:c], dilation=dilation).permute(0, 2, 3, 1)
        return torch.tanh(filt) * torch.sigmoid(gate)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, dilation={self.dilation})")
