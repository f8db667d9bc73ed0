"""README.md and every docs/*.md page: each Python block runs as it stands (in a fresh
directory), each command line of the shell blocks is accepted by the command's own parser
(an experiment script's flags must appear in its ``--help``), every page the README links
exists, and the pages speak of the current state only. Blocks fenced as ``text`` are shown,
not run. A slow check regenerates the smoke paper table of docs/paper-table.md."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)


def blocks(lang: str) -> list[tuple[str, str]]:
    """``(page name, code)`` of every block fenced with ``lang``."""
    return [(page.name if page.parent == ROOT else f"docs/{page.name}", code)
            for page in PAGES for kind, code in FENCE.findall(page.read_text()) if kind == lang]


PYTHON = blocks("python")
SHELL = blocks("bash")


def test_readme_starts_with_the_two_setup_commands_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    first = FENCE.search(readme)
    assert first.group(1) == "bash" and first.group(2).count("pip install torch==2.13.0") == 2
    assert "gwnet-train" in first.group(2) and "python -m pytest -q" in first.group(2)
    assert len(readme.splitlines()) < 300


def test_the_blocks_this_test_runs_are_there():
    assert len(PYTHON) >= 3 and any("register_model" in code for _, code in PYTHON)
    assert {page for page, _ in PYTHON} >= {"README.md", "docs/python-api.md", "docs/extending.md"}


def test_every_linked_page_exists_and_every_page_is_linked():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme))
    assert linked, "the README links no docs page"
    for page in linked:
        assert (ROOT / page).is_file(), f"README links {page}, which does not exist"
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in linked, f"docs/{page.name} is not linked from the README"
        for target in re.findall(r"\]\(([\w.-]+\.md)\)", page.read_text()):
            assert (ROOT / "docs" / target).is_file(), f"docs/{page.name} links {target}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_state_the_current_state_only(page):
    text = page.read_text().lower()
    for stale in ("previous round", "this round", "last round", "previous run"):
        assert stale not in text, f"{page.name} speaks of the {stale}"


@pytest.mark.parametrize("index", range(len(PYTHON)), ids=lambda i: f"{PYTHON[i][0]}-{i}")
def test_python_block_runs(index, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PYTHON[index][1]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{PYTHON[index][0]}: {done.stderr[-3000:]}"


def _commands() -> list[tuple[str, list[str]]]:
    """Every gwnet or experiment command line of the shell blocks, comments and continuations
    resolved: ``(page, words)``."""
    out = []
    for page, block in SHELL:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part)
                while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value cmd
                    words = words[1:]
                if "-m" in words and words[:1] == ["torchrun"]:
                    at = words.index("-m")
                    words = [f"gwnet-{words[at + 2]}", *words[at + 3:]]
                if words and (words[0].startswith("gwnet-") or
                              (words[0] == "python" and len(words) > 1 and words[1].startswith("experiments/"))):
                    out.append((page, words))
    return out


@functools.lru_cache(maxsize=None)
def _script_help(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"{script} --help failed: {done.stderr[-2000:]}"
    return done.stdout


def test_every_shell_command_line_parses():
    commands = _commands()
    assert {words[0] for _, words in commands} >= {"gwnet-train", "gwnet-predict", "gwnet-data", "python"}
    for page, words in commands:
        where = f"{page}: {' '.join(words)}"
        if words[0] == "python":
            script = words[1]
            assert (ROOT / script).is_file(), where
            shown = _script_help(script)
            for flag in (w.split("=", 1)[0] for w in words[2:] if w.startswith("--")):
                assert re.search(rf"{re.escape(flag)}\b", shown), f"{where}: {flag} is not in its --help"
            continue
        module = importlib.import_module(f"gwnet.cli.{words[0].removeprefix('gwnet-')}")
        argv = words[1:]
        if inspect.signature(module.build_parser).parameters:
            # gwnet-train picks the model's flags from the command line (--resume: from the run)
            parser = module.build_parser([] if "--resume" in argv else argv)
        else:
            parser = module.build_parser()
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # --help exits 0; a rejected option exits 2
            assert exc.code == 0, where


def _smoke_table(text: str) -> tuple[str, str]:
    found = re.search(r"<!-- smoke-table: (.*?) -->\n(.*?)<!-- end smoke-table -->", text, flags=re.S)
    assert found, "docs/paper-table.md has no smoke table"
    return found.group(1), found.group(2).strip()


def test_paper_table_page_names_its_command():
    command, table = _smoke_table((ROOT / "docs" / "paper-table.md").read_text())
    assert command.startswith("python experiments/paper_table.py --budget smoke")
    assert table.startswith("|") or "Graph WaveNet" in table


def _load_paper_table():
    if "paper_table" in sys.modules:
        return sys.modules["paper_table"]
    spec = importlib.util.spec_from_file_location("paper_table", ROOT / "experiments" / "paper_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_table"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_paper_table_is_what_the_command_produces(tmp_path):
    """Regenerates the table (several minutes on 2 cores) and compares it with the page."""
    command, table = _smoke_table((ROOT / "docs" / "paper-table.md").read_text())
    words = shlex.split(command)
    at = words.index("--out")
    words[at + 1] = str(tmp_path / "smoke")
    pt = _load_paper_table()
    assert pt.main(words[2:]) == 0
    produced = (tmp_path / "smoke" / "paper_table.md").read_text().strip()
    assert produced == table, "docs/paper-table.md's smoke table differs from what its command produces"
