"""The package's imports go one way (trainer_accel/layers.py): no cycle, and no module imports a layer above its own.

Every import is read from the source, function-level and TYPE_CHECKING ones included: a lazy import inside a
function is how the last cycle (checkpoint.py <-> hf_gpt2.py) hid. A new top-level module or folder must be given
a floor in trainer_accel/layers.py before the test passes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trainer_accel.layers import FLOORS, SHARED
from trainer_accel.layers import PEERS as FLOOR_PEERS

PACKAGE = "trainer_accel"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# The rules are the package's own (trainer_accel/layers.py): written once, read here.
LAYERS, PEERS, SHARED_LAYERS = FLOORS, FLOOR_PEERS, SHARED


def unit(module: str) -> str:
    """'trainer_accel.data.cache' -> 'data/', 'trainer_accel.errors' -> 'errors', 'trainer_accel' -> ''."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    return parts[0] + "/" if (ROOT / parts[0]).is_dir() else parts[0]


def layer_of(module: str) -> int:
    u = unit(module)
    for i, (_, units) in enumerate(LAYERS):
        if u in units:
            return i
    raise AssertionError(f"{module}: {u!r} is in no layer; give it a floor in trainer_accel/layers.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every trainer_accel module the file imports, at any depth of its code."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}"))
    return {m for m in found if (m == PACKAGE or m.startswith(PACKAGE + ".")) and m != me}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def against_the_order(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            same_folder = unit(importer) == unit(target) and unit(importer).endswith("/")
            if same_folder or target == PACKAGE:
                continue
            mine, theirs = layer_of(importer), layer_of(target)
            name, other = LAYERS[mine][0], LAYERS[theirs][0]
            if theirs > mine or (theirs == mine and name not in SHARED_LAYERS) or (name in PEERS and other in PEERS):
                problems.append(f"{importer} imports {target} ({name} may not import {other})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected knot, found by depth-first search."""
    found, state = [], {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_module_imports_against_the_layer_order():
    problems = against_the_order(import_graph())
    assert not problems, "imports against trainer_accel/layers.py's order:\n" + "\n".join(problems)


def test_every_module_has_a_layer_and_no_folder_repeats_the_rules():
    """The rules live in layers.py alone: a folder's docstring that restated them drifted from them before (data
    listed config below itself; checkpoints named imports it did not make and missed one it made)."""
    graph = import_graph()
    for module in graph:
        layer_of(module)
    for folder in sorted(p for p in ROOT.iterdir() if (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
        assert "layers.py" in doc and "May import" not in doc, (
            f"{folder}/__init__.py: its docstring should point at trainer_accel/layers.py, not restate the rules"
        )


@pytest.mark.parametrize(
    "importer, target, why",
    [
        ("trainer_accel.checkpoints.loading", "trainer_accel.training.loop", "checkpoints may not import training"),
        ("trainer_accel.data.cache", "trainer_accel.models.gpt", "data may not import models"),
        ("trainer_accel.errors", "trainer_accel.data.cache", "ground may not import data"),
        ("trainer_accel.tools.bench", "trainer_accel.run", "tools may not import commands"),
        ("trainer_accel.run", "trainer_accel.export", "commands may not import commands"),
    ],
)
def test_a_back_import_is_caught(importer, target, why):
    graph = import_graph()
    graph[importer] = graph[importer] | {target}
    assert any(why in p for p in against_the_order(graph))


def test_a_hidden_cycle_is_caught():
    graph = import_graph()
    graph["trainer_accel.models.gpt"] = graph["trainer_accel.models.gpt"] | {"trainer_accel.models.gpt_hf"}
    graph["trainer_accel.models.gpt_hf"] = graph["trainer_accel.models.gpt_hf"] | {"trainer_accel.models.gpt"}
    assert any(set(c) == {"trainer_accel.models.gpt", "trainer_accel.models.gpt_hf"} for c in cycles(graph))


def test_function_level_and_relative_imports_are_read(tmp_path, monkeypatch):
    source = tmp_path / PACKAGE / "checkpoints" / "probe.py"
    source.parent.mkdir(parents=True)
    (source.parent / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "errors.py").write_text("")
    (tmp_path / PACKAGE / "training").mkdir()
    (tmp_path / PACKAGE / "training" / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "training" / "loop.py").write_text("")
    source.write_text("def later():\n    from ..training import loop\n    from trainer_accel import errors\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path / PACKAGE)
    assert imports_of(source) == {
        "trainer_accel",
        "trainer_accel.errors",
        "trainer_accel.training",
        "trainer_accel.training.loop",
    }
