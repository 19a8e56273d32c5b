"""The few-shot table: one row per method, one column per (way, shot) setting, each cell the
mean accuracy over the episodes and its 95% confidence interval, in percent. Pure: it reads the
``results.json`` document :mod:`kmnist_torch.fewshot` writes."""

from __future__ import annotations

from typing import Any

# The columns few-shot papers report (Omniglot, miniImageNet), in this order; other settings a
# run measured follow them.
COLUMNS = ((5, 1), (5, 5), (20, 1), (20, 5))
METHOD_NAMES = {
    "ncm": "Nearest class mean (pixels)",
    "protonet": "Prototypical Networks (Conv-4)",
    "baseline": "Base classifier + NCM (Conv-4)",
}
MISSING = "—"


def cell_text(cell: dict[str, Any]) -> str:
    """``mean ± ci`` in percent, two decimals: ``45.12 ± 0.78``."""
    return f"{100 * cell['mean']:.2f} ± {100 * cell['ci95']:.2f}"


def columns(cells: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """The standard columns, then any other (way, shot) the cells hold, sorted."""
    found = {(c["way"], c["shot"]) for c in cells}
    return list(COLUMNS) + sorted(found - set(COLUMNS))


def render(results: dict[str, Any]) -> str:
    """The markdown table of a ``results.json`` document: rows are methods (in the order
    they were run), columns 5-way 1-shot, 5-way 5-shot, 20-way 1-shot, 20-way 5-shot (and
    any other setting measured), cells ``mean ± ci`` (% accuracy, 95% CI), ``—`` where not
    measured; a line under it says over how many episodes, with how many queries, and the
    partition's sha256."""
    cells = results.get("cells", [])
    methods = list(dict.fromkeys(c["method"] for c in cells))
    cols = columns(cells)
    by_key = {(c["method"], c["way"], c["shot"]): c for c in cells}
    head = "| method | " + " | ".join(f"{w}-way {s}-shot" for w, s in cols) + " |"
    lines = [head, "| --- |" + " ---: |" * len(cols)]
    for m in methods:
        row = [by_key.get((m, w, s)) for w, s in cols]
        texts = [cell_text(c) if c is not None else MISSING for c in row]
        lines.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(texts) + " |")
    episodes = sorted({c["episodes"] for c in cells})
    queries = sorted({c["query"] for c in cells})
    note = (
        f"Accuracy (%) on novel-class episodes, mean ± 95% confidence interval over "
        f"{'/'.join(map(str, episodes))} episodes, {'/'.join(map(str, queries))} queries per "
        f"class; partition sha256 {results.get('partition_sha256', '?')}."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"
