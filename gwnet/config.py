"""One typed configuration tree shared by the command line, the Python API and checkpoints.

``Config`` holds three sections, :class:`DataConfig`, the model's config (a
:class:`ModelConfig`: :class:`GWNetConfig` for Graph WaveNet, another dataclass for each model
registered in :mod:`gwnet.models`) and :class:`TrainConfig`. Every field carries its help
text, allowed values and *role* in its ``metadata``, so the CLI builds its flags from these
classes, every compatibility check derives its list of fields from the roles, and a saved
``config.json`` rebuilds exactly the same run. Presets (``original``, ``improved``, scaled
sizes, one per registered model) are functions in :data:`gwnet.registry.PRESETS` returning
filled-in trees; nothing else holds defaults.

Roles (``role=`` of :func:`opt`):

==============  ==============================================================================
source          where the readings and the graph come from (replaceable at prediction time)
window          shapes a model's input windows: ensemble members must agree on it
horizon         how many steps are forecast (members may differ; evaluation keeps the run's)
derived         filled in from the data by :meth:`Config.resolve`; never a flag
output          derived from the horizon: may differ between a run and one initialised from it
regularization  training-only behaviour of the model (dropout): may differ at ``--init-from``
kernel          another implementation of the same mathematics: may differ at ``--init-from``
runtime         where and how a run executes, not what it computes (device, progress, loggers)
==============  ==============================================================================
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .atomic import atomic_write_text
from .errors import GWNetError, file_error
from .paths import check_input_file
from .registry import LOGGERS, PRESETS

ADJTYPES = ("transition", "doubletransition", "symnadj", "scalap", "normlap", "identity")
ROLES = ("source", "window", "horizon", "derived", "output", "regularization", "kernel", "runtime")
# How the CPU heap treats freed memory (gwnet.engine.allocator).
MALLOC_POLICIES = ("auto", "reuse", "system")
# How a student learns from its teachers (gwnet.engine.distill).
DISTILL_MODES = ("kd", "pseudo", "fill")
# DCRNN's chronological split (train, test shares of the windows), for data with no protocol.
DCRNN_SPLIT = (0.7, 0.2)
# Roles of fields a user never sets: they follow from the data.
DERIVED_ROLES = ("derived", "output")


def opt(default, help: str, choices=None, role: str | None = None, filled: bool = False):
    """A dataclass field whose help text, choices (a tuple, or a live registry) and role the
    CLI and the compatibility checks read. ``filled``: ``None`` means "decided by the data and
    its protocol", and a run's ``config.json`` holds the value that was decided."""
    meta: dict[str, Any] = {"help": help, "filled": filled}
    if choices is not None:
        meta["choices"] = choices
    if role is not None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        meta["role"] = role
    return field(default=default, metadata=meta)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data.seq_len": 12, ...}`` from a nested config dict (``Config.to_dict()``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def fields_filled_from_data(cls: Any) -> tuple[str, ...]:
    """Names of the fields of ``cls`` whose ``None`` the data and its protocol fill in."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("filled"))


def fields_with_role(cls: Any, *roles: str) -> tuple[str, ...]:
    """Names of the fields of config dataclass ``cls`` (or of an instance) that have one of ``roles``."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("role") in roles)


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
            number = None
            if isinstance(value, int) and not isinstance(value, bool):
                number = value
            elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                number = int(value)
            elif isinstance(value, (float, str)) and float(value).is_integer():  # 5.0, "1e3"; not inf/nan
                number = int(float(value))
            if number is not None and abs(number) <= MAX_SEED:  # what int64 (a seed, a tensor size) holds
                return number
        elif kind is float:
            # A number, or its text ("1e-3"); never a list, a table or a bool.
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                return float(value)
        elif typing.get_origin(kind) is list:  # a list of strings (run directories)
            if isinstance(value, str):
                return [value]
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
        elif typing.get_origin(kind) is tuple:  # a list of numbers (model.quantiles)
            if isinstance(value, (list, tuple)) and not any(isinstance(v, (bool, list, tuple, dict))
                                                            for v in value):
                return tuple(float(v) for v in value)
        elif isinstance(value, kind):
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    raise GWNetError(f"{source}: option {name} must be {'none or ' if optional else ''}"
                     f"{kind.__name__}, got {value!r}")


