"""What each file of a run directory holds, checked by the code that writes it and by the code
that reads it back.

``best.pt`` (:data:`TRAINED` plus :data:`BEST`), ``last.pt`` (:data:`TRAINED` plus
:data:`LAST`), ``config.json`` and ``pipeline.json`` (a whole :class:`~gwnet.config.Config`)
are written by gwnet, but a file on disk can be edited, truncated or crafted. Everything is
checked before it is used: types, shapes, finite values, ranges and the fields that must agree
with each other (the model's derived sizes with the data's, the scaler's missing-value option
with the config's, the early-stopping counters with the history, the sensor ids with the
graph). The writer runs the same check before it writes, so a file that passes is exactly a
file gwnet can write. A failure is one :class:`~gwnet.errors.GWNetError` naming the file and
the field.

What can only be checked against a live trainer (the optimizer's groups against the model's
parameters, the random states' sizes, an interrupted epoch's batch order against the training
windows, ``config.json`` against ``last.pt``) is in :func:`check_optimizer_state`,
:func:`check_rng_state` and :func:`check_agreement`, which the trainer calls on resume.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from typing import Any

import torch

from .._version import __version__
from ..config import Config, flatten, fields_with_role
from ..data.scaler import StandardScaler
from ..errors import GWNetError, file_error

FORMAT = "gwnet-checkpoint"
# Integers in a run's files: far below what int64 tensors and Python's range() take.
MAX_COUNT = 2**62
# Every number of a checkpoint is a float32 quantity (readings, their mean, a MAE): beyond this it
# overflowed, or was never one.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
VERSION = re.compile(r"\d+\.\d+(\.\d+)?\S*")

# Entries of every trained checkpoint: what gwnet-predict needs.
TRAINED = {"config": dict, "model": dict, "scaler": dict, "sensor_ids": (list, tuple), "adjacency": torch.Tensor}
# best.pt: the epoch it was saved at and its validation MAE.
BEST = {"epoch": int, "val_mae": float}
# last.pt: the progress of --resume, and the training state (with "optimizer", or "sharded" naming
# the shard folder), which a finished run no longer needs: it only recomputes its test metrics.
LAST = {"epoch": int, "best_val_mae": float, "best_epoch": int, "bad_epochs": int, "finished": bool,
        "history": list}
TRAINING_STATE = {"scheduler": dict, "shuffle_rng": torch.Tensor, "torch_rng": (torch.Tensor, list),
                  "partial": (dict, type(None))}
KIND_NAMES = {dict: "a table", list: "a list", tuple: "a list", torch.Tensor: "a tensor", int: "an integer",
              float: "a number", bool: "true or false", str: "a string", type(None): "none"}
# Fields of a run's config that --resume may change: where the run is (a moved run directory) and
# how long it goes on.
RESUMABLE = ("out", "train.epochs", "train.patience")
# The runs a run started from, read only at its start: the trainer lets them differ from last.pt
# (a pipeline names its pretraining stage by path, which moves with the run directory), the
# files of a run must still agree on them.
STARTED_FROM = ("train.init_from", "train.shrink_from")


def _kind_text(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(dict.fromkeys(KIND_NAMES.get(k, k.__name__) for k in kinds))


def _is(value: Any, kind) -> bool:
    """``isinstance`` where a bool is no integer and an integer is a number."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def _entry(path, state: dict, key: str, kind, where: str = "entry") -> Any:
    if key not in state:
        raise file_error(path, f"{where} {key!r} is missing")
    value = state[key]
    if not _is(value, kind):
        raise file_error(path, f"{where} {key!r} is {_shown(value)}, not {_kind_text(kind)}")
    return value


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _count(path, state: dict, key: str, low: int = 0, where: str = "entry") -> int:
    value = _entry(path, state, key, int, where)
    if not low <= value <= MAX_COUNT:
        raise file_error(path, f"{where} {key!r} is {value}, not between {low} and {MAX_COUNT}")
    return value


