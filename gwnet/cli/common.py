"""What every command shares: flags built from the config dataclasses, and error handling.

Each field of :class:`~gwnet.config.Config` becomes a ``--flag`` with the field's help text
and choices, so the CLI can never drift from the API; the model section's flags are those of
the chosen model's config class (see :func:`model_config_class`). Fields that follow from the
data (roles ``derived`` and ``output``) get no flag. Precedence: preset < ``--config`` file
< flags.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import re
import sys
import typing
import warnings
from dataclasses import fields
from typing import Any, Callable

from ..config import (DERIVED_ROLES, SECTIONS, Config, DataConfig, ModelConfig, TrainConfig, field_types,
                      read_config_file, update)
from .._version import __version__
from ..atomic import DISK_ERRORS
from ..errors import GWNetError
from ..registry import PRESETS


def plain(text: str | None) -> str | None:
    """``text`` without reStructuredText markup: ``literal`` and :role:`target` become plain words."""
    if not text:
        return text
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (paragraphs kept), and every option's default in its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None or action.nargs == 0:  # a switch's help says what it does
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """Every command's parser: plain-text help with defaults, ``--version``, and a mistake in the
    flags as one line (a misspelled flag names the closest one), exit status 2."""

    def __init__(self, *args, version: bool = True, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        kw.setdefault("allow_abbrev", False)
        if kw.get("description"):
            kw["description"] = plain(kw["description"])
        super().__init__(*args, **kw)
        if version and self.add_help:
            self.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                              help="print the gwnet version and exit")

    def add_subparsers(self, **kw):
        kw.setdefault("parser_class", functools.partial(type(self), version=False))
        return super().add_subparsers(**kw)

    def option_strings(self) -> list[str]:
        """The flags this parser (and its subcommands) takes."""
        found = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found += list(sub._option_string_actions)
        return found

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            hints = []
            for word in message.split(":", 1)[1].split():
                if word.startswith("--"):
                    close = difflib.get_close_matches(word.split("=", 1)[0], self.option_strings(), n=1)
                    if close:
                        hints.append(f"did you mean {close[0]}?")
            if hints:
                message += f" ({'; '.join(hints)})"
        self.exit(2, f"{self.prog}: error: {message}\n")


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


@functools.lru_cache(maxsize=None)
def _preset_configs(names: tuple[str, ...]) -> tuple[Config, ...]:
    """One config per preset of ``names`` (read only), for the defaults shown in ``--help``."""
    return tuple(Config.from_preset(name) for name in names)


def default_text(section: str | None, name: str, model: type[ModelConfig] = ModelConfig) -> str:
    """``default: 3.0`` (the default preset's value, or the first preset of ``model``), with
    ``; presets may differ`` when another preset of the same model sets something else."""
    try:
        configs = [c for c in _preset_configs(tuple(PRESETS)) if section != "model" or type(c.model) is model]
    except GWNetError:
        return ""
    if not configs:
        return ""
    default = next((c for c in configs if c.preset == Config().preset), configs[0])

    def value(cfg: Config):
        return getattr(getattr(cfg, section) if section else cfg, name, None)

    shown = value(default)
    text = "none" if shown is None else str(shown).lower() if isinstance(shown, bool) else str(shown)
    differ = section is not None and any(value(c) != shown for c in configs)
    return f"default: {text}" + ("; presets may differ" if differ else "")


def add_field(group, section: str | None, f, model: type[ModelConfig] = ModelConfig,
              show_default: bool = True) -> None:
    """Add the flag of config field ``f`` (of ``section``, or of the top level when None);
    its help ends with the default preset's value unless ``show_default`` is false."""
    kind, optional = field_types(section_classes(model)[section] if section else Config)[f.name]
    flag = "--" + ("model" if f.name == "preset" else f.name.replace("_", "-"))
    dest = f"{section}.{f.name}" if section else f.name
    text = plain(f.metadata.get("help")) or ""
    shown = default_text(section, f.name, model if section == "model" else ModelConfig) if show_default else ""
    if shown and "default" not in text:  # a help that states its default already keeps it
        text = f"{text} ({shown})" if text else f"({shown})"
    kw: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is list:  # --teacher RUN [RUN ...]
        kw.update(nargs="+", type=str, metavar=f.name.upper())
    elif typing.get_origin(kind) is tuple:  # --quantiles 0.05 0.5 0.95
        kw.update(nargs="+", type=float, metavar="Q")
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
            except OSError as exc:
                if exc.errno not in DISK_ERRORS:
                    raise
                # A full, read-only or forbidden place a writer met: the file and the reason, one line.
                where = f"{exc.filename}: " if exc.filename else ""
                print(f"{prog}: error: {where}{exc.strerror or exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            finally:
                warnings.formatwarning = default_format

        return wrapper

    return wrap


# --- results a reader can read: minutes ahead, units, baselines beside the model ------------
def lead_label(horizon: str | int, data) -> str:
    """``+15 min`` for a horizon row (``mean`` stays), from the data's step and first offset."""
    if str(horizon) == "mean":
        return "mean"
    step = data.step_minutes or 5
    return f"+{(data.first_offset + int(horizon) - 1) * step} min"


def metrics_note(data) -> str:
    """``MAE and RMSE in mph (speed), MAPE in %``."""
    if data.unit:
        what = f" in {data.unit}" + (f" ({data.target})" if data.target else "")
    else:
        what = f" of {data.target} in its own unit" if data.target else ""
        what += " (name the unit with --unit)"
    return f"MAE and RMSE{what}, MAPE in %"


def results_table(table, data, baselines: dict | None = None):
    """A metrics table (rows: horizons 1..H and ``mean``; mae, rmse, mape_pct) with
    minutes ahead as rows, and each baseline's MAE and RMSE beside it."""
    out = table[["mae", "rmse", "mape_pct"]].copy()
    out.columns = ["MAE", "RMSE", "MAPE %"]
    for name, base in (baselines or {}).items():
        base = base.reindex(table.index.astype(str)) if base is not None else None
        if base is None:
            continue
        out[f"{name} MAE"] = base["mae"].to_numpy()
        out[f"{name} RMSE"] = base["rmse"].to_numpy()
    out.index = [lead_label(h, data) for h in table.index]
    out.index.name = "ahead"
    return out

