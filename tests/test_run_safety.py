"""No data loss: a resume never retrains over a run's results, two processes never share a run
directory, and an export (like a prediction, see test_predict.py) replaces an earlier one
whole or not at all, even when killed."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_train import tiny_config

from gwnet import atomic
from gwnet.atomic import atomic_directory
from gwnet.config import Config
from gwnet.engine import RunDir, Trainer, load_checkpoint, train
from gwnet.errors import GWNetError


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (but the lock file, whose holder writes its pid in it)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != RunDir(root).lock.name}


def cli(*argv, module: str = "gwnet.cli.train", env: dict | None = None) -> subprocess.CompletedProcess:
    code = f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_error_line(stderr: str, prog: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from gwnet.data import synthetic

    root = tmp_path_factory.mktemp("safety")
    synthetic.write(root / "data", nodes=6, days=3, seed=1)
    cfg = tiny_config(root / "data", root / "run", epochs=2, batches_per_epoch=2)
    result = train(cfg)
    return root, cfg, result


def copy_of(finished, dest: Path) -> Config:
    _, cfg, result = finished
    shutil.copytree(result.run_dir, dest)
    cfg = Config.from_dict(json.loads((dest / "config.json").read_text()))
    cfg.out = str(dest)
    return cfg


def no_training(monkeypatch):
    def refuse(self, epoch):
        raise AssertionError("trained again")

    monkeypatch.setattr(Trainer, "_train_epoch", refuse)


# --- resume -----------------------------------------------------------------------------------
def test_resume_without_last_pt_is_refused_and_changes_nothing(finished, tmp_path, capsys, monkeypatch):
    cfg = copy_of(finished, tmp_path / "run")
    RunDir(cfg.out).last.unlink()
    before = snapshot(tmp_path / "run")
    no_training(monkeypatch)
    with pytest.raises(GWNetError, match="holds best.pt, metrics.csv, test_metrics.csv but no last.pt, so the "
                                         "run cannot be resumed exactly; nothing was changed"):
        train(cfg, resume=True)
    from gwnet.cli.train import main

    assert main(["--resume", cfg.out]) == 2
    assert "cannot be resumed exactly" in one_error_line(capsys.readouterr().err, "gwnet-train")
    assert snapshot(tmp_path / "run") == before


def test_finished_run_without_test_metrics_only_recomputes_them(finished, tmp_path, monkeypatch):
    _, _, result = finished
    cfg = copy_of(finished, tmp_path / "run")
    rd = RunDir(cfg.out)
    rd.test_metrics.unlink()
    checkpoints = rd.best.read_bytes(), rd.last.read_bytes()
    no_training(monkeypatch)
    # Its optimizer state is not needed any more: a finished run restores none of it.
    payload = load_checkpoint(rd.last)
    del payload["optimizer"], payload["scheduler"]
    from gwnet.engine.checkpoint import save_checkpoint

    save_checkpoint(rd.last, payload)
    checkpoints = checkpoints[0], rd.last.read_bytes()
    resumed = train(cfg, resume=True)
    pd.testing.assert_frame_equal(resumed.test_metrics, result.test_metrics)
    pd.testing.assert_frame_equal(pd.read_csv(rd.test_metrics, index_col=0),
                                  pd.read_csv(RunDir(result.run_dir).test_metrics, index_col=0))
    assert (rd.best.read_bytes(), rd.last.read_bytes()) == checkpoints


@pytest.mark.parametrize("test_metrics", [False, True])
def test_run_without_best_pt_is_refused_and_changes_nothing(finished, tmp_path, monkeypatch, test_metrics):
    cfg = copy_of(finished, tmp_path / "run")
    rd = RunDir(cfg.out)
    rd.best.unlink()
    if not test_metrics:
        rd.test_metrics.unlink()
    before = snapshot(tmp_path / "run")
    no_training(monkeypatch)
    message = "already finished" if test_metrics else "best.pt: is missing .*test metrics cannot be recomputed"
    with pytest.raises(GWNetError, match=message):
        train(cfg, resume=True)
    assert snapshot(tmp_path / "run") == before and not rd.best.exists()


def test_unfinished_run_without_best_pt_is_refused(finished, tmp_path, monkeypatch):
    cfg = copy_of(finished, tmp_path / "run")
    rd = RunDir(cfg.out)
    payload = load_checkpoint(rd.last)
    payload["finished"], payload["epoch"], payload["history"] = False, 1, payload["history"][:1]
    payload["best_epoch"], payload["bad_epochs"] = 1, 0
    payload["best_val_mae"] = payload["history"][0]["val_mae"]
    from gwnet.engine.checkpoint import save_checkpoint

    save_checkpoint(rd.last, payload)
    rd.best.unlink()
    before = snapshot(tmp_path / "run")
    no_training(monkeypatch)
    with pytest.raises(GWNetError, match="best.pt: is missing .*cannot be resumed exactly; nothing was changed"):
        train(cfg, resume=True)
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("left", ["nothing", "config.json"])
def test_resume_of_a_directory_with_nothing_of_a_run_starts_fresh(finished, tmp_path, left):
    root, _, _ = finished
    cfg = tiny_config(root / "data", tmp_path / "run", epochs=1, batches_per_epoch=1)
    if left == "config.json":  # a run killed before its first checkpoint
        cfg.save(RunDir(cfg.out).config)
    result = train(cfg, resume=True)  # what experiments/paper_table.py relies on
    assert result.best_epoch == 1 and load_checkpoint(RunDir(cfg.out).last)["finished"]


def test_pipeline_resume_refuses_a_lost_last_pt_and_continues_a_stage_never_checkpointed(finished, tmp_path):
    root, _, _ = finished
    cfg = tiny_config(root / "data", tmp_path / "ft", epochs=1, batches_per_epoch=1, pretrain_horizon=3)
    train(cfg)
    rd, pre = RunDir(cfg.out), RunDir(cfg.out).pretrain(3)
    pretrained = pre.best.read_bytes()

    rd.last.unlink()
    before = snapshot(rd.root)
    with pytest.raises(GWNetError, match="but no last.pt, so the run cannot be resumed exactly"):
        train(cfg, resume=True)
    assert snapshot(rd.root) == before

    # The finetuning stage killed before its first checkpoint: only its config.json is left.
    for f in (rd.best, rd.metrics, rd.test_metrics):
        f.unlink()
    result = train(cfg, resume=True)
    assert result.best_epoch == 1 and rd.test_metrics.exists()
    assert pre.best.read_bytes() == pretrained  # the finished pretraining stage was left alone


# --- one process per run directory ------------------------------------------------------------
def test_second_process_on_a_run_directory_is_refused_and_changes_nothing(finished, tmp_path):
    root, _, _ = finished
    cfg = tiny_config(root / "data", tmp_path / "run", epochs=1, batches_per_epoch=2)
    first = Trainer(cfg)  # holds the run directory until fit() ends
    before = snapshot(tmp_path / "run")
    flags = ["--dataset", root / "data", "--epochs", "1", "--blocks", "1", "--no-progress"]
    for argv in (["--out", cfg.out, *flags], ["--resume", cfg.out, "--no-progress"]):
        second = cli(*argv)
        assert second.returncode == 2
        line = one_error_line(second.stderr, "gwnet-train")
        assert f"{cfg.out}: is in use: another process (pid {os.getpid()}) is training into it" in line
        assert snapshot(tmp_path / "run") == before
    first.fit()
    assert RunDir(cfg.out).lock.exists()
    later = cli("--resume", cfg.out, "--no-progress")  # the lock went with the run
    assert later.returncode == 2 and "already finished" in one_error_line(later.stderr, "gwnet-train")


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_locked_run_directory_is_refused_before_anything_is_written(finished, tmp_path, pipeline):
    root, _, _ = finished
    cfg = tiny_config(root / "data", tmp_path / "run", epochs=1, batches_per_epoch=1,
                      pretrain_horizon=3 if pipeline else None)
    rd = RunDir(cfg.out)
    rd.root.mkdir()
    with open(rd.lock, "w") as held:  # another process's lock, as far as the trainer can tell
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(GWNetError, match="is in use"):
            train(cfg)
        assert [p.name for p in rd.root.iterdir()] == [rd.lock.name]
    assert train(cfg).best_epoch == 1


# --- exports ------------------------------------------------------------------------------------
def export(*argv, env: dict | None = None) -> subprocess.CompletedProcess:
    return cli("export-npz", *argv, module="gwnet.cli.data", env=env)


def test_export_refuses_an_earlier_export_bad_lengths_and_foreign_directories(tiny_dataset, tmp_path, capsys):
    from gwnet.cli.data import main

    out = tmp_path / "npz"
    speeds = tiny_dataset / "speeds.h5"
    assert main(["export-npz", "--data", str(speeds), "--out", str(out)]) == 0
    before = snapshot(out)
    cases = [([], "already holds results; pass --overwrite"),
             (["--seq-len", "0", "--overwrite"], "--seq-len must be at least 1, not 0"),
             (["--horizon", "-2", "--overwrite"], "--horizon must be at least 1, not -2")]
    for extra, message in cases:
        assert main(["export-npz", "--data", str(speeds), "--out", str(out), *extra]) == 2
        assert message in one_error_line(capsys.readouterr().err, "gwnet-data")
        assert snapshot(out) == before
    # The data directory is no export: nothing in it is ever replaced.
    assert main(["export-npz", "--data", str(speeds), "--out", str(tiny_dataset), "--overwrite"]) == 2
    assert "which gwnet-data export-npz did not write" in one_error_line(capsys.readouterr().err, "gwnet-data")
    assert speeds.exists()
    (tmp_path / "file").write_text("x")
    assert main(["export-npz", "--data", str(speeds), "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in one_error_line(capsys.readouterr().err, "gwnet-data")
    assert main(["export-npz", "--data", str(speeds), "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "cannot write here" in one_error_line(capsys.readouterr().err, "gwnet-data")


def test_export_killed_while_overwriting_keeps_the_earlier_set(tiny_dataset, tmp_path):
    out = tmp_path / "npz"
    speeds = tiny_dataset / "speeds.h5"
    assert export("--data", speeds, "--out", out).returncode == 0
    before = snapshot(out)
    # SIGKILL once the first split of the new (6-step) export is written.
    killer = tmp_path / "sitecustomize.py"
    killer.write_text("import os, signal, numpy\n"
                      "_save = numpy.savez_compressed\n"
                      "def savez(*a, **k):\n"
                      "    _save(*a, **k)\n"
                      "    os.kill(os.getpid(), signal.SIGKILL)\n"
                      "numpy.savez_compressed = savez\n")
    killed = export("--data", speeds, "--out", out, "--seq-len", "6", "--overwrite",
                    env={"PYTHONPATH": str(tmp_path)})
    assert killed.returncode == -signal.SIGKILL
    assert snapshot(out) == before
    assert export("--data", speeds, "--out", out, "--seq-len", "6", "--overwrite").returncode == 0
    assert {np.load(out / f"{s}.npz")["x"].shape[1] for s in ("train", "val", "test")} == {6}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".npz")]  # nothing left beside it


def test_a_replacement_killed_between_its_renames_is_put_right_by_the_next(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_directory(out, ours=("a", "b")) as stage:
        (stage / "a").write_text("old a")
        (stage / "b").write_text("old b")
    renames = []
    real_rename = os.rename

    def killed_after_the_first(src, dst):
        if renames:
            raise KeyboardInterrupt  # as a kill would: no handler runs
        renames.append(src)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_after_the_first)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a system without renameat2
    with pytest.raises(KeyboardInterrupt), atomic_directory(out, overwrite=True, ours=("a", "b")) as stage:
        (stage / "a").write_text("new a")
    monkeypatch.undo()
    assert not out.exists() and snapshot(tmp_path / ".out.gwnet-old") == {"a": b"old a", "b": b"old b"}
    with pytest.raises(GWNetError, match="already holds results"):  # the next one puts it back first
        with atomic_directory(out, ours=("a", "b")):
            pass
    assert snapshot(out) == {"a": b"old a", "b": b"old b"} and not (tmp_path / ".out.gwnet-old").exists()
    # A failure while writing leaves the previous result, and nothing beside it.
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True, ours=("a", "b")) as stage:
        (stage / "a").write_text("new a")
        raise RuntimeError
    assert snapshot(out) == {"a": b"old a", "b": b"old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_directory(out, overwrite=True, ours=("a", "b")) as stage:
        (stage / "a").write_text("new a")
    assert snapshot(out) == {"a": b"new a"}  # replaced whole: no old b beside the new a
