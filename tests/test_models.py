"""The model registry: a model registered from Python trains, resumes, evaluates and predicts
through every path (gwnet.train, load_trained, evaluate, --resume, --init-from, gwnet-predict),
and the built-in MLP baseline does the same from the command line, alone and beside a GWNet."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from gwnet.cli.predict import main as predict_main
from gwnet.cli.train import main as train_main
from gwnet.config import Config, ModelConfig, opt
from gwnet.engine import EpochListener, RunDir, evaluate, load_checkpoint, load_trained, train
from gwnet.errors import GWNetError
from gwnet.models import MLPConfig, WindowMLP, register_model, unregister_model
from gwnet.registry import MODELS, PRESETS


@dataclass
class LastStepConfig(ModelConfig):
    """A per-sensor linear map of the newest step's features to every horizon."""

    init_gain: float = opt(1.0, "initial weight on the newest reading")


class LastStep(nn.Module):
    def __init__(self, cfg: LastStepConfig):
        super().__init__()
        self.config = cfg
        self.head = nn.Linear(cfg.in_dim, cfg.out_dim)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[:, 0] = cfg.init_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, -1]).transpose(1, 2)  # (B, N, F) -> (B, H, N)


@pytest.fixture
def last_step_model():
    built = []

    @register_model("test-last-step", LastStepConfig, horizon_head="head")
    def build(cfg, supports):
        built.append(len(supports))  # the registry hands every model the fixed supports
        return LastStep(cfg)

    yield built
    unregister_model("test-last-step")


def tiny(cfg: Config, data: Path, out: Path, epochs: int = 2) -> Config:
    cfg.data.dataset = str(data)
    cfg.out = str(out)
    cfg.train.epochs, cfg.train.batches_per_epoch, cfg.train.batch_size = epochs, 3, 16
    cfg.train.progress = False
    return cfg


