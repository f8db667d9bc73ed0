"""Shared test fixtures: tiny speed tables and graphs, and the real files in ../shared."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def make_speeds(steps: int = 400, nodes: int = 5, seed: int = 0, start: str = "2012-03-01") -> pd.DataFrame:
    """A small speed table with daily cycles and some zeros (missing readings)."""
    rng = np.random.default_rng(seed)
    index = pd.date_range(start, periods=steps, freq="5min")
    tod = np.arange(steps)[:, None] / 288.0
    values = 55 + 10 * np.sin(2 * np.pi * tod + rng.uniform(0, 6, nodes)) + rng.normal(0, 2, (steps, nodes))
    values[rng.random((steps, nodes)) < 0.03] = 0.0
    return pd.DataFrame(values.astype(np.float32), index=index, columns=[f"s{i}" for i in range(nodes)])


def make_adj(nodes: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    adj = np.where(rng.random((nodes, nodes)) < 0.4, rng.uniform(0.1, 1, (nodes, nodes)), 0.0)
    np.fill_diagonal(adj, 1.0)
    return adj.astype(np.float32)


@pytest.fixture
def shared_graphs() -> Path:
    folder = SHARED / "data" / "sensor_graph"
    if not folder.is_dir():
        pytest.skip("../shared/data/sensor_graph is not available")
    return folder


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """A directory with speeds.h5 (key df) and adj_mx.pkl in METR-LA's formats."""
    import pickle

    df = make_speeds()
    df.to_hdf(tmp_path / "speeds.h5", key="df")
    ids = list(df.columns)
    with open(tmp_path / "adj_mx.pkl", "wb") as fh:
        pickle.dump([ids, {s: i for i, s in enumerate(ids)}, make_adj(len(ids))], fh, protocol=2)
    return tmp_path


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP barriers can
    stall a millisecond forward pass for seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
