"""Trust every byte: files gwnet wrote are checked when read back, names and links never reach
outside, full disks and kills lose nothing, crafted arrays and special files are one line.

Each test drives a command-line tool in this process (``main(argv)``: exit status and stderr)
on one tiny run, stopped after its first epoch of two so that ``--resume`` has work left.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from test_train import tiny_config

from gwnet import atomic
from gwnet.cli.data import main as data_main
from gwnet.cli.predict import main as predict_main
from gwnet.cli.train import main as train_main
from gwnet.config import flatten, read_config_file
from gwnet.engine import RunDir, load_checkpoint, save_checkpoint, train
from gwnet.engine.listeners import EpochListener
from gwnet.errors import GWNetError


class StopAfterFirstEpoch(EpochListener):
    def on_epoch_end(self, trainer, record, improved):
        raise KeyboardInterrupt  # as a kill after the epoch's checkpoints would


@pytest.fixture(scope="module")
def half(tmp_path_factory) -> SimpleNamespace:
    """A run of 2 epochs stopped after the first (best.pt, last.pt, config.json, metrics.csv)."""
    from gwnet.data import synthetic

    root = tmp_path_factory.mktemp("trust")
    synthetic.write(root / "data", nodes=6, days=3, seed=1)
    cfg = tiny_config(root / "data", root / "run", epochs=2, batches_per_epoch=2, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, listeners=[StopAfterFirstEpoch()])
    return SimpleNamespace(root=root, run=root / "run", data=root / "data")


def outcome(main, argv, capsys) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def refused(main, argv, capsys, *words) -> str:
    """Exit status 2 and exactly one error line, holding ``words``."""
    code, lines = outcome(main, argv, capsys)
    errors = [line for line in lines if ": error: " in line]
    assert code == 2 and len(errors) == 1 and len(lines) == len(errors), (code, lines)
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- crafted files read back: best.pt, last.pt, config.json -----------------------------------
MUTATIONS = ("wrong type", "nan", "negative", "huge", "missing")


def mutate(table: dict, key: str, how: str) -> None:
    """One hostile edit of ``table[key]``."""
    if how == "missing":
        del table[key]
        return
    value = table[key]
    if isinstance(value, torch.Tensor):
        fill = {"wrong type": None, "nan": math.nan, "negative": -1.0, "huge": 1e39}[how]
        edited = None if fill is None else torch.full(value.shape, fill, dtype=torch.float64)
        # Weights stay float32 (1e39 overflows to inf there); other tensors become floats.
        table[key] = "x" if edited is None else edited.to(value.dtype) if value.is_floating_point() else edited
    else:
        table[key] = {"wrong type": "x", "nan": math.nan, "negative": -1, "huge": 1e300}[how]


def checkpoint_mutations(path: Path):
    """(label, edited payload) for every entry of the checkpoint and of its scaler, and a weight."""
    state = torch.load(path, weights_only=True)
    targets = [(None, key) for key in state] + [("scaler", key) for key in state["scaler"]]
    targets.append(("model", next(iter(state["model"]))))
    for table, key in targets:
        for how in MUTATIONS:
            if table == "model" and how == "negative":
                continue  # a weight may be any finite number
            edited = torch.load(path, weights_only=True)
            mutate(edited if table is None else edited[table], key, how)
            yield f"{table + '.' if table else ''}{key} {how}", edited


def test_every_entry_of_best_pt_mutated_is_one_line(half, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(half.run, run)
    cases = 0
    for label, edited in checkpoint_mutations(half.run / "best.pt"):
        torch.save(edited, run / "best.pt")
        code, lines = outcome(predict_main, [run, "--out", tmp_path / "out", "--no-plots"], capsys)
        assert code == 2 and len(lines) == 1 and "best.pt: " in lines[0], (label, code, lines)
        assert not (tmp_path / "out").exists()
        cases += 1
    assert cases > 60
    shutil.copy(half.run / "best.pt", run / "best.pt")  # the genuine file still predicts
    assert outcome(predict_main, [run, "--out", tmp_path / "out", "--no-plots"], capsys)[0] == 0


@pytest.mark.parametrize("section,name,value,words", [
    ("train", "clamp_max", -1.0, "clamp_min 0 must be below clamp_max -1"),  # would forecast a constant
    ("train", "clamp_max", 0.0, "must be below clamp_max 0"),
    ("train", "batch_size", 0, "batch_size must be at least 1"),
    ("data", "seq_len", 0, "seq_len must be at least 1"),
    ("data", "horizon", 0, "horizon must be at least 1"),
    ("model", "num_nodes", 7, "model.num_nodes is 7, but its data and 6 sensor ids give 6"),
    ("model", "skip_channels", 10**6, "weights do not fit"),  # compared before anything is allocated
    ("data", "fill_zeroes", False, "scaler 'fill_zeroes' is True"),
])
def test_best_pt_config_that_would_mislead_predictions(half, tmp_path, capsys, section, name, value, words):
    run = tmp_path / "run"
    shutil.copytree(half.run, run)
    state = torch.load(run / "best.pt", weights_only=True)
    state["config"][section][name] = value
    torch.save(state, run / "best.pt")
    refused(predict_main, [run, "--out", tmp_path / "out", "--no-plots"], capsys, "best.pt: ", words)


def test_every_entry_of_last_pt_mutated_is_one_line(half, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(half.run, run)
    before = snapshot(run)
    cases = 0
    for label, edited in checkpoint_mutations(half.run / "last.pt"):
        torch.save(edited, run / "last.pt")
        code, lines = outcome(train_main, ["--resume", run], capsys)
        assert code == 2 and len(lines) == 1 and "last.pt" in lines[0], (label, code, lines)
        cases += 1
    assert cases > 100
    shutil.copy(half.run / "last.pt", run / "last.pt")
    assert snapshot(run) == before  # nothing was written by any refused resume


@pytest.mark.parametrize("edit,words", [
    # Another optimizer group, a group of other size, a moment of another shape.
    (lambda s: s["optimizer"]["param_groups"].append(dict(s["optimizer"]["param_groups"][0])), "parameter group"),
    (lambda s: s["optimizer"]["param_groups"][0]["params"].pop(), "parameter group"),
    (lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(1, 2, 3)), "has shape"),
    (lambda s: s.update(torch_rng=s["torch_rng"][:100]), "not a random state"),
    (lambda s: s.update(shuffle_rng=s["shuffle_rng"].float()), "not a random state"),
    (lambda s: s.update(epoch=0), "cannot exceed 'epoch' 0"),
    (lambda s: s.update(epoch=3, bad_epochs=2), "'history' holds 1 epochs"),
    (lambda s: s.update(best_val_mae=1.0), "not the validation MAE its history records"),
    (lambda s: s.update(partial={"order": torch.arange(5), "next_batch": 1, "sums": torch.zeros(2, 3),
                                 "grads": [0.0, 0.0, 0, 0]}), "partial 'order' covers 5 windows"),
    (lambda s: s["config"]["model"].update(residual_channels=10**6), "model"),
])
def test_training_state_that_does_not_fit_the_model_is_one_line(half, tmp_path, capsys, edit, words):
    run = tmp_path / "run"
    shutil.copytree(half.run, run)
    state = torch.load(run / "last.pt", weights_only=True)
    edit(state)
    torch.save(state, run / "last.pt")
    refused(train_main, ["--resume", run], capsys, "last.pt", words)


def test_every_option_of_config_json_mutated_is_one_line(half, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(half.run, run)
    raw = json.loads((half.run / "config.json").read_text())
    cases = 0
    for key in flatten(raw):
        if key == "out":
            continue  # where the run directory was: a moved run resumes where it is now
        for how in MUTATIONS:
            edited = json.loads((half.run / "config.json").read_text())
            *sections, name = key.split(".")
            table = edited
            for section in sections:
                table = table[section]
            mutate(table, name, how)
            (run / "config.json").write_text(json.dumps(edited))
            code, lines = outcome(train_main, ["--resume", run], capsys)
            assert code == 2 and len(lines) == 1 and "config.json" in lines[0], (key, how, code, lines)
            cases += 1
    assert cases > 300


def test_hand_edited_learning_rate_on_resume_says_last_pt_wins(half, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(half.run, run)
    raw = json.loads((run / "config.json").read_text())
    raw["train"]["lr"] = 0.01
    (run / "config.json").write_text(json.dumps(raw))
    line = refused(train_main, ["--resume", run], capsys, "config.json: train.lr is 0.01",
                   "last.pt trained with 0.001", "recorded but not used")
    assert "restore it" in line


def test_genuine_files_pass_and_the_writer_checks_what_it_writes(half, tmp_path):
    RunDir(half.run).check_saved_state()
    best = load_checkpoint(half.run / "best.pt", kind="best")
    with pytest.raises(GWNetError, match="scaler 'std' is 0.0"):
        save_checkpoint(tmp_path / "best.pt", {**best, "scaler": {**best["scaler"], "std": 0.0}}, kind="best")
    assert not (tmp_path / "best.pt").exists()


# --- names and links ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../victim", "/tmp/victim", "a/b", ".hidden", "", ".."])
def test_a_name_from_a_flag_never_becomes_a_path(tmp_path, capsys, name):
    refused(data_main, ["synth", "--out", tmp_path / "out", "--format", "pems", "--name", name,
                        "--nodes", "4", "--days", "1"], capsys, "plain file name")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lock_that_is_a_symlink_is_refused_and_its_target_untouched(half, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(half.run, run)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(victim)
    refused(train_main, ["--resume", run], capsys, ".lock", "symbolic link")
    assert victim.read_text() == "mine\n"


def test_a_symlinked_shard_folder_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    (tmp_path / "mine").mkdir()
    (run.root / "last-shards-a").symlink_to(tmp_path / "mine")
    with pytest.raises(GWNetError, match="last-shards-a: is a symbolic link"):
        run.shards("last-shards-a")
    assert run.shards("last-shards-b") == run.root / "last-shards-b"


def test_users_hidden_files_beside_and_inside_outputs_are_never_touched(half, tmp_path, capsys):
    out = tmp_path / "pred"
    assert outcome(predict_main, [half.run, "--out", out, "--no-plots"], capsys)[0] == 0
    # Names the earlier gwnet gave its own leftovers: now a user's files, kept as they are.
    (tmp_path / ".pred.old").mkdir()
    (tmp_path / ".pred.old" / "notes").write_text("mine")
    (tmp_path / ".pred.thesis.tmp").write_text("mine")
    assert outcome(predict_main, [half.run, "--out", out, "--no-plots", "--overwrite", "--split", "val"],
                   capsys)[0] == 0
    assert (tmp_path / ".pred.old" / "notes").read_text() == "mine"
    assert (tmp_path / ".pred.thesis.tmp").read_text() == "mine"
    # Inside the output: not gwnet's, so the folder is never replaced.
    (out / ".thesis.tmp").write_text("mine")
    refused(predict_main, [half.run, "--out", out, "--no-plots", "--overwrite"], capsys, ".thesis.tmp",
            "did not write")
    assert (out / ".thesis.tmp").read_text() == "mine"
    # Inside a run directory: stale temporaries are gwnet's own names only.
    run = RunDir(tmp_path / "run")
    shutil.copytree(half.run, run.root)
    (run.root / ".notes.tmp").write_text("mine")
    (run.root / ".last.pt.gwnet-abc123.tmp").write_text("half-written")
    run.remove_stale_temporaries()
    assert (run.root / ".notes.tmp").read_text() == "mine"
    assert not (run.root / ".last.pt.gwnet-abc123.tmp").exists()


# --- kills and full disks ----------------------------------------------------------------------
# The child that gets killed: gwnet-predict, with the swap's rename (or any rename) made to
# kill the process right after it returns. A fresh interpreter, not a fork of this one: a fork
# of a process with threads (torch's, a server's) can deadlock on a lock one of them held.
KILLED_CHILD = """
import json, os, signal, sys
from gwnet import atomic
from gwnet.cli.predict import main
argv, after = json.loads(sys.argv[1])
if after is not None:
    owner = atomic if after == "_exchange" else os
    call = getattr(owner, after)

    def call_then_die(*args, **kwargs):
        done = call(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return done

    setattr(owner, after, call_then_die)
print("go", flush=True)  # imports done: the parent's delay counts from here
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
main(argv)
"""


def _killed(argv, delay: float | None = None, after: str | None = None) -> None:
    """Run gwnet-predict in a child process; SIGKILL it after ``delay`` seconds, or right after
    its first call of ``after`` (``_exchange``: the one rename that swaps the results; ``rename``:
    any other rename, as a swap in two renames would do between them)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, json.dumps([[str(a) for a in argv], after])],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout.readline().strip() == "go"
    if delay is not None:
        time.sleep(delay)
        child.kill()
    child.wait(timeout=300)
    child.stdout.close()


