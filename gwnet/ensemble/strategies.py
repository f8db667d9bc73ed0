"""How an ensemble combines its members per horizon: one function per strategy, by name.

A strategy maps what the members did on validation windows (:class:`Validation`) to weights
``(horizons, members)``, zero where a member does not forecast a horizon. Adding one is
writing one function::

    @register_strategy("median-free-lunch")
    def my_weights(val: Validation, available: np.ndarray) -> np.ndarray:
        ...

after which ``Ensemble(members, "median-free-lunch")`` and ``gwnet-predict --strategy
median-free-lunch`` use it. ``needs_validation=False`` marks a strategy that ignores ``val``
(it is then ready without fitting), ``describe`` adds per-horizon fields to ``ensemble.json``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import scipy.optimize

from ..registry import STRATEGIES


@dataclass
class Validation:
    """Per-horizon statistics of the members on validation windows (valid readings only).

    ``mae[h, m]`` is member ``m``'s MAE at horizon ``h + 1`` (``inf`` where it does not
    forecast it); ``gram[h]`` and ``xty[h]`` are ``X^T X`` and ``X^T y`` of the members'
    predictions ``X`` and the readings ``y`` at that horizon, all least squares needs.
    """

    mae: np.ndarray  # (H, M)
    gram: np.ndarray  # (H, M, M)
    xty: np.ndarray  # (H, M)


WeightsFn = Callable[[Validation | None, np.ndarray], np.ndarray]
DescribeFn = Callable[[np.ndarray, Sequence[str]], dict]


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its weights function and how ``ensemble.json`` describes it."""

    name: str
    weights: WeightsFn
    needs_validation: bool = True
    describe: DescribeFn | None = None  # (weights of one horizon, member names) -> extra fields


def register_strategy(name: str, needs_validation: bool = True, describe: DescribeFn | None = None,
                      replace: bool = False) -> Callable[[WeightsFn], WeightsFn]:
    """Decorator registering a weights function as strategy ``name``."""
    def deco(fn: WeightsFn) -> WeightsFn:
        STRATEGIES.add(name, Strategy(name, fn, needs_validation, describe), replace)
        return fn

    return deco


@register_strategy("mean", needs_validation=False)
def mean_weights(val: Validation | None, available: np.ndarray) -> np.ndarray:
    """The average of the members that forecast the horizon."""
    return available / available.sum(axis=1, keepdims=True)


@register_strategy("per-horizon", describe=lambda w, names: {"member": names[int(w.argmax())]})
def best_per_horizon(val: Validation, available: np.ndarray) -> np.ndarray:
    """The member with the lowest validation MAE at the horizon (so on validation the ensemble
    equals the best member at every horizon)."""
    mae = np.where(available, val.mae, np.inf)
    return np.eye(available.shape[1])[mae.argmin(axis=1)]


@register_strategy("weighted", describe=lambda w, names: {"weight_sum": float(w.sum())})
def nnls_weights(val: Validation, available: np.ndarray) -> np.ndarray:
    """Non-negative least-squares weights per horizon on the validation readings. They are not
    normalised to sum to one: the optimum is over all non-negative weights, so rescaling it
    would make it worse on validation and lose the guarantee that it is no worse than the best
    single member (each member alone is a feasible point); free scale also corrects a bias the
    members share."""
    weights = np.zeros(available.shape)
    for h in range(available.shape[0]):
        idx = np.flatnonzero(available[h])
        weights[h, idx] = nnls_from_gram(val.gram[h][np.ix_(idx, idx)], val.xty[h, idx])
    return weights


def nnls_from_gram(gram: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """``argmin_{w >= 0} ||X w - y||^2`` from ``X^T X`` and ``X^T y`` alone.

    With ``X^T X = V S V^T`` the objective is ``||S^1/2 V^T w - S^-1/2 V^T X^T y||^2`` plus a
    constant (``X^T y`` lies in the range of ``X^T X``), an ordinary NNLS problem of size M.
    Eigenvalues that are zero up to rounding (members predicting identically) are dropped.
    """
    s, v = np.linalg.eigh(gram)
    keep = s > max(s.max(), 0.0) * 1e-12
    if not keep.any():  # every prediction is zero: any weights do equally well
        return np.zeros(len(xty))
    root = np.sqrt(s[keep])
    a = root[:, None] * v[:, keep].T
    b = (v[:, keep].T @ xty) / root
    return scipy.optimize.nnls(a, b)[0]

