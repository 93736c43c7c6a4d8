"""pipeline/ is layered: core -> data -> model -> methods -> train -> tasks -> the CLI and the
entry points at pipeline/'s top. A module may import from its own layer and the layers below,
never from one above (at module level or inside a function alike)."""

from __future__ import annotations

import ast

from helpers import REPO

LAYERS = ["core", "data", "model", "methods", "train", "tasks"]
TOP = len(LAYERS)  # pipeline/cli.py and the entry-point modules beside it


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name inside pipeline, None for anything else."""
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) == 1:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else TOP


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline import train` names a layer; `from pipeline.train import step` a module
            found += [
                (node.lineno, f"{node.module}.{alias.name}" if node.module == "pipeline" else node.module)
                for alias in node.names
            ]
    return found


def upward_imports() -> list[str]:
    wrong = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        relative = path.relative_to(REPO).with_suffix("")
        own = layer_of(".".join(relative.parts))
        own = TOP if own is None else own  # pipeline/__init__.py
        for line, module in imported(ast.parse(path.read_text())):
            target = layer_of(module)
            if target is not None and target > own:
                wrong.append(
                    f"{relative}.py:{line} imports {module} ({LAYERS[own] if own < TOP else 'top'} -> "
                    f"{LAYERS[target] if target < TOP else 'top'})"
                )
    return wrong


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import():
    tree = ast.parse("def f():\n    from pipeline.train import checkpoint\n")
    assert imported(tree) == [(2, "pipeline.train")]
    assert layer_of("pipeline.train") > layer_of("pipeline.model.masked_lm")
    assert layer_of("pipeline.cli") == TOP and layer_of("torch") is None
