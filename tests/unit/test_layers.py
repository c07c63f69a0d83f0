"""The package's layers, as the folders show them: each subpackage imports only its own layer or
lower ones, no module imports itself back through others, and imports inside functions are left to
the CLI layer (where they keep `alignctl --help` and config errors free of torch)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "alignctl"
# Lowest first. A module may import from its own layer and the layers before it.
LAYERS = ["core", "runs", "config", "data", "nn", "models", "train", "rl", "stages", "cli"]
# Modules at the top of the package, placed in a layer.
TOP_LEVEL = {"alignctl": "core", "alignctl.rewards": "data", "alignctl.__main__": "cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}
MODULES = set(SOURCES)


def layer_of(module: str) -> str:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    return module.split(".")[1]


def imports(module: str, sources: dict[str, str] = SOURCES) -> list[tuple[str, bool]]:
    """(imported alignctl module, whether the import sits inside a function) for each import."""
    tree = ast.parse(sources[module])
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alignctl"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full if full in sources else node.module, id(node) not in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) not in top) for a in node.names if a.name.startswith("alignctl")]
    return [(m, lazy) for m, lazy in found if m != module]


def test_every_module_sits_in_a_known_layer():
    assert {layer_of(m) for m in MODULES} <= set(LAYERS), sorted({layer_of(m) for m in MODULES} - set(LAYERS))


def upward_imports(sources: dict[str, str]) -> list[str]:
    return [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
            for m in sources for t, _ in imports(m, sources) if LAYERS.index(layer_of(t)) > LAYERS.index(layer_of(m))]


def test_each_layer_imports_only_its_own_or_lower_layers():
    upward = upward_imports(SOURCES)
    assert not upward, "\n".join(upward)


def test_imports_inside_functions_only_in_the_cli_layer():
    lazy = [f"{m} imports {t} inside a function" for m in MODULES if layer_of(m) != "cli" for t, inside in imports(m) if inside]
    assert not lazy, "\n".join(lazy)


def test_no_import_circles():
    graph = {m: {t for t, _ in imports(m) if t in MODULES} for m in MODULES}
    # A subpackage's __init__ runs before its modules: count that edge too (the root's, which only
    # quiets loggers, is left out: every module would otherwise sit in a circle through it).
    for m in MODULES:
        if m.count(".") > 1:
            graph[m].add(m.rsplit(".", 1)[0])
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_check_reports_an_upward_import_and_accepts_a_downward_one():
    sources = {"alignctl.core.a": "from alignctl.cli.b import run\n", "alignctl.cli.b": "from alignctl.core import a\n"}
    assert upward_imports(sources) == ["alignctl.core.a (core) imports alignctl.cli.b (cli)"]


def test_cli_help_and_a_bad_config_load_no_torch():
    probe = (
        "import sys\n"
        "from alignctl.cli.main import main\n"
        "for args in (['--help'], ['train', 'recipe.lr=oops']):\n"
        "    sys.argv = ['alignctl', *args]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    # The system allocator: under jemalloc the CLI would re-execute itself, and the probe with it.
    env = {**os.environ, "ALIGNCTL_ALLOCATOR": "system"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stdout + out.stderr
