"""One typed configuration tree shared by the command line, the Python API and checkpoints.

``Config`` holds three sections, :class:`DataConfig`, :class:`GWNetConfig` (the model) and
:class:`TrainConfig`. Every field carries its help text (and allowed values) in its
``metadata``, so the CLI builds its flags from these classes and a saved ``config.json``
rebuilds exactly the same run. Presets (``original``, ``improved``, scaled sizes) are
functions returning filled-in trees; nothing else holds defaults.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .atomic import atomic_write_text
from .errors import GWNetError, file_error

ADJTYPES = ("transition", "doubletransition", "symnadj", "scalap", "normlap", "identity")


def opt(default, help: str, choices: tuple | None = None):
    """A dataclass field whose help text and choices the CLI reads."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """``{field: (type, optional)}`` of a config dataclass, from its annotations."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        out[name] = (next(a for a in args if a is not type(None)) if optional else hint, optional)
    return out


def coerce(cls: type, name: str, value: Any, source: str) -> Any:
    """``value`` as field ``name`` of ``cls`` wants it (config files may hold "1e-3" or 5 for 5.0)."""
    kind, optional = field_types(cls)[name]
    if value is None and optional:
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is int:
            if not isinstance(value, bool) and float(value) == int(float(value)):
                return int(float(value))
        elif kind is float:
            if not isinstance(value, bool):
                return float(value)
        elif isinstance(value, kind):
            return value
    except (TypeError, ValueError):
        pass
    raise GWNetError(f"{source}: option {name} must be {'none or ' if optional else ''}"
                     f"{kind.__name__}, got {value!r}")


@dataclass
class DataConfig:
    """Where the readings and the sensor graph come from and how windows are cut."""

    dataset: str = opt("synthetic", "named dataset (synthetic, metr-la, pems-bay) or a directory "
                       "holding a speeds file and a graph file")
    data: Optional[str] = opt(None, "speeds file (.h5, .csv, .parquet); overrides --dataset")
    adj: Optional[str] = opt(None, "sensor graph: DCRNN pickle or distances CSV from,to,distance")
    key: Optional[str] = opt(None, "HDF5 key of the frame, needed when the file holds several")
    seq_len: int = opt(12, "past steps per input window")
    horizon: int = opt(12, "future steps to forecast")
    first_offset: int = opt(1, "steps from the last input to the first target")
    time_of_day: bool = opt(True, "add the time-of-day fraction as an input feature")
    day_of_week: bool = opt(False, "add a one-hot day of week (7 features)")
    fill_zeroes: bool = opt(True, "replace missing (0) input readings by the training mean")
    adjtype: str = opt("doubletransition", "normalisation of the fixed supports", ADJTYPES)
    normalized_k: float = opt(0.1, "distances CSV: kernel weights below this become 0")
    train_ratio: float = opt(0.7, "share of windows for training (chronological)")
    test_ratio: float = opt(0.2, "share of windows for testing (the last ones)")
    synth_nodes: int = opt(40, "synthetic dataset: number of sensors")
    synth_days: int = opt(14, "synthetic dataset: days of 5-minute readings")
    synth_seed: int = opt(0, "synthetic dataset: generator seed")

    @property
    def in_dim(self) -> int:
        """Input features per node and step: speed, then the calendar features."""
        return 1 + int(self.time_of_day) + 7 * int(self.day_of_week)

    @property
    def num_supports(self) -> int:
        """How many fixed supports ``adjtype`` yields."""
        return 2 if self.adjtype == "doubletransition" else 1


