"""The docs site (mkdocs.yml, docs/) builds in strict mode: a broken link or anchor, a page left
out of the navigation, or a docstring that no longer matches its signature fails the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # The mkdocs of the interpreter running the tests (the test extra installs it there): a
    # missing mkdocs is a failure, never a silent skip. PYTHONPATH puts this checkout's package
    # first for the API pages; the variable silences mkdocs-material's end-of-life banner.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config)]
        + ["--site-dir", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_docs_build_strict(tmp_path):
    res = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert res.returncode == 0, res.stdout + res.stderr
    assert not _warnings(res.stderr), res.stderr
    site = tmp_path / "site"
    # Every page of docs/ became a page of the site, and the API reference holds the docstrings.
    for page in sorted((ROOT / "docs").glob("*.md")):
        name = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (site / name).is_file(), page.name
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("kmnist_torch.data.mnist.KMNIST", "kmnist_torch.data.loader.TensorLoader"):
        assert f'id="{name}"' in api, name


def test_docs_build_fails_on_each_kind_of_fault(tmp_path):
    # So a pass above means something: the same config, on a copy of the pages with a broken
    # link, a broken anchor, a page missing from the navigation and a docstring naming a
    # parameter its function lacks, fails, and says why for each.
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    with open(tmp_path / "docs" / "cli.md", "a", encoding="utf-8") as f:
        f.write("\n[gone](no-such-page.md) and [moved](datasets.md#no-such-heading)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n", encoding="utf-8")
    # The API page documents a module of the temporary folder (mkdocs.yml's `paths: [.]`).
    (tmp_path / "drifted.py").write_text(
        'def f(a: int) -> int:\n    """Double.\n\n    Args:\n        a: a number.\n'
        '        b: a parameter f no longer has.\n    """\n    return 2 * a\n',
        encoding="utf-8",
    )
    (tmp_path / "docs" / "api.md").write_text("# API\n\n::: drifted\n", encoding="utf-8")
    res = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert res.returncode != 0, res.stderr
    warnings = _warnings(res.stderr)
    for why in (
        "'no-such-page.md', but the target is not found",
        "does not contain an anchor '#no-such-heading'",
        'not included in the "nav" configuration:\n  - orphan.md',
        "Parameter 'b' does not appear in the function signature",
    ):
        assert any(why in w for w in warnings), (why, res.stderr)


def _warnings(log: str) -> list[str]:
    """mkdocs's WARNING records, each with its indented continuation lines."""
    records: list[str] = []
    for line in log.splitlines():
        if line.startswith("WARNING"):
            records.append(line)
        elif records and line.startswith("  "):
            records[-1] += "\n" + line
    return records
