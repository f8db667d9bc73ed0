"""The reference implementation itself, loaded at run time from ``../shared`` beside the checkout.

``../shared/reference/sshleifer-gwnet/model.py`` (Shleifer et al.'s code, MIT) is imported
from where it lies, never copied. Its README says how to run it on torch 2: it builds 2-D
kernels with ``nn.Conv1d``, which torch 2 rejects for 4-D input, so ``nn.Conv1d`` is
``nn.Conv2d`` while the module is imported and in its namespace afterwards; it takes
``(batch, features, nodes, steps)`` and its engine left-pads the input by one step.

    ref = SharedReference.build(supports, seed=0)  # None when ../shared is absent
    model = ref.as_gwnet()                          # a gwnet GWNet holding the same weights
    ref(x)                                          # x (B, L, N, F) -> (B, horizons, N)
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL_PY = SHARED / "reference" / "sshleifer-gwnet" / "model.py"


def available() -> bool:
    return MODEL_PY.is_file()


def _import_model():
    spec = importlib.util.spec_from_file_location("sshleifer_gwnet_model", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    conv1d = torch.nn.Conv1d
    torch.nn.Conv1d = torch.nn.Conv2d  # as the reference's README says, for torch 2
    try:
        spec.loader.exec_module(module)
    finally:
        torch.nn.Conv1d = conv1d
    module.Conv1d = torch.nn.Conv2d
    return module


class SharedReference(nn.Module):
    """The reference ``GWNet`` (improved configuration) behind gwnet's input and output layout."""

    def __init__(self, model: nn.Module, supports: Sequence[Tensor]) -> None:
        super().__init__()
        self.model = model
        self.supports = list(supports)  # on the CPU, for as_gwnet

    @classmethod
    def build(cls, supports: Sequence[Tensor], seed: int = 0, device: str = "cpu",
              **change) -> Optional["SharedReference"]:
        """The improved model over dense ``supports`` (e.g. the two ``doubletransition``
        matrices), initialised by the reference's own code from ``seed``, on ``device`` (the
        reference keeps its supports in a plain list, which ``.to()`` would not move)."""
        if not available():
            return None
        module = _import_model()
        dense = [(s.to_dense() if s.layout != torch.strided else s).cpu() for s in supports]
        kwargs = dict(do_graph_conv=True, addaptadj=True, aptinit=None, in_dim=2, out_dim=12,
                      residual_channels=40, dilation_channels=40, skip_channels=320,
                      end_channels=640, cat_feat_gc=True)
        kwargs.update(change)
        torch.manual_seed(seed)
        model = module.GWNet("cpu", dense[0].shape[0], supports=[s.to(device) for s in dense], **kwargs)
        return cls(model.to(device), dense)

    def forward(self, x: Tensor) -> Tensor:
        # (B, L, N, F) -> (B, F, N, L), left-padded by one step as the reference's engine does.
        out = self.model(F.pad(x.permute(0, 3, 2, 1), (1, 0, 0, 0)))
        return out[..., 0]

    def as_gwnet(self, **overrides):
        """A :class:`gwnet.nn.GWNet` with these weights, through gwnet's own checkpoint loader."""
        from gwnet.nn import load_reference_checkpoint

        fd, path = tempfile.mkstemp(suffix=".pth")
        os.close(fd)
        try:
            torch.save({k: v.cpu() for k, v in self.model.state_dict().items()}, path)
            # Untrained weights cannot say whether graph convolution is on: it is.
            overrides.setdefault("do_graph_conv", True)
            return load_reference_checkpoint(path, supports=self.supports, **overrides).train()
        finally:
            os.unlink(path)