@dataclass
class DataConfig:
    """Where the readings and the sensor graph come from and how windows are cut."""

    dataset: str = opt("synthetic", "named dataset (synthetic, metr-la, pems-bay, pems03/04/07/08, "
                       "largest-sd/gba/gla/ca) or a directory holding a readings file and a graph file",
                       role="source")
    data: Optional[str] = opt(None, "readings file (.h5, .csv, .parquet, .npz); overrides --dataset",
                              role="source")
    adj: Optional[str] = opt(None, "sensor graph: DCRNN pickle, distances or edge-list CSV "
                             "from,to[,distance|cost|weight], .npy/.npz adjacency", role="source")
    key: Optional[str] = opt(None, "HDF5 key of the frame, needed when the file holds several",
                             role="source")
    target: Optional[str] = opt(None, "quantity forecast (speed, flow, occupancy...): picks the feature of a "
                                "multi-feature .npz; default: the dataset's protocol", role="window", filled=True)
    unit: Optional[str] = opt(None, "unit of the target, shown with results (default: the protocol's)",
                              filled=True)
    step_minutes: Optional[int] = opt(None, "minutes between readings: read from the timestamps; files "
                                      "without them (.npz) take the protocol's (5 for your own)", filled=True)
    start: Optional[str] = opt(None, "first timestamp of a file without timestamps (.npz); default: the "
                               "dataset's conventional start")
    adj_weights: Optional[str] = opt(None, "how graph edges become weights: kernel (DCRNN's Gaussian of "
                                     "distances), binary (1 both ways), given (as listed); default: by "
                                     "dataset and file", ("kernel", "binary", "given"))
    protocol: Optional[str] = opt(None, "the evaluation protocol the run used (filled in)", role="derived",
                                  filled=True)
    seq_len: int = opt(12, "past steps per input window", role="window")
    horizon: int = opt(12, "future steps to forecast", role="horizon")
    first_offset: int = opt(1, "steps from the last input to the first target", role="window")
    time_of_day: bool = opt(True, "add the time-of-day fraction as an input feature", role="window")
    day_of_week: bool = opt(False, "add a one-hot day of week (7 features)", role="window")
    fill_zeroes: bool = opt(True, "replace missing (0) input readings by the training mean")
    adjtype: str = opt("doubletransition", "normalisation of the fixed supports", ADJTYPES)
    normalized_k: float = opt(0.1, "distances CSV: kernel weights below this become 0")
    train_ratio: Optional[float] = opt(None, "share of windows for training (chronological); default: "
                                       "the protocol's (0.7 DCRNN, 0.6 PEMS0X and LargeST)", filled=True)
    test_ratio: Optional[float] = opt(None, "share of windows for testing (the last ones); default: the "
                                      "protocol's (0.2)", filled=True)
    synth_nodes: int = opt(40, "synthetic dataset: number of sensors")
    synth_days: int = opt(14, "synthetic dataset: days of 5-minute readings")
    synth_seed: int = opt(0, "synthetic dataset: generator seed")

    def split(self) -> tuple[float, float]:
        """``(train_ratio, test_ratio)``; DCRNN's where the protocol has not filled them in."""
        return (DCRNN_SPLIT[0] if self.train_ratio is None else self.train_ratio,
                DCRNN_SPLIT[1] if self.test_ratio is None else self.test_ratio)

    @property
    def in_dim(self) -> int:
        """Input features per node and step: speed, then the calendar features."""
        return 1 + int(self.time_of_day) + 7 * int(self.day_of_week)

    @property
    def num_supports(self) -> int:
        """How many fixed supports ``adjtype`` yields."""
        return 2 if self.adjtype == "doubletransition" else 1


