"""The package's shape: no import circle, prediction without the training loop's heavy
dependencies, one version, and no hand-kept lists of option names."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import gwnet
from gwnet.config import DERIVED_ROLES, Config, DataConfig, GWNetConfig, TrainConfig, fields_with_role
from gwnet.engine.checkpoint import RunDir, load_checkpoint, save_checkpoint

from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_circle():
    tool = SHARED / "tools" / "import_cycles.py"
    if not tool.is_file():
        pytest.skip("the import-circle checker in ../shared is not available")
    done = subprocess.run([sys.executable, str(tool), str(ROOT / "gwnet")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_engine_and_prediction_do_not_import_the_scale_package():
    code = ("import sys, gwnet.engine, gwnet.ensemble, gwnet.cli.predict; "
            "print(sorted(m for m in sys.modules if m.startswith('gwnet.scale')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_version_lives_in_one_place(tmp_path):
    setup = (ROOT / "setup.py").read_text()
    assert "gwnet/_version.py" in setup and not re.search(r'version="\d', setup)
    save_checkpoint(tmp_path / "x.pt", {})
    assert load_checkpoint(tmp_path / "x.pt")["gwnet_version"] == gwnet.__version__
    # what pip recorded when installing is what the package says
    from importlib.metadata import version

    assert version("gwnet") == gwnet.__version__


def test_roles_give_the_field_lists():
    assert fields_with_role(DataConfig, "window") == ("target", "seq_len", "first_offset", "time_of_day",
                                                      "day_of_week")
    assert fields_with_role(DataConfig, "derived") == ("protocol",)
    assert fields_with_role(DataConfig, "source") == ("dataset", "data", "adj", "key")
    assert fields_with_role(GWNetConfig, *DERIVED_ROLES) == ("num_nodes", "in_dim", "out_dim", "num_supports",
                                                              "seq_len")
    assert set(fields_with_role(TrainConfig, "runtime")) == {"device", "progress", "log", "activation_checkpointing",
                                                             "memmap", "memory_limit_gb", "malloc", "cuda_graphs"}
    assert fields_with_role(Config, "runtime", "derived") == ("out", "arch")


def test_resolve_fills_only_the_model_base_fields_from_the_data():
    cfg = Config.from_preset("mlp")
    cfg.data.seq_len, cfg.data.horizon, cfg.data.day_of_week = 6, 3, True
    cfg.resolve(num_nodes=9)
    m = cfg.model
    assert (m.num_nodes, m.in_dim, m.out_dim, m.seq_len) == (9, 9, 3, 6)


def test_default_run_names_are_unique_within_a_second():
    names = {Config.from_preset().resolve().out for _ in range(50)}
    assert len(names) == 50


def test_run_dir_owns_the_names_and_never_leaves_the_directory(tmp_path):
    run = RunDir(tmp_path)
    assert run.pretrain(6).root == tmp_path / "pretrain-h6"
    assert run.shards("last-shards-a") == tmp_path / "last-shards-a"
    with pytest.raises(gwnet.GWNetError, match="not one of last-shards-a, last-shards-b"):
        run.shards("../../etc")
    assert run.saved_config == run.config
    run.pipeline.write_text("{}")
    assert run.saved_config == run.pipeline