class StopAfter(EpochListener):
    """Raises after ``epoch``: a kill between two epochs, once last.pt holds the epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, trainer, record, improved):
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_registered_model_trains_resumes_evaluates_and_predicts(last_step_model, tiny_dataset, tmp_path,
                                                                  capsys):
    cfg = tiny(Config.from_preset("test-last-step"), tiny_dataset, tmp_path / "whole", epochs=3)
    assert cfg.arch == "test-last-step" and isinstance(cfg.model, LastStepConfig)
    whole = train(cfg)
    assert last_step_model and last_step_model[0] == 2  # doubletransition: two supports
    state = load_checkpoint(RunDir(whole.run_dir).best)
    assert state["config"]["arch"] == "test-last-step" and "init_gain" in state["config"]["model"]

    # Interrupted after epoch 1, then resumed: the same weights and test metrics.
    cut = tiny(Config.from_preset("test-last-step"), tiny_dataset, tmp_path / "cut", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(cut, listeners=[StopAfter(1)])
    resumed = train(cut, resume=True)
    pd.testing.assert_frame_equal(resumed.test_metrics, whole.test_metrics)

    model, loaded_cfg, _, _ = load_trained(whole.run_dir)
    assert isinstance(model, LastStep) and loaded_cfg.arch == "test-last-step"
    best = load_checkpoint(RunDir(whole.run_dir).best)["model"]
    torch.testing.assert_close(model.state_dict(), best)
    pd.testing.assert_frame_equal(evaluate(whole.run_dir, device="cpu"), whole.test_metrics, check_exact=False)

    assert predict_main([str(whole.run_dir), "--out", str(tmp_path / "pred"), "--no-plots"]) == 0
    metrics = pd.read_csv(tmp_path / "pred" / "metrics.csv")
    member = metrics[metrics["model"] == "whole"].set_index("horizon")["mae"]
    expected = whole.test_metrics.drop(index="mean")["mae"].to_numpy()
    assert member.to_numpy() == pytest.approx(expected, rel=1e-5)


def test_init_from_copies_the_registered_head_rows(last_step_model, tiny_dataset, tmp_path):
    cfg = tiny(Config.from_preset("test-last-step"), tiny_dataset, tmp_path / "ft", epochs=1)
    cfg.train.pretrain_horizon = 3
    result = train(cfg)
    pre = load_checkpoint(RunDir(result.run_dir).pretrain(3).best)["model"]
    fine_cfg = Config.load(RunDir(result.run_dir).config)
    assert fine_cfg.train.init_from == str(RunDir(result.run_dir).pretrain(3).root)
    # The finetuning stage started from the pretrained head: its first rows at initialisation
    # are the pretrained ones (checked by rebuilding the initialised model).
    from gwnet.data import load_data
    from gwnet.engine.trainer import build_model, init_from_run

    data = load_data(fine_cfg.data)
    fresh = fine_cfg.resolve(data.num_nodes)
    model = build_model(fresh, data)
    init_from_run(model, fresh, data, fresh.train.init_from)
    torch.testing.assert_close(model.head.weight[:3], pre["head.weight"])
    assert model.head.weight.shape[0] == 12


def test_a_run_of_an_unregistered_model_is_a_one_line_error(last_step_model, tiny_dataset, tmp_path):
    result = train(tiny(Config.from_preset("test-last-step"), tiny_dataset, tmp_path / "run", epochs=1))
    unregister_model("test-last-step")
    assert "test-last-step" not in MODELS and "test-last-step" not in PRESETS
    with pytest.raises(GWNetError, match="preset 'test-last-step' .* is not registered"):
        load_trained(result.run_dir)


def test_init_from_another_model_is_refused(last_step_model, tiny_dataset, tmp_path):
    first = train(tiny(Config.from_preset("test-last-step"), tiny_dataset, tmp_path / "a", epochs=1))
    cfg = tiny(Config.from_preset("mlp"), tiny_dataset, tmp_path / "b", epochs=1)
    cfg.train.init_from = str(first.run_dir)
    with pytest.raises(GWNetError, match="holds a test-last-step model, this run trains mlp"):
        train(cfg)


def test_registering_a_name_twice_or_a_foreign_config_is_refused():
    with pytest.raises(GWNetError, match="model named 'gwnet' is already registered"):
        register_model("gwnet", MLPConfig)(lambda cfg, supports: None)
    with pytest.raises(TypeError, match="must subclass"):
        register_model("plain", dict)


def test_window_mlp_shapes_and_linear_variant():
    cfg = MLPConfig(num_nodes=5, in_dim=2, out_dim=4, seq_len=6, layers=0)
    model = WindowMLP(cfg)
    assert model(torch.randn(3, 6, 5, 2)).shape == (3, 4, 5)
    assert [type(m) for m in model.modules()].count(nn.Linear) == 1  # layers=0: linear autoregression
    # every sensor goes through the same weights: permuting sensors permutes the forecasts
    x = torch.randn(2, 6, 5, 2)
    perm = torch.randperm(5)
    torch.testing.assert_close(model(x[:, :, perm]), model(x)[:, :, perm])
    with pytest.raises(GWNetError, match="input must be"):
        model(torch.randn(2, 7, 5, 2))


def _train_cli(argv: list[str]) -> int:
    return train_main([*argv, "--no-progress", "--epochs", "2", "--batches-per-epoch", "3",
                       "--batch-size", "16"])


def test_mlp_from_the_command_line_alone_and_in_an_ensemble_with_gwnet(tiny_dataset, tmp_path, capsys):
    mlp, gw = tmp_path / "mlp", tmp_path / "gw"
    assert _train_cli(["--model", "mlp", "--dataset", str(tiny_dataset), "--out", str(mlp),
                       "--hidden-channels", "16", "--layers", "1"]) == 0
    saved = json.loads(RunDir(mlp).config.read_text())
    assert saved["arch"] == "mlp" and saved["model"]["hidden_channels"] == 16
    assert _train_cli(["--dataset", str(tiny_dataset), "--out", str(gw), "--residual-channels", "8",
                       "--dilation-channels", "8", "--skip-channels", "8", "--end-channels", "8"]) == 0
    capsys.readouterr()
    assert predict_main([str(mlp), "--out", str(tmp_path / "alone"), "--no-plots"]) == 0
    assert predict_main([str(mlp), str(gw), "--out", str(tmp_path / "both"), "--strategy", "weighted"]) == 0
    described = json.loads((tmp_path / "both" / "ensemble.json").read_text())
    assert [m["name"] for m in described["members"]] == ["mlp", "gw"]
    assert (tmp_path / "both" / "adaptive_adjacency.png").exists()  # the GWNet member's; the MLP has none
    metrics = pd.read_csv(tmp_path / "both" / "metrics.csv")
    assert set(metrics["model"]) == {"mlp", "gw", "ensemble"}


def test_mlp_flags_belong_to_the_mlp_and_resume_keeps_the_model(tiny_dataset, tmp_path, capsys):
    # A Graph WaveNet option given to the MLP is not one of its flags.
    with pytest.raises(SystemExit) as exc:
        _train_cli(["--model", "mlp", "--dataset", str(tiny_dataset), "--out", str(tmp_path / "x"),
                    "--blocks", "2"])
    assert exc.value.code == 2 and "--blocks" in capsys.readouterr().err
    run = tmp_path / "r"
    assert _train_cli(["--model", "mlp", "--dataset", str(tiny_dataset), "--out", str(run),
                       "--hidden-channels", "8"]) == 0
    # --resume reads the MLP's flags from the saved run (the run is finished: a clear error).
    assert train_main(["--resume", str(run), "--hidden-channels", "8"]) == 2
    assert "run already finished" in capsys.readouterr().err


def test_cli_model_choices_are_the_registry(last_step_model):
    from gwnet.cli.train import build_parser

    parser = build_parser(["--model", "test-last-step"])
    flags = {a.dest: a for a in parser._actions}
    assert set(flags["preset"].choices) == set(PRESETS) and "test-last-step" in flags["preset"].choices
    assert "model.init_gain" in flags and "model.blocks" not in flags
    assert "model.num_nodes" not in flags and "model.out_dim" not in flags  # derived from the data