@dataclass
class ModelConfig:
    """What every model's config holds: the sizes that follow from the data (role ``derived``,
    filled in by :meth:`resolve`). A model registered in :mod:`gwnet.models` subclasses it
    and adds its hyperparameters, each an :func:`opt` field (they become flags)."""

    num_nodes: int = opt(207, "sensors in the graph", role="derived")
    in_dim: int = opt(2, "input features per node and step", role="derived")
    out_dim: int = opt(12, "forecast horizons", role="output")
    num_supports: int = opt(2, "fixed supports built from the graph", role="derived",
                                  filled=True)
    seq_len: int = opt(12, "input steps per window", role="derived")
    quantiles: Optional[tuple[float, ...]] = opt(None, "forecast these quantile levels (sorted, in (0, 1), "
                                                 "with 0.5, e.g. 0.05 0.5 0.95): the output layer has horizons "
                                                 "x quantiles rows, training minimises the masked pinball loss "
                                                 "and the median is the point forecast; none: a point forecast")

    def resolve(self, data: "DataConfig", num_nodes: int | None = None) -> None:
        """Fill the derived sizes from the data options (and the graph's size when known)."""
        self.in_dim = data.in_dim
        self.out_dim = data.horizon
        self.seq_len = data.seq_len
        self.num_supports = data.num_supports
        if num_nodes is not None:
            self.num_nodes = num_nodes

    def validate(self) -> None:
        """Check the hyperparameters; raise :class:`GWNetError` on the first problem."""


