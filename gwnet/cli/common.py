"""What every command shares: flags built from the config dataclasses, and error handling.

Each field of :class:`~gwnet.config.Config` becomes a ``--flag`` with the field's help text
and choices, so the CLI can never drift from the API; the model section's flags are those of
the chosen model's config class (see :func:`model_config_class`). Fields that follow from the
data (roles ``derived`` and ``output``) get no flag. Precedence: preset < ``--config`` file
< flags.
"""
from __future__ import annotations

import argparse
import functools
import sys
import warnings
from dataclasses import fields
from typing import Any, Callable

from ..config import (DERIVED_ROLES, SECTIONS, Config, DataConfig, ModelConfig, TrainConfig, field_types,
                      read_config_file, update)
from ..errors import GWNetError
from ..registry import PRESETS


def section_classes(model: type[ModelConfig]) -> dict[str, type]:
    return {"data": DataConfig, "model": model, "train": TrainConfig}


def model_config_class(argv: list[str] | None, base: Config | None = None) -> type[ModelConfig]:
    """The config class of the model the command line asks for, read before the full parser is
    built (its flags depend on it): ``--model``, else a ``--config`` file's preset, else
    ``base``'s model (a resumed run's), else the default preset's."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model", dest="preset", default=None)
    pre.add_argument("--config", dest="config_file", default=None)
    known, _ = pre.parse_known_args(argv)
    preset = known.preset
    if preset is None and known.config_file:
        preset = read_config_file(known.config_file).get("preset")
    if preset is None:
        return type(base.model) if base is not None else type(Config.from_preset().model)
    if preset not in PRESETS:
        return type(Config.from_preset().model)  # argparse then names the valid choices
    return type(Config.from_preset(preset).model)


def _parse_optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_field(group, section: str | None, f, model: type[ModelConfig] = ModelConfig) -> None:
    """Add the flag of config field ``f`` (of ``section``, or of the top level when None)."""
    kind, optional = field_types(section_classes(model)[section] if section else Config)[f.name]
    flag = "--" + ("model" if f.name == "preset" else f.name.replace("_", "-"))
    dest = f"{section}.{f.name}" if section else f.name
    kw: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=f.metadata.get("help"))
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = _parse_optional(kind) if optional else kind
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
            kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        else:
            kw["metavar"] = f.name.upper()
    group.add_argument(flag, **kw)


def add_config_flags(parser: argparse.ArgumentParser, sections=SECTIONS, top: bool = True,
                     model: type[ModelConfig] | None = None) -> None:
    """Add ``--config`` and one flag per config field of ``sections`` (the model section's
    from ``model``, default: the default preset's model)."""
    model = model or type(Config.from_preset().model)
    parser.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                        help="TOML, YAML or JSON file of options (flags override it)")
    if top:
        group = parser.add_argument_group("run")
        for f in fields(Config):
            if f.name not in SECTIONS and f.metadata.get("role") not in DERIVED_ROLES:
                add_field(group, None, f)
    for section in sections:
        title = f"model ({model.__name__}; another --model has other options)" if section == "model" else section
        group = parser.add_argument_group(title)
        for f in fields(section_classes(model)[section]):
            if f.metadata.get("role") not in DERIVED_ROLES:
                add_field(group, section, f, model)


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """Preset (or ``base``), then the ``--config`` file, then the flags given."""
    given = {k: v for k, v in vars(args).items() if k != "config_file"}
    file_raw = read_config_file(args.config_file) if getattr(args, "config_file", None) else {}
    preset = given.get("preset") or file_raw.get("preset")
    if base is None or preset is not None:
        base = Config.from_preset(preset or "improved")
    cfg = update(base, {k: v for k, v in file_raw.items() if k != "preset"},
                 source=args.config_file or "config")
    nested: dict[str, Any] = {}
    for dest, value in given.items():
        if "." in dest:
            section, name = dest.split(".", 1)
            nested.setdefault(section, {})[name] = value
        elif dest in {f.name for f in fields(Config)} and dest != "preset":
            nested[dest] = value
    return update(cfg, nested, source="command line")


def run_cli(prog: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Decorate a ``main(argv)``: user mistakes print one line and exit 2, Ctrl-C exits 130."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapper(argv: list[str] | None = None) -> int:
            default_format = warnings.formatwarning
            warnings.formatwarning = lambda msg, cat, *a, **k: f"{prog}: warning: {msg}\n"
            try:
                return int(main(argv) or 0)
            except GWNetError as exc:
                print(f"{prog}: error: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            finally:
                warnings.formatwarning = default_format

        return wrapper

    return wrap
