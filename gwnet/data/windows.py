"""Sliding windows over a series, chronological splits, and batches for the model.

Windows are never materialised: a split is a range of window indices, and a batch is one
gather from the ``(time, nodes, features)`` series. Window ``i`` reads input rows
``i .. i + seq_len - 1`` and targets ``first_offset .. first_offset + horizon - 1`` steps after
its last input row (its *origin*), exactly DCRNN's ``generate_training_data`` offsets.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from ..config import DataConfig
from ..errors import file_error
from ..paths import open_private
from .scaler import StandardScaler

SPLITS = ("train", "val", "test")


def calendar_features(index: pd.DatetimeIndex, time_of_day: bool, day_of_week: bool,
                      dtype=np.float32) -> np.ndarray:
    """``(time, k)`` features: time of day as a fraction of a day, then a one-hot weekday."""
    cols = []
    if time_of_day:
        cols.append(((index - index.normalize()) / pd.Timedelta(days=1)).to_numpy()[:, None])
    if day_of_week:
        cols.append(np.eye(7)[index.day_of_week.to_numpy()])
    if not cols:
        return np.zeros((len(index), 0), dtype=dtype)
    return np.concatenate(cols, axis=1).astype(dtype)


class Series:
    """Model inputs over time: speeds ``(T, N)`` and calendar features ``(T, k)``.

    The calendar is the same for every sensor, so it is stored once per step and broadcast
    when a batch is gathered; the series then costs little more than the raw speeds.
    """

    def __init__(self, speeds: torch.Tensor, calendar: torch.Tensor, mapped: np.memmap | None = None):
        self.speeds, self.calendar = speeds, calendar
        # The np.memmap ``speeds`` wraps, when it is one (see build_series).
        self.mapped = mapped

    @property
    def memmapped(self) -> bool:
        """Whether the speeds are a map of a cache file, shared between processes."""
        return self.mapped is not None

    def __len__(self) -> int:
        return self.speeds.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.speeds, self.calendar))

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Inputs ``(*rows.shape, N, F)`` at ``rows``: raw speed, then the calendar features."""
        speed = self.speeds[rows].unsqueeze(-1)
        calendar = self.calendar[rows].unsqueeze(-2).expand(*speed.shape[:-1], -1)
        return torch.cat([speed, calendar], dim=-1)

    def to_numpy(self) -> np.ndarray:
        """The whole ``(T, N, F)`` array (for exports that need it materialised)."""
        return self.gather(torch.arange(len(self))).cpu().numpy()

    def to(self, device: torch.device | str) -> "Series":
        """The series on ``device`` (itself when it is there already), so that batches are
        gathered where the model runs."""
        if self.speeds.device == torch.device(device):
            return self
        return Series(self.speeds.to(device), self.calendar.to(device))


# A series at least this large is memory-mapped whenever it comes from a file.
MEMMAP_AUTO_BYTES = 1 << 30


def build_series(speeds: pd.DataFrame, cfg: DataConfig, dtype=np.float32, cache: Path | None = None,
                 key: str | None = None) -> Series:
    """The model-input series of a speed table.

    With ``cache`` (a directory) and ``key`` (what identifies the readings: see
    :func:`series_cache_key`), the ``(T, N)`` speeds are written once to
    ``cache/series-<hash>.npy`` and mapped from there, so that the processes of one machine
    (torchrun) share one copy in the page cache. Nothing writes into a series (batches are
    gathered into new tensors); the map is copy-on-write all the same, so that a write would
    stay in the process that made it rather than crash it (torch ignores numpy's read-only flag).
    """
    calendar = torch.from_numpy(calendar_features(speeds.index, cfg.time_of_day, cfg.day_of_week, dtype))
    if cache is None or key is None:
        return Series(torch.from_numpy(speeds.to_numpy(dtype=dtype, copy=True)), calendar)
    mapped = map_speeds(speeds, Path(cache), key, dtype)
    return Series(torch.from_numpy(mapped), calendar, mapped)


