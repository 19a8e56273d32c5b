"""The prepared GPU check (benchmarks/gpu_session.sh) fits one device call and brings back what
it measured: its budget, each step's limit cut to what is left of it, a step that overruns
killed, the steps it skips when the budget is spent, results merged after every step, and the
files it leaves in $OUT (the device returns at most 8)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STEPS = 6


def _steps(tmp_path: Path, budget: int, commands: str) -> tuple[str, dict, str]:
    """Runs ``commands`` (``step`` calls) under benchmarks/_session.sh with ``budget``
    seconds; returns the log, results.json and the final status line."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    script = (
        f"set -uo pipefail; out={out}; work={work}; budget={budget}; status=0; "
        f". benchmarks/_session.sh; SECONDS=0; {commands}; echo status=$status"
    )
    res = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    results = json.loads((out / "results.json").read_text())
    return (out / "log.txt").read_text(), results, res.stdout.strip().splitlines()[-1]


def test_a_step_runs_within_what_is_left_and_its_json_is_merged_at_once(tmp_path):
    write = "import json, sys; json.dump({'images_s': 1.5}, open(sys.argv[1], 'w'))"
    # The second command reads results.json between steps: merged after the first.
    log, results, status = _steps(
        tmp_path,
        40,
        f'step first 300 python -c "{write}" "$work/a.json"; '
        f'cp "$out/results.json" "$work/after_first.txt"',
    )
    assert re.search(r"=== first \(limit (39|40)s\)", log)
    assert "=== first: exit 0 after " in log
    assert results == {"a.json": {"images_s": 1.5}}
    assert status == "status=0"
    merged_then = json.loads((tmp_path / "work" / "after_first.txt").read_text())
    assert merged_then == {"a.json": {"images_s": 1.5}}


def test_an_overrunning_step_is_killed_and_the_next_skipped_when_the_budget_is_spent(tmp_path):
    # A step that writes half a JSON and then hangs past its 2-s limit (ignoring SIGTERM, as a
    # process stuck in a long call would): killed 10 s later, its JSON kept as unreadable, the
    # script goes on; with under 20 s of the budget left the next step is skipped.
    hang = tmp_path / "hang.py"
    hang.write_text(
        "import signal, sys, time\n"
        "open(sys.argv[1], 'w').write('{\"half')\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(60)\n"
    )
    log, results, status = _steps(
        tmp_path, 30, f'step hang 2 python {hang} "$work/h.json"; step later 60 true'
    )
    assert re.search(r"=== hang: exit 137 after 1[0-9] s", log), log
    assert "unreadable" in results["h.json"]
    assert "=== later: skipped, " in log and "of the 30s budget left" in log
    assert status == "status=1"


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
