"""Weights from elsewhere: reference checkpoints, and state_dicts trained for fewer horizons.

Both reference implementations save a plain state_dict of ``Conv2d`` weights in the
``(batch, features, nodes, time)`` layout: the improved model of Shleifer et al.
(``graph_convs.{i}.final_conv``, ``cat_feature_conv``) and the original of Wu et al.
(``gconv.{i}.mlp.mlp``). They build modules their forward pass never uses (residual
convolutions next to graph convolutions, the last layer's graph convolution and batch
norm); those are recognised and dropped, anything else unexpected is an error.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..config import GWNetConfig
from ..data.graph import read_graph
from ..data.supports import build_supports, to_torch
from ..errors import GWNetError, file_error
from ..paths import check_input_file
from .model import GWNet

_GRAPH_CONV = re.compile(r"(?:graph_convs\.(\d+)\.final_conv|gconv\.(\d+)\.mlp\.mlp)\.(weight|bias)")
_TEMPORAL = re.compile(r"(filter|gate)_convs\.(\d+)\.(weight|bias)")
_PER_LAYER = re.compile(r"(skip|residual)_convs\.(\d+)\.(weight|bias)|bn\.(\d+)\.(\w+)")
_TOP = re.compile(r"(start_conv|cat_feature_conv|end_conv_1|end_conv_2)\.(weight|bias)|nodevec([12])")


def load_reference_checkpoint(path: Union[str, os.PathLike],
                              adj: Union[str, os.PathLike, np.ndarray, Tensor, None] = None,
                              adjtype: str = "doubletransition",
                              supports: Optional[Sequence[Tensor]] = None,
                              **config_overrides: Any) -> GWNet:
    """A :class:`GWNet` in eval mode holding a reference implementation's state_dict.

    The configuration is read off the tensor shapes: channels, ``blocks * layers`` (the
    number of filter convolutions; dilations are not stored, so two layers per block, both
    references' default, unless overridden), ``in_dim``, ``out_dim``, nodes and ``apt_size``
    (node embeddings), ``cat_feat_gc`` (a ``cat_feature_conv``), and ``order`` times the
    number of supports (the graph convolution's input width, split using the fixed supports
    given, else assuming ``order=2``). ``config_overrides`` set any :class:`GWNetConfig`
    field on top (e.g. ``graph_conv="dense"``, ``layers=1``).

    Args:
        path: the ``.pth`` state_dict.
        adj: the sensor graph the weights were trained on: a DCRNN pickle or distances CSV
            path, or an ``(N, N)`` adjacency (row = source).
        adjtype: normalisation turning ``adj`` into the fixed supports.
        supports: ready fixed supports instead of ``adj``.
    """
    path = os.fspath(path)
    state = _read_state_dict(path)
    if adj is not None and supports is not None:
        raise GWNetError("pass the sensor graph as adj or as supports, not both")
    if adj is not None:
        if isinstance(adj, (str, os.PathLike)):
            adj = read_graph(adj).adj
        supports = to_torch(build_supports(np.asarray(adj, dtype=np.float32), adjtype))
    supports = None if supports is None else list(supports)

    config = _infer_config(state, path, supports, config_overrides)
    if supports is None and not config.do_graph_conv:
        config = dataclasses.replace(config, num_supports=0)  # no graph convolution: no graph needed
    if supports is None:
        if config.num_supports:
            raise file_error(path, f"needs its {config.num_supports} fixed supports: "
                                   "pass the sensor graph (adj=...) or supports=...")
        supports = []
    model = GWNet(config, supports)
    _load_converted(model, _convert(state, path), path)
    return model.eval()


def load_for_more_horizons(model: nn.Module, state_dict: dict[str, Tensor],
                           source: str = "state_dict", head: Optional[str] = "end_conv_2") -> None:
    """Load a state_dict trained for fewer horizons into ``model`` (of the same architecture).

    Everything is copied; of ``head`` (the output layer, one row per horizon: Graph WaveNet's
    ``end_conv_2``; any registered model names its own) only the rows the state_dict has, so
    the extra horizons keep their initial weights. Missing or unexpected keys and any other
    shape difference raise :class:`GWNetError` naming ``source``.
    """
    ours = model.state_dict()
    _check_keys(ours.keys(), state_dict.keys(), source)
    for key, theirs in state_dict.items():
        mine = ours[key]
        if (head is not None and key.startswith(head + ".") and theirs.shape[1:] == mine.shape[1:]
                and theirs.shape[0] <= mine.shape[0]):
            mine = mine[:theirs.shape[0]]
        elif theirs.shape != mine.shape:
            raise GWNetError(f"{source}: {key} has shape {tuple(theirs.shape)}, the model "
                             f"{tuple(mine.shape)}")
        with torch.no_grad():
            # state_dict() tensors share storage with the parameters and buffers.
            mine.copy_(theirs)


# A reference state_dict's pickle (names and tensor records, not the weights) is a few hundred
# kilobytes and a few levels deep: a crafted one of deep nesting or millions of records would make
# the unpickler recurse or run for minutes before any check.
MAX_PICKLE_BYTES = 64 * 2**20
MAX_PICKLE_DEPTH = 64
# Input steps one forecast may see: far beyond any published window (the references use 13).
MAX_RECEPTIVE_FIELD = 1024


def _check_pickle_bounds(path: str) -> None:
    """Size and nesting of the pickle inside a torch zip file, measured without unpickling it."""
    import pickletools
    import zipfile

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return  # not a zip: torch.load says what it is
    with zf:
        member = next((i for i in zf.infolist() if i.filename.endswith("data.pkl")), None)
        if member is None:
            return
        if member.file_size > MAX_PICKLE_BYTES:
            raise file_error(path, f"its pickle is {member.file_size:,} bytes, more than a state_dict's "
                             f"{MAX_PICKLE_BYTES:,}")
        data = zf.read(member)
    try:
        deepest = _pickle_depth(data)
    except (ValueError, IndexError):
        return  # a malformed pickle: torch.load says so
    if deepest <= MAX_PICKLE_DEPTH:
        return
    raise file_error(path, f"its pickle nests deeper than {MAX_PICKLE_DEPTH} levels; not a state_dict")


# Pickle operations that add to a container already on the stack rather than make a new object.
_FILLING = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}


def _pickle_depth(data: bytes) -> int:
    """How deeply the objects of a pickle nest (a list in a list in a dict: 3), by following its
    operations on a stack of nesting levels; nothing is built."""
    import pickletools

    mark = object()
    stack: list = []
    memo: dict = {}
    deepest = 0
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name == "MARK":
            stack.append(mark)
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, 0))
            continue
        if pickletools.markobject in op.stack_before:
            items = []
            while stack and stack[-1] is not mark:
                items.append(stack.pop())
            if stack:
                stack.pop()
            if name == "POP_MARK":
                continue
            inner = 1 + max(items, default=-1)
            level = max(stack.pop(), inner) if name in _FILLING and stack else inner
        else:
            popped = [stack.pop() for _ in op.stack_before if stack]
            if not op.stack_after:
                continue
            if name in _FILLING and popped:
                level = max(popped[-1], 1 + max(popped[:-1], default=-1))
            else:
                level = 1 + max(popped) if popped else 0
        stack.extend([level] * len(op.stack_after))
        deepest = max(deepest, level)
        if deepest > MAX_PICKLE_DEPTH:
            break
    return deepest


def _read_state_dict(path: str) -> dict[str, Tensor]:
    if not os.path.lexists(path):
        raise file_error(path, "no such checkpoint")
    check_input_file(path, "checkpoint")  # a FIFO, a device or a link loop: one line, no hang
    _check_pickle_bounds(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors alike mean "not a state_dict we can read"
        raise file_error(path, f"not a readable PyTorch state_dict ({' '.join(str(exc).split())})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise file_error(path, "expected a state_dict (a mapping of names to tensors)")
    needed = ["start_conv.weight", "filter_convs.0.weight", "skip_convs.0.weight",
              "end_conv_1.weight", "end_conv_2.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise file_error(path, f"not a Graph WaveNet state_dict (no {', '.join(missing)})")
    _check_ranks(state, path)
    return state


def _infer_config(state: dict[str, Tensor], path: str, supports: Optional[list[Tensor]],
                  overrides: dict[str, Any]) -> GWNetConfig:
    depth = 0
    while f"filter_convs.{depth}.weight" in state:
        depth += 1
    dil, res, _, kernel = state["filter_convs.0.weight"].shape
    cat = "cat_feature_conv.weight" in state
    in_dim = 1 + state["cat_feature_conv.weight"].shape[1] if cat else state["start_conv.weight"].shape[1]
    addapt = "nodevec1" in state
    if addapt:
        num_nodes, apt_size = state["nodevec1"].shape
    else:
        num_nodes = supports[0].shape[0] if supports else GWNetConfig.num_nodes
        apt_size = GWNetConfig.apt_size

    gc = next((v for k, v in state.items() if _GRAPH_CONV.fullmatch(k) and k.endswith("weight")), None)
    do_graph_conv = gc is not None
    if do_graph_conv and "graph_convs.0.final_conv.weight" in state:
        do_graph_conv = _improved_uses_graph_conv(state, depth, path, overrides)
    aptonly = overrides.get("aptonly", False)
    order = overrides.get("order", 2)
    num_fixed = 0 if supports is None else len(supports)
    if gc is not None:
        # The graph convolution sees (order * (fixed + adaptive) + 1) blocks of channels.
        blocks, rest = divmod(gc.shape[1], dil)
        products = blocks - 1
        if supports is not None:
            seen = (0 if aptonly else num_fixed) + addapt
            if seen and "order" not in overrides:
                order = products // seen
        else:
            seen = products // order
            num_fixed = 0 if aptonly else seen - addapt
        if rest or order < 1 or order * seen != products or seen < addapt:
            raise file_error(path, f"graph convolution input width {gc.shape[1]} does not split "
                                   f"into (order x supports + 1) x {dil} channels")
    layers = overrides.get("layers", 2 if depth % 2 == 0 else 1)
    inferred = dict(
        num_nodes=num_nodes, in_dim=in_dim, out_dim=state["end_conv_2.weight"].shape[0],
        num_supports=num_fixed, residual_channels=res, dilation_channels=dil,
        skip_channels=state["skip_convs.0.weight"].shape[0],
        end_channels=state["end_conv_1.weight"].shape[0], blocks=depth // layers,
        layers=layers, kernel_size=kernel, order=order, do_graph_conv=do_graph_conv,
        addaptadj=addapt, apt_size=apt_size, cat_feat_gc=cat)
    try:
        config = dataclasses.replace(GWNetConfig(**inferred), **overrides)
    except TypeError as exc:
        raise GWNetError(f"unknown model option in overrides ({exc})") from None
    if config.receptive_field > MAX_RECEPTIVE_FIELD:
        raise file_error(path, f"describes a model that sees {config.receptive_field:,} input steps (kernel "
                         f"{config.kernel_size}, {config.blocks} x {config.layers} layers), more than the "
                         f"{MAX_RECEPTIVE_FIELD:,} gwnet builds")
    return config


def _at_default_init(weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether a convolution's parameters are within PyTorch's default initialisation bounds,
    ``|w|, |b| <= 1 / sqrt(fan_in)``: where a module the forward pass never used stays, since
    without a gradient no optimiser step (nor weight decay) touches it."""
    bound = (1 + 1e-5) / math.sqrt(max(weight[0].numel(), 1))
    return bool(weight.abs().max() <= bound) and (bias is None or bias.numel() == 0 or
                                                    bool(bias.abs().max() <= bound))


def _improved_uses_graph_conv(state: dict[str, Tensor], depth: int, path: str,
                              overrides: dict[str, Any]) -> bool:
    """Whether an improved-format state_dict was trained with ``--do_graph_conv``.

    That reference builds ``graph_convs`` and ``residual_convs`` for every layer whatever the
    option, and its forward pass uses one of them (the graph convolution when on, the 1x1
    residual convolution when off); the other keeps its initial weights. So the file tells
    which by which set of layers left the initialisation bounds; when both or neither did,
    ``do_graph_conv=`` must say it.
    """
    if "do_graph_conv" in overrides:
        return bool(overrides["do_graph_conv"])
    layers = [i for i in range(depth - 1)  # the last layer uses neither
              if f"graph_convs.{i}.final_conv.weight" in state and f"residual_convs.{i}.weight" in state]
    if not layers:
        return True  # no residual convolutions saved: only the graph convolution can be used
    graph = any(not _at_default_init(state[f"graph_convs.{i}.final_conv.weight"],
                                     state.get(f"graph_convs.{i}.final_conv.bias")) for i in layers)
    residual = any(not _at_default_init(state[f"residual_convs.{i}.weight"],
                                        state.get(f"residual_convs.{i}.bias")) for i in layers)
    if graph != residual:
        return graph
    seen = "both trained" if graph else "both at their initial weights"
    raise file_error(path, f"cannot tell whether it was trained with --do_graph_conv (its graph_convs and "
                     f"residual_convs are {seen}); pass do_graph_conv=True or do_graph_conv=False")


def _check_ranks(state: dict[str, Tensor], path: str) -> None:
    """Every tensor has the rank its module gives it: 4-D convolution weights, 2-D node
    embeddings, 1-D biases and batch-norm vectors (a count is 0-D)."""
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            expected = (0, 1)
        elif key.startswith("nodevec"):
            expected = (2,)
        elif _PER_LAYER.fullmatch(key) and key.startswith("bn."):
            expected = (1,)
        elif key.endswith(".weight"):
            expected = (4,)
        elif key.endswith(".bias"):
            expected = (1,)
        else:
            continue  # an unknown key is reported as such later
        if value.dim() not in expected:
            raise file_error(path, f"{key} is a {value.dim()}-D tensor of shape {tuple(value.shape)}, expected "
                             f"{' or '.join(f'{d}-D' for d in expected)}")
        if value.dim() and 0 in value.shape:
            raise file_error(path, f"{key} is empty (shape {tuple(value.shape)})")


def _convert(state: dict[str, Tensor], path: str) -> dict[str, Tensor]:
    """Reference names and Conv2d shapes to this package's (unused ones included)."""
    out: dict[str, Tensor] = {}
    temporal: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if m := _TOP.fullmatch(key):
            name = f"adaptive.nodevec{m[3]}" if m[3] else key
            out[name] = value.flatten(1) if m[2] == "weight" else value
        elif m := _PER_LAYER.fullmatch(key):
            if m[1]:
                out[f"layers.{m[2]}.{m[1]}.{m[3]}"] = value.flatten(1) if m[3] == "weight" else value
            else:
                out[f"layers.{m[4]}.norm.{m[5]}"] = value
        elif m := _GRAPH_CONV.fullmatch(key):
            out[f"layers.{m[1] or m[2]}.graph_conv.{m[3]}"] = value.flatten(1) if m[3] == "weight" else value
        elif m := _TEMPORAL.fullmatch(key):
            temporal.setdefault((m[2], m[3]), {})[m[1]] = value
        else:
            unknown.append(key)
    if unknown:
        raise file_error(path, f"unexpected key(s) {_shown(unknown)}")
    for (layer, param), pair in temporal.items():
        if len(pair) != 2:
            raise file_error(path, f"layer {layer} has a {next(iter(pair))} but no "
                                   f"{'gate' if 'filter' in pair else 'filter'} convolution")
        # Filter rows first, then gate rows; (out, in, 1, k) -> (out, in, k).
        value = torch.cat([pair["filter"], pair["gate"]])
        out[f"layers.{layer}.temporal.{param}"] = value.flatten(1, 2) if param == "weight" else value
    return out


def _load_converted(model: GWNet, converted: dict[str, Tensor], path: str) -> None:
    ours = model.state_dict()
    last = len(model.layers) - 1
    # What the reference builds but never uses: residual convolutions beside graph
    # convolutions (or all of them, for the last layer), graph convolutions when they are off
    # (and the last layer's), the last layer's batch norm.
    unused = re.compile(rf"layers\.\d+\.(residual|graph_conv)\..*|layers\.{last}\.norm\..*")
    kept = {k: v for k, v in converted.items() if k in ours or not unused.fullmatch(k)}
    _check_keys(ours.keys(), kept.keys(), path)
    try:
        model.load_state_dict(kept)
    except RuntimeError as exc:
        found = re.findall(r"size mismatch for ([\w.]+)", str(exc))
        raise file_error(path, f"shapes do not match the inferred model ({_shown(found)}); "
                               "pass the differing options as overrides") from None


def _check_keys(expected, found, source: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise file_error(source, f"missing key(s) {_shown(missing)}")
    if unexpected:
        raise file_error(source, f"unexpected key(s) {_shown(unexpected)}")


def _shown(keys: Sequence[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