@dataclass
class GWNetConfig(ModelConfig):
    """Graph WaveNet hyperparameters (defaults: the improved model of Shleifer et al.)."""

    residual_channels: int = opt(40, "channels of the residual stream")
    dilation_channels: int = opt(40, "channels of the gated temporal convolution")
    skip_channels: int = opt(320, "channels of the skip connections")
    end_channels: int = opt(640, "channels of the first output convolution")
    blocks: int = opt(4, "blocks of dilated layers (dilation resets per block)")
    layers: int = opt(2, "layers per block (dilation 1, 2, 4, ...)")
    kernel_size: int = opt(2, "temporal kernel size")
    dropout: float = opt(0.3, "dropout in the graph convolution", role="regularization")
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
    graph_conv: str = opt("auto", "graph convolution kernel: fast (Horner's scheme, CSR supports), dense "
                          "(reference math, dense products), or auto: fast on CPU; on CUDA dense up to "
                          "2,048 nodes or for a dense graph, else fast (the run prints its choice)",
                          ("auto", "fast", "dense"), role="kernel")
    adaptive: str = opt("dense", "form of the adaptive adjacency: dense (N x N softmax), topk "
                        "(the adaptive_k largest entries per row, renormalised), or lowrank "
                        "(kernelised softmax of adaptive_rank random features); topk and "
                        "lowrank never build an N x N matrix", ("dense", "topk", "lowrank"))
    adaptive_k: int = opt(20, "entries kept per row of the adaptive adjacency (adaptive=topk)")
    adaptive_rank: int = opt(64, "random features of the adaptive adjacency (adaptive=lowrank)")

    def validate(self) -> None:
        positive = {"blocks": self.blocks, "layers": self.layers, "kernel_size": self.kernel_size,
                    "order": self.order, "apt_size": self.apt_size,
                    "residual_channels": self.residual_channels}
        for name, value in positive.items():
            if value < 1:
                raise GWNetError(f"{name} must be at least 1, got {value}")
        channels = {"dilation_channels": self.dilation_channels, "skip_channels": self.skip_channels,
                    "end_channels": self.end_channels}
        for name, value in channels.items():
            if value < 1:
                raise GWNetError(f"{name} must be at least 1, got {value}")
        if not 0 <= self.dropout < 1:
            raise GWNetError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.aptonly and not self.addaptadj:
            raise GWNetError("aptonly needs the adaptive adjacency (addaptadj)")
        if self.adaptive not in ("dense", "topk", "lowrank"):
            raise GWNetError(f"adaptive must be dense, topk or lowrank, got {self.adaptive!r}")
        if self.adaptive_k < 1:
            raise GWNetError(f"adaptive_k must be at least 1, got {self.adaptive_k}")
        if self.adaptive_rank < 1:
            raise GWNetError(f"adaptive_rank must be at least 1, got {self.adaptive_rank}")

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
    device: str = opt("auto", "cpu, cuda, cuda:N or auto", role="runtime")
    precision: str = opt("fp32", "fp32, or bf16 autocast", ("fp32", "bf16"))
    optimizer: str = opt("adam", "adam, adamw, or adamw8bit (block-wise 8-bit states)",
                         ("adam", "adamw", "adamw8bit"))
    null_value: float = opt(0.0, "target value that marks a missing reading")
    clamp_min: float = opt(0.0, "evaluation: clamp predictions to at least this")
    clamp_max: Optional[float] = opt(None, "evaluation: clamp predictions to at most this; default: the "
                                     "protocol's (70 for METR-LA/PEMS-BAY), else the training maximum",
                                     filled=True)
    cuda_graphs: str = opt("auto", "replay the training step and the forecast as CUDA graphs: auto (on CUDA "
                           "with one process, Adam/AdamW, nan_policy stop and no teacher), on (refuse where "
                           "they cannot work) or off", ("auto", "on", "off"), role="runtime")
    nan_policy: str = opt("stop", "non-finite loss: stop (keep the last good checkpoint) "
                          "or skip the batch", ("stop", "skip"))
    init_from: Optional[str] = opt(None, "run directory whose best model initialises this one "
                                   "(extra horizons keep their fresh weights)")
    pretrain_horizon: Optional[int] = opt(None, "first train horizons 1..N, then finetune on all "
                                          "horizons from that checkpoint")
    progress: bool = opt(True, "show progress bars on a terminal (the start line and one line per epoch are "
                              "printed either way)", role="runtime")
    log: Optional[str] = opt(None, "extra epoch loggers, comma-separated (tensorboard: RUN_DIR/tensorboard/)",
                             role="runtime")
    fsdp: bool = opt(False, "shard with FSDP2 (launch with torchrun)")
    activation_checkpointing: bool = opt(False, "recompute each residual layer in backward (less activation "
                                         "memory, about a third more compute; with or without FSDP)",
                                         role="runtime")
    memmap: bool = opt(False, "memory-map the readings series from the cache directory, one copy shared by "
                       "the processes of a machine (always done for series above 1 GiB)", role="runtime")
    memory_limit_gb: Optional[float] = opt(None, "refuse to train when the memory estimate exceeds this many GB "
                                           "(none: the available memory, MemAvailable or free GPU memory)",
                                           role="runtime")
    malloc: str = opt("auto", "CPU heap: reuse keeps freed memory for the next step (no page faults on "
                      "activations above 32 MiB: large graphs train faster; RSS stays at its peak), system "
                      "leaves glibc's default; auto: reuse on CPU when an activation is above 32 MiB, "
                      "without activation checkpointing",
                      MALLOC_POLICIES, role="runtime")
    # Distillation (gwnet.ensemble.distill, docs/distillation.md).
    teacher: Optional[list[str]] = opt(None, "run directories of a teacher ensemble whose forecasts this run "
                                       "learns from (distillation; see distill_mode)")
    teacher_strategy: str = opt("per-horizon", "how the teachers combine per horizon, a gwnet-predict "
                                "--strategy (mean, per-horizon, weighted, ...), fitted on validation as "
                                "gwnet-predict fits it")
    distill_mode: str = opt("kd", "with teachers: kd (alpha x loss on readings + (1 - alpha) x loss on the "
                            "teachers' forecasts), pseudo (the teachers' forecasts are the targets) or fill "
                            "(readings, the teachers' forecasts where a reading is missing)", DISTILL_MODES)
    distill_alpha: float = opt(0.5, "kd: weight of the loss on readings (1: readings only, as without teachers)")
    shrink_from: Optional[str] = opt(None, "Graph WaveNet run directory whose best weights initialise this "
                                     "smaller Graph WaveNet (fewer layers per block, fewer blocks or fewer "
                                     "channels): shrink and fine-tune")

    def loggers(self) -> list[str]:
        """The extra epoch loggers ``log`` names (console lines and metrics.csv are always kept)."""
        return [name.strip() for name in (self.log or "").split(",") if name.strip()]


