"""``GET /``: one self-contained page of the latest readings and forecast of every sensor.

The data travel inside the page as JSON and a short inline script draws them as plain SVG:
per sensor a card with the readings held and the forecast after them (and the band when
intervals are on), and, with ``--locations``, a map of the sensors coloured by their
forecast at the first horizon. Nothing is fetched from elsewhere (no CDN, no fonts), so the
page works on a machine without internet.
"""
from __future__ import annotations

import html
import json

import numpy as np

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gwnet forecast</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
.note { color: #555; margin: .2em 0 1em; }
#sensors { display: flex; flex-wrap: wrap; gap: 8px; }
.sensor { border: 1px solid #ddd; border-radius: 4px; padding: 4px 6px; width: 230px; }
.sensor h3 { font-size: 12px; margin: 0; font-weight: 600; }
.sensor .last { font-size: 11px; color: #555; }
#map { border: 1px solid #ddd; background: #fafafa; margin-bottom: 1em; }
.legend { font-size: 12px; color: #555; }
</style></head>
<body>
<h1>gwnet forecast</h1>
<p class="note" id="summary">__SUMMARY__</p>
<div id="map-box"></div>
<div id="sensors"></div>
<script type="application/json" id="gwnet-data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("gwnet-data").textContent);
const NS = "http://www.w3.org/2000/svg";
function el(name, attrs, parent) {
  const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function colour(v, lo, hi) {  // low values red, high green: slow traffic stands out
  if (v === null || !isFinite(v)) return "#999";
  const t = hi > lo ? Math.min(1, Math.max(0, (v - lo) / (hi - lo))) : 0.5;
  return "hsl(" + Math.round(120 * t) + ",75%,42%)";
}
const W = 218, H = 70, P = 3;
const nRead = D.times.length, nAhead = D.forecast ? D.forecast.minutes_ahead.length : 0;
const box = document.getElementById("sensors");
D.sensors.forEach(function (sid, i) {
  const card = document.createElement("div");
  card.className = "sensor";
  card.dataset.sensor = sid;
  const title = document.createElement("h3");
  title.textContent = sid;
  card.appendChild(title);
  const readings = D.readings.map(function (row) { return row[i]; });
  const pred = D.forecast ? D.forecast.values.map(function (row) { return row[i]; }) : [];
  const lower = D.forecast && D.forecast.lower ? D.forecast.lower.map(function (r) { return r[i]; }) : [];
  const upper = D.forecast && D.forecast.upper ? D.forecast.upper.map(function (r) { return r[i]; }) : [];
  const all = readings.concat(pred, lower, upper).filter(function (v) { return v !== null && isFinite(v); });
  const lo = all.length ? Math.min.apply(null, all) : 0, hi = all.length ? Math.max.apply(null, all) : 1;
  const steps = Math.max(1, nRead + nAhead - 1);
  const x = function (k) { return P + (W - 2 * P) * k / steps; };
  const y = function (v) { return H - P - (H - 2 * P) * (hi > lo ? (v - lo) / (hi - lo) : 0.5); };
  const svg = el("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H}, card);
  el("line", {x1: x(nRead - 1), x2: x(nRead - 1), y1: 0, y2: H, stroke: "#ccc"}, svg);
  if (lower.length) {
    const pts = lower.map(function (v, k) { return x(nRead + k) + "," + y(v); })
      .concat(upper.map(function (v, k) { return x(nRead + k) + "," + y(v); }).reverse());
    el("polygon", {points: pts.join(" "), fill: "#f4a26155", stroke: "none", class: "band"}, svg);
  }
  const seen = readings.map(function (v, k) { return v === null ? null : x(k) + "," + y(v); })
    .filter(function (p) { return p !== null; });
  el("polyline", {points: seen.join(" "), fill: "none", stroke: "#3465a4", "stroke-width": 1.5, class: "readings"}, svg);
  if (pred.length) {
    const last = readings[nRead - 1];
    const start = last === null ? [] : [x(nRead - 1) + "," + y(last)];
    const pts = start.concat(pred.map(function (v, k) { return x(nRead + k) + "," + y(v); }));
    el("polyline", {points: pts.join(" "), fill: "none", stroke: "#e66100", "stroke-width": 1.5, class: "forecast"}, svg);
  }
  const info = document.createElement("div");
  info.className = "last";
  const fmt = function (v) { return v === null ? "missing" : v.toFixed(1); };
  info.textContent = "now " + (nRead ? fmt(readings[nRead - 1]) : "-") +
    (pred.length ? "  +" + D.forecast.minutes_ahead[0] + " min " + fmt(pred[0]) +
     "  +" + D.forecast.minutes_ahead[nAhead - 1] + " min " + fmt(pred[nAhead - 1]) : "") +
    (D.unit ? " " + D.unit : "");
  card.appendChild(info);
  box.appendChild(card);
});
if (D.locations) {
  const ids = Object.keys(D.locations);
  const lat = ids.map(function (s) { return D.locations[s][0]; });
  const lon = ids.map(function (s) { return D.locations[s][1]; });
  const MW = 640, MH = 420, M = 12;
  const la0 = Math.min.apply(null, lat), la1 = Math.max.apply(null, lat);
  const lo0 = Math.min.apply(null, lon), lo1 = Math.max.apply(null, lon);
  const sx = function (v) { return M + (MW - 2 * M) * (lo1 > lo0 ? (v - lo0) / (lo1 - lo0) : 0.5); };
  const sy = function (v) { return MH - M - (MH - 2 * M) * (la1 > la0 ? (v - la0) / (la1 - la0) : 0.5); };
  const first = {};
  if (D.forecast) D.sensors.forEach(function (s, i) { first[s] = D.forecast.values[0][i]; });
  const vals = Object.values(first).filter(function (v) { return v !== null && isFinite(v); });
  const vmin = vals.length ? Math.min.apply(null, vals) : 0, vmax = vals.length ? Math.max.apply(null, vals) : 1;
  const holder = document.getElementById("map-box");
  const svg = el("svg", {id: "map", width: MW, height: MH, viewBox: "0 0 " + MW + " " + MH}, holder);
  ids.forEach(function (s) {
    const c = el("circle", {cx: sx(D.locations[s][1]), cy: sy(D.locations[s][0]), r: 5,
                            fill: colour(first[s] === undefined ? null : first[s], vmin, vmax),
                            stroke: "#333", "stroke-width": 0.5, class: "map-sensor"}, svg);
    c.dataset.sensor = s;
    const t = el("title", {}, c);
    t.textContent = s + (first[s] !== undefined ? ": " + first[s].toFixed(1) + (D.unit ? " " + D.unit : "") : "");
  });
  const legend = document.createElement("div");
  legend.className = "legend";
  legend.textContent = D.forecast ? "Colour: forecast at +" + D.forecast.minutes_ahead[0] + " min, red " +
    vmin.toPrecision(4) + " to green " + vmax.toPrecision(4) + (D.unit ? " " + D.unit : "") : "No forecast yet.";
  holder.appendChild(legend);
}
__RELOAD__
</script>
</body></html>
"""


def _nullable(array: np.ndarray, null_value: float | None = None) -> list:
    out = []
    for v in np.asarray(array, dtype=np.float64).tolist():
        missing = v != v or (null_value is not None and v == null_value)
        out.append(None if missing else round(v, 4))
    return out


def render_page(service, result) -> str:
    """The page for ``service``'s window and ``result`` (``(forecast, band)``, or None while
    the window is not full)."""
    f, window = service.forecaster, service.window
    with window.lock:
        frame = window.frame()
    data: dict = {
        "sensors": f.sensor_ids, "unit": f.config.unit or "",
        "times": [t.isoformat() for t in frame.index],
        "readings": [_nullable(row, f.null_value) for row in frame.to_numpy()],
        "forecast": None,
        "locations": {s: list(v) for s, v in service.locations.items()} or None,
    }
    if result is not None:
        forecast, band = result
        values = forecast.prediction[0].numpy()
        data["forecast"] = {"origin_time": forecast.origins[0].isoformat(), "minutes_ahead": f.minutes_ahead,
                            "values": [_nullable(row) for row in values]}
        if band is not None:
            data["forecast"]["lower"] = [_nullable(r) for r in np.asarray(band[0]).reshape(values.shape)]
            data["forecast"]["upper"] = [_nullable(r) for r in np.asarray(band[1]).reshape(values.shape)]
        level = getattr(f.calibrator, "level", None)
        summary = (f"{len(f.sensor_ids)} sensors; readings up to {forecast.origins[0]}; forecast "
                   f"+{f.minutes_ahead[0]} to +{f.minutes_ahead[-1]} min ({f.strategy}"
                   f"{', ' + str(len(f.members)) + ' members' if len(f.members) > 1 else ''}"
                   f"{f', {level:.0%} intervals shaded' if band is not None and level else ''}).")
    else:
        summary = (f"{len(f.sensor_ids)} sensors; waiting for readings: the window holds "
                   f"{len(window.times)} of the {window.seq_len} steps the model reads.")
    # "<" escaped: nothing in the data can close the script element.
    text = json.dumps(data, allow_nan=False).replace("<", "\\u003c")
    # Without a token the page reloads itself each step; with one a browser could not send it.
    reload = ("" if service.options.token else
              f"setTimeout(function () {{ location.reload(); }}, {int(f.step_minutes) * 60000});")
    return (PAGE.replace("__SUMMARY__", html.escape(summary)).replace("__RELOAD__", reload)
            .replace("__DATA__", text))
