"""``gwnet-serve``: serve live forecasts of one run or an ensemble of runs over HTTP.

The models are loaded once. POST /readings appends the newest readings (JSON or CSV) to a
rolling window (kept in --state so that a restart continues); GET /forecast gives the next
horizons of every sensor (JSON, or CSV with Accept: text/csv); POST /forecast forecasts from a
window in the body; GET /health, GET /metadata, GET / (a page of the forecast), GET /docs
(OpenAPI). It binds 127.0.0.1 by default; any other address needs --token. Needs the
``serve`` extra (FastAPI, uvicorn). See docs/serving.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from ..config import DataConfig
from ..ensemble.members import SOURCE_FIELDS
from ..errors import GWNetError
from ..intervals import INTERVALS
from ..registry import STRATEGIES
from .common import ArgumentParser, add_field, run_cli


def build_parser() -> argparse.ArgumentParser:
    from ..serve.service import ServeOptions, field_types_of

    parser = ArgumentParser(prog="gwnet-serve", description=__doc__,
                            epilog="Example: gwnet-serve runs/h3 runs/h12 --strategy mean --state window.npz")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (gwnet-train --out)")
    kinds = field_types_of(ServeOptions)
    for f in fields(ServeOptions):
        flag = "--" + f.name.replace("_", "-")
        kw = dict(dest=f.name, default=f.default, help=f.metadata["help"].replace("%", "%%"),
                  type=kinds[f.name], metavar=f.name.upper())
        if f.name == "strategy":
            kw.update(choices=STRATEGIES, metavar="{" + ",".join(STRATEGIES) + "}")
        if f.name == "interval_method":
            methods = ("auto", *INTERVALS)
            kw.update(choices=methods, metavar="{" + ",".join(methods) + "}")
        parser.add_argument(flag, **kw)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    group = parser.add_argument_group("data to fit a per-horizon or weighted ensemble on (default: the first run's)")
    for f in fields(DataConfig):
        if f.name in SOURCE_FIELDS:
            add_field(group, "data", f, show_default=False)
    return parser


def options_from_args(args: argparse.Namespace):
    from ..serve.service import ServeOptions

    values = {f.name: getattr(args, f.name) for f in fields(ServeOptions)}
    if values["token"] is None:
        values["token"] = os.environ.get("GWNET_SERVE_TOKEN") or None
    return ServeOptions(**values)


@run_cli("gwnet-serve")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise GWNetError(f"gwnet-serve needs FastAPI and uvicorn (pip install 'gwnet[serve]'): {exc}") from None
    import torch

    from ..engine.device import resolve_device
    from ..serve import Forecaster, check_options, create_app
    from ..serve.service import ModelThread

    options = options_from_args(args)
    check_options(options)  # before the models load: a refusal costs nothing
    check_port(options.host, options.port)
    # Every torch operation (loading, each forecast) on one thread: see ModelThread.
    model_thread = ModelThread()
    if options.threads:
        model_thread.call(torch.set_num_threads, options.threads)
    source = {name.split(".", 1)[1]: value for name, value in vars(args).items() if name.startswith("data.")}
    interval = interval_state = None
    if options.interval is not None:
        from ..ensemble.bands import IntervalOptions

        interval = IntervalOptions(options.interval, options.interval_method)
        interval_state = f"{options.state}.intervals.json" if options.state else None
    forecaster = model_thread.call(Forecaster, args.runs, options.strategy, resolve_device(args.device),
                                   interval=interval, interval_state=interval_state, **source)
    app = create_app(forecaster, options, model_thread)
    window = app.state.service.window
    held = f"; resumed {len(window.times)} steps from {options.state}" if window.times else ""
    print(f"gwnet-serve: {len(forecaster.members)} member(s), {len(forecaster.sensor_ids)} sensors, "
          f"{forecaster.seq_len} steps in, {forecaster.horizon} out{held}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            access_log=False, server_header=False)
    server = uvicorn.Server(config)
    _announce(server, options)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind (the port taken since the check)
        if exc.code in (0, None):
            raise
        raise GWNetError(f"--port {options.port}: the server could not listen on {options.host}:{options.port} "
                         "(see the message above); choose another --port") from None
    return 0


def check_port(host: str, port: int) -> None:
    """Refuse in one line a port the server cannot listen on (bound as uvicorn binds it)."""
    import socket

    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            raise GWNetError(f"--port {port}: cannot listen on {host}:{port} "
                             f"({exc.strerror or exc}); choose another --port") from None


def _announce(server, options) -> None:
    """Print the address once the socket is bound (the real port when --port 0)."""
    startup = server.startup

    async def announced(sockets=None):
        await startup(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                print(f"gwnet-serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)

    server.startup = announced


if __name__ == "__main__":
    sys.exit(main())