@dataclass
class Config:
    """A whole run: which preset it started from, its output directory and the sections.

    ``arch`` names the registered model (:data:`gwnet.registry.MODELS`) that ``model``
    configures; it follows from the preset.
    """

    preset: str = opt("improved", "model preset: a Graph WaveNet size or a registered model", PRESETS)
    out: Optional[str] = opt(None, "run directory (default: runs/PRESET-TIMESTAMP)", role="runtime")
    arch: str = opt("gwnet", "the registered model the model section configures", role="derived")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=GWNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_preset(cls, name: str = "improved") -> "Config":
        """The full tree of a preset: the model and its size plus the training recipe that goes
        with it (see :data:`gwnet.registry.PRESETS`)."""
        cfg = PRESETS.get_entry(name)()
        cfg.preset = name
        return cfg

    def resolve(self, num_nodes: int | None = None) -> "Config":
        """Fill the fields that follow from the data (features, horizons, supports) and name
        the run directory if none was given."""
        if self.out is None:
            # Microseconds and the process id: runs started in the same second (a seed sweep
            # in parallel) get directories of their own.
            stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() // 1000 % 1000000:06d}-{os.getpid()}"
            self.out = f"runs/{self.preset}-{stamp}"
        self.model.resolve(self.data, num_nodes)
        return self

    def validate(self) -> "Config":
        """Check choices and ranges; raise :class:`GWNetError` on the first problem."""
        for section in (self, self.data, self.model, self.train):
            for f in fields(section):
                value = getattr(section, f.name)
                choices = f.metadata.get("choices")
                if choices is not None and value not in choices and value is not None:
                    raise GWNetError(f"{f.name}={value!r} is not one of {', '.join(choices)}")
        d, t = self.data, self.train
        positive = {"seq_len": d.seq_len, "horizon": d.horizon, "first_offset": d.first_offset,
                    "epochs": t.epochs, "batch_size": t.batch_size,
                    "synth_nodes": d.synth_nodes, "synth_days": d.synth_days}
        for name, value in positive.items():
            if value < 1:
                raise GWNetError(f"{name} must be at least 1, got {value}")
        train, test = d.split()
        if not (0 < train < 1 and 0 < test < 1 and train + test < 1):
            raise GWNetError("train_ratio and test_ratio must be in (0, 1) and sum below 1")
        if not 0 <= d.normalized_k <= 1:  # a kernel weight lies in (0, 1]; NaN is refused too
            raise GWNetError(f"normalized_k must be in [0, 1], got {d.normalized_k}")
        if d.step_minutes is not None and not (d.step_minutes >= 1 and 1440 % d.step_minutes == 0):
            raise GWNetError(f"step_minutes must be whole minutes dividing a day, got {d.step_minutes}")
        self.model.validate()
        self.model.quantiles = validate_quantiles(self.model.quantiles)
        _validate_train(t)
        if t.pretrain_horizon is not None and not 1 <= t.pretrain_horizon < d.horizon:
            raise GWNetError(f"pretrain_horizon must be between 1 and horizon-1 ({d.horizon - 1})")
        for name in self.train.loggers():
            LOGGERS.get_entry(name, hint=" (train.log)")
        expected = _preset_arch(self.preset)
        if self.arch != expected:
            raise GWNetError(f"arch {self.arch!r} does not match preset {self.preset!r} (a {expected} preset)")
        return self

    # --- serialisation: the same dict goes into config.json and every checkpoint ---------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "Config":
        """Build from a (possibly partial) nested dict; unknown keys are an error."""
        raw = dict(raw)
        preset = raw.pop("preset", "improved")
        if preset not in PRESETS:
            arch = raw.get("arch", "gwnet")
            raise GWNetError(f"{source}: preset {preset!r} ({arch} model) is not registered; import the module "
                             f"that registers it first (known: {', '.join(PRESETS)})")
        cfg = cls.from_preset(preset)
        if raw.get("arch", cfg.arch) != cfg.arch:
            raise GWNetError(f"{source}: arch {raw['arch']!r} does not match preset {preset!r}")
        update(cfg, raw, source)
        if "seq_len" not in raw.get("model", {}):  # saved by gwnet 0.1, before models had it
            cfg.model.seq_len = cfg.data.seq_len
        return cfg

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        """A run's saved config (``config.json``, ``pipeline.json``), checked as a run's config."""
        cfg = cls.from_dict(read_config_file(path), source=os.fspath(path))
        try:
            return cfg.validate()
        except GWNetError as exc:
            raise file_error(path, str(exc)) from None


