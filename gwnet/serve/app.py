"""The FastAPI application of ``gwnet-serve``: the service, its safety checks and the routes.

Every route is an entry of :data:`gwnet.registry.ROUTES` (the built-in ones in
:mod:`gwnet.serve.routes`); :func:`create_app` mounts them all. What the server refuses gets
a 4xx status and ``{"error": "<one sentence>"}``, never a 500, and the server keeps serving.
"""
from __future__ import annotations

import hmac

from ..errors import GWNetError
from ..registry import ROUTES
from .forecaster import Forecaster
from .service import Route, ServeOptions, Service, check_options
from .window import RequestError


def error_response(status: int, message: str):
    from fastapi.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(forecaster: Forecaster, options: ServeOptions | None = None, model_thread=None):
    """The FastAPI app serving ``forecaster`` with ``options`` (checked first); forecasts run on
    ``model_thread`` (a :class:`~gwnet.serve.service.ModelThread`, best the one that loaded
    ``forecaster``; a new one without)."""
    from fastapi import FastAPI, Request

    from . import routes  # noqa: F401 - registers the built-in routes

    options = options or ServeOptions()
    check_options(options)
    service = Service(forecaster, options, model_thread)
    app = FastAPI(title="gwnet-serve", version=_version(),
                  description="Live traffic forecasts of a trained gwnet model or ensemble.")
    app.state.service = service
    token = options.token

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error_response(401, "This server needs the header 'Authorization: Bearer <token>'.")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > options.max_body_bytes):
            return error_response(413, f"The body is larger than the {options.max_body_bytes} bytes this "
                                  "server takes.")
        try:
            return await call_next(request)
        except RequestError as exc:
            return error_response(exc.status, exc.message)

    for route in ROUTES.values():
        app.add_api_route(route.path, _endpoint(route, service), methods=[route.method], summary=route.summary)
    return app


def _endpoint(route: Route, service: Service):
    from fastapi import Request

    async def endpoint(request: Request):
        try:
            return await route.handler(service, request)
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        except GWNetError as exc:
            return error_response(422, str(exc).rstrip(".") + ".")

    endpoint.__annotations__ = {"request": Request}  # resolved here, not as a string in this module
    endpoint.__name__ = route.handler.__name__
    endpoint.__doc__ = route.handler.__doc__
    return endpoint


def _version() -> str:
    from .._version import __version__

    return __version__
