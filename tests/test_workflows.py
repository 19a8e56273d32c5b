"""The GitHub workflows: valid against GitHub's workflow schema (the copy check-jsonschema
ships), CI runs the README's own commands, and the reproduction job runs on the GPU runner with
--check."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CI, REPRODUCE = WORKFLOWS / "ci.yml", WORKFLOWS / "reproduce.yml"


def _validate(*files: Path) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed (it is in the test extra)")
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema",
           "vendor.github-workflows", *map(str, files)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _load(path: Path) -> dict:
    # ruamel (YAML 1.2, a dependency of check-jsonschema): PyYAML would read the key "on" as
    # the boolean True.
    yaml = pytest.importorskip("ruamel.yaml")
    return yaml.YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def _runs(workflow: dict) -> list[str]:
    """Every ``run:`` script of every job, in order."""
    return [s["run"] for job in workflow["jobs"].values() for s in job["steps"] if "run" in s]


def _uses(workflow: dict) -> list[dict]:
    return [s for job in workflow["jobs"].values() for s in job["steps"] if "uses" in s]


@pytest.mark.parametrize("path", [CI, REPRODUCE], ids=["ci", "reproduce"])
def test_workflow_is_valid(path):
    res = _validate(path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_validator_rejects_a_broken_workflow(tmp_path):
    # So a pass above means something: the same minimal job passes with runs-on, not without.
    good = "on: push\njobs:\n  test:\n    runs-on: ubuntu-latest\n    steps:\n      - run: ls\n"
    (tmp_path / "good.yml").write_text(good, encoding="utf-8")
    (tmp_path / "bad.yml").write_text(good.replace("    runs-on: ubuntu-latest\n", ""))
    assert _validate(tmp_path / "good.yml").returncode == 0
    res = _validate(tmp_path / "bad.yml")
    assert res.returncode != 0 and "'runs-on' is a required property" in res.stdout


def _readme_commands() -> list[str]:
    """The commands of the README's fenced block that installs and tests, one per line."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme, flags=re.S):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        if any(ln.startswith("pip install") for ln in lines) and any(
            "pytest" in ln for ln in lines
        ):
            return lines
    pytest.fail("README.md has no fenced block with the install and test commands")


def test_ci_runs_the_readme_commands():
    commands = _readme_commands()
    assert 'pip install -e ".[test]"' in commands and "python -m pytest -q" in commands
    ci = _load(CI)
    assert set(ci["on"]) == {"push", "pull_request"}
    (job,) = ci["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    # The README's commands, in its order, then the harness's CPU smoke run, nothing else.
    runs = [r.strip() for r in _runs(ci)]
    assert runs[:-1] == commands
    smoke = runs[-1].split()
    assert smoke[:3] == ["python", "-m", "kmnist_torch.reproduce"] and "--quick" in smoke
    setup = next(s for s in _uses(ci) if s["uses"].startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "3.11" and setup["with"]["cache"] == "pip"


def test_reproduce_runs_on_the_gpu_runner_with_check():
    wf = _load(REPRODUCE)
    assert "workflow_dispatch" in wf["on"] and wf["on"]["schedule"][0]["cron"]
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "linux", "x64", "gpu"]
    runs = " ".join(" ".join(r.split()) for r in _runs(wf))
    assert "python -m kmnist_torch download kmnist k49 --root" in runs
    harness = next(r for r in _runs(wf) if "python -m kmnist_torch.reproduce" in r)
    args = harness.split()
    for flag in ("--check", "--out", "reproduce-out"):
        assert flag in args
    datasets = args[args.index("--datasets") + 1 : args.index("--datasets") + 4]
    assert datasets == ["mnist", "kmnist", "k49"]
    rows = args[args.index("--rows") + 1 : args.index("--rows") + 6]
    assert rows == ["knn", "cnn", "preact18", "preact18-input", "preact18-manifold"]
    # The cells fan out over the GPUs the dispatch lists (one, GPU 0, on the weekly run).
    assert args[args.index("--devices") + 1] == '"$DEVICES"'
    devices = wf["on"]["workflow_dispatch"]["inputs"]["devices"]
    assert devices["type"] == "string" and devices["default"] == "0"
    assert job["env"]["DEVICES"] == "${{ inputs.devices || '0' }}"
    # The first step of each action: the main dataset root (the KKanji steps come later).
    assert not any("benchmarks/" in r for r in _runs(wf))  # the harness is in the package
    uses = {}
    for s in _uses(wf):
        uses.setdefault(s["uses"].split("@")[0], s)
    restore = uses["actions/cache/restore"]
    assert restore["with"]["path"] == ".kmnist-data"
    assert "hashFiles('kmnist_torch/catalog.py')" in restore["with"]["key"]
    assert uses["actions/cache/save"]["with"]["key"] == restore["with"]["key"]
    upload = uses["actions/upload-artifact"]
    assert upload["if"] == "always()"
    assert set(upload["with"]["path"].split()) == {
        "reproduce-out/table.md",
        "reproduce-out/results.json",
        "reproduce-out/kkanji/table.md",
        "reproduce-out/kkanji/results.json",
    }


def test_reproduce_runs_the_kkanji_rows_on_request_without_check():
    wf = _load(REPRODUCE)
    assert wf["on"]["workflow_dispatch"]["inputs"]["kkanji"]["type"] == "boolean"
    (job,) = wf["jobs"].values()
    steps = [s for s in job["steps"] if s.get("if", "").startswith("inputs.kkanji")]
    runs = [" ".join(s["run"].split()) for s in steps if "run" in s]
    assert 'python -m kmnist_torch download kkanji --root "$KMNIST_TORCH_ROOT"' in runs
    (harness,) = [r for r in runs if "python -m kmnist_torch.reproduce" in r]
    args = harness.split()
    assert args[args.index("--datasets") + 1] == "kkanji" and "--check" not in args
    # Nearest class mean too: with 4-NN, the long-tail benchmark's pixel rows.
    rows = args[args.index("--rows") + 1 : args.index("--rows") + 7]
    assert rows == ["knn", "ncm", "cnn", "preact18", "preact18-input", "preact18-manifold"]
    assert "--fewshot" in args  # and the few-shot benchmark, into the same table
    caches = [s for s in steps if s.get("uses", "").startswith("actions/cache/")]
    assert {s["with"]["path"] for s in caches} == {".kmnist-data/KKanji"}


@pytest.mark.parametrize("path", [CI, REPRODUCE], ids=["ci", "reproduce"])
def test_every_cache_key_hashes_files_that_exist(path):
    # hashFiles of a path that matches nothing is the empty string: the key then never changes
    # (reproduce.yml hashed kmnist_torch/kkanji.py for months after the file moved).
    text = path.read_text(encoding="utf-8")
    patterns = [p for call in re.findall(r"hashFiles\(([^)]*)\)", text)
                for p in re.findall(r"'([^']+)'", call)]  # fmt: skip
    missing = [p for p in patterns if not list(ROOT.glob(p))]
    assert not missing, f"{path.name} hashes files that do not exist: {missing}"
