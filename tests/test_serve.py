"""gwnet-serve: a real uvicorn server on a loopback port, talked to over HTTP."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from gwnet.cli.predict import main as predict_main  # noqa: E402
from gwnet.cli.serve import main as serve_main  # noqa: E402
from gwnet.config import Config  # noqa: E402
from gwnet.data import synthetic  # noqa: E402
from gwnet.engine import train  # noqa: E402
from gwnet.errors import GWNetError  # noqa: E402
from gwnet.serve import Forecaster, ServeOptions, check_options, create_app  # noqa: E402

TOKEN = "a-long-enough-test-token"


def tiny_run(data: Path, out: Path, horizon: int, seed: int) -> Path:
    cfg = Config.from_preset("improved")
    cfg.data.dataset = str(data)
    cfg.data.horizon = horizon
    m = cfg.model
    m.residual_channels = m.dilation_channels = 4
    m.skip_channels = m.end_channels = 8
    m.blocks = 1
    t = cfg.train
    t.epochs, t.batches_per_epoch, t.progress, t.device, t.seed = 1, 2, False, "cpu", seed
    cfg.out = str(out)
    train(cfg)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("serve")
    paths = synthetic.write(root / "data", nodes=6, days=3, seed=3)
    speeds = pd.read_hdf(paths["speeds"])
    return SimpleNamespace(root=root, speeds=speeds, locations=paths["locations"],
                           h4=tiny_run(root / "data", root / "h4", 4, 1),
                           h6=tiny_run(root / "data", root / "h6", 6, 2))


@pytest.fixture(scope="module")
def forecaster(runs) -> Forecaster:
    return Forecaster([runs.h4], "per-horizon")


@contextlib.contextmanager
def serving(forecaster: Forecaster, **options):
    """A uvicorn server of ``forecaster`` on a free loopback port; an httpx client to it."""
    app = create_app(forecaster, ServeOptions(port=0, **options))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    headers = {"Authorization": f"Bearer {options['token']}"} if options.get("token") else {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


def reading(time: pd.Timestamp, row: pd.Series) -> dict:
    return {"time": time.isoformat(), "values": {k: (None if v == 0 else float(v)) for k, v in row.items()}}


def post_rows(client, frame: pd.DataFrame) -> None:
    for t, row in frame.iterrows():
        r = client.post("/readings", json=reading(t, row))
        assert r.status_code == 200, r.text


def readings(runs, n: int = 14, start: int = 100) -> pd.DataFrame:
    frame = runs.speeds.iloc[start:start + n].copy()
    frame.iloc[-2, 1] = 0.0  # a missing reading inside the window
    return frame


def predict_latest(runs, members: list, frame: pd.DataFrame, tmp_path: Path, strategy: str) -> pd.DataFrame:
    data = tmp_path / "latest.csv"
    frame.to_csv(data, index_label="time")  # 0: missing, as the readers store it
    out = tmp_path / f"pred-{strategy}"
    rc = predict_main([*map(str, members), "--latest", "--data", str(data), "--out", str(out),
                       "--strategy", strategy, "--no-plots", "--device", "cpu"])
    assert rc == 0
    return pd.read_csv(out / "predictions.csv", dtype={"sensor_id": str})


def test_forecast_equals_gwnet_predict_latest(runs, forecaster, tmp_path):
    frame = readings(runs)
    with serving(forecaster) as client:
        assert client.get("/forecast").status_code == 409  # nothing held yet
        post_rows(client, frame)
        as_json = client.get("/forecast").json()
        as_csv = client.get("/forecast", headers={"Accept": "text/csv"}).text
        stateless = client.post("/forecast", content=frame.to_csv(index_label="time").encode(),
                                headers={"Content-Type": "text/csv"}).json()
        one = client.get("/forecast", params={"sensor": frame.columns[2]}).json()
    expected = predict_latest(runs, [runs.h4], frame, tmp_path, "per-horizon")
    served = pd.read_csv(pd.io.common.StringIO(as_csv), dtype={"sensor_id": str})
    assert list(served.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(served.drop(columns="prediction"), expected.drop(columns="prediction"))
    np.testing.assert_allclose(served["prediction"], expected["prediction"], rtol=0, atol=1e-5)
    wide = expected.pivot(index="horizon", columns="sensor_id", values="prediction")
    for sensor in frame.columns:
        np.testing.assert_allclose(as_json["forecast"][sensor], wide[sensor], rtol=0, atol=1e-5)
        np.testing.assert_allclose(stateless["forecast"][sensor], wide[sensor], rtol=0, atol=1e-5)
    assert as_json["origin_time"] == frame.index[-1].isoformat()
    assert as_json["minutes_ahead"] == [5, 10, 15, 20]
    assert list(one["forecast"]) == [frame.columns[2]]


def test_mean_ensemble_equals_gwnet_predict_latest(runs, tmp_path):
    frame = readings(runs, start=300)
    with serving(Forecaster([runs.h4, runs.h6], "mean")) as client:
        post_rows(client, frame)
        served = pd.read_csv(pd.io.common.StringIO(client.get("/forecast", headers={"Accept": "text/csv"}).text),
                             dtype={"sensor_id": str})
    expected = predict_latest(runs, [runs.h4, runs.h6], frame, tmp_path, "mean")
    assert served["horizon"].max() == 6
    np.testing.assert_allclose(served["prediction"], expected["prediction"], rtol=0, atol=1e-5)


def test_restart_resumes_the_window_from_its_state_file(runs, forecaster, tmp_path):
    frame = readings(runs, start=200)
    state = tmp_path / "window.npz"
    with serving(forecaster, state=str(state)) as client:
        post_rows(client, frame.iloc[:8])
    assert state.is_file()
    with serving(forecaster, state=str(state)) as client:
        health = client.get("/health").json()
        assert health["held_steps"] == 8 and health["newest_time"] == frame.index[7].isoformat()
        assert client.post("/readings", json=reading(frame.index[7], frame.iloc[7])).status_code == 409
        post_rows(client, frame.iloc[8:])
        resumed = client.get("/forecast").json()["forecast"]
    state.write_bytes(b"not a state file")
    with pytest.raises(GWNetError, match="not a readable gwnet-serve state file"):
        create_app(forecaster, ServeOptions(state=str(state)))
    expected, _ = forecaster.forecast(frame.replace(np.nan, 0.0))
    for i, sensor in enumerate(frame.columns):
        np.testing.assert_allclose(resumed[sensor], expected.prediction[0, :, i].numpy(), rtol=0, atol=1e-5)


def test_each_bad_request_gets_its_4xx_and_the_server_keeps_serving(runs, forecaster):
    frame = readings(runs, start=400)
    t = frame.index
    good = reading(t[0], frame.iloc[0])
    bad = [
        ("malformed JSON", 400, dict(content=b'{"time": ', headers={"Content-Type": "application/json"})),
        ("malformed CSV", 400, dict(content=b"time,a\n2012-03-01,1,2\n", headers={"Content-Type": "text/csv"})),
        ("not a number", 422, dict(json={"time": t[1].isoformat(), "values": {frame.columns[0]: "fast"}})),
        ("unknown sensor", 422, dict(json={"time": t[1].isoformat(), "values": {"no-such-sensor": 50.0}})),
        ("off-grid time", 422, dict(json={"time": (t[1] + pd.Timedelta(minutes=2)).isoformat(), "values": {}})),
        ("duplicate", 409, dict(json=good)),
        ("late", 409, dict(json={"time": (t[0] - pd.Timedelta(minutes=5)).isoformat(), "values": {}})),
        ("too large", 413, dict(content=b"x" * 5000, headers={"Content-Type": "application/json"})),
        ("media type", 415, dict(content=b"<a/>", headers={"Content-Type": "application/xml"})),
    ]
    with serving(forecaster, max_body_bytes=4096) as client:
        assert client.post("/readings", json=good).status_code == 200
        for name, status, request in bad:
            r = client.post("/readings", **request)
            assert r.status_code == status, (name, r.text)
            message = r.json()["error"]
            assert "\n" not in message and message.endswith("."), (name, message)
            assert client.get("/health").status_code == 200
        assert client.get("/health").json()["held_steps"] == 1  # nothing of a refused body joined
        assert client.get("/forecast", params={"sensor": "nope"}).status_code == 404
        assert "of the 12 steps" in client.get("/forecast").json()["error"]  # 409 until the window is full
        post_rows(client, frame.iloc[1:13])
        assert client.get("/forecast").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/readings", "/forecast", "/health", "/metadata", "/"} <= set(paths)


def test_a_token_is_required_once_set(forecaster):
    with serving(forecaster, token=TOKEN) as client:
        assert client.get("/health").status_code == 200
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-token-of-some-length"}):
            r = client.get("/forecast", headers=headers)
            assert r.status_code == 401 and "Bearer" in r.json()["error"]
            assert client.get("/metadata", headers=headers).status_code == 401


def test_non_loopback_host_without_token_is_refused_in_one_line(runs, capsys):
    assert serve_main([str(runs.h4), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--token" in err and "0.0.0.0" in err


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_page_renders_in_headless_chromium(runs, forecaster, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's)")
    frame = readings(runs, start=500)
    with serving(forecaster, locations=str(runs.locations)) as client:
        post_rows(client, frame)
        url = str(client.base_url) + "/"
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
        dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=60).stdout
        shot = Path(os.environ.get("GWNET_PAGE_SCREENSHOT") or tmp_path / "page.png")
        subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-shot'}", "--window-size=1280,1100",
                        f"--screenshot={shot}", url], capture_output=True, timeout=60)
    cards = re.findall(r'<div class="sensor" data-sensor="([^"]+)"', dom)
    assert sorted(cards) == sorted(frame.columns)  # one card per sensor, drawn by the page's script
    assert len(re.findall(r'<circle[^>]*class="map-sensor"', dom)) == len(frame.columns)
    assert len(re.findall(r'class="forecast"', dom)) == len(frame.columns)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_intervals_equal_gwnet_predict_latest_interval_then_adapt_online(runs, tmp_path):
    from gwnet.ensemble.bands import IntervalOptions

    served = Forecaster([runs.h4], "per-horizon", interval=IntervalOptions(0.9))
    frame = runs.speeds.iloc[-12:]  # the end of the runs' data: what predict --latest forecasts after
    with serving(served) as client:
        post_rows(client, frame)
        as_csv = client.get("/forecast", headers={"Accept": "text/csv"}).text
        first = client.get("/forecast").json()
        later = frame.index[-1] + pd.Timedelta(minutes=5)
        assert client.post("/readings", json=reading(later, frame.iloc[-1] + 1.0)).status_code == 200
        second = client.get("/forecast").json()
        meta = client.get("/metadata").json()
    out = tmp_path / "pred"
    assert predict_main([str(runs.h4), "--latest", "--interval", "0.9", "--out", str(out), "--no-plots",
                         "--device", "cpu"]) == 0
    expected = pd.read_csv(out / "predictions.csv", dtype={"sensor_id": str})
    got = pd.read_csv(pd.io.common.StringIO(as_csv), dtype={"sensor_id": str})
    assert list(got.columns) == list(expected.columns)
    for column in ("prediction", "lower", "upper"):
        np.testing.assert_allclose(got[column], expected[column], rtol=0, atol=1e-5)
    sensor = frame.columns[0]
    assert all(lo <= p <= hi for lo, p, hi in zip(first["lower"][sensor], first["forecast"][sensor],
                                                   first["upper"][sensor]))
    # The +5 min forecast's reading has arrived: the online update scored it and moved the widths.
    assert meta["intervals"]["online_readings_scored"] == len(frame.columns)
    width = lambda f: np.subtract(f["upper"][sensor], f["lower"][sensor])  # noqa: E731
    assert not np.allclose(width(first), width(second))


def test_post_forecast_leaves_the_online_intervals_and_their_state_file_alone(runs, tmp_path):
    """Made-up readings in a POST /forecast body must not move the widths later GET /forecast
    calls use, nor join the waiting forecasts, nor rewrite the state file."""
    import copy

    from gwnet.ensemble.bands import IntervalOptions

    state = tmp_path / "intervals.json"
    served = Forecaster([runs.h4], "per-horizon", interval=IntervalOptions(0.9), interval_state=state)
    frame = runs.speeds.iloc[200:213]
    held, arriving = frame.iloc[:-1], frame.iloc[-1:]
    step = pd.Timedelta(minutes=5)
    with serving(served) as client:
        post_rows(client, held)
        assert client.get("/forecast").status_code == 200  # a forecast now waits for its readings
        saved = state.read_bytes()
        before = copy.deepcopy((served.calibrator.online, served.calibrator.pending))
        made_up = [reading(t + step, row + 40.0) for t, row in held.iterrows()]  # covers the waiting horizon 1
        r = client.post("/forecast", json=made_up)
        assert r.status_code == 200 and "lower" in r.json(), r.text
        assert state.read_bytes() == saved
        post_rows(client, arriving)
        after = client.get("/forecast").json()
    # The same GET /forecast from the state before the POST: what its bounds must be.
    served.calibrator.online, served.calibrator.pending = before
    expected, _ = served.forecast(frame.iloc[1:])
    sensors = list(frame.columns)
    for key, values in (("lower", expected.lower), ("upper", expected.upper)):
        np.testing.assert_allclose([after[key][s] for s in sensors], values[0].numpy().T, rtol=0, atol=1e-4)


def test_a_failed_state_write_is_a_503_and_the_window_stays_as_it_was(runs, forecaster, tmp_path):
    frame = readings(runs, start=300)
    state = tmp_path / "window.npz"
    with serving(forecaster, state=str(state)) as client:
        post_rows(client, frame.iloc[:3])
        state.unlink()
        (state / "in-the-way").mkdir(parents=True)  # a folder where the file goes: the write fails
        r = client.post("/readings", json=reading(frame.index[3], frame.iloc[3]))
        assert r.status_code == 503, r.text
        message = r.json()["error"]
        assert "\n" not in message and "state file" in message and message.endswith(".")
        assert client.get("/health").json()["held_steps"] == 3  # memory did not move past the file
        shutil.rmtree(state)
        post_rows(client, frame.iloc[3:4])  # the same reading is taken once the file can be written
        assert client.get("/health").json()["held_steps"] == 4
    assert state.is_file()
    # Checked before anything loads (the CLI says a GWNetError in one line, exit 2).
    with pytest.raises(GWNetError, match="--state .*no-such-folder.* does not exist"):
        check_options(ServeOptions(state=str(tmp_path / "no-such-folder" / "window.npz")))


def test_a_port_in_use_is_refused_in_one_line(runs, capsys):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_main([str(runs.h4), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}" in err, err