def series_cache_key(path: str | os.PathLike, options, dtype=np.float32) -> str:
    """What identifies the series of a readings file: its real path, modification time and
    size, the options it was read with (key, target, start, step, ids file) and the dtype."""
    from .._version import __version__  # another gwnet may read the same file differently

    path = Path(path).resolve()
    st = path.stat()
    return f"{path}|{st.st_mtime_ns}|{st.st_size}|{options!r}|{np.dtype(dtype).str}|{__version__}"


def map_speeds(speeds: pd.DataFrame, cache: Path, key: str, dtype=np.float32) -> np.memmap:
    """The speeds as a copy-on-write :class:`numpy.memmap` of the cache file for ``key``, written
    (once, atomically, under a lock other processes wait on) if it is not there yet. A cache
    directory that cannot be written (read-only, full, a file) is one line."""
    try:
        return _map_speeds(speeds, cache, key, dtype)
    except OSError as exc:
        raise file_error(getattr(exc, "filename", None) or cache,
                         f"cannot write the series cache ({exc.strerror or exc}); set GWNET_CACHE to a writable "
                         "folder, or train without --memmap") from None


def _map_speeds(speeds: pd.DataFrame, cache: Path, key: str, dtype=np.float32) -> np.memmap:
    import fcntl

    shape = speeds.shape
    name = hashlib.sha256(f"{key}|{shape}".encode()).hexdigest()[:24]
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"series-{name}.npy"
    with os.fdopen(open_private(cache / f".series-{name}.lock"), "a") as lock:  # never through a link
        fcntl.flock(lock, fcntl.LOCK_EX)
        mapped = _open_mapped(final, shape, dtype)
        if mapped is None:
            tmp = cache / f".series-{name}.{os.getpid()}.tmp"
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
                out[:] = speeds.to_numpy(dtype=dtype, copy=False)
                out.flush()
                del out
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            mapped = _open_mapped(final, shape, dtype)
    return mapped


def _open_mapped(path: Path, shape: tuple, dtype) -> np.memmap | None:
    """The cache file mapped copy-on-write, or ``None`` if absent or not of ``shape`` and ``dtype``."""
    try:
        mapped = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if not isinstance(mapped, np.memmap) or mapped.shape != tuple(shape) or mapped.dtype != np.dtype(dtype):
        return None
    return mapped


def split_sizes(num_windows: int, train_ratio: float = 0.7, test_ratio: float = 0.2) -> dict[str, int]:
    """DCRNN's split: ``test = round(0.2 n)``, ``train = round(0.7 n)``, validation the rest."""
    num_test = round(num_windows * test_ratio)
    num_train = round(num_windows * train_ratio)
    return {"train": num_train, "val": num_windows - num_test - num_train, "test": num_test}


