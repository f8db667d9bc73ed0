"""The README's code blocks: every Python block runs as it stands (in a fresh directory), and
every command line of the shell blocks is accepted by the command's own parser, so an option
renamed in the code cannot leave the README behind."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [code for lang, code in BLOCKS if lang == "bash"]


def test_readme_has_the_blocks_this_test_runs():
    assert len(PYTHON) >= 2 and any("register_model" in code for code in PYTHON)
    assert SHELL and SHELL[0].count("pip install torch==2.13.0") == 2  # the two set-up commands


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PYTHON[index]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _commands() -> list[list[str]]:
    """Every gwnet command line of the shell blocks, comments and continuations resolved."""
    out = []
    for block in SHELL:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
            for part in line.split("&&"):
                words = shlex.split(part)
                if "-m" in words and words[:1] == ["torchrun"]:
                    at = words.index("-m")
                    words = [f"gwnet-{words[at + 2]}", *words[at + 3:]]
                if words and (words[0].startswith("gwnet-") or words[:2] == ["python", "experiments/paper_table.py"]):
                    out.append(words)
    return out


def _paper_table():
    if "paper_table" in sys.modules:
        return sys.modules["paper_table"]
    spec = importlib.util.spec_from_file_location("paper_table", ROOT / "experiments" / "paper_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_table"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_shell_command_line_parses():
    from gwnet.cli import data, predict, train

    commands = _commands()
    assert {c[0] for c in commands} >= {"gwnet-train", "gwnet-predict", "python"}
    for words in commands:
        name, argv = words[0], words[1:]
        if name == "python":
            parser = _paper_table().build_parser()
            argv = words[2:]
        elif name == "gwnet-train":
            # --resume reads the run's saved config to pick the model's flags: here there is none
            parser = train.build_parser([] if "--resume" in argv else argv)
        else:
            parser = {"gwnet-predict": predict, "gwnet-data": data}[name].build_parser()
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # --help exits 0; a rejected option exits 2
            assert exc.code == 0, " ".join(words)
