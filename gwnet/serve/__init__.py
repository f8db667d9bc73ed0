"""``gwnet-serve``: live forecasts of a trained model or ensemble over HTTP.

:mod:`~gwnet.serve.forecaster` (the members loaded once, forecasting as ``gwnet-predict
--latest`` does), :mod:`~gwnet.serve.window` (the rolling window of readings and its state
file), :mod:`~gwnet.serve.parse` (JSON and CSV bodies), :mod:`~gwnet.serve.service` (options,
safety checks, the shared state), :mod:`~gwnet.serve.app` (the FastAPI app),
:mod:`~gwnet.serve.routes` (the endpoints, each registered in :data:`gwnet.registry.ROUTES`) and :mod:`~gwnet.serve.page` (the page at ``/``). FastAPI and
uvicorn come with the ``serve`` extra.
"""
from .app import create_app
from .service import Route, ServeOptions, Service, check_options, is_loopback, register_route
from .forecaster import Forecaster
from .window import ReadingWindow, RequestError, Row

__all__ = ["Route", "ServeOptions", "Service", "check_options", "create_app", "is_loopback", "register_route",
           "Forecaster", "ReadingWindow", "RequestError", "Row"]
