"""The built-in endpoints of ``gwnet-serve``, each one registered function.

``POST /readings`` appends readings to the rolling window; ``GET /forecast`` forecasts from
it (JSON, or with ``Accept: text/csv`` the columns of gwnet-predict's predictions file);
``POST /forecast`` forecasts from the readings in its body alone (stateless);
``GET /health``, ``GET /metadata``; ``GET /`` the page. No request names a file.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from starlette.concurrency import run_in_threadpool

from ..ensemble.tables import tidy
from .service import Service, read_body, register_route
from .page import render_page
from .parse import parse_rows
from .window import ReadingWindow, RequestError


def _iso(stamp) -> str:
    return pd.Timestamp(stamp).isoformat()


def _positions(service: Service, request) -> list[int]:
    """Columns of the sensors ``?sensor=`` asks for (repeatable), default all."""
    asked = request.query_params.getlist("sensor")
    if not asked:
        return list(range(len(service.forecaster.sensor_ids)))
    where = service.window.where
    unknown = [s for s in asked if s not in where]
    if unknown:
        raise RequestError(404, f"No sensor {unknown[0][:40]!r}; GET /metadata lists the sensor ids.")
    return [where[s] for s in dict.fromkeys(asked)]


def _by_sensor(values: np.ndarray, sensor_ids: list[str], index: list[int]) -> dict[str, list[float]]:
    """``{sensor_id: [value per horizon]}`` of ``(H, N)`` ``values`` (one numpy pass: thousands of
    sensors cost a few milliseconds, not tens)."""
    rows = np.round(np.asarray(values, dtype=np.float64)[:, index], 6).T.tolist()
    return dict(zip([sensor_ids[i] for i in index], rows))


def forecast_response(service: Service, request, result) -> object:
    from fastapi.responses import JSONResponse, Response

    forecast, band = result
    f = service.forecaster
    index = _positions(service, request)
    if "text/csv" in request.headers.get("accept", ""):
        # With intervals the forecast carries lower/upper, and tidy() writes them as gwnet-predict does.
        table = tidy(forecast, f.sensor_ids, f.null_value)
        if len(index) < len(f.sensor_ids):
            table = table[table["sensor_id"].isin([f.sensor_ids[i] for i in index])]
        return Response(table.to_csv(index=False, na_rep=""), media_type="text/csv")
    prediction = forecast.prediction[0].numpy()  # (H, N)
    body = {
        "origin_time": _iso(forecast.origins[0]), "unit": f.config.unit, "target": f.config.target,
        "strategy": f.strategy, "step_minutes": f.step_minutes,
        "horizons": list(range(1, f.horizon + 1)), "minutes_ahead": f.minutes_ahead,
        "target_times": [_iso(t) for t in forecast.target_times[0]],
        "forecast": _by_sensor(prediction, f.sensor_ids, index),
    }
    if band is not None:
        lower, upper = (np.asarray(b).reshape(prediction.shape) for b in band)
        body["lower"] = _by_sensor(lower, f.sensor_ids, index)
        body["upper"] = _by_sensor(upper, f.sensor_ids, index)
    return JSONResponse(body)


@register_route("POST", "/readings", "Append the newest readings (JSON or CSV) to the rolling window")
async def post_readings(service: Service, request):
    """Body: JSON ``{"time": ..., "values": {sensor_id: reading}}`` (or a list of them), or CSV
    ``time,<sensor id>,...`` rows. Late, duplicate, off-grid or unknown-sensor rows are refused
    (409/422) and nothing of the body joins the window."""
    body = await read_body(request, service.options.max_body_bytes)
    rows = parse_rows(body, request.headers.get("content-type"))
    return await run_in_threadpool(service.window.add, rows)


@register_route("GET", "/forecast", "The next horizons for every sensor (or ?sensor=ID), JSON or CSV")
async def get_forecast(service: Service, request):
    """The forecast after the newest readings held; ``Accept: text/csv`` for the columns of
    gwnet-predict's predictions file."""
    _positions(service, request)  # an unknown sensor is refused before any work
    result = await service.model_thread.run(service.current_forecast)
    return forecast_response(service, request, result)


@register_route("POST", "/forecast", "Forecast from the readings in the body alone (stateless)")
async def post_forecast(service: Service, request):
    """Body as for POST /readings, holding at least the model's seq_len steps; the held window
    is neither read nor changed."""
    body = await read_body(request, service.options.max_body_bytes)
    rows = parse_rows(body, request.headers.get("content-type"))
    f = service.forecaster
    window = ReadingWindow(f.sensor_ids, f.seq_len, f.step_minutes, f.null_value)
    window.add(rows)
    if not window.ready:
        raise RequestError(422, f"The body spans {len(window.times)} steps; the model reads {window.seq_len}.")
    result = await service.model_thread.run(service.forecast_frame, window.frame(), False)
    return forecast_response(service, request, result)


@register_route("GET", "/health", "Whether the server is up and how full the window is")
async def health(service: Service, request):
    return {"status": "ok", **service.window.describe()}


@register_route("GET", "/metadata", "Sensors, step, horizons, unit and members of the model served")
async def metadata(service: Service, request):
    return {**service.forecaster.metadata(), "window": service.window.describe(),
            "locations": len(service.locations)}


@register_route("GET", "/", "A page showing the latest readings and forecast of every sensor")
async def page(service: Service, request):
    from fastapi.responses import HTMLResponse

    try:
        result = await service.model_thread.run(service.current_forecast)
    except RequestError:
        result = None  # the page says how many readings are still missing
    return HTMLResponse(render_page(service, result))
