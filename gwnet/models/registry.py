"""The model registry: a name, a config dataclass and a build function per model.

A run's config names its model (``Config.arch``) and holds that model's config section, and
every checkpoint carries the config, so everything that rebuilds a model (``load_trained``,
``evaluate``, ``--resume``, ``--init-from``, ``gwnet-predict``, the paper table) goes through
:func:`build_model_from_config` and works for any registered model. Registering a model also
registers a preset of the same name (``gwnet-train --model NAME``), unless ``preset=False``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import scipy.sparse as sp
from torch import nn

from ..config import Config, ModelConfig
from ..errors import GWNetError
from ..registry import MODELS, PRESETS
from .quantiles import build_with_quantiles

# The data's normalised fixed supports (N x N, row = source sensor), as scipy CSR matrices.
Supports = Sequence[sp.csr_matrix]
BuildFn = Callable[[ModelConfig, Supports], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of a model.

    Attributes:
        name: the model's name (``Config.arch``).
        config: its config dataclass, a subclass of :class:`~gwnet.config.ModelConfig`.
        build: ``build(config, supports) -> nn.Module`` mapping scaled inputs ``(B, L, N, F)``
            to forecasts ``(B, H, N)`` in the scaled target's units.
        horizon_head: the state-dict prefix of the output layer, whose first dimension has one
            row per horizon: ``--init-from`` (and pretrain-then-finetune) copies the rows a
            shorter-horizon run has and leaves the others fresh. ``None``: shapes must match.
    """

    name: str
    config: type[ModelConfig]
    build: BuildFn
    horizon_head: str | None = None


def register_model(name: str, config: type[ModelConfig], *, horizon_head: str | None = None,
                   preset: bool = True, replace: bool = False) -> Callable[[BuildFn], BuildFn]:
    """Decorator registering ``build`` as model ``name`` configured by ``config``::

        @dataclass
        class MyConfig(gwnet.ModelConfig):
            hidden: int = gwnet.opt(64, "hidden units")

        @gwnet.register_model("my-model", MyConfig, horizon_head="head")
        def build(cfg: MyConfig, supports) -> nn.Module:
            return MyModel(cfg)

    With ``preset`` (the default) ``Config.from_preset(name)`` and ``gwnet-train --model
    name`` give the model's defaults with the improved recipe for data and training.
    """
    if not (isinstance(config, type) and issubclass(config, ModelConfig)):
        raise TypeError(f"the config of model {name!r} must subclass gwnet.config.ModelConfig")

    def deco(build: BuildFn) -> BuildFn:
        MODELS.add(name, ModelSpec(name, config, build, horizon_head), replace)
        if preset:
            PRESETS.add(name, lambda: Config(preset=name, arch=name, model=config()), replace)
        return build

    return deco


def unregister_model(name: str) -> None:
    """Remove a model (and its preset of the same name, if it registered one)."""
    spec = MODELS.get(name)
    MODELS.remove(name)
    if spec is not None and name in PRESETS and PRESETS[name]().arch == name:
        PRESETS.remove(name)


def model_spec(name: str) -> ModelSpec:
    return MODELS.get_entry(name, hint=" (register it with gwnet.register_model before loading such a run)")


def build_model_from_config(cfg: Config, supports: Supports) -> nn.Module:
    """The model ``cfg`` describes (``cfg.arch`` with ``cfg.model``), on ``supports``."""
    spec = model_spec(cfg.arch)
    if not isinstance(cfg.model, spec.config):
        raise GWNetError(f"model {cfg.arch!r} takes a {spec.config.__name__}, got {type(cfg.model).__name__}")
    if cfg.model.quantiles:  # horizons x quantiles outputs, viewed as (B, H, Q, N)
        return build_with_quantiles(lambda model: spec.build(model, supports), cfg.model)
    return spec.build(cfg.model, supports)
