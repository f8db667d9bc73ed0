"""Readers for readings tables: pandas' fixed-format HDF5 (METR-LA, PEMS-BAY, LargeST), CSV,
Parquet, and the PEMS0X ``.npz`` arrays.

Every reader returns the same thing: a float32 ``DataFrame`` with a regular ``DatetimeIndex``
(any step of whole minutes that divides a day: 1, 5, 15, 60...) and one string-named column
per sensor, where 0.0 marks a missing reading. The readings may be speeds, flows or any
non-negative quantity (``DataConfig.target`` names it). Readers are registered by file
extension in :data:`gwnet.registry.READERS`: a new format is one function
``(path, options, dtype) -> DataFrame`` decorated with ``@register_reader(".ext")``;
:func:`read_speeds` then checks what it returns like any other.
The HDF5 files are read with h5py alone: pandas' fixed layout is a group holding ``axis0``
(column labels), ``axis1`` (timestamps as integers) and ``block{i}_items``/``block{i}_values``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from ..errors import GWNetError, file_error
from ..paths import check_input_file
from ..registry import READERS
from .arrays import check_affordable, npz_members

STEP = pd.Timedelta(minutes=5)  # METR-LA's and PEMS0X's step, the default of files without timestamps
HDF5_EXTS = (".h5", ".hdf5", ".hdf")
DAY_MINUTES = 1440
DATETIME_UNITS = ("ns", "us", "ms", "s", "m", "h", "D")
# Filling gaps in the timestamps may grow a table at most this many times (and to at most
# MAX_FILLED_BYTES): a mistyped year (2012 -> 2021) is an error, not nine years of missing rows.
MAX_FILL_FACTOR = 10
MAX_FILLED_BYTES = 2 * 2**30
# PEMS0X's feature order (PEMS04/08 carry three, PEMS03/07 flow only).
PEMS_FEATURES = ("flow", "occupancy", "speed")


@dataclass(frozen=True)
class ReadOptions:
    """What a reader may need besides the path: an HDF5/npz key, the target feature of a
    multi-feature file, and for files without timestamps their start, step and sensor ids."""

    key: Optional[str] = None
    target: Optional[str] = None
    start: Optional[str] = None
    step_minutes: Optional[int] = None
    ids: Optional[str] = None  # a file with one sensor id per line, in column order


Reader = Callable[[str, ReadOptions, Any], pd.DataFrame]


def register_reader(*extensions: str) -> Callable[[Reader], Reader]:
    """Decorator registering ``reader(path, options, dtype)`` for files ending in ``extensions``."""
    def deco(reader: Reader) -> Reader:
        for ext in extensions:
            READERS.add(ext.lower(), reader)
        return reader

    return deco


def _text(value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", "replace")
    return str(value)


def _labels(dataset) -> list[str]:
    return [_text(v) for v in dataset[()]]


def _frame_keys(h5) -> list[str]:
    """Keys of every pandas frame stored in the file (groups with ``pandas_type``)."""
    found = []

    def visit(name, obj):
        if "pandas_type" in obj.attrs:
            found.append(name)

    h5.visititems(visit)
    return found


def _read_fixed_frame(path: str, group, dtype) -> pd.DataFrame:
    kind = _text(group.attrs["pandas_type"])
    if kind != "frame":
        raise file_error(path, f"frame is stored as {kind!r}; only pandas' fixed format is read "
                         "(save it with df.to_hdf(path, key=..., format='fixed'))")
    try:
        check_affordable(path, f"the frame states {group['axis0'].size:,} column labels", group["axis0"].size * 64)
        columns = _labels(group["axis0"])
        stamps = group["axis1"]
        index_kind = _text(stamps.attrs.get("kind", ""))
        if not index_kind.startswith("datetime64"):
            raise file_error(path, f"index is {index_kind or 'unknown'}, not timestamps")
        unit = index_kind[len("datetime64["):-1] if "[" in index_kind else "ns"
        if unit not in DATETIME_UNITS:
            raise file_error(path, f"index has an unknown datetime unit {unit!r} (expected one of "
                             f"{', '.join(DATETIME_UNITS)})")
        if stamps.ndim != 1 or stamps.dtype.kind not in "iu":
            raise file_error(path, f"index axis1 holds {stamps.dtype} {stamps.shape}, not integer timestamps")
        # What the header states, before any of it is read: a small file may claim 1e9 timestamps.
        check_affordable(path, f"the frame states {stamps.shape[0]:,} timestamps x {len(columns):,} columns",
                         stamps.shape[0] * (len(columns) * np.dtype(dtype).itemsize * 2 + 16))
        index = pd.to_datetime(stamps[()].astype(np.int64), unit=unit)
        tz = stamps.attrs.get("tz")
        if tz is not None:
            try:
                index = index.tz_localize("UTC").tz_convert(_text(tz))
            except Exception:
                raise file_error(path, f"index has an unknown time zone {_text(tz)!r}") from None
        values = np.zeros((len(index), len(columns)), dtype=dtype)
        position = {c: i for i, c in enumerate(columns)}
        filled: dict[str, int] = {}
        for b in range(int(group.attrs.get("nblocks", 1))):
            items = _labels(group[f"block{b}_items"])
            block = group[f"block{b}_values"]
            if block.dtype.kind not in "fiu":
                raise file_error(path, f"columns {', '.join(items[:3])} are not numeric ({block.dtype})")
            for item in items:
                if item not in position:
                    raise file_error(path, f"block {b} holds column {item!r}, which axis0 does not list")
                if item in filled:
                    where = "twice in block" if filled[item] == b else f"in blocks {filled[item]} and"
                    raise file_error(path, f"column {item!r} is stored {where} {b} (duplicate block items)")
                filled[item] = b
            expected = (len(items), len(index)) if not int(block.attrs.get("transposed", 0)) else \
                (len(index), len(items))
            if block.ndim != 2 or tuple(block.shape) != expected:
                raise file_error(path, f"block {b} values have shape {tuple(block.shape)}, but the frame has "
                                 f"{len(index)} timestamps (axis1) and the block {len(items)} columns")
            data = block[()]
            if not int(block.attrs.get("transposed", 0)):
                data = data.T
            values[:, [position[i] for i in items]] = data
        unfilled = [c for c in columns if c not in filled]
        if unfilled:
            raise file_error(path, f"column {unfilled[0]!r} is in no block of the frame "
                             f"({len(unfilled)} column(s) without values)")
    except KeyError as exc:
        raise file_error(path, f"incomplete pandas frame ({exc})") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise file_error(path, f"malformed pandas frame ({' '.join(str(exc).split())[:160]})") from None
    return pd.DataFrame(values, index=index, columns=columns)


@register_reader(*HDF5_EXTS)
def _read_hdf5_file(path: str, options: ReadOptions, dtype=np.float32) -> pd.DataFrame:
    return read_hdf5(path, options.key, dtype)


def read_hdf5(path: str, key: str | None = None, dtype=np.float32) -> pd.DataFrame:
    """Read a frame from a pandas fixed-format HDF5 file; ``key`` is needed if it holds several."""
    import h5py

    try:
        h5 = h5py.File(path, "r")
    except OSError:
        raise file_error(path, "not a readable HDF5 file (truncated or another format?)") from None
    with h5:
        keys = _frame_keys(h5)
        if key is not None:
            key = key.strip("/")
            if key not in keys:
                raise file_error(path, f"no frame under key {key!r}; keys: {', '.join(keys) or 'none'}")
        elif len(keys) == 1:
            key = keys[0]
        elif not keys:
            raise file_error(path, "holds no pandas frame")
        else:
            raise file_error(path, f"holds several frames ({', '.join(keys)}); choose one with --key")
        try:
            return _read_fixed_frame(path, h5[key], dtype)
        except OSError:
            raise file_error(path, "cannot read the frame (truncated file?)") from None


@register_reader(".csv")
def read_csv(path: str, options: ReadOptions = ReadOptions(), dtype=np.float32) -> pd.DataFrame:
    """A CSV table: timestamps in the first column, one column per sensor id."""
    return _read_table(path, ".csv")


@register_reader(".parquet", ".pq")
def read_parquet(path: str, options: ReadOptions = ReadOptions(), dtype=np.float32) -> pd.DataFrame:
    """A Parquet table: a timestamp index (or first column), one column per sensor id."""
    return _read_table(path, ".parquet")


@register_reader(".npz")
def read_npz(path: str, options: ReadOptions = ReadOptions(), dtype=np.float32) -> pd.DataFrame:
    """A PEMS0X-style array: key ``data`` (or ``options.key``, or the only array) of shape
    ``(steps, sensors, features)`` or ``(steps, sensors)``, without timestamps.

    The target feature is picked by name: PEMS04/08's three features are flow, occupancy and
    speed; a one-feature file holds the target itself. Timestamps start at ``options.start``
    (the dataset's conventional start; midnight of 2000-01-01 with a warning when unknown) in
    steps of ``options.step_minutes`` (default 5). Sensor ids come from ``options.ids`` (one
    per line, as PEMS03.txt) when that file exists, else they are 0..N-1 as in PEMS04/07/08's
    graph files. The file is read without unpickling (``allow_pickle=False``).
    """
    members = npz_members(path)  # every .npy member's header bounded (size, memory, zip) before any is read
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            key = options.key if options.key in names else ("data" if "data" in names else None)
            if key is None and len(names) == 1:
                key = names[0]
            if key is None:
                raise file_error(path, f"holds {', '.join(names) or 'no arrays'}; choose the readings with --key")
            if key not in members:  # stored without ".npy": npz_members never bounded its header
                raise file_error(path, f"array {key!r} is not stored as {key}.npy; gwnet reads .npy members only")
            array = npz[f"{key}.npy"]  # that very member (a zip may also hold a bare {key!r} one)
    except GWNetError:
        raise
    except Exception as exc:  # zip and format errors alike
        raise file_error(path, f"not a readable .npz ({' '.join(str(exc).split())[:160]})") from None
    if array.dtype.kind not in "fiu":
        raise file_error(path, f"array {key!r} is not numeric ({array.dtype})")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise file_error(path, f"array {key!r} has shape {array.shape}; expected (steps, sensors, features)")
    features = array.shape[2]
    names = PEMS_FEATURES if features == 3 else None
    target = options.target or "flow"
    if features == 1:
        column = 0
    elif names is not None and target in names:
        column = names.index(target)
    else:
        known = ", ".join(names) if names else f"feature0..feature{features - 1}"
        if target.startswith("feature") and target[7:].isdigit() and int(target[7:]) < features:
            column = int(target[7:])
        else:
            raise file_error(path, f"has {features} features; choose the target with --target ({known})")
    steps, sensors = array.shape[:2]
    ids = [str(i) for i in range(sensors)]
    if options.ids and os.path.isfile(options.ids):
        with open(options.ids) as fh:
            ids = [line.strip() for line in fh if line.strip()]
        if len(ids) != sensors:
            raise file_error(options.ids, f"lists {len(ids)} sensor ids, {path} has {sensors} sensors")
    if options.start is None:
        warnings.warn(f"{path}: no timestamps in the file; the first reading is taken as 2000-01-01 00:00 "
                      "(set --start for time-of-day features on the real clock)", stacklevel=3)
    step = pd.Timedelta(minutes=options.step_minutes or 5)
    try:
        index = pd.date_range(pd.Timestamp(options.start or "2000-01-01"), periods=steps, freq=step)
    except (TypeError, ValueError):
        raise file_error(path, f"start {options.start!r} is not a timestamp") from None
    return pd.DataFrame(array[:, :, column].astype(dtype, copy=False), index=index, columns=ids)


def _read_table(path: str, ext: str) -> pd.DataFrame:
    try:
        if ext == ".csv":
            # pandas renames a repeated header ("a", "a.1"); a repeated sensor id must be refused.
            ids = pd.Index(pd.read_csv(path, nrows=1, header=None, dtype=str).iloc[0, 1:].str.strip())
            if ids.has_duplicates:
                raise file_error(path, f"duplicate sensor id {ids[ids.duplicated()][0]!r}")
            frame = pd.read_csv(path, index_col=0)
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise file_error(path, "file is empty") from None
    except GWNetError:
        raise
    except Exception as exc:
        raise file_error(path, f"cannot parse ({' '.join(str(exc).split())})") from None
    if not isinstance(frame.index, pd.DatetimeIndex):
        try:
            frame.index = pd.to_datetime(frame.index)
        except (ValueError, TypeError):
            raise file_error(path, "first column must hold timestamps") from None
    return frame


def read_speeds(path: str | os.PathLike, key: str | None = None, dtype=np.float32,
                options: ReadOptions | None = None) -> pd.DataFrame:
    """Read a speed table (time x sensors) with the reader registered for its extension
    (``.h5``, ``.csv``, ``.parquet``, ...) and check it.

    ``dtype`` is float32 for modelling; exports that must match other tools bit for bit read
    float64.

    See :func:`check_speeds` for what is checked and repaired.
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise file_error(path, "no such data file")
    if os.path.isdir(path):
        raise file_error(path, "is a directory, expected a speeds file")
    check_input_file(path, "readings file")  # a FIFO, a device or a link loop: one line, no hang
    if os.path.getsize(path) == 0:
        raise file_error(path, "file is empty")
    ext = os.path.splitext(path)[1].lower()
    if ext not in READERS:
        raise file_error(path, f"speeds must be {'/'.join(READERS)} files (no reader for {ext or 'no extension'})")
    options = options or ReadOptions()
    if key is not None:
        options = ReadOptions(key, options.target, options.start, options.step_minutes, options.ids)
    return check_speeds(READERS[ext](path, options, dtype), path, dtype)


def check_speeds(frame: pd.DataFrame, source: str = "data", dtype=np.float32) -> pd.DataFrame:
    """Validate and normalise a speed table.

    Errors: no rows or columns, duplicate sensor ids, non-numeric columns, timestamps that are
    unsorted, duplicated or not on a regular grid (see :func:`infer_step`), infinite or
    negative readings.
    Repairs (with a warning): NaN readings become 0.0 (missing), and gaps in the index are
    filled with missing rows so that every step has the same length.
    """
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise file_error(source, "table has no rows or no sensor columns")
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        dup = pd.Index(columns)[pd.Index(columns).duplicated()][0]
        raise file_error(source, f"duplicate sensor id {dup!r}")
    flags = [c for c, t in zip(columns, frame.dtypes) if pd.api.types.is_bool_dtype(t)]
    if flags:
        raise file_error(source, f"sensor column {flags[0]!r} holds true/false values, not readings")
    bad = [c for c, t in zip(columns, frame.dtypes) if not pd.api.types.is_numeric_dtype(t)]
    if bad:
        raise file_error(source, f"sensor column {bad[0]!r} is not numeric")
    index = frame.index
    if not isinstance(index, pd.DatetimeIndex):
        raise file_error(source, "index must hold timestamps")
    try:  # pandas may hold seconds beyond its nanosecond range (1677-2262), which the windows use
        index = index.as_unit("ns")
    except (pd.errors.OutOfBoundsDatetime, OverflowError):
        raise file_error(source, f"timestamps from {index.min()} to {index.max()} lie outside the range "
                         f"gwnet handles ({pd.Timestamp.min:%Y} to {pd.Timestamp.max:%Y})") from None
    if index.tz is not None:
        # The wall-clock time of the stated zone, so that time of day is local (rush hours
        # stay at the same hours); a repeated hour of a daylight-saving change is an error.
        zone = index.tz
        index = index.tz_localize(None)
        if index.has_duplicates:
            raise file_error(source, f"timestamps in {zone} repeat the local time {index[index.duplicated()][0]} "
                             "(a daylight-saving change); store them in a fixed-offset zone or in UTC")
    if index.has_duplicates:
        raise file_error(source, f"duplicate timestamp {index[index.duplicated()][0]}")
    if not index.is_monotonic_increasing:
        raise file_error(source, "timestamps are not sorted in increasing order")
    values = frame.to_numpy(dtype=dtype, copy=True)
    if np.isinf(values).any():
        raise file_error(source, "infinite speeds")
    nan = np.isnan(values)
    if nan.any():
        warnings.warn(f"{source}: {int(nan.sum())} NaN readings treated as missing (0.0)", stacklevel=2)
        values[nan] = 0.0
    if (values < 0).any():
        raise file_error(source, f"negative speeds (minimum {values.min():g})")
    if len(index) > 1:
        step = infer_step(index, source)
        steps = np.diff(index.as_unit("ns").asi8)
        if (steps != step.value).any():
            rows = (index[-1] - index[0]) // step + 1
            nbytes = rows * len(columns) * np.dtype(dtype).itemsize
            if rows > MAX_FILL_FACTOR * len(index) or nbytes > MAX_FILLED_BYTES:
                big = int(np.argmax(steps))
                raise file_error(source, f"filling the gaps in the timestamps would grow the table from "
                                 f"{len(index):,} to {rows:,} rows ({nbytes / 2**30:.1f} GiB); the biggest gap is "
                                 f"{index[big]} -> {index[big + 1]} (a mistyped date?)")
            full = pd.date_range(index[0], index[-1], freq=step)
            minutes = step // pd.Timedelta(minutes=1)
            warnings.warn(f"{source}: {len(full) - len(index)} missing {minutes}-minute steps filled as missing "
                          "readings", stacklevel=2)
            out = pd.DataFrame(values, index=index, columns=columns).reindex(full, fill_value=0.0)
            return out.astype(dtype)
    return pd.DataFrame(values, index=pd.DatetimeIndex(index), columns=columns)


def infer_step(index: pd.DatetimeIndex, source: str = "data") -> pd.Timedelta:
    """The step of a sorted index: its smallest gap, which every gap must be a multiple of, in
    whole minutes that divide a day (so that time-of-day slots are whole)."""
    steps = np.diff(index.as_unit("ns").asi8)
    step = int(steps.min())
    minute = pd.Timedelta(minutes=1).value
    if step % minute or DAY_MINUTES % (step // minute) or (steps % step).any():
        shown = ", ".join(sorted({str(pd.Timedelta(int(v))) for v in steps[:1000]})[:3])
        raise file_error(source, f"timestamps are not on a regular grid (gaps {shown}): the step must be whole "
                         "minutes dividing a day, e.g. a 5-minute grid")
    return pd.Timedelta(step)
