"""Repository hygiene that CI enforces through the test command: ruff clean, README true to
the catalog and the CI script."""

from __future__ import annotations

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
