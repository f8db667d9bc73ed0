"""Nothing a user gives us runs code: crafted sharded checkpoints (torch.distributed.checkpoint
folders named by ``last.pt``) are refused with one line, and a genuine one still resumes.

Each payload is shown to work (it creates its marker file when loaded the unsafe way), so
that the refusals below are refusals of a live exploit.
"""
from __future__ import annotations

import os
import pathlib
import pickle
import shlex
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_scale import run_ranks, train_sharded
from test_train import tiny_config

from gwnet.engine import RunDir, load_checkpoint
from gwnet.errors import GWNetError
from gwnet.scale import distributed
from gwnet.scale.backbone import (_METADATA_GLOBALS, _SafeLoadPlanner, _SafeReader, check_sharded_checkpoint,
                                  load_sharded, read_shard_metadata)
from gwnet.scale.trainer import ShardedTrainer


class TouchMarker:
    """Unpickled, it creates ``marker`` (pathlib.Path.touch)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


class ShellMarker(TouchMarker):
    """Unpickled, it runs a shell command that creates ``marker`` (os.system)."""

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


PAYLOADS = [TouchMarker, ShellMarker]


def assert_one_line(exc: pytest.ExceptionInfo, names: Path) -> None:
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{names}: "), message


def genuine_checkpoint(folder: Path) -> None:
    """A small checkpoint as torch.distributed.checkpoint writes it (one process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(6.0), "lr": 0.01}, checkpoint_id=folder, no_dist=True)


# --- crafted files ----------------------------------------------------------------------------
@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_metadata_is_refused_before_it_runs(tmp_path, payload):
    pickle.loads(pickle.dumps(payload(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()  # the payload is live

    folder = tmp_path / "last-shards-a"
    genuine_checkpoint(folder)
    marker = tmp_path / "marker"
    (folder / ".metadata").write_bytes(pickle.dumps(payload(marker)))
    model = torch.nn.Linear(2, 2)
    for load in (check_sharded_checkpoint, lambda f: _SafeReader(f).read_metadata(),
                 lambda f: load_sharded(f, model, torch.optim.Adam(model.parameters()))):
        with pytest.raises(GWNetError, match="refused") as exc:
            load(folder)
        assert_one_line(exc, folder / ".metadata")
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_value_in_a_shard_file_is_refused_by_the_check_and_the_planner(tmp_path, payload):
    folder, marker = tmp_path / "ck", tmp_path / "marker"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3), "x": payload(marker)}, checkpoint_id=folder, no_dist=True)
    shard = next(folder.glob("*.distcp"))
    with pytest.raises(GWNetError, match="refused: 'x' is not plain tensor data") as exc:
        check_sharded_checkpoint(folder)
    assert_one_line(exc, shard)
    assert "GLOBAL" in str(exc.value)  # torch's reason (the global it blocked), not its advice
    # The reader and planner load_sharded passes to dcp refuse it too, should the file change
    # after the check.
    state = {"w": torch.zeros(3), "x": None}
    with warnings.catch_warnings(), pytest.raises(BaseException) as exc:
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=_SafeReader(folder), planner=_SafeLoadPlanner(folder), no_dist=True)
    assert f"{shard}: refused: 'x' is not plain data" in str(exc.value)
    assert not marker.exists()
    with warnings.catch_warnings():  # torch's own planner runs it: what the above prevents
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=folder, no_dist=True)
    assert marker.exists()


@pytest.mark.parametrize("where", ["../outside.distcp", "/etc/passwd", ".metadata", "missing.distcp"])
def test_metadata_pointing_outside_the_folder_or_at_nothing_is_refused(tmp_path, where):
    folder = tmp_path / "ck"
    genuine_checkpoint(folder)
    (tmp_path / "outside.distcp").write_bytes(next(folder.glob("*.distcp")).read_bytes())
    md = pickle.loads((folder / ".metadata").read_bytes())  # our own file: safe to unpickle
    for info in md.storage_data.values():
        info.relative_path = where
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(GWNetError) as exc:
        check_sharded_checkpoint(folder)
    assert "\n" not in str(exc.value) and ("refused" in str(exc.value) or "is missing" in str(exc.value))


def test_truncated_shard_file_is_one_line(tmp_path):
    folder = tmp_path / "ck"
    genuine_checkpoint(folder)
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(GWNetError, match="is truncated") as exc:
        check_sharded_checkpoint(folder)
    assert_one_line(exc, shard)


def test_genuine_metadata_needs_nothing_outside_the_allowed_globals(tmp_path):
    folder = tmp_path / "ck"
    genuine_checkpoint(folder)
    seen = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recording(open(folder / ".metadata", "rb")).load()  # our own file: safe to unpickle
    assert {g for g in seen if g[0] != "torch" or g[1] == "Size"} <= _METADATA_GLOBALS
    md = check_sharded_checkpoint(folder)
    assert md.state_dict_metadata.keys() == {"w", "lr"}


# --- a sharded run ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from gwnet.data import synthetic

    root = tmp_path_factory.mktemp("security") / "data"
    synthetic.write(root, nodes=6, days=3, seed=1)
    return root


def resume_or_report(cfg, result: Path) -> None:
    """One rank resuming a sharded run; the error it stops with goes to ``result``."""
    try:
        with distributed(cfg):
            ShardedTrainer(cfg, resume=True).fit()
    except GWNetError as exc:
        result.write_text(str(exc))


def test_crafted_run_directory_is_refused_and_a_genuine_one_resumes(dataset, tmp_path):
    cfg = tiny_config(dataset, tmp_path / "run", epochs=1, batches_per_epoch=3, fsdp=True)
    run_ranks(train_sharded, cfg, tmp_path / "first.pt", False, 2)  # stopped after step 2
    last = load_checkpoint(RunDir(cfg.out).last)
    shards = RunDir(cfg.out).shards(last["sharded"])
    read_shard_metadata(shards)  # what torch writes passes the restricted unpickler

    evil = tiny_config(dataset, tmp_path / "evil", epochs=1, batches_per_epoch=3, fsdp=True)
    shutil.copytree(cfg.out, evil.out)
    marker = tmp_path / "marker"
    (Path(evil.out) / last["sharded"] / ".metadata").write_bytes(pickle.dumps(TouchMarker(marker)))
    run_ranks(resume_or_report, evil, tmp_path / "error.txt", world=1)
    message = (tmp_path / "error.txt").read_text()
    assert message.startswith(f"{Path(evil.out) / last['sharded'] / '.metadata'}: refused") and "\n" not in message
    assert not marker.exists()

    run_ranks(train_sharded, cfg, tmp_path / "second.pt", True)
    assert len(torch.load(tmp_path / "second.pt")["losses"]) == 1
    assert load_checkpoint(RunDir(cfg.out).last)["finished"]