MAX_SEED = 2**63 - 1
MAX_MEMORY_GB = 2**20
DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")


def validate_quantiles(levels) -> Optional[tuple[float, ...]]:
    """``model.quantiles`` as a tuple of floats: sorted, distinct, in (0, 1), holding 0.5 (the
    point forecast); ``None`` (or empty) for a point model."""
    if levels is None or (isinstance(levels, (list, tuple)) and len(levels) == 0):
        return None
    if isinstance(levels, (str, bytes)) or not isinstance(levels, (list, tuple)):
        raise GWNetError(f"quantiles must be a list of levels in (0, 1), got {levels!r}")
    try:
        values = tuple(float(q) for q in levels)
    except (TypeError, ValueError):
        raise GWNetError(f"quantiles must be numbers in (0, 1), got {list(levels)!r}") from None
    shown = " ".join(f"{q:g}" for q in values)
    if not all(0 < q < 1 for q in values):
        raise GWNetError(f"quantiles must lie in (0, 1), got {shown}")
    if 0.5 not in values:
        raise GWNetError(f"quantiles must include 0.5 (the median is the point forecast), got {shown}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise GWNetError(f"quantiles must be sorted and distinct, got {shown}")
    return values


def _validate_train(t: TrainConfig) -> None:
    """Training options that make no sense: one :class:`GWNetError` for the first one."""
    def finite(name: str, value: float) -> None:
        if not math.isfinite(value):
            raise GWNetError(f"{name} must be a finite number, got {value}")

    finite("lr", t.lr)
    if t.lr <= 0:
        raise GWNetError(f"lr must be above 0, got {t.lr}")
    finite("weight_decay", t.weight_decay)
    if t.weight_decay < 0:
        raise GWNetError(f"weight_decay must be at least 0, got {t.weight_decay}")
    finite("lr_decay", t.lr_decay)
    if not 0 < t.lr_decay <= 1:
        raise GWNetError(f"lr_decay must be in (0, 1] (1 = constant learning rate), got {t.lr_decay}")
    if t.clip is not None:
        finite("clip", t.clip)
        if t.clip <= 0:
            raise GWNetError(f"clip must be above 0 (or none to disable clipping), got {t.clip}")
    if t.patience < 1:
        raise GWNetError(f"patience must be at least 1, got {t.patience}")
    if t.batches_per_epoch is not None and t.batches_per_epoch < 1:
        raise GWNetError(f"batches_per_epoch must be at least 1 (or none for all), got {t.batches_per_epoch}")
    if not 0 <= t.seed <= MAX_SEED:
        raise GWNetError(f"seed must be between 0 and 2**63-1, got {t.seed}")
    # The readers store every missing reading as 0.0 (NaN readings included), so a NaN
    # null_value would mark nothing missing and score the missing zeros as readings.
    if math.isnan(t.null_value):
        raise GWNetError("null_value nan marks nothing: the readers store missing readings (NaN ones too) as 0; "
                         "keep null_value 0")
    if math.isinf(t.null_value):
        raise GWNetError(f"null_value must be a finite number, got {t.null_value}")
    finite("clamp_min", t.clamp_min)
    if t.clamp_max is not None:
        if math.isnan(t.clamp_max):
            raise GWNetError("clamp_max must be a number (or none), got nan")
        if t.clamp_min >= t.clamp_max:  # equal bounds would forecast one constant
            raise GWNetError(f"clamp_min {t.clamp_min:g} must be below clamp_max {t.clamp_max:g}")
    if t.memory_limit_gb is not None and not 0 < t.memory_limit_gb <= MAX_MEMORY_GB:
        raise GWNetError(f"memory_limit_gb must be above 0 and at most {MAX_MEMORY_GB} (1 PiB), or none; "
                         f"got {t.memory_limit_gb}")
    if not isinstance(t.device, str) or not DEVICE_NAMES.fullmatch(t.device):
        raise GWNetError(f"unknown device {t.device!r}; use cpu, cuda, cuda:N or auto")
    finite("distill_alpha", t.distill_alpha)
    if not 0 <= t.distill_alpha <= 1:
        raise GWNetError(f"distill_alpha must be in [0, 1] (1: readings only), got {t.distill_alpha}")
    if t.teacher is not None and not t.teacher:
        raise GWNetError("teacher names no run directory (give one or more, or none)")
    if t.shrink_from and t.init_from:
        raise GWNetError("shrink_from and init_from both say where the weights start: give one")
    if t.teacher and t.pretrain_horizon is not None:
        raise GWNetError("teacher and pretrain_horizon cannot be combined (the stages have other training "
                         "windows); distil into a plain run, or --init-from a pretrained one")


# --- Graph WaveNet's presets (other models register theirs in gwnet.models) --------------
@PRESETS.register("improved")
def _improved() -> Config:
    """Shleifer et al.'s model and recipe (every default of the tree)."""
    return Config(preset="improved")


@PRESETS.register("original")
def _original() -> Config:
    """Wu et al.'s recipe: 100 epochs with no early stopping (every epoch trains, the best
    validation epoch is kept: patience equals the epochs), gradient clipping 5, constant
    learning rate, no upper clamp of forecasts (their evaluation clamps nothing; the lower
    bound 0 of non-negative readings stays), zeros kept as inputs."""
    epochs = 100
    return Config(preset="original", model=GWNetConfig.original(), data=DataConfig(fill_zeroes=False),
                  train=TrainConfig(epochs=epochs, patience=epochs, clip=5.0, lr_decay=1.0, clamp_max=math.inf))


def _scaled_preset(size: str):
    def make() -> Config:
        return Config(preset=size, model=GWNetConfig.scaled(size))

    make.__doc__ = f"Graph WaveNet, {size} size, for sharded training."
    return make


for _size in SCALED_SIZES:
    PRESETS.add(_size, _scaled_preset(_size))


def _preset_arch(name: str) -> str:
    """The model a preset builds."""
    return PRESETS.get_entry(name)().arch


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
    if not os.path.lexists(path):
        raise file_error(path, "no such config file")
    check_input_file(path, "config file")  # a FIFO or a device would never end
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            import tomllib

            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        elif ext in (".yaml", ".yml"):
            import yaml

            with open(path) as fh:
                raw = yaml.load(fh, Loader=_unique_keys_yaml_loader()) or {}
        elif ext == ".json":
            with open(path) as fh:
                raw = json.load(fh, object_pairs_hook=_unique_keys)
        else:
            raise file_error(path, "config files must be .toml, .yaml/.yml or .json")
    except GWNetError:
        raise
    except Exception as exc:  # parser errors carry line numbers; keep them on one line
        raise file_error(path, f"cannot parse config: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise file_error(path, "config must be a table of options")
    if "preset" in raw and not isinstance(raw["preset"], str):
        raise file_error(path, f"preset must be a name, got {raw['preset']!r}")
    return raw


class DuplicateKey(ValueError):
    """A config file states one option twice (the parser would keep the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(f"option {key!r} is given twice")
        seen[key] = value
    return seen


@functools.cache
def _unique_keys_yaml_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            for key in keys:
                if keys.count(key) > 1:
                    raise DuplicateKey(f"option {key!r} is given twice ({node.start_mark})")
            return super().construct_mapping(node, deep=deep)

    return Loader
