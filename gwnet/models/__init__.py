"""Models by name: the registry, Graph WaveNet (the first entry) and a per-sensor MLP baseline.

A new model is one file that defines a config dataclass (a subclass of
:class:`~gwnet.config.ModelConfig`), a module and a build function decorated with
:func:`register_model`; import it here (or, for a user's own model, anywhere before training
or loading) and every command and API takes it by name.
"""
from ..registry import MODELS
from .registry import ModelSpec, build_model_from_config, model_spec, register_model, unregister_model

# Built-in models register themselves on import.
from . import graph_wavenet, mlp  # noqa: E402,F401  isort: skip
from .mlp import MLPConfig, WindowMLP  # noqa: E402

__all__ = ["MODELS", "ModelSpec", "build_model_from_config", "model_spec", "register_model",
           "unregister_model", "MLPConfig", "WindowMLP"]
