"""Repository hygiene that CI enforces through the test command: ruff clean, README true to
the catalog and the CI script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from kmnist_torch import catalog

ROOT = Path(__file__).resolve().parent.parent


def _ruff(*args: str) -> subprocess.CompletedProcess:
    # The ruff of the interpreter running the tests (the test extra installs it there), not
    # whatever is on PATH: a missing ruff is a failure, never a silent skip.
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_check_clean():
    res = _ruff("check", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format_clean():
    res = _ruff("format", "--check", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text()
    for cmd in ('pip install -e ".[test]"', "python -m pytest -q"):
        assert cmd in readme and cmd in ci


def test_readme_names_every_dataset():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for info in catalog.DATASETS.values():
        assert info.title in readme
        assert info.name in readme


def test_python_m_entry_point_runs_without_importing_torch():
    # -X importtime lists every module imported: the catalog commands must not pay for torch.
    for cmd in (["available"], ["info", "k49"], ["info", "kkanji"]):
        res = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "kmnist_torch", *cmd],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0 and "Kuzushiji" in res.stdout, res.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()}
        assert "torch" not in imported and "torchvision" not in imported, cmd


DOC_PAGES = tuple(sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")))
DOCS = ("README.md", "CONTRIBUTING.md", "benchmarks/README.md", *DOC_PAGES)
# `python -m kmnist_torch[.module] [subcommand]` or `python benchmarks/<script>.py`
COMMAND = re.compile(
    r"python (-m kmnist_torch(?:\.\w+)?(?: (?!-)[a-z][a-z-]*)?|benchmarks/\w+\.py)"
)


def documented_commands() -> list[list[str]]:
    """Every command line the docs show, as the argv prefix to run with ``--help``."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for m in COMMAND.finditer((ROOT / doc).read_text(encoding="utf-8")):
            found.setdefault(m.group(1), m.group(1).split())
    return list(found.values())


def test_every_documented_command_runs():
    # Each in a child forked after the torch import (tests/_help_runner.py): 23 interpreters
    # importing torch cost minutes on a loaded 2-core machine.
    commands = documented_commands()
    assert ["-m", "kmnist_torch", "download"] in commands and [
        "benchmarks/knn_speed.py"
    ] in commands
    # The docs site's pages are read too (a docs/ folder moved or emptied is a failure here).
    assert "docs/cli.md" in DOCS and "docs/after-training.md" in DOCS
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runner = Path(__file__).with_name("_help_runner.py")
    proc = subprocess.run([sys.executable, str(runner)], input=json.dumps(commands), cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert [r["cmd"] for r in results] == commands
    for r in results:
        assert r["returncode"] == 0, (r["cmd"], r["stderr"][-2000:])
        assert r["stdout"].startswith("usage:") and "--help" in r["stdout"], r["cmd"]


def test_the_help_runner_fails_a_broken_command(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import argparse\nraise ImportError('no such thing')\n")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_help_runner.py"))],
                          input=json.dumps([[str(script)], ["-m", "kmnist_torch", "info"]]),
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    broken, good = json.loads(proc.stdout)
    assert broken["returncode"] == 1 and "no such thing" in broken["stderr"]
    assert good["returncode"] == 0 and good["stdout"].startswith("usage:")


def test_every_benchmark_script_is_documented():
    listed = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    for script in sorted((ROOT / "benchmarks").glob("[!_]*.py")):
        assert f"python benchmarks/{script.name}" in listed, script.name


# A module row of CONTRIBUTING.md's layout tables: | `data/formats.py` | its one job |
MAP_ROW = re.compile(r"^\| `([\w/]+\.py)` \| (.*) \|$", re.M)


def contributing_map() -> dict[str, str]:
    """CONTRIBUTING.md's layout map: module path under ``kmnist_torch/`` -> its one job."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    layout = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    rows = MAP_ROW.findall(layout)
    mapped = dict(rows)
    assert len(mapped) == len(rows), "a module has two rows"
    return mapped


def package_modules() -> set[str]:
    """Every module of the package, as a path under ``kmnist_torch/``; the sub-packages'
    ``__init__.py`` files (a docstring only, by the layer rules) are left out."""
    pkg = ROOT / "kmnist_torch"
    return {
        path.relative_to(pkg).as_posix()
        for path in pkg.rglob("*.py")
        if path.name != "__init__.py" or path.parent == pkg
    }


def test_contributing_maps_every_module_and_only_those():
    mapped = contributing_map()
    modules = package_modules()
    assert "data/formats.py" in modules and "__init__.py" in modules  # the walk sees the tree
    assert not modules - set(mapped), (
        f"missing from CONTRIBUTING.md: {sorted(modules - set(mapped))}"
    )
    assert not set(mapped) - modules, f"no such module: {sorted(set(mapped) - modules)}"
    assert all(job.strip() for job in mapped.values()), "a row without its job"


def test_contributing_map_check_can_fail():
    # The parser reads the rows as they are written: a module row is found, a row with no path
    # or a path outside backticks is not.
    text = "| `data/formats.py` | bytes to arrays |\n| data/base.py | x |\n| module | one job |\n"
    assert MAP_ROW.findall(text) == [("data/formats.py", "bytes to arrays")]
