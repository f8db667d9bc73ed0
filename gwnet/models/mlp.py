r"""A per-sensor MLP over the input window: the no-graph baseline of the registry.

Every sensor's window of ``seq_len`` steps and ``in_dim`` features is flattened and mapped
to its ``horizon`` forecasts by one MLP whose weights all sensors share (STID's backbone
without its spatial and temporal embeddings):

.. math::
    \mathbf{h}^{(0)}_n = \mathrm{vec}(\mathbf{X}_{:, n, :}) \in \mathbb{R}^{L F}, \qquad
    \mathbf{h}^{(i+1)}_n = \mathrm{Dropout}(\mathrm{ReLU}(\mathbf{W}_i \mathbf{h}^{(i)}_n + \mathbf{b}_i)),
    \qquad \hat{\mathbf{Y}}_{:, n} = \mathbf{W}_o \mathbf{h}^{(K)}_n + \mathbf{b}_o

With ``layers=0`` it is a linear autoregression of the window (with the calendar features as
regressors). It sees no graph: the gap between it and Graph WaveNet is what the graph buys.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..config import ModelConfig, opt
from ..errors import GWNetError
from .registry import Supports, register_model


@dataclass
class MLPConfig(ModelConfig):
    """Hyperparameters of :class:`WindowMLP`."""

    hidden_channels: int = opt(128, "hidden units of each layer")
    layers: int = opt(2, "hidden layers (0: a linear autoregression of the window)")
    dropout: float = opt(0.1, "dropout after each hidden layer", role="regularization")

    def validate(self) -> None:
        if self.layers < 0 or self.hidden_channels < 1:
            raise GWNetError(f"layers must be at least 0 and hidden_channels at least 1, "
                             f"got {self.layers} and {self.hidden_channels}")
        if not 0 <= self.dropout < 1:
            raise GWNetError(f"dropout must be in [0, 1), got {self.dropout}")


class WindowMLP(nn.Module):
    """Shapes: input ``(B, seq_len, N, in_dim)``, output ``(B, out_dim, N)``."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = c = config
        width, body = c.seq_len * c.in_dim, []
        for _ in range(c.layers):
            body += [nn.Linear(width, c.hidden_channels), nn.ReLU(), nn.Dropout(c.dropout)]
            width = c.hidden_channels
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(width, c.out_dim)

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if x.dim() != 4 or x.shape[1:] != (c.seq_len, c.num_nodes, c.in_dim):
            raise GWNetError(f"input must be (batch, {c.seq_len} steps, {c.num_nodes} nodes, {c.in_dim} "
                             f"features), got {tuple(x.shape)}")
        b, steps, nodes, feats = x.shape
        h = x.permute(0, 2, 1, 3).reshape(b, nodes, steps * feats)  # one row per sensor
        return self.head(self.body(h)).transpose(1, 2)


@register_model("mlp", MLPConfig, horizon_head="head")
def build_mlp(cfg: MLPConfig, supports: Supports) -> WindowMLP:
    """The graph's supports are not used."""
    return WindowMLP(cfg)
