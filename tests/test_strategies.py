"""The strategy registry: each built-in strategy is one function of the validation
statistics, a strategy registered in a test drives Ensemble, run() and gwnet-predict, and an
unknown name is a one-line error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gwnet.config import Config, DataConfig
from gwnet.data import TrafficData
from gwnet.data.graph import SensorGraph
from gwnet.ensemble import Ensemble, Member, Validation, register_strategy, run
from gwnet.ensemble.strategies import best_per_horizon, mean_weights, nnls_weights
from gwnet.errors import GWNetError
from gwnet.models import WindowMLP
from gwnet.registry import STRATEGIES

from conftest import make_adj, make_speeds


def test_builtin_strategies_are_functions_of_the_validation_statistics():
    available = np.array([[True, True], [True, True], [False, True]])  # member 0 forecasts 2 horizons
    assert mean_weights(None, available).tolist() == [[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]]
    val = Validation(mae=np.array([[1.0, 2.0], [3.0, 2.5], [np.inf, 4.0]]), gram=np.zeros((3, 2, 2)),
                     xty=np.zeros((3, 2)))
    assert best_per_horizon(val, available).tolist() == [[1, 0], [0, 1], [0, 1]]
    # NNLS from the Gram matrix: y = 2 * member 1 exactly
    x = np.random.default_rng(0).normal(size=(50, 2))
    y = 2 * x[:, 1]
    gram = np.stack([x.T @ x] * 3)
    xty = np.stack([x.T @ y] * 3)
    w = nnls_weights(Validation(val.mae, gram, xty), available)
    assert w[0] == pytest.approx([0, 2], abs=1e-8) and w[2] == pytest.approx([0, 2], abs=1e-8)


@pytest.fixture(scope="module")
def members_and_data():
    speeds = make_speeds(steps=500, nodes=4)
    cfg = DataConfig(horizon=3)
    data = TrafficData.from_frames(speeds, SensorGraph(list(speeds.columns), make_adj(4)), cfg)
    members = []
    for i, horizon in enumerate((2, 3)):
        run_cfg = Config.from_preset("mlp")
        run_cfg.data = DataConfig(horizon=horizon)
        run_cfg.resolve(num_nodes=4)
        torch.manual_seed(i)
        model = WindowMLP(run_cfg.model).eval()
        members.append(Member(f"m{i}", model, run_cfg, data.scaler, Path(f"m{i}"), data.sensor_ids))
    return members, data


@pytest.fixture
def last_member_strategy():
    @register_strategy("test-last-member", describe=lambda w, names: {"picked": names[int(w.argmax())]})
    def last_member(val, available):
        # the last member that forecasts each horizon
        last = available.shape[1] - 1 - np.argmax(available[:, ::-1], axis=1)
        return np.eye(available.shape[1])[last]

    yield "test-last-member"
    STRATEGIES.remove("test-last-member")


def test_registered_strategy_drives_the_ensemble_and_its_report(members_and_data, last_member_strategy,
                                                                tmp_path):
    members, data = members_and_data
    ensemble = Ensemble(members, last_member_strategy)
    assert not ensemble.fitted  # it asked for validation statistics
    report = run(ensemble, data, tmp_path / "out", plots=False)
    assert ensemble.weights.tolist() == [[0, 1], [0, 1], [0, 1]]
    described = json.loads((tmp_path / "out" / "ensemble.json").read_text())
    assert described["strategy"] == "test-last-member"
    assert [h["picked"] for h in described["horizons"]] == ["m1", "m1", "m1"]
    # the ensemble is member m1 everywhere
    metrics = report.metrics.set_index(["model", "horizon"])["mae"]
    for h in (1, 2, 3):
        assert metrics[("ensemble", h)] == pytest.approx(metrics[("m1", h)], rel=1e-6)


def test_a_strategy_without_validation_is_ready_at_once(members_and_data):
    ensemble = Ensemble(members_and_data[0], "mean")
    assert ensemble.fitted and ensemble.weights.tolist() == [[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]]


def test_unknown_strategy_is_a_one_line_error(members_and_data):
    with pytest.raises(GWNetError, match=r"unknown strategy 'median'; choose one of mean, per-horizon, weighted"):
        Ensemble(members_and_data[0], "median")


def test_gwnet_predict_offers_the_registered_strategies(last_member_strategy):
    from gwnet.cli.predict import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "strategy")
    assert set(action.choices) == set(STRATEGIES) and last_member_strategy in action.choices
