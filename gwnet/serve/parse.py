"""Request bodies to rows of readings, with one sentence for whatever is wrong.

JSON: one object ``{"time": "2012-03-01T08:05:00", "values": {"773869": 61.5, ...}}`` or a
list of them (``null`` marks a missing reading). CSV: a header ``time,<sensor id>,...`` (the
first column is the time whatever its name) and one row per step, an empty field marking a
missing reading: the layout of a readings file.
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import pandas as pd

from .window import RequestError, Row


def parse_time(text: Any, where: str) -> pd.Timestamp:
    if not isinstance(text, str) or not text.strip():
        raise RequestError(422, f"{where} needs a time as an ISO 8601 string, e.g. \"2012-03-01T08:05:00\".")
    try:
        stamp = pd.Timestamp(text.strip())
    except (ValueError, TypeError, OverflowError):
        raise RequestError(422, f"{where}: {text[:40]!r} is not an ISO 8601 time.") from None
    if stamp is pd.NaT or pd.isna(stamp):
        raise RequestError(422, f"{where}: {text[:40]!r} is not an ISO 8601 time.")
    if stamp.tzinfo is not None:
        raise RequestError(422, f"{where}: {text[:40]!r} has a UTC offset; send the local time of the readings "
                           "without one, as the training readings had.")
    return stamp


def _reading(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(422, f"{where} must be a number or null, got {json.dumps(value)[:40]}.")
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(422, f"{where} must be a finite number.")
    return value


def rows_from_json(body: bytes) -> list[Row]:
    try:
        data = json.loads(body, parse_constant=lambda name: _refuse_constant(name))
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"The body is not valid JSON ({str(exc).split(':')[0]}).") from None
    items = data if isinstance(data, list) else [data]
    rows = []
    for number, item in enumerate(items, 1):
        where = f"Reading {number}" if len(items) > 1 else "The reading"
        if not isinstance(item, dict) or set(item) != {"time", "values"} or not isinstance(item["values"], dict):
            raise RequestError(422, f"{where} must be an object {{\"time\": ..., \"values\": {{sensor_id: reading}}}}.")
        time = parse_time(item["time"], where)
        values = {str(k): _reading(v, f"{where}'s value of sensor {str(k)[:40]!r}") for k, v in item["values"].items()}
        rows.append(Row(time, values))
    return rows


def _refuse_constant(name: str):
    raise RequestError(422, f"The body holds {name}; readings must be finite numbers or null.")


def rows_from_csv(body: bytes) -> list[Row]:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RequestError(400, "The CSV body is not UTF-8 text.") from None
    try:
        records = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise RequestError(400, f"The body is not valid CSV ({exc}).") from None
    records = [r for r in records if any(field.strip() for field in r)]
    if len(records) < 2:
        raise RequestError(400, "The CSV body needs a header (time,<sensor id>,...) and at least one row.")
    header = [h.strip() for h in records[0]]
    sensors = header[1:]
    if not sensors or len(set(sensors)) != len(sensors) or any(not s for s in sensors):
        raise RequestError(400, "The CSV header must be the time column, then distinct sensor ids.")
    rows = []
    for number, record in enumerate(records[1:], 1):
        where = f"CSV row {number}"
        if len(record) != len(header):
            raise RequestError(400, f"{where} has {len(record)} fields, the header {len(header)}.")
        time = parse_time(record[0], where)
        values = {}
        for sensor, field in zip(sensors, record[1:]):
            field = field.strip()
            if field == "":
                values[sensor] = None
                continue
            try:
                value = float(field)
            except ValueError:
                raise RequestError(422, f"{where}: {field[:40]!r} for sensor {sensor!r} is not a number.") from None
            if not math.isfinite(value):
                raise RequestError(422, f"{where}: the reading of sensor {sensor!r} must be a finite number.")
            values[sensor] = value
        rows.append(Row(time, values))
    return rows


def parse_rows(body: bytes, content_type: str | None) -> list[Row]:
    """Rows of a JSON or CSV body, by its ``Content-Type``."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in ("application/json", ""):
        return rows_from_json(body)
    if kind in ("text/csv", "application/csv"):
        return rows_from_csv(body)
    raise RequestError(415, f"Content-Type {kind!r} is not taken; send application/json or text/csv.")