def test_overwrite_killed_at_any_instant_leaves_the_old_or_the_new_result_whole(half, tmp_path, capsys):
    out, new = tmp_path / "pred", tmp_path / "new"
    base = [half.run, "--no-plots", "--device", "cpu"]
    assert outcome(predict_main, [*base, "--out", out], capsys)[0] == 0
    assert outcome(predict_main, [*base, "--out", new, "--split", "val"], capsys)[0] == 0
    old_files, new_files = snapshot(out), snapshot(new)
    assert old_files != new_files and set(old_files) == set(new_files)
    seen = set()
    for delay, after in [(None, "_exchange"), (None, "rename"), (0.0, None), (0.05, None), (0.15, None),
                         (0.3, None)]:
        _killed([*base, "--out", out, "--split", "val", "--overwrite"], delay, after)
        now = snapshot(out)
        assert now in (old_files, new_files), (delay, after, sorted(now))
        seen.add("new" if now == new_files else "old")
        shutil.rmtree(out)
        assert outcome(predict_main, [*base, "--out", out], capsys)[0] == 0  # the old one, for the next kill
    assert "new" in seen  # the kill right after the swap: the new result, whole
    # The next run cleaned up what the kills left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "pred"]


def _full_disk(*names):
    def raise_enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), names[0] if names else None)
    return raise_enospc


