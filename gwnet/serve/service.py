"""What the endpoints of ``gwnet-serve`` share: its options and their checks, the service
(forecaster, rolling window, locations, cached forecast) and the route registration."""
from __future__ import annotations

import asyncio
import ipaddress
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from ..errors import GWNetError, file_error
from ..registry import ROUTES
from .forecaster import Forecaster
from .window import ReadingWindow, RequestError


def opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ServeOptions:
    """How the server runs (the ``gwnet-serve`` flags are made from these fields)."""

    host: str = opt("127.0.0.1", "address to listen on; one that is not loopback needs --token")
    port: int = opt(8000, "port to listen on (0: any free one)")
    token: Optional[str] = opt(None, "bearer token every request must carry (Authorization: Bearer TOKEN); "
                               "default: the GWNET_SERVE_TOKEN environment variable, else none (loopback only)")
    state: Optional[str] = opt(None, "state file of the rolling window (.npz): read at start when present, "
                               "rewritten after every accepted POST /readings, so a restart continues")
    locations: Optional[str] = opt(None, "sensor locations CSV (sensor_id, latitude, longitude, as METR-LA's "
                                   "graph_sensor_locations.csv) for the map on the page")
    strategy: str = opt("per-horizon", "how members combine per horizon, as gwnet-predict's --strategy")
    interval: Optional[float] = opt(None, "calibrated intervals of this coverage (e.g. 0.9): lower and upper "
                                    "on every forecast, fitted at start on the validation split of the runs' "
                                    "data as gwnet-predict --interval fits them, then adapted online as "
                                    "readings arrive")
    interval_method: str = opt("auto", "interval method, as gwnet-predict's --interval-method")
    max_body_bytes: int = opt(4 << 20, "largest request body taken; larger ones get 413")
    threads: Optional[int] = opt(None, "CPU threads for the forecasts (default: torch's)")


def field_types_of(cls) -> dict[str, type]:
    """The plain type of each field (``Optional[int]`` -> ``int``), for the CLI flags."""
    import typing

    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if args else hint
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_options(options: ServeOptions) -> None:
    """Refuse, in one line, what would expose the server or cannot work."""
    if not is_loopback(options.host) and not options.token:
        raise GWNetError(f"--host {options.host} is not a loopback address: pass --token (or set "
                         "GWNET_SERVE_TOKEN) so that every request must carry it")
    if options.token is not None and len(options.token) < 16:
        raise GWNetError("--token must be at least 16 characters (e.g. python -c \"import secrets; "
                         "print(secrets.token_urlsafe())\")")
    if not 0 <= options.port <= 65535:
        raise GWNetError(f"--port {options.port} is not a port number (0-65535)")
    if options.max_body_bytes < 1024:
        raise GWNetError("--max-body-bytes must be at least 1024")
    if options.threads is not None and options.threads < 1:
        raise GWNetError("--threads must be at least 1")
    if options.state is not None and not Path(options.state).absolute().parent.is_dir():
        raise GWNetError(f"--state {options.state}: the folder {Path(options.state).absolute().parent} does not "
                         "exist (create it, or give a state file in an existing folder)")


def read_locations(path: str | Path, sensor_ids: list[str]) -> dict[str, tuple[float, float]]:
    """``{sensor_id: (latitude, longitude)}`` of the model's sensors found in ``path``."""
    try:
        table = pd.read_csv(path, dtype={"sensor_id": str})
    except FileNotFoundError:
        raise file_error(path, "no such file") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise file_error(path, f"not a readable CSV ({' '.join(str(exc).split())[:120]})") from None
    missing = {"sensor_id", "latitude", "longitude"} - set(table.columns)
    if missing:
        raise file_error(path, f"lacks the column(s) {', '.join(sorted(missing))} (expected sensor_id, latitude, "
                         "longitude as METR-LA's graph_sensor_locations.csv)")
    known = set(sensor_ids)
    out = {}
    for sid, lat, lon in zip(table["sensor_id"].astype(str).str.strip(), table["latitude"], table["longitude"]):
        try:
            lat, lon = float(lat), float(lon)
        except (TypeError, ValueError):
            raise file_error(path, f"sensor {sid!r} has a latitude or longitude that is not a number") from None
        if sid in known and np.isfinite(lat) and np.isfinite(lon):
            out[sid] = (lat, lon)
    if not out:
        raise file_error(path, "locates none of the model's sensors")
    return out


class ModelThread:
    """The one thread that runs every torch operation of a server: loading the models and each
    forecast. An OpenMP team belongs to the thread that starts it, so torch work spread over
    several threads (the main thread loading, then a pool thread per request) keeps two teams
    on the same cores: a 207-sensor forecast took 40-46 ms in a pool thread against 18-19 ms on
    the thread that had loaded the model (2 cores, 2 threads)."""

    def __init__(self):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="gwnet-model")

    def call(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the model thread, waited for."""
        return self.executor.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable, *args):
        """``fn(*args)`` on the model thread, awaited without blocking the event loop."""
        return await asyncio.wrap_future(self.executor.submit(fn, *args))


class Service:
    """What the routes share: the forecaster, the rolling window, the options, a cache, and
    the thread the model runs on (:class:`ModelThread`; the one that loaded it, when given)."""

    def __init__(self, forecaster: Forecaster, options: ServeOptions, model_thread: ModelThread | None = None):
        self.model_thread = model_thread or ModelThread()
        self.forecaster = forecaster
        self.options = options
        self.window = ReadingWindow(forecaster.sensor_ids, forecaster.seq_len, forecaster.step_minutes,
                                    forecaster.null_value, options.state)
        self.locations = (read_locations(options.locations, forecaster.sensor_ids)
                          if options.locations else {})
        self.model_lock = threading.Lock()
        self._cached: tuple[int, Any] | None = None

    def current_forecast(self):
        """The forecast of the held window (computed once per accepted batch)."""
        window = self.window
        with window.lock:
            if not window.ready:
                raise RequestError(409, f"The window holds {len(window.times)} of the {window.seq_len} steps "
                                   "the model reads; POST more readings to /readings first.")
            version, frame = window.version, window.frame()
        cached = self._cached
        if cached is not None and cached[0] == version:
            return cached[1]
        result = self.forecast_frame(frame)
        self._cached = (version, result)
        return result

    def forecast_frame(self, frame: pd.DataFrame, update: bool = True):
        """The forecast of ``frame``; ``update=False`` for readings that are not the held
        window's (POST /forecast): the online intervals neither learn from them nor save."""
        with self.model_lock:
            return self.forecaster.forecast(frame, update=update)


@dataclass(frozen=True)
class Route:
    """One endpoint: ``handler(service, request)`` is an ``async`` function returning a response."""

    method: str
    path: str
    handler: Callable
    summary: str


def register_route(method: str, path: str, summary: str):
    """Decorator: make ``handler`` the endpoint ``METHOD path`` of every app built after."""
    def deco(handler: Callable) -> Callable:
        ROUTES.add(f"{method} {path}", Route(method, path, handler, summary))
        return handler

    return deco


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it grows past ``limit`` (chunked uploads too)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"The body is larger than the {limit} bytes this server takes.")
        chunks.append(chunk)
    return b"".join(chunks)