def _number(path, state: dict, key: str, low: float = -math.inf, allow_inf: bool = False,
            where: str = "entry") -> float:
    value = float(_entry(path, state, key, float, where))
    if math.isnan(value) or (math.isinf(value) and not allow_inf) or value < low or \
            (math.isfinite(value) and abs(value) > FLOAT32_MAX):
        raise file_error(path, f"{where} {key!r} is {value!r}, not a finite number"
                         + (f" of at least {low:g}" if low > -math.inf else ""))
    return value


def _rng(path, key: str, value: Any, like: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != like.dtype or value.shape != like.shape:
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else _shown(value)
        raise file_error(path, f"entry {key!r} is {got}, not a random state ({like.dtype} {tuple(like.shape)})")


def check_saved_config(path, raw: Any, complete: bool = True) -> Config:
    """The :class:`Config` a run's file holds, checked as a run's config: every option of the
    right type and range (:meth:`Config.validate`), and with ``complete`` every option present
    (gwnet writes them all; a missing one would silently take its preset's default)."""
    if not isinstance(raw, dict):
        raise file_error(path, f"config is {_shown(raw)}, not a table of options")
    try:
        cfg = Config.from_dict(raw, source=os.fspath(path))
        cfg.validate()
    except GWNetError as exc:
        text = str(exc)
        raise file_error(path, text) if not text.startswith(os.fspath(path)) else GWNetError(text) from None
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise file_error(path, f"config is malformed ({' '.join(str(exc).split())[:160]})") from None
    if complete:
        missing = sorted(set(flatten(cfg.to_dict())) - set(flatten(raw)))
        if missing:
            raise file_error(path, f"config lacks {missing[0]}"
                             + (f" and {len(missing) - 1} more option(s)" if len(missing) > 1 else ""))
    return cfg


def _check_derived(path, cfg: Config, num_nodes: int) -> None:
    """The model's sizes that follow from the data must be the ones the data gives."""
    expected = copy.deepcopy(cfg.model)
    expected.resolve(cfg.data, num_nodes)
    for f in dataclasses.fields(expected):
        ours, theirs = getattr(cfg.model, f.name), getattr(expected, f.name)
        if ours != theirs:
            raise file_error(path, f"config model.{f.name} is {ours!r}, but its data and {num_nodes} sensor ids "
                             f"give {theirs!r}")


def check_trained(path, state: Any, kind: str = "best") -> Config:
    """Check a checkpoint's payload (``kind`` ``best`` or ``last``); returns its config."""
    if not isinstance(state, dict):
        raise file_error(path, "not a gwnet checkpoint")
    if state.get("format") != FORMAT:
        raise file_error(path, "not a gwnet checkpoint (a reference state_dict? use gwnet.load_reference_checkpoint)")
    _count(path, state, "format_version", low=1)
    version = _entry(path, state, "gwnet_version", str)
    if not VERSION.fullmatch(version):
        raise file_error(path, f"entry 'gwnet_version' is {_shown(version)}, not a version number")
    missing = [k for k in TRAINED if k not in state]
    if missing:
        raise file_error(path, f"checkpoint lacks {', '.join(missing)} (not the {kind}.pt of a gwnet run?)")
    for key, want in TRAINED.items():
        _entry(path, state, key, want)
    # Files of this version hold every option; older ones may lack options added since.
    cfg = check_saved_config(path, state["config"], complete=version == __version__)
    ids = state["sensor_ids"]
    if not ids or not all(isinstance(s, str) for s in ids) or len(set(ids)) != len(ids):
        raise file_error(path, "entry 'sensor_ids' must be distinct strings, at least one")
    _check_derived(path, cfg, len(ids))
    adj = state["adjacency"]
    if adj.dim() != 2 or tuple(adj.shape) != (len(ids), len(ids)) or not adj.is_floating_point():
        raise file_error(path, f"entry 'adjacency' has shape {tuple(adj.shape)} ({adj.dtype}), expected "
                         f"{len(ids)} x {len(ids)} floats (one row per sensor id)")
    if not bool(torch.isfinite(adj).all()) or bool((adj < 0).any()):
        raise file_error(path, "entry 'adjacency' holds negative, NaN or infinite weights")
    scaler = state["scaler"]
    _number(path, scaler, "mean", low=0.0, where="scaler")  # of readings, which are never negative
    std = _number(path, scaler, "std", where="scaler")
    if std <= 0:
        raise file_error(path, f"scaler 'std' is {std!r}: it must be above 0 (forecasts divide by it)")
    fill = _entry(path, scaler, "fill_zeroes", bool, where="scaler")
    if fill != cfg.data.fill_zeroes:
        raise file_error(path, f"scaler 'fill_zeroes' is {fill}, config data.fill_zeroes {cfg.data.fill_zeroes}")
    extra = sorted(set(scaler) - {f.name for f in dataclasses.fields(StandardScaler)})
    if extra:
        raise file_error(path, f"scaler has unknown field {extra[0]!r}")
    weights = state["model"]
    if not weights or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise file_error(path, "entry 'model' is not a state_dict (names to tensors)")
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise file_error(path, f"weight {name!r} holds NaN or infinite values")
    if kind == "best":
        _count(path, state, "epoch", low=1)
        _number(path, state, "val_mae", low=0.0)
    else:
        check_training_entries(path, state)
    return cfg


def check_training_entries(path, state: dict) -> None:
    """last.pt's progress and training state, each of its type and range and agreeing together."""
    for key, want in LAST.items():
        _entry(path, state, key, want)
    finished = state["finished"]
    for key, want in TRAINING_STATE.items():
        if not finished or key in state:
            _entry(path, state, key, want)
    if "sharded" in state:
        _entry(path, state, "sharded", str)
    elif not finished or "optimizer" in state:
        _entry(path, state, "optimizer", dict)
    epoch = _count(path, state, "epoch")
    best_epoch = _count(path, state, "best_epoch")
    bad = _count(path, state, "bad_epochs")
    best = _number(path, state, "best_val_mae", low=0.0, allow_inf=True)
    if best_epoch > epoch or bad > epoch:
        raise file_error(path, f"entries 'best_epoch' {best_epoch} and 'bad_epochs' {bad} cannot exceed "
                         f"'epoch' {epoch}")
    history = state["history"]
    if len(history) != epoch:
        raise file_error(path, f"entry 'history' holds {len(history)} epochs, 'epoch' says {epoch}")
    for i, record in enumerate(history):
        if not isinstance(record, dict) or record.get("epoch") != i + 1:
            raise file_error(path, f"entry 'history' row {i} is not the record of epoch {i + 1}")
    recorded = history[best_epoch - 1].get("val_mae") if best_epoch else math.inf
    if best != recorded:
        raise file_error(path, f"entry 'best_val_mae' {best!r} is not the validation MAE its history records "
                         f"for 'best_epoch' {best_epoch} ({recorded!r})")
    if "shuffle_rng" in state:
        _rng(path, "shuffle_rng", state["shuffle_rng"], torch.Generator().get_state())
    if "torch_rng" in state:
        rngs = state["torch_rng"] if isinstance(state["torch_rng"], list) else [state["torch_rng"]]
        if not rngs:
            raise file_error(path, "entry 'torch_rng' is empty")
        for rng in rngs:
            _rng(path, "torch_rng", rng, torch.get_rng_state())
    if "scheduler" in state:
        _check_numbers(path, "scheduler", state["scheduler"])
    if "optimizer" in state:
        opt = state["optimizer"]
        groups = _entry(path, opt, "param_groups", list, where="optimizer")
        _entry(path, opt, "state", dict, where="optimizer")
        for group in groups:
            if not isinstance(group, dict) or not isinstance(group.get("params"), list):
                raise file_error(path, "optimizer 'param_groups' are not groups of parameters")
            _check_numbers(path, "optimizer group", {k: v for k, v in group.items() if k != "params"})
    partial = state.get("partial")
    if partial is not None:
        order = _entry(path, partial, "order", torch.Tensor, where="partial")
        if order.dim() != 1 or order.dtype != torch.int64 or not torch.equal(order.sort().values,
                                                                              torch.arange(len(order))):
            raise file_error(path, "partial 'order' is not an order of the training windows")
        _count(path, partial, "next_batch", where="partial")
        sums = _entry(path, partial, "sums", torch.Tensor, where="partial")
        if not sums.is_floating_point() or not bool(torch.isfinite(sums).all()):
            raise file_error(path, "partial 'sums' are not finite numbers")
        grads = _entry(path, partial, "grads", (list, tuple), where="partial")
        if len(grads) > 4 or not all(_is(g, float) and math.isfinite(g) for g in grads):
            raise file_error(path, "partial 'grads' are not up to 4 finite numbers")


def _check_numbers(path, what: str, table: Any) -> None:
    """Every number of a state table (a scheduler's, an optimizer group's) finite."""
    if not isinstance(table, dict):
        raise file_error(path, f"{what} is {_shown(table)}, not a table")
    for key, value in table.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, torch.Tensor):
                bad = v.is_floating_point() and not bool(torch.isfinite(v).all())
            else:
                bad = isinstance(v, float) and not math.isfinite(v) or isinstance(v, int) and abs(v) > MAX_COUNT
            if bad:
                raise file_error(path, f"{what} {key!r} is {_shown(v)}, not a finite number")