@dataclass
class GWNetConfig:
    """Graph WaveNet hyperparameters (defaults: the improved model of Shleifer et al.)."""

    num_nodes: int = opt(207, "sensors in the graph")
    in_dim: int = opt(2, "input features per node and step")
    out_dim: int = opt(12, "forecast horizons")
    num_supports: int = opt(2, "fixed supports fed to the graph convolution")
    residual_channels: int = opt(40, "channels of the residual stream")
    dilation_channels: int = opt(40, "channels of the gated temporal convolution")
    skip_channels: int = opt(320, "channels of the skip connections")
    end_channels: int = opt(640, "channels of the first output convolution")
    blocks: int = opt(4, "blocks of dilated layers (dilation resets per block)")
    layers: int = opt(2, "layers per block (dilation 1, 2, 4, ...)")
    kernel_size: int = opt(2, "temporal kernel size")
    dropout: float = opt(0.3, "dropout in the graph convolution")
    order: int = opt(2, "diffusion order (powers of each support)")
    do_graph_conv: bool = opt(True, "graph convolution (off: a 1x1 residual convolution)")
    addaptadj: bool = opt(True, "learn an adaptive adjacency softmax(relu(E1 E2))")
    aptonly: bool = opt(False, "use the adaptive adjacency only, no fixed supports")
    randomadj: bool = opt(True, "random node embeddings (off: SVD of the first support)")
    apt_size: int = opt(10, "node embedding size of the adaptive adjacency")
    cat_feat_gc: bool = opt(True, "separate start convolutions for speed and other features, "
                            "graph-conv output added to its input")
    stable_embedding: bool = opt(False, "node embeddings as a stable embedding (layer norm, "
                                 "Xavier init), for 8-bit optimizers")
    graph_conv: str = opt("fast", "graph convolution kernel: fast, or dense (reference math)",
                          ("fast", "dense"))

    @property
    def receptive_field(self) -> int:
        """Input steps one output sees: 1 + sum over layers of (kernel_size - 1) * dilation."""
        per_block = sum((self.kernel_size - 1) * 2**i for i in range(self.layers))
        return 1 + self.blocks * per_block

    @classmethod
    def original(cls, **kw) -> "GWNetConfig":
        """Wu et al. 2019: 32 channels, skip 256, end 512, no ``cat_feat_gc``."""
        base = dict(residual_channels=32, dilation_channels=32, skip_channels=256,
                    end_channels=512, cat_feat_gc=False)
        return cls(**{**base, **kw})

    @classmethod
    def improved(cls, **kw) -> "GWNetConfig":
        """Shleifer et al. 2019: 40 channels, skip 320, end 640, ``cat_feat_gc``."""
        return cls(**kw)

    @classmethod
    def scaled(cls, size: str, **kw) -> "GWNetConfig":
        """Wider and deeper variants for sharded training (``base``, ``large``, ``xl``)."""
        if size not in SCALED_SIZES:
            raise GWNetError(f"unknown scaled size {size!r}; choose one of {', '.join(SCALED_SIZES)}")
        return cls(**{**SCALED_SIZES[size], **kw})


SCALED_SIZES: dict[str, dict[str, Any]] = {
    "base": dict(residual_channels=64, dilation_channels=64, skip_channels=512,
                 end_channels=1024, apt_size=16),
    "large": dict(residual_channels=128, dilation_channels=128, skip_channels=1024,
                  end_channels=2048, blocks=6, apt_size=32),
    "xl": dict(residual_channels=256, dilation_channels=256, skip_channels=2048,
               end_channels=4096, blocks=8, apt_size=64),
}


@dataclass
class TrainConfig:
    """Optimisation, evaluation and run-management options (defaults: improved paper)."""

    epochs: int = opt(100, "maximum epochs")
    batch_size: int = opt(64, "windows per batch")
    lr: float = opt(1e-3, "Adam learning rate")
    weight_decay: float = opt(1e-4, "weight decay")
    lr_decay: float = opt(0.97, "learning-rate factor per epoch (1 = constant)")
    clip: Optional[float] = opt(3.0, "gradient-norm clipping (none to disable)")
    patience: int = opt(20, "early stopping: epochs without a better validation MAE")
    batches_per_epoch: Optional[int] = opt(None, "cap on training batches per epoch")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    precision: str = opt("fp32", "fp32, or bf16 autocast", ("fp32", "bf16"))
    optimizer: str = opt("adam", "adam, adamw, or adamw8bit (block-wise 8-bit states)",
                         ("adam", "adamw", "adamw8bit"))
    null_value: float = opt(0.0, "target value that marks a missing reading")
    clamp_min: float = opt(0.0, "evaluation: clamp predictions to at least this")
    clamp_max: float = opt(70.0, "evaluation: clamp predictions to at most this")
    nan_policy: str = opt("stop", "non-finite loss: stop (keep the last good checkpoint) "
                          "or skip the batch", ("stop", "skip"))
    init_from: Optional[str] = opt(None, "run directory whose best model initialises this one "
                                   "(extra horizons keep their fresh weights)")
    pretrain_horizon: Optional[int] = opt(None, "first train horizons 1..N, then finetune on all "
                                          "horizons from that checkpoint")
    progress: bool = opt(True, "show progress bars")
    fsdp: bool = opt(False, "shard with FSDP2 (launch with torchrun)")
    activation_checkpointing: bool = opt(False, "FSDP: recompute each block in backward")


PRESETS = ("improved", "original", *SCALED_SIZES)


