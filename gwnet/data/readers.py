"""Readers for speed tables: pandas' fixed-format HDF5 (METR-LA, PEMS-BAY), CSV and Parquet.

Every reader returns the same thing: a float32 ``DataFrame`` with a regular 5-minute
``DatetimeIndex`` and one string-named column per sensor, where 0.0 marks a missing reading.
Readers are registered by file extension in :data:`gwnet.registry.READERS`: a new format is
one function ``(path, key, dtype) -> DataFrame`` decorated with ``@register_reader(".ext")``;
:func:`read_speeds` then checks what it returns like any other.
The HDF5 files are read with h5py alone: pandas' fixed layout is a group holding ``axis0``
(column labels), ``axis1`` (timestamps as integers) and ``block{i}_items``/``block{i}_values``.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from ..errors import GWNetError, file_error
from ..registry import READERS

STEP = pd.Timedelta(minutes=5)
HDF5_EXTS = (".h5", ".hdf5", ".hdf")
Reader = Callable[[str, Optional[str], Any], pd.DataFrame]


def register_reader(*extensions: str) -> Callable[[Reader], Reader]:
    """Decorator registering ``reader(path, key, dtype)`` for files ending in ``extensions``."""
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
        columns = _labels(group["axis0"])
        stamps = group["axis1"]
        index_kind = _text(stamps.attrs.get("kind", ""))
        if not index_kind.startswith("datetime64"):
            raise file_error(path, f"index is {index_kind or 'unknown'}, not timestamps")
        unit = index_kind[len("datetime64["):-1] if "[" in index_kind else "ns"
        index = pd.to_datetime(stamps[()].astype(np.int64), unit=unit)
        tz = stamps.attrs.get("tz")
        if tz is not None:
            index = index.tz_localize("UTC").tz_convert(_text(tz))
        values = np.zeros((len(index), len(columns)), dtype=dtype)
        position = {c: i for i, c in enumerate(columns)}
        for b in range(int(group.attrs.get("nblocks", 1))):
            items = _labels(group[f"block{b}_items"])
            block = group[f"block{b}_values"]
            if block.dtype.kind not in "fiu":
                raise file_error(path, f"columns {', '.join(items[:3])} are not numeric ({block.dtype})")
            data = block[()]
            if not int(block.attrs.get("transposed", 0)):
                data = data.T
            values[:, [position[i] for i in items]] = data
    except KeyError as exc:
        raise file_error(path, f"incomplete pandas frame ({exc})") from None
    return pd.DataFrame(values, index=index, columns=columns)


@register_reader(*HDF5_EXTS)
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
def read_csv(path: str, key: str | None = None, dtype=np.float32) -> pd.DataFrame:
    """A CSV table: timestamps in the first column, one column per sensor id."""
    return _read_table(path, ".csv")


@register_reader(".parquet", ".pq")
def read_parquet(path: str, key: str | None = None, dtype=np.float32) -> pd.DataFrame:
    """A Parquet table: a timestamp index (or first column), one column per sensor id."""
    return _read_table(path, ".parquet")


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


def read_speeds(path: str | os.PathLike, key: str | None = None, dtype=np.float32) -> pd.DataFrame:
    """Read a speed table (time x sensors) with the reader registered for its extension
    (``.h5``, ``.csv``, ``.parquet``, ...) and check it.

    ``dtype`` is float32 for modelling; exports that must match other tools bit for bit read
    float64.

    See :func:`check_speeds` for what is checked and repaired.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise file_error(path, "no such data file")
    if os.path.isdir(path):
        raise file_error(path, "is a directory, expected a speeds file")
    if os.path.getsize(path) == 0:
        raise file_error(path, "file is empty")
    ext = os.path.splitext(path)[1].lower()
    if ext not in READERS:
        raise file_error(path, f"speeds must be {'/'.join(READERS)} files (no reader for {ext or 'no extension'})")
    return check_speeds(READERS[ext](path, key, dtype), path, dtype)


def check_speeds(frame: pd.DataFrame, source: str = "data", dtype=np.float32) -> pd.DataFrame:
    """Validate and normalise a speed table.

    Errors: no rows or columns, duplicate sensor ids, non-numeric columns, timestamps that are
    unsorted, duplicated or not on a 5-minute grid, infinite or negative speeds.
    Repairs (with a warning): NaN readings become 0.0 (missing), and gaps in the index are
    filled with missing rows so that every step is 5 minutes.
    """
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise file_error(source, "table has no rows or no sensor columns")
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        dup = pd.Index(columns)[pd.Index(columns).duplicated()][0]
        raise file_error(source, f"duplicate sensor id {dup!r}")
    bad = [c for c, t in zip(columns, frame.dtypes) if not pd.api.types.is_numeric_dtype(t)]
    if bad:
        raise file_error(source, f"sensor column {bad[0]!r} is not numeric")
    index = frame.index
    if not isinstance(index, pd.DatetimeIndex):
        raise file_error(source, "index must hold timestamps")
    if index.tz is not None:
        index = index.tz_convert(None)
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
        steps = np.diff(index.as_unit("ns").asi8)
        step_ns = STEP.value
        if (steps % step_ns).any():
            raise file_error(source, "timestamps are not on a 5-minute grid")
        if (steps != step_ns).any():
            full = pd.date_range(index[0], index[-1], freq=STEP)
            warnings.warn(f"{source}: {len(full) - len(index)} missing 5-minute steps filled as missing readings",
                          stacklevel=2)
            out = pd.DataFrame(values, index=index, columns=columns).reindex(full, fill_value=0.0)
            return out.astype(dtype)
    return pd.DataFrame(values, index=pd.DatetimeIndex(index), columns=columns)
