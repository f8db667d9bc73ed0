"""Registries: every name a user can choose (a model, a preset, a logger, an ensemble strategy,
a file format).

Each registry starts empty here and is filled by the module that defines its entries, with a
decorator, so a new entry is one definition plus its registration and no list of names is
kept by hand anywhere. The registries live in this leaf module (it imports nothing of gwnet
but the errors) so that the config tree can offer their names as choices without importing
the modules that fill them: ``gwnet/__init__.py`` imports those, so by the time anything is
parsed or built every built-in entry is registered.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, Mapping, TypeVar

from .errors import GWNetError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A name -> entry mapping with a registering decorator and a one-line error for unknown
    names. It is a live ``Mapping``: config choices and CLI flags that hold it see entries
    registered after they were made."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T, replace: bool = False) -> T:
        if not replace and name in self._entries:
            raise GWNetError(f"a {self.kind} named {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str, replace: bool = False) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        def deco(entry: T) -> T:
            return self.add(name, entry, replace)

        return deco

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def get_entry(self, name: str, hint: str = "") -> T:
        """The entry called ``name``; a :class:`GWNetError` naming the known ones if none is."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise GWNetError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self)}{hint}") from None

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self)})"


# Filled by gwnet.models (and by users' own models): name -> gwnet.models.ModelSpec.
MODELS: Registry = Registry("model")
# Filled by gwnet.config (Graph WaveNet's) and gwnet.models.register_model: name -> () -> Config.
PRESETS: Registry = Registry("preset")
# Filled by gwnet.engine.listeners: name -> (trainer) -> EpochListener.
LOGGERS: Registry = Registry("logger")
# Filled by gwnet.ensemble.strategies: name -> Strategy.
STRATEGIES: Registry = Registry("strategy")
# Filled by gwnet.intervals.methods: name -> IntervalMethod subclass (calibrated forecast intervals).
INTERVALS: Registry = Registry("interval method")
# Filled by gwnet.serve.routes: "METHOD /path" -> Route (a gwnet-serve endpoint).
ROUTES: Registry = Registry("service route")
# Filled by gwnet.data.readers: file extension (".h5") -> Reader.
READERS: Registry = Registry("reading format")
# Filled by gwnet.data.protocols: named dataset -> DatasetSpec (files, protocol, where published).
DATASETS: Registry = Registry("dataset")