@dataclass
class Config:
    """A whole run: which preset it started from, its output directory and the sections."""

    preset: str = opt("improved", "model preset", PRESETS)
    out: Optional[str] = opt(None, "run directory (default: runs/PRESET-TIMESTAMP)")
    data: DataConfig = field(default_factory=DataConfig)
    model: GWNetConfig = field(default_factory=GWNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_preset(cls, name: str = "improved") -> "Config":
        """The full tree of a preset: model size plus the training recipe that goes with it."""
        if name == "improved":
            return cls(preset=name)
        if name == "original":
            # Wu et al.: gradient clipping 5, constant learning rate, zeros kept as inputs.
            return cls(preset=name, model=GWNetConfig.original(),
                       data=DataConfig(fill_zeroes=False),
                       train=TrainConfig(clip=5.0, lr_decay=1.0))
        if name in SCALED_SIZES:
            return cls(preset=name, model=GWNetConfig.scaled(name))
        raise GWNetError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")

    def resolve(self, num_nodes: int | None = None) -> "Config":
        """Fill the fields that follow from the data (features, horizons, supports) and name
        the run directory if none was given."""
        if self.out is None:
            self.out = f"runs/{self.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.model.in_dim = self.data.in_dim
        self.model.out_dim = self.data.horizon
        # aptonly still receives the fixed supports: the SVD initialisation reads the first.
        self.model.num_supports = self.data.num_supports
        if num_nodes is not None:
            self.model.num_nodes = num_nodes
        return self

    def validate(self) -> "Config":
        """Check choices and ranges; raise :class:`GWNetError` on the first problem."""
        for section in (self, self.data, self.model, self.train):
            for f in fields(section):
                value = getattr(section, f.name)
                choices = f.metadata.get("choices")
                if choices is not None and value not in choices:
                    raise GWNetError(f"{f.name}={value!r} is not one of {', '.join(choices)}")
        d, m, t = self.data, self.model, self.train
        positive = {"seq_len": d.seq_len, "horizon": d.horizon, "first_offset": d.first_offset,
                    "epochs": t.epochs, "batch_size": t.batch_size, "blocks": m.blocks,
                    "layers": m.layers, "kernel_size": m.kernel_size, "order": m.order,
                    "apt_size": m.apt_size, "residual_channels": m.residual_channels,
                    "synth_nodes": d.synth_nodes, "synth_days": d.synth_days}
        for name, value in positive.items():
            if value < 1:
                raise GWNetError(f"{name} must be at least 1, got {value}")
        if not (0 < d.train_ratio < 1 and 0 < d.test_ratio < 1 and d.train_ratio + d.test_ratio < 1):
            raise GWNetError("train_ratio and test_ratio must be in (0, 1) and sum below 1")
        if not 0 <= m.dropout < 1:
            raise GWNetError(f"dropout must be in [0, 1), got {m.dropout}")
        if t.pretrain_horizon is not None and not 1 <= t.pretrain_horizon < d.horizon:
            raise GWNetError(f"pretrain_horizon must be between 1 and horizon-1 ({d.horizon - 1})")
        if m.aptonly and not m.addaptadj:
            raise GWNetError("aptonly needs the adaptive adjacency (addaptadj)")
        return self

    # --- serialisation: the same dict goes into config.json and every checkpoint ---------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "Config":
        """Build from a (possibly partial) nested dict; unknown keys are an error."""
        raw = dict(raw)
        cfg = cls.from_preset(raw.pop("preset", "improved"))
        update(cfg, raw, source)
        return cfg

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        return cls.from_dict(read_config_file(path), source=os.fspath(path))


SECTIONS = ("data", "model", "train")


def update(cfg: Config, raw: dict[str, Any], source: str = "config") -> Config:
    """Apply a nested ``{section: {field: value}}`` dict (top-level fields too) in place."""
    top = {f.name for f in fields(Config)} - set(SECTIONS)
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise GWNetError(f"{source}: section {key!r} must be a table of options")
            section = getattr(cfg, key)
            names = {f.name for f in fields(section)}
            for name, v in value.items():
                if name not in names:
                    raise GWNetError(f"{source}: unknown option {key}.{name}")
                setattr(section, name, coerce(type(section), name, v, source))
        elif key in top:
            setattr(cfg, key, coerce(Config, key, value, source))
        else:
            raise GWNetError(f"{source}: unknown option {key!r}")
    return cfg


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise file_error(path, "no such config file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            import tomllib

            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        elif ext in (".yaml", ".yml"):
            import yaml

            with open(path) as fh:
                raw = yaml.safe_load(fh) or {}
        elif ext == ".json":
            with open(path) as fh:
                raw = json.load(fh)
        else:
            raise file_error(path, "config files must be .toml, .yaml/.yml or .json")
    except GWNetError:
        raise
    except Exception as exc:  # parser errors carry line numbers; keep them on one line
        raise file_error(path, f"cannot parse config: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise file_error(path, "config must be a table of options")
    return raw