def test_full_disk_while_overwriting_keeps_the_previous_result(half, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pred"
    assert outcome(predict_main, [half.run, "--out", out, "--no-plots"], capsys)[0] == 0
    before = snapshot(out)
    monkeypatch.setattr(pd.DataFrame, "to_csv", _full_disk("metrics.csv"))
    refused(predict_main, [half.run, "--out", out, "--no-plots", "--overwrite", "--split", "val"], capsys,
            "No space left on device", "left as it was")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]  # no partial result beside it


def test_full_disk_in_export_and_synth_leaves_no_partial_folder(half, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(np, "savez_compressed", _full_disk())
    refused(data_main, ["export-npz", "--data", half.data / "speeds.h5", "--out", tmp_path / "npz"], capsys,
            "No space left on device")
    refused(data_main, ["synth", "--out", tmp_path / "syn", "--format", "pems", "--nodes", "4", "--days", "1"],
            capsys, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_training_is_one_line(half, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(half.run, run)
    monkeypatch.setattr(pd.DataFrame, "to_csv", _full_disk(str(run / "metrics.csv")))
    refused(train_main, ["--resume", run], capsys, "metrics.csv: No space left on device")
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_that_does_not_fit_on_the_disk_is_one_line(half, tmp_path, monkeypatch):
    shutil.copy(half.run / "best.pt", tmp_path / "best.pt")
    before = (tmp_path / "best.pt").read_bytes()

    def torch_full_disk(*args, **kwargs):  # what torch's zip writer raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")

    monkeypatch.setattr(torch, "save", torch_full_disk)
    with pytest.raises(GWNetError, match="best.pt: cannot write checkpoint .*the previous one is intact"):
        save_checkpoint(tmp_path / "best.pt", load_checkpoint(half.run / "best.pt"))
    assert (tmp_path / "best.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


# --- crafted arrays ----------------------------------------------------------------------------
def _sparse(path: Path, **arrays) -> Path:
    import scipy.sparse as sp

    m = sp.csr_matrix(np.eye(4, dtype=np.float32) + np.eye(4, k=1, dtype=np.float32))
    base = {"data": m.data, "indices": m.indices, "indptr": m.indptr, "shape": np.array([4, 4]),
            "format": np.array(b"csr")}
    np.savez(path, **{**base, **arrays})
    return path


@pytest.mark.parametrize("arrays,words", [
    ({"indices": np.array([0, 1, 1, 2, 2, 3, 900])}, "outside 0..3"),  # scipy would write out of bounds
    ({"indices": np.array([0, 1, 1, -2, 2, 3, 3])}, "outside 0..3"),
    ({"indptr": np.array([0, 2, 1, 6, 7])}, "never falling"),
    ({"indptr": np.array([0, 2, 4, 6])}, "'indptr' has"),
    ({"indptr": np.array([0, 2, 4, 6, 9])}, "never falling"),
    ({"format": np.array(b"dia")}, "sparse format 'dia'"),
    ({"shape": np.array([4, 4, 4])}, "not two integers"),
])
def test_sparse_graph_is_checked_in_full_before_scipy_sees_it(tmp_path, arrays, words):
    from gwnet.data.graph import read_graph

    assert read_graph(_sparse(tmp_path / "ok.npz")).adj.shape == (4, 4)
    with pytest.raises(GWNetError, match=words) as info:
        read_graph(_sparse(tmp_path / "g.npz", **arrays))
    assert "g.npz: " in str(info.value) and "\n" not in str(info.value)


def test_npz_member_whose_header_claims_more_than_it_holds(tmp_path):
    """A zip member of a few bytes whose .npy header states 1.9 GB (what a bomb's inflated
    member looks like before it is inflated) is refused from the header."""
    from gwnet.data.graph import read_graph
    from gwnet.data.readers import read_speeds

    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
    header["shape"] = (50_000, 10_000)
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("data.npy", "w") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(np.zeros(1000, np.float32).tobytes())
    with pytest.raises(GWNetError, match="states shape .50000, 10000. .2,000,000,000 bytes"):
        read_speeds(path)
    with pytest.raises(GWNetError, match="states shape"):
        read_graph(path)


def test_hdf5_header_claiming_a_billion_timestamps_is_refused_before_reading(tmp_path):
    import h5py

    from gwnet.data.readers import read_speeds

    path = tmp_path / "huge.h5"
    pd.DataFrame({"a": [1.0, 2.0]}, index=pd.date_range("2020", periods=2, freq="5min")).to_hdf(path, key="df")
    with h5py.File(path, "a") as h5:
        group = h5["df"]
        kind = group["axis1"].attrs["kind"]
        del group["axis1"]
        stamps = group.create_dataset("axis1", shape=(10**9,), dtype=np.int64, chunks=(2**16,),
                                      compression="gzip")  # nothing stored: a few kilobytes on disk
        stamps.attrs["kind"] = kind
    assert path.stat().st_size < 1_000_000
    with pytest.raises(GWNetError, match="1,000,000,000 timestamps"):
        read_speeds(path)


@pytest.mark.parametrize("write", [
    lambda p: p.with_suffix(".csv").write_text("time,a\n3000-01-01 00:00,1\n3000-01-01 00:05,2\n"),
    lambda p: pd.DataFrame({"a": [1.0, 2.0]}, index=pd.date_range("2020", periods=2, freq="5min"))
    .to_hdf(p.with_suffix(".h5"), key="df"),
])
def test_dates_outside_pandas_range_are_one_line(tmp_path, write):
    import h5py

    from gwnet.data.readers import read_speeds

    write(tmp_path / "f")
    path = next(tmp_path.iterdir())
    if path.suffix == ".h5":
        with h5py.File(path, "a") as h5:
            h5["df/axis1"][0] = np.iinfo(np.int64).max - 1  # year 2262 and beyond
            h5["df/axis1"].attrs["kind"] = b"datetime64[s]"
    with pytest.raises(GWNetError) as info:
        read_speeds(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


# --- graph values ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "1e39", "-inf"])
def test_edge_weights_float32_cannot_hold_are_refused(tmp_path, value):
    from gwnet.data.graph import read_graph

    (tmp_path / "g.csv").write_text(f"from,to,weight\na,b,0.5\nb,c,{value}\n")
    with pytest.raises(GWNetError, match="g.csv: .*(not a finite float32 number|negative)"):
        read_graph(tmp_path / "g.csv", sensor_ids=["a", "b", "c"])


@pytest.mark.parametrize("suffix", [".npy", ".pkl"])
def test_adjacency_arrays_beyond_float32_are_refused(tmp_path, suffix):
    import pickle

    from gwnet.data.graph import read_graph

    adj = np.eye(3) + np.eye(3, k=1) * 1e39  # float64: finite here, inf once the graph is float32
    path = tmp_path / f"g{suffix}"
    if suffix == ".npy":
        np.save(path, adj)
    else:
        path.write_bytes(pickle.dumps([["a", "b", "c"], {"a": 0, "b": 1, "c": 2}, adj], protocol=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow note on the cast
        with pytest.raises(GWNetError, match="non-finite|NaN or infinite"):
            read_graph(path)


def test_conflicting_duplicates_and_unknown_ids_are_counted(tmp_path):
    from gwnet.data.graph import read_graph

    rows = ["from,to,weight", "a,b,0.5", "a,b,0.9", "b,c,0.3", "b,c,0.3"]  # one conflict, one repeat
    rows += [f"x{i},y{i},1.0" for i in range(500)]  # among sensors the data lacks
    (tmp_path / "g.csv").write_text("\n".join(rows) + "\n")
    graph = read_graph(tmp_path / "g.csv", sensor_ids=["a", "b", "c"])
    assert (graph.report.conflicting, graph.report.unknown, graph.report.listed) == (1, 500, 2)
    said = graph.describe()
    assert "1 pairs listed twice with different values" in said and "500 rows name sensors the data lacks" in said


# --- special files -----------------------------------------------------------------------------
@pytest.fixture
def no_hang():
    """A read that blocks fails the test after 20 s instead of hanging it."""
    def expire(*_):
        raise TimeoutError("blocked on a special file")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fifo_device_and_link_loop_as_inputs_are_one_line(half, tmp_path, capsys, no_hang):
    from gwnet.data.graph import read_graph

    os.mkfifo(tmp_path / "adj.pkl")
    (tmp_path / "zero.pkl").symlink_to("/dev/zero")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    speeds = half.data / "speeds.h5"
    refused(train_main, ["--data", speeds, "--adj", tmp_path / "adj.pkl", "--out", tmp_path / "r1"], capsys,
            "adj.pkl: is a FIFO")
    with pytest.raises(GWNetError, match="zero.pkl: is a character device"):
        read_graph(tmp_path / "zero.pkl")
    refused(train_main, ["--config", tmp_path / "a", "--out", tmp_path / "r2"], capsys, "loop of symbolic links")
    refused(predict_main, [tmp_path / "a", "--out", tmp_path / "p"], capsys, "leads nowhere")
    os.mkfifo(tmp_path / "speeds.csv")
    refused(data_main, ["inspect", tmp_path / "speeds.csv"], capsys, "speeds.csv: is a FIFO")


def test_reference_weights_are_bounded_in_depth_and_receptive_field(tmp_path, no_hang):
    from gwnet import load_reference_checkpoint

    nested: list = []
    inner = nested
    for _ in range(200):  # deeper than any state_dict; torch.load would recurse through every level
        inner.append([])
        inner = inner[0]
    torch.save({"start_conv.weight": torch.zeros(1), "x": nested}, tmp_path / "deep.pth")
    with pytest.raises(GWNetError, match="deep.pth: its pickle nests deeper than"):
        load_reference_checkpoint(tmp_path / "deep.pth")
    state = {"start_conv.weight": torch.zeros(4, 2, 1, 1), "end_conv_1.weight": torch.zeros(8, 8, 1, 1),
             "end_conv_2.weight": torch.zeros(3, 8, 1, 1)}
    for i in range(2):  # one block of two layers, kernel 1000: each forecast would read 2,998 steps
        state.update({f"filter_convs.{i}.weight": torch.zeros(4, 4, 1, 1000),
                      f"gate_convs.{i}.weight": torch.zeros(4, 4, 1, 1000),
                      f"skip_convs.{i}.weight": torch.zeros(8, 4, 1, 1),
                      f"residual_convs.{i}.weight": torch.zeros(4, 4, 1, 1)})
    torch.save(state, tmp_path / "wide.pth")
    with pytest.raises(GWNetError, match="wide.pth: .*2,998 input steps .kernel 1000.*more than the"):
        load_reference_checkpoint(tmp_path / "wide.pth")


# --- config files and options ------------------------------------------------------------------
@pytest.mark.parametrize("name,text,words", [
    ("c.json", '{"train": {"lr": 0.1, "lr": 0.2}}', "'lr' is given twice"),
    ("c.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n", "'lr' is given twice"),
    ("c.toml", 'preset = ["improved"]\n', "preset must be a name"),
    ("c.yaml", "preset: [improved]\n", "preset must be a name"),
    ("c.json", '{"preset": {"a": 1}}', "preset must be a name"),
])
def test_duplicate_keys_and_ill_typed_presets_are_one_line(tmp_path, capsys, name, text, words):
    (tmp_path / name).write_text(text)
    with pytest.raises(GWNetError, match=words):
        read_config_file(tmp_path / name)
    refused(train_main, ["--config", tmp_path / name, "--out", tmp_path / "run"], capsys, name, words)


def test_options_that_do_nothing_for_the_file_warn(half):
    from gwnet.config import DataConfig
    from gwnet.data.datasets import resolve_source

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve_source(DataConfig(dataset="synthetic", synth_nodes=6, synth_days=3, synth_seed=1,
                                  start="2020-01-01", target="flow"))
    said = " | ".join(str(w.message) for w in caught)
    assert "--start 2020-01-01 is ignored" in said and "--target flow only renames it" in said


def test_huge_channel_counts_meet_the_memory_estimate(half, tmp_path, capsys):
    refused(train_main, ["--dataset", half.data, "--out", tmp_path / "run", "--residual-channels", "1000000",
                         "--dilation-channels", "1000000", "--no-progress"], capsys, "needs about", "GB")


# --- dead ends ---------------------------------------------------------------------------------
def test_kill_during_the_first_last_pt_write_does_not_block_the_run(half, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(half.run, run.root)
    run.last.unlink()
    run.metrics.unlink()  # the first epoch's record is written after its last.pt
    with pytest.warns(UserWarning, match="starts over"):
        run.check_resumable()
    best = load_checkpoint(run.best)
    best["epoch"] = 2
    save_checkpoint(run.best, best)
    with pytest.raises(GWNetError, match="cannot be resumed exactly"):
        run.check_resumable()  # a later epoch's best.pt: refused as before


def test_latest_on_readings_that_are_all_missing_is_one_line(half, tmp_path, capsys):
    speeds = pd.read_hdf(half.data / "speeds.h5", key="df").iloc[-20:] * 0
    speeds.to_csv(tmp_path / "last.csv")
    refused(predict_main, [half.run, "--latest", "--data", tmp_path / "last.csv", "--out", tmp_path / "p"],
            capsys, "every sensor are missing")


def test_synth_step_zero_and_unwritable_places_are_one_line(half, tmp_path, capsys, monkeypatch):
    refused(data_main, ["synth", "--out", tmp_path / "s", "--step", "0", "--nodes", "4", "--days", "1"], capsys,
            "step must be a multiple of 5")
    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("GWNET_CACHE", str(tmp_path / "cache"))
    refused(train_main, ["--dataset", half.data, "--out", tmp_path / "r1", "--memmap", "--no-progress"], capsys,
            "cannot write the series cache")
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "tensorboard").write_text("a file")
    refused(train_main, ["--dataset", half.data, "--out", tmp_path / "r2", "--log", "tensorboard",
                         "--no-progress"], capsys, "tensorboard: exists and is not a directory")