def check_optimizer_state(path, saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """A saved optimizer state must have this optimizer's groups and, for each parameter, state
    of that parameter's shape (Adam's moments; an 8-bit optimizer's blocks are not compared)."""
    ours = optimizer.state_dict()
    theirs = saved["param_groups"]
    if len(theirs) != len(ours["param_groups"]) or any(
            len(a["params"]) != len(b["params"]) or set(a) != set(b) for a, b in zip(theirs, ours["param_groups"])):
        sizes = [len(g["params"]) for g in theirs]
        raise file_error(path, f"optimizer has {len(theirs)} parameter group(s) of {sizes} parameters, the "
                         f"model's optimizer {[len(g['params']) for g in ours['param_groups']]} (or other options)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in theirs for i in group["params"]]
    if sorted(ids, key=repr) != sorted(set(ids), key=repr):
        raise file_error(path, "optimizer groups list a parameter twice")
    where = dict(zip(ids, params))
    for key, entry in saved["state"].items():
        if key not in where or not isinstance(entry, dict):
            raise file_error(path, f"optimizer state {key!r} belongs to no parameter of the model")
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise file_error(path, f"optimizer state {key!r} {name!r} is {_shown(value)}, not a tensor")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise file_error(path, f"optimizer state {key!r} {name!r} holds NaN or infinite values")
            if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and value.dim() > 0 \
                    and value.shape != where[key].shape:
                raise file_error(path, f"optimizer state {key!r} {name!r} has shape {tuple(value.shape)}, its "
                                 f"parameter {tuple(where[key].shape)}")


def check_agreement(config_path, raw: dict, last_path, state: dict, cfg: Config, free: tuple = ()) -> None:
    """On resume, ``config.json`` (``raw``, the run's config after the flags: ``cfg``) must
    describe what ``last.pt`` trained: a hand-edited option would be recorded but not used
    (the optimizer's saved learning rate wins), so it is refused. Where and how the run
    executes, and its epoch budget, may change, and the options named in ``free``."""
    free = set(RESUMABLE) | set(free)
    for section, part in (("", cfg), ("data", cfg.data), ("model", cfg.model), ("train", cfg.train)):
        free |= {f"{section}.{n}" if section else n for n in fields_with_role(part, "runtime")}
    missing = sorted(set(flatten(state["config"])) - set(flatten(raw)) - free)
    if missing:
        raise file_error(config_path, f"lacks {missing[0]}, which {os.fspath(last_path)} trained with")
    theirs, ours = flatten(state["config"]), flatten(cfg.to_dict())
    for key in sorted(set(theirs) | set(ours)):
        if key not in free and theirs.get(key) != ours.get(key):
            raise file_error(config_path, f"{key} is {ours.get(key)!r}, but {os.fspath(last_path)} trained with "
                             f"{theirs.get(key)!r}; a resume continues what last.pt holds, so this change would "
                             "be recorded but not used: restore it, or start a new run (--init-from this one)")
