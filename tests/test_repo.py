"""Repository hygiene that CI enforces through the test command: ruff clean, README true to
the catalog and the CI script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kmnist_torch import catalog

ROOT = Path(__file__).resolve().parent.parent


def _ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (it is in the test extra)")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


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


def test_python_m_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "kmnist_torch", "available"], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0 and "kmnist" in res.stdout
