"""The rolling window of the newest readings a server forecasts from, and its state file.

Readings arrive as rows ``(time, {sensor_id: reading})``. A batch of rows is checked whole
before any row joins (so a refused request changes nothing): each time must lie on the
step grid (a whole number of steps after midnight), after the newest time held (an earlier
one is *late*, the same one a *duplicate*), in increasing order, and name only the model's
sensors. A sensor a row leaves out, and every step skipped between two rows, counts as a
missing reading (``null_value``), as the readers store a gap in a file. The window keeps
the newest ``seq_len`` steps.

The state file (``--state``) holds the window: an ``.npz`` of the sensor ids, the step, the
times and the readings, written atomically after every accepted batch and read without
pickle, so that a restarted server continues where it stopped.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..atomic import atomic_path
from ..errors import file_error

STATE_FORMAT = "gwnet-serve-window"
STATE_VERSION = 1


class RequestError(Exception):
    """A request the server refuses: an HTTP status and one sentence for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Row:
    time: pd.Timestamp
    values: dict[str, float | None]  # None: missing


class ReadingWindow:
    """The newest ``seq_len`` steps of readings of ``sensor_ids`` (thread-safe)."""

    def __init__(self, sensor_ids: Sequence[str], seq_len: int, step_minutes: int, null_value: float = 0.0,
                 state: str | Path | None = None):
        self.sensor_ids = [str(s) for s in sensor_ids]
        self.where = {s: i for i, s in enumerate(self.sensor_ids)}
        self.seq_len = int(seq_len)
        self.step = pd.Timedelta(minutes=int(step_minutes))
        self.null_value = float(null_value)
        self.state = Path(state) if state is not None else None
        self.times: list[pd.Timestamp] = []
        self.values = np.zeros((0, len(self.sensor_ids)), dtype=np.float32)
        self.version = 0  # bumped by every accepted batch (what a cached forecast belongs to)
        self.lock = threading.Lock()
        if self.state is not None and self.state.exists():
            self._load()

    # --- what it holds ------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return len(self.times) >= self.seq_len

    @property
    def newest(self) -> pd.Timestamp | None:
        return self.times[-1] if self.times else None

    def frame(self) -> pd.DataFrame:
        """The held readings, time x sensor (``null_value`` where missing)."""
        return pd.DataFrame(self.values.copy(), index=pd.DatetimeIndex(self.times), columns=self.sensor_ids)

    def describe(self) -> dict:
        return {"held_steps": len(self.times), "needed_steps": self.seq_len,
                "newest_time": None if self.newest is None else self.newest.isoformat(),
                "ready": self.ready}

    # --- adding readings ----------------------------------------------------------------------
    def check(self, rows: Sequence[Row]) -> None:
        """Refuse (a :class:`RequestError`) the first row that cannot join; nothing changes."""
        if not rows:
            raise RequestError(400, "The body holds no readings.")
        newest = self.newest
        for number, row in enumerate(rows, 1):
            at = f"Row {number} ({row.time.isoformat()})" if len(rows) > 1 else f"Time {row.time.isoformat()}"
            if (row.time - row.time.normalize()) % self.step != pd.Timedelta(0):
                raise RequestError(422, f"{at} is off the {self.step_label} grid of the model's readings "
                                   f"(a whole number of {self.step_label} steps after midnight).")
            if newest is not None and row.time == newest:
                raise RequestError(409, f"{at} duplicates a reading already held; each step is sent once.")
            if newest is not None and row.time < newest:
                raise RequestError(409, f"{at} is late: the window already holds readings up to "
                                   f"{newest.isoformat()}.")
            unknown = [s for s in row.values if s not in self.where]
            if unknown:
                raise RequestError(422, f"{at} names sensor {unknown[0]!r}, which the model does not forecast "
                                   f"(it has {len(self.sensor_ids)} sensors, e.g. "
                                   f"{', '.join(map(repr, self.sensor_ids[:3]))}).")
            newest = row.time

    @property
    def step_label(self) -> str:
        return f"{self.step // pd.Timedelta(minutes=1)}-minute"

    def add(self, rows: Sequence[Row]) -> dict:
        """Check ``rows`` and append them (skipped steps as missing), keep the newest
        ``seq_len`` steps, write the state file; what was done."""
        with self.lock:
            self.check(rows)
            times, values = list(self.times), [self.values]
            filled = 0
            for row in rows:
                if times:
                    gap = int((row.time - times[-1]) // self.step) - 1
                    if gap > 0:
                        # Only the skipped steps that stay in the window are materialised.
                        kept = min(gap, self.seq_len)
                        skipped = [row.time - (k + 1) * self.step for k in reversed(range(kept))]
                        times += skipped
                        values.append(np.full((kept, len(self.sensor_ids)), self.null_value, np.float32))
                        filled += gap
                line = np.full((1, len(self.sensor_ids)), self.null_value, np.float32)
                for sensor, value in row.values.items():
                    if value is not None:
                        line[0, self.where[sensor]] = value
                times.append(row.time)
                values.append(line)
            times, stacked = times[-self.seq_len:], np.ascontiguousarray(np.concatenate(values)[-self.seq_len:])
            if self.state is not None:
                # Written before the window changes: a failed write leaves memory and file as they were.
                try:
                    self._save(times, stacked)
                except OSError as exc:
                    raise RequestError(503, "The server could not write its state file "
                                       f"({exc.strerror or type(exc).__name__}); the readings were not "
                                       "taken, send them again later.") from None
            self.times, self.values = times, stacked
            self.version += 1
            return {"accepted": len(rows), "missing_steps_filled": filled, **self.describe()}

    # --- the state file -----------------------------------------------------------------------
    def _save(self, times: list[pd.Timestamp], values: np.ndarray) -> None:
        with atomic_path(self.state) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, format=np.array(STATE_FORMAT), version=np.array(STATE_VERSION),
                         sensor_ids=np.array(self.sensor_ids, dtype=str),
                         step_minutes=np.array(self.step // pd.Timedelta(minutes=1)),
                         times=np.array([t.value for t in times], dtype=np.int64), values=values)

    def _load(self) -> None:
        path = self.state
        try:
            with np.load(path, allow_pickle=False) as npz:
                content = {k: npz[k] for k in npz.files}
        except Exception:  # noqa: BLE001 - any unreadable file is the same mistake
            raise file_error(path, "is not a readable gwnet-serve state file; give another --state, or delete "
                             "it to start empty") from None
        if str(content.get("format", "")) != STATE_FORMAT:
            raise file_error(path, "not a gwnet-serve state file; give another --state, or delete it to start empty")
        if int(content.get("version", -1)) > STATE_VERSION:
            raise file_error(path, "was written by a newer gwnet; upgrade gwnet or delete it")
        ids = [str(s) for s in content["sensor_ids"]]
        if ids != self.sensor_ids:
            raise file_error(path, f"holds readings of other sensors ({len(ids)}) than the model forecasts "
                             f"({len(self.sensor_ids)}); give another --state, or delete it to start empty")
        minutes = int(content["step_minutes"])
        if pd.Timedelta(minutes=minutes) != self.step:
            raise file_error(path, f"holds {minutes}-minute readings, the model reads {self.step_label} ones")
        values = np.asarray(content["values"], dtype=np.float32)
        times = [pd.Timestamp(int(t)) for t in content["times"]]
        if values.shape != (len(times), len(ids)) or len(times) > self.seq_len:
            raise file_error(path, f"readings of shape {values.shape} do not fit {len(times)} times, "
                             f"{len(ids)} sensors and a {self.seq_len}-step window")
        self.times, self.values = times, values
