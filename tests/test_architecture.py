"""The layout ARCHITECTURE.md describes, enforced: which way imports go, no cycles, small modules, and a
command line that starts without loading the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "serving", "explain", "loadtests")
MAX_LINES = 400

# Each layer may import only the layers listed for it (and itself); ARCHITECTURE.md has the same table.
ALLOWED = {
    "models.base": set(),
    "models.data": {"models.base"},
    "models.tasks": {"models.base", "models.data"},
    "models.export": {"models.base", "models.data", "models.tasks"},
    "models.train": {"models.base", "models.data", "models.tasks", "models.export"},
    "models.sweep": {"models.base", "models.data", "models.tasks", "models.export", "models.train"},
    "models.job": {"models.base", "models.data", "models.tasks", "models.export", "models.train", "models.sweep"},
    "explain": {"models.base", "models.data", "models.tasks"},
    "loadtests": {"models.base", "models.data"},
    "serving": {"models.base", "models.data", "models.tasks", "models.export", "models.train", "models.sweep",
                "models.job", "explain", "loadtests"},
}
BASE = {"models", "models.errors", "models.values", "models.runtime"}  # the bottom layer: standard library only
LIGHT = ("torch", "torchvision", "numpy", "ray", "mlflow", "cv2", "pycocotools", "PIL", "pandas", "pydantic",
         "fastapi", "yaml", "timm", "locust")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The project's modules that `path` imports anywhere (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            for k in range(len(parts), 0, -1):
                if ".".join(parts[:k]) in MODULES:
                    found.add(".".join(parts[:k]))
                    break
    return found


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


# the model folder's ONNX files and settings.json's record of the INT8 one belong with the folder
SAME_LAYER = {"models.onnx_export": "models.export", "models.onnx_int8": "models.export",
              "models.int8_record": "models.export"}


def layer(module: str) -> str:
    if module in BASE:
        return "models.base"
    if module in SAME_LAYER:
        return SAME_LAYER[module]
    if module.startswith("models."):
        return ".".join(module.split(".")[:2])
    return module.split(".")[0]


def test_every_module_belongs_to_a_layer():
    assert {layer(m) for m in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    wrong = sorted(f"{module} -> {target}" for target in GRAPH[module]
                   if layer(target) != layer(module) and layer(target) not in ALLOWED[layer(module)])
    assert not wrong, "imports against ARCHITECTURE.md's direction:\n" + "\n".join(wrong)


def test_nothing_under_models_imports_serving_explain_or_loadtests():
    wrong = [(a, b) for a in GRAPH if a.startswith("models") for b in GRAPH[a]
             if b.split(".")[0] in ("serving", "explain", "loadtests")]
    assert not wrong


def test_the_bottom_layer_imports_nothing_of_ours():
    assert {m: GRAPH[m] for m in BASE if GRAPH[m]} == {}


def _cycle() -> list[str] | None:
    """One import cycle among the project's modules, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH[node]):
            if target.startswith(node + ".") or node.startswith(target + "."):
                continue  # a package and its own modules
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    GRAPH["models.errors"].add("models.values")
    GRAPH["models.values"].add("models.errors")
    try:
        assert _cycle() is not None
    finally:
        GRAPH["models.errors"].discard("models.values")
        GRAPH["models.values"].discard("models.errors")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines; split it by concept"


def test_the_command_line_builds_without_heavy_libraries():
    code = ("import sys; import serving.cli as c; c.build_parser(); "
            f"print(sorted(m for m in {LIGHT!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["models.errors", "models.values", "models.data.formats", "models.data.records",
                                    "models.runtime"])
def test_modules_that_every_process_imports_are_light(module):
    code = f"import sys, {module}; print(sorted(m for m in {LIGHT!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