class Windows(torch.utils.data.Dataset):
    """The windows of one split: ``x`` is ``(seq_len, nodes, features)`` scaled, ``y`` is
    ``(horizon, nodes)`` raw speed with zeros for missing readings."""

    def __init__(self, series: Series, scaler: StandardScaler, start: int, stop: int,
                 seq_len: int, horizon: int, first_offset: int, index: pd.DatetimeIndex):
        self.series = series
        self.scaler = scaler
        self.start, self.stop = start, stop
        self.seq_len, self.horizon, self.first_offset = seq_len, horizon, first_offset
        self.index = index
        self._in_steps = torch.arange(seq_len)
        self._out_steps = torch.arange(horizon) + seq_len - 1 + first_offset

    def __len__(self) -> int:
        return self.stop - self.start

    def with_series(self, series: Series) -> "Windows":
        """The same windows over ``series`` (the same readings, e.g. a copy on the training
        device): batches are gathered where ``series`` lives, from positions there."""
        device = series.speeds.device
        out = Windows(series, self.scaler, self.start, self.stop, self.seq_len, self.horizon,
                      self.first_offset, self.index)
        out._in_steps = torch.arange(self.seq_len, device=device)
        out._out_steps = torch.arange(self.horizon, device=device) + self.seq_len - 1 + self.first_offset
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]

    def batch(self, positions: torch.Tensor,
              scaler: StandardScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(B, seq_len, N, F)`` and targets ``(B, horizon, N)`` of windows at ``positions``.

        Inputs are scaled with ``scaler`` (default: the split's), so models trained with other
        statistics can read the same windows.
        """
        first = positions.to(torch.long)[:, None] + self.start
        x = self.series.gather(first + self._in_steps)
        x[..., 0] = (scaler or self.scaler).transform(x[..., 0])
        y = self.series.speeds[first + self._out_steps]
        return x, y

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                scaler: StandardScaler | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for chunk in order.split(batch_size):
            yield self.batch(chunk, scaler)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    @property
    def origins(self) -> pd.DatetimeIndex:
        """Timestamp of the last input step of each window."""
        return self.index[self.start + self.seq_len - 1: self.stop + self.seq_len - 1]

    def target_times(self) -> np.ndarray:
        """``(windows, horizon)`` timestamps of the targets."""
        rows = np.arange(self.start, self.stop)[:, None] + self._out_steps.numpy()[None, :]
        return self.index.to_numpy()[rows]


def count_windows(num_steps: int, cfg: DataConfig) -> int:
    return num_steps - (cfg.seq_len - 1) - (cfg.first_offset + cfg.horizon - 1)


def split_ranges(num_steps: int, cfg: DataConfig, source: str = "data") -> dict[str, range]:
    """Window indices of the chronological train/val/test splits of a series."""
    n = count_windows(num_steps, cfg)
    if n < 1:
        span = cfg.seq_len + cfg.first_offset + cfg.horizon - 1
        raise file_error(source, f"{num_steps} steps are too few for one window of {span} steps")
    ranges, start = {}, 0
    for name, size in split_sizes(n, *cfg.split()).items():
        ranges[name] = range(start, start + size)
        start += size
    return ranges


def _check_valid_targets(series: Series, ranges: dict[str, range], index: pd.DatetimeIndex,
                         cfg: DataConfig, source: str) -> None:
    """Every split must have some valid (non-zero) target reading: a split of missing readings
    only would score a perfect 0.0 (or nothing at all) instead of failing."""
    speeds = series.speeds
    for name, r in ranges.items():
        first = r.start + cfg.seq_len - 1 + cfg.first_offset
        last = r.stop - 1 + cfg.seq_len - 1 + cfg.first_offset + cfg.horizon - 1
        targets = speeds[first:last + 1]
        if not bool((targets != 0).any()):
            when = f"{index[first]} to {index[last]}" if len(index) > last else f"rows {first} to {last}"
            raise file_error(source, f"the {name} split has no valid target reading (all are 0, i.e. missing, "
                             f"from {when})")


def make_splits(series: Series, index: pd.DatetimeIndex, cfg: DataConfig, source: str = "data",
                scaler: StandardScaler | None = None) -> tuple[dict[str, Windows], StandardScaler]:
    """Cut ``series`` into train/val/test windows; fit the scaler on the training inputs unless
    one is given (a trained model's, when predicting on new data)."""
    ranges = split_ranges(len(series), cfg, source)
    empty = [name for name, r in ranges.items() if len(r) < 1]
    if empty:
        n = sum(len(r) for r in ranges.values())
        raise file_error(source, f"{n} windows are too few for a non-empty {'/'.join(empty)} split")
    _check_valid_targets(series, ranges, index, cfg, source)
    if scaler is None:
        scaler = StandardScaler.fit_windows(series.speeds.numpy(), len(ranges["train"]), cfg.seq_len,
                                            cfg.fill_zeroes)
    windows = {name: Windows(series, scaler, r.start, r.stop, cfg.seq_len, cfg.horizon,
                             cfg.first_offset, index)
               for name, r in ranges.items()}
    return windows, scaler
