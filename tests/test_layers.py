"""The package's layering (docs/design.md §6), read from the source: every `import` of a prism module,
including imports inside functions, must go to a lower layer or stay inside its own package; no import
cycle between modules; and no library module imports the demo task (`prism.tasks`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "prism"

# Lowest first. A module may import a module of a lower layer, or one of its own top-level package.
LAYERS = [
    ["prism.core"],
    ["prism.models"],
    ["prism.data"],
    ["prism.rollout", "prism.rewards"],
    ["prism.losses"],
    ["prism.dist"],
    ["prism.checkpoint", "prism.tracking", "prism.eval"],
    ["prism.loop"],
    ["prism.sft", "prism.align", "prism.rl"],
    ["prism.plots"],
    ["prism.report"],
    ["prism.pipeline"],
    ["prism.cli"],
]
PLUG_INS = "prism.tasks"  # outside the layers: may import the library, is never imported by it


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def prism_imports(path: Path, name: str) -> set[str]:
    """Every prism module `path` imports (absolute or relative, at any depth of the file)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from prism.x import module`
    known = modules()
    return {m for m in found if m in known and m != name}


def top_package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def layer_of(name: str) -> int | None:
    top = top_package(name)
    for i, group in enumerate(LAYERS):
        if top in group:
            return i
    return None


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m != "prism" and layer_of(m) is None and not m.startswith(PLUG_INS)]
    assert not unplaced, f"modules outside every layer (add them to LAYERS and docs/design.md §6): {unplaced}"


def test_imports_only_go_down_and_never_into_the_demo_task():
    upward = []
    for name, path in modules().items():
        if name == "prism" or name.startswith(PLUG_INS):
            continue
        for target in prism_imports(path, name):
            if target.startswith(PLUG_INS):
                upward.append(f"{name} -> {target} (the library must not import a task)")
            elif top_package(target) != top_package(name) and target != "prism" and layer_of(target) >= layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) -> {target} (layer {layer_of(target)})")
    assert not upward, "imports that do not go down:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {name: prism_imports(path, name) for name, path in modules().items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("line, expected", [
    ("from prism.core.errors import ConfigError", {"prism.core.errors"}),
    ("from prism.core import errors", {"prism.core", "prism.core.errors"}),
    ("def f():\n    from prism.tasks.grids import TASK", {"prism.tasks.grids"}),
])
def test_the_import_reader_sees_function_level_and_module_imports(tmp_path, line, expected):
    path = tmp_path / "probe.py"
    path.write_text(line + "\n")
    assert prism_imports(path, "prism.loop.probe") == expected


def test_package_docstrings_say_what_each_layer_is_for():
    missing = [m for m, p in modules().items() if p.name == "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"packages without a docstring: {missing}"


def test_the_readme_layout_lists_every_top_level_module_in_its_layer():
    text = (ROOT.parent / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```") + 3:]
    block = block[: block.index("```")]
    listed = {}
    for line in block.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("prism/"):
            listed[parts[0].removeprefix("prism/").rstrip("/").removesuffix(".py")] = parts[1]
    tops = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
            if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert set(listed) == tops, f"README layout {sorted(listed)} vs package {sorted(tops)}"
    for name, layer in listed.items():
        expected = "-" if f"prism.{name}" == PLUG_INS else str(layer_of(f"prism.{name}"))
        assert layer == expected, f"README puts prism/{name} in layer {layer}, LAYERS in {expected}"
