"""The prepared GPU check (benchmarks/gpu_session.sh) fits one device call and brings back what
it measured: its budget, the steps it skips when the budget is spent, and the files it leaves
in $OUT (the device returns at most 8)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STEPS = 6


def test_the_default_budget_fits_one_device_call():
    # A device call runs at most 600 s; the budget leaves room for the merge and the transfers.
    budget = re.search(r"GPU_SESSION_BUDGET:-(\d+)", SCRIPT.read_text())
    assert budget and 300 <= int(budget.group(1)) <= 540


def test_a_spent_budget_skips_every_step_and_still_writes_its_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text("an earlier run's log\n")
    env = {
        **os.environ,
        "GPU_SESSION_SMOKE": "1",
        "GPU_SESSION_BUDGET": "0",
        "GPU_SESSION_DATA": str(tmp_path / "no-data"),
        "OUT": str(out),
    }
    res = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 1, res.stdout + res.stderr
    log = (out / "log.txt").read_text()
    assert "an earlier run's log" not in log
    assert log.count(": skipped, ") == STEPS
    assert "=== done in " in log and "exit 1" in log
    assert json.loads((out / "results.json").read_text()) == {}
    tables = (out / "tables.md").read_text()
    assert tables.count("(no table)") == 2
    assert "## fast recipe" in tables and "## paper recipe" in tables
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "tables.md"]
