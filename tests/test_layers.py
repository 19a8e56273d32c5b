"""The package's shape, checked so it cannot drift: imports point only down the layers, no
import circle, no private name crosses a module, sub-package ``__init__`` files stay empty, and
no module or function grows past what one reader holds in mind."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "kmnist_torch"

# Lower numbers are lower layers; a module may import only from its own folder or a lower layer.
LAYERS = {
    "vocabulary": 0,  # catalog, settings, errors, _io (and the package's __init__)
    "download": 1,
    "data": 2,
    "models": 2,
    "reporting": 3,
    "training": 4,
    "commands": 5,  # cli, train, reproduce, evaluate, predict, export, _args, __main__
}
VOCABULARY = {"kmnist_torch", "catalog", "settings", "errors", "_io"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = ["kmnist_torch", *path.relative_to(PKG).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


MODULES = _modules()


def _folder(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2:
        return parts[1]
    return "vocabulary" if parts[-1] in VOCABULARY else "commands"


def _imports(module: str) -> list[tuple[str, str, int]]:
    """(module imported, name imported or "", line) for every kmnist_torch import in
    ``module``, function-level imports included."""
    path, is_pkg = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith(PKG.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: None if is_pkg else -1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(PKG.name):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append(
                    (sub, "", node.lineno) if sub in MODULES else (target, alias.name, node.lineno)
                )
    return found


def test_imports_point_down_the_layers():
    wrong = []
    for module in MODULES:
        here = _folder(module)
        for target, _, line in _imports(module):
            there = _folder(target) if target != "kmnist_torch" else "vocabulary"
            if there != here and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{module}:{line} imports {target} ({there} is not below {here})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    circles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m)
    assert not circles, "\n".join(circles)


def test_no_private_name_crosses_a_module():
    crossing = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, name, line in _imports(module)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize(
    "module", [m for m, (_, is_pkg) in MODULES.items() if is_pkg and m != "kmnist_torch"]
)
def test_subpackage_init_is_only_a_docstring(module):
    # Importing kmnist_torch.download must not import torch; importing one layer never pulls
    # in another through an __init__.
    tree = ast.parse(MODULES[module][0].read_text(encoding="utf-8"))
    assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), module


def test_no_module_or_function_too_long():
    long = []
    for module, (path, _) in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            long.append(f"{module}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_the_layer_test_sees_an_upward_import(tmp_path, monkeypatch):
    # The checks above must be able to fail: a data module importing training is caught.
    fake = tmp_path / "kmnist_torch"
    (fake / "data").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "data" / "__init__.py").write_text('"""doc"""\n')
    (fake / "training" / "__init__.py").write_text('"""doc"""\n')
    (fake / "training" / "engine.py").write_text("X = 1\n")
    (fake / "data" / "loader.py").write_text("from ..training.engine import X\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", _modules())
    with pytest.raises(AssertionError, match="data.loader:1 imports kmnist_torch.training.engine"):
        test_imports_point_down_the_layers()
