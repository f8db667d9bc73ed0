"""Z-score scaling of speeds with the statistics of the training windows."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class StandardScaler:
    """``z = (x - mean) / std``; with ``fill_zeroes`` missing (0) readings become the mean first.

    Filling applies to model inputs only: targets keep their zeros so masked metrics skip them.
    """

    mean: float
    std: float
    fill_zeroes: bool = False

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.fill_zeroes:
            # masked_fill takes the mean as a kernel argument: no copy to the device per batch
            x = x.masked_fill(x == 0, self.mean)
        return (x - self.mean) / self.std

    def inverse_transform(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    @classmethod
    def fit_windows(cls, speeds: np.ndarray, num_windows: int, seq_len: int,
                    fill_zeroes: bool = False) -> "StandardScaler":
        """Mean and std of speed over the inputs of the first ``num_windows`` windows.

        Each row counts once per window that contains it, which is what stacking the training
        windows and taking ``x[..., 0].mean()`` (DCRNN / Graph WaveNet) computes, without
        materialising the windows. Zeros count, as they do there.
        """
        weights = np.convolve(np.ones(num_windows), np.ones(seq_len))
        rows = speeds[: len(weights)].astype(np.float64)
        total = weights.sum() * speeds.shape[1]
        mean = float(weights @ rows.sum(axis=1) / total)
        var = float(weights @ np.square(rows - mean).sum(axis=1) / total)
        std = float(np.sqrt(var)) or 1.0
        return cls(mean=mean, std=std, fill_zeroes=fill_zeroes)

    def to_dict(self) -> dict:
        return asdict(self)
