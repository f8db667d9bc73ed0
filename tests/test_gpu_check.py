"""experiments/gpu_check.py, the one command for a GPU machine, in its --smoke mode on the CPU:
its parts run, its report holds every variant, and it imports nothing the GPU machine lacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import gpu_check  # noqa: E402

# What the GPU machine has besides the standard library (tqdm comes with torch_geometric
# and is a dependency of gwnet itself).
ALLOWED = {"torch", "numpy", "pandas", "scipy", "h5py", "matplotlib", "tensorboard", "torch_geometric", "tqdm",
           "gwnet"}


def test_smoke_of_the_step_table_and_the_large_graph_rows(tmp_path):
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out), "--smoke", "--parts", "steps", "large"]) == 0
    results = json.loads((out / "gpu_check.json").read_text())
    rows = results["steps"]["rows"]
    gwnet = {(r["kernel"], r["precision"], r["mode"]) for r in rows if r["model"] == "gwnet"}
    # every kernel x precision x mode the CPU has (TF32 is CUDA's), auto resolved to its kernel
    assert gwnet == {(k, p, m) for k in ("fast", "dense", "auto (fast)") for p in ("fp32", "bf16")
                     for m in ("eager", "graphs (eager on cpu)")}
    assert all("error" not in r and r["train_ms"] > 0 and r["infer_ms"] > 0 for r in rows)
    if results["env"]["shared"]:
        assert rows[0]["model"] == "reference code" and all("train_vs_ref" in r for r in rows[1:])
    else:
        assert "absent" in results["steps"]["baseline"] and all("train_vs_ref" not in r for r in rows)
    large = results["large"]
    assert {r["adaptive"] for r in large["rows"]} == {"topk", "lowrank", "dense"}
    assert all(r["fits"] and r["epoch_s_projected"] > 0 for r in large["rows"])
    report = (out / "gpu_check.md").read_text()
    assert "| gwnet | dense | fp32 | graphs (eager on cpu) |" in report and "300 sensors" in report
    assert "Every part ran." in report
    # A second run never writes over the first.
    assert gpu_check.main(["--out", str(out), "--smoke", "--parts", "steps"]) == 2


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "part_large", lambda check, device, smoke: 1 / 0)
    monkeypatch.setattr(gpu_check, "part_train", lambda check, device, smoke: {"ran": True})
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out), "--smoke", "--parts", "large", "train"]) == 0
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["large"]["error"].startswith("ZeroDivisionError") and "1 / 0" in results["large"]["traceback"]
    assert results["train"] == {"ran": True}
    assert "Parts that failed: large" in (out / "gpu_check.md").read_text()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # written atomically, none left
    over = tmp_path / "over"
    assert gpu_check.main(["--out", str(over), "--smoke", "--budget", "0", "--parts", "train"]) == 0
    assert "budget" in json.loads((over / "gpu_check.json").read_text())["train"]["skipped"]


def test_imports_only_what_the_gpu_machine_has():
    """Every import of the script and of the experiments modules it loads (recursively):
    the standard library, the GPU machine's packages, gwnet, or another experiments module."""
    import ast

    local = {p.stem for p in (ROOT / "experiments").glob("*.py")}
    seen, todo, found = set(), ["gpu_check"], {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / "experiments" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            for top in (n.split(".")[0] for n in names):
                if top in local:
                    todo.append(top)
                else:
                    found.setdefault(top, name)
    extra = {m: where for m, where in found.items()
             if m not in ALLOWED and m not in sys.stdlib_module_names and m != "__future__"}
    assert not extra, extra
    assert {"benchmark", "shared_reference"} <= seen


@pytest.mark.slow
def test_full_smoke_runs_every_part(tmp_path):
    out = tmp_path / "check"
    res = subprocess.run([sys.executable, "experiments/gpu_check.py", "--out", str(out), "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, env={**__import__("os").environ,
                                                                            "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((out / "gpu_check.json").read_text())
    for part in ("env", "steps", "large", "train", "fsdp", "intervals", "distill"):
        assert "error" not in results[part], (part, results[part])
    assert results["train"]["fp32"]["epoch_seconds"] and results["fsdp"]["wrote_best"]
    assert results["fsdp"]["predicted"]
