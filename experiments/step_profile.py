"""Where a training step's time goes, grouped by the parts of Graph WaveNet.

``profile_step(model, step, nodes)`` runs ``step`` under ``torch.profiler`` with each
module's forward wrapped in a ``record_function`` range named after its part (forward hooks,
so neither our model nor the reference needs changing). Every operator's own time (self CPU
time, so nothing is counted twice) goes to one part:

* forward: the part of the innermost labelled module around it;
* backward: the part of the forward operator that recorded the autograd node (matched by
  the autograd sequence number), so a backward GEMM lands where its forward GEMM was;
* whatever the operator, a few kinds go to their own part: dropout (drawing and
  thresholding the mask: ``rand``/``random_``/``bitwise_and_``/``bernoulli``/``ge``; the
  product with the mask stays with the part around it), batch norm, ``tanh``/``sigmoid``
  (to the temporal part: the reference gates outside its modules), and inside a graph convolution the propagation (an operand of
  the adjacency's ``N x N`` shape or a sparse one, with everything called under it) versus
  the projections (the rest);
* the optimizer step is labelled by the caller; the rest (loss, the reference's gate
  product, autograd bookkeeping) is ``rest``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import torch
from torch import nn
from torch.autograd.profiler_util import FunctionEvent

PARTS = ("temporal conv + gate", "graph conv: propagation", "graph conv: projections",
         "skip path", "batch norm", "dropout", "start/end convs", "optimizer step", "rest")
LABEL = "part::"
_DROPOUT_OPS = ("aten::rand", "aten::rand_like", "aten::uniform_", "aten::random_",
                "aten::bitwise_and_", "aten::bernoulli_", "aten::bernoulli", "aten::dropout",
                "aten::native_dropout", "aten::ge")
_BN_OPS = ("aten::batch_norm", "aten::native_batch_norm", "aten::_batch_norm_impl_index",
           "aten::native_batch_norm_backward", "aten::cudnn_batch_norm")


def gwnet_part(name: str) -> Optional[str]:
    """Parts of :class:`gwnet.nn.GWNet` and of the reference ``GWNet`` by module name."""
    if any(k in name for k in ("temporal", "filter_convs", "gate_convs")):
        return "temporal conv + gate"
    if "graph_conv" in name:
        return "graph conv: projections"
    if "skip" in name:
        return "skip path"
    if ".norm" in name or name.startswith("bn.") or ".bn." in name:
        return "batch norm"
    if any(k in name for k in ("start_conv", "cat_feature_conv", "end_conv")):
        return "start/end convs"
    if name.rsplit(".", 1)[-1] == "residual":  # the 1x1 convolution that replaces graph conv
        return "graph conv: projections"
    return None


def _label_modules(model: nn.Module, part_of: Callable[[str], Optional[str]]):
    handles = []
    for name, module in model.named_modules():
        part = part_of(name)
        if not part:
            continue

        def pre(mod, args, part=part):
            mod._profile_range = torch.profiler.record_function(LABEL + part)
            mod._profile_range.__enter__()

        def post(mod, args, out):
            mod._profile_range.__exit__(None, None, None)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def _ancestors(event: FunctionEvent):
    e = event.cpu_parent
    while e is not None:
        yield e
        e = e.cpu_parent


def _label(events) -> Optional[str]:
    """The part named by the innermost label range among ``events`` (innermost first)."""
    return next((a.name[len(LABEL):] for a in events if a.name.startswith(LABEL)), None)


def _shapes(shapes):
    for s in shapes or []:
        if isinstance(s, (list, tuple)) and s and isinstance(s[0], (list, tuple)):
            yield from _shapes(s)  # a list of tensors (einsum's operands)
        elif isinstance(s, (list, tuple)):
            yield list(s)


def _is_propagation(event: FunctionEvent, nodes: int) -> bool:
    """An operator with an adjacency operand (``N x N``, batched or not, or the ``(N, N, 1)``
    weight of the width-1 convolution gwnet propagates with on CPU), a sparse one, or an
    ``einsum`` (both the dense kernel and the reference propagate with one)."""
    return ("sparse" in event.name or event.name == "aten::einsum"
            or any(s[-2:] == [nodes, nodes] or s == [nodes, nodes, 1]
                   for s in _shapes(event.input_shapes)))


def _op_part(event: FunctionEvent, label: Optional[str], nodes: int) -> str:
    """The part of one operator given the label around it (forward) or of its forward op."""
    chain = [event] + [a for a in _ancestors(event) if not a.name.startswith(LABEL)]
    names = [e.name for e in chain]
    if any(n in _BN_OPS for n in names):
        return "batch norm"
    if any(n in ("aten::tanh", "aten::sigmoid") for n in names):
        return "temporal conv + gate"  # the reference gates outside its modules
    if any(n in _DROPOUT_OPS for n in names):
        return "dropout"
    if label == "graph conv: projections" and any(_is_propagation(e, nodes) for e in chain):
        return "graph conv: propagation"
    return label or "rest"


def profile_step(model: nn.Module, step: Callable[[], None], nodes: int,
                 part_of: Callable[[str], Optional[str]] = gwnet_part, repeats: int = 2) -> dict[str, float]:
    """Seconds per step by part (self CPU time of every operator, averaged over ``repeats``)."""
    handles = _label_modules(model, part_of)
    try:
        step()  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=True) as prof:
            for _ in range(repeats):
                step()
    finally:
        for h in handles:
            h.remove()
    events = list(prof.events())
    forward_part: dict[int, str] = {}
    for e in events:
        if (e.sequence_nr < 0 or e.sequence_nr in forward_part or e.name.startswith(LABEL)
                or e.name.startswith("autograd::")):
            continue
        forward_part[e.sequence_nr] = _op_part(e, _label(_ancestors(e)), nodes)
    seconds: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith(LABEL):
            continue
        ancestors = list(_ancestors(e))
        label = _label(ancestors)
        backward = next((a for a in [e] + ancestors
                         if a.name.startswith("autograd::engine::evaluate_function")), None)
        if label is not None:
            part = _op_part(e, label, nodes) if label != "optimizer step" else label
        elif backward is not None:
            fwd = forward_part.get(backward.sequence_nr)
            if fwd in ("graph conv: propagation", "graph conv: projections"):
                # A hand-written backward holds both: split its operators by operand.
                part = ("graph conv: propagation" if any(_is_propagation(a, nodes) for a in [e] + ancestors)
                        else "graph conv: projections")
            else:
                part = fwd or _op_part(e, None, nodes)
        else:
            part = _op_part(e, None, nodes)
        seconds[part] += e.self_cpu_time_total / 1e6 / repeats
    return {p: seconds.get(p, 0.0) for p in PARTS}
