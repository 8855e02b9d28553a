"""The package's layers and the direction of its imports (DESIGN section 10).

ops <- core <- parallel <- tuning <- layer <- (checkpoint, models, baselines, integrations, testing)
<- (app, bench, lm, cli): a module may import its own part and the parts below it, never above, and
the top-level parts import each other without cycles. Every import counts, a lazy one inside a
function too. `import flexmoe` loads the library only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import flexmoe

PACKAGE = Path(flexmoe.__file__).parent
# part (first name under flexmoe) -> its layer; the public re-export modules sit with what they export
LAYER_OF_PART = {
    "ops": 0,
    "amp": 0,
    "cpu_memory": 0,
    "json_file": 0,
    "core": 1,
    "parallel": 2,
    "data_parallel": 2,
    "tuning": 3,
    "plan_file": 3,
    "layer": 4,
    "__init__": 4,
    "checkpoint": 5,
    "models": 5,
    "baselines": 5,
    "integrations": 5,
    "testing": 5,
    "app": 6,
    "bench": 6,
    "lm": 6,
    "cli": 6,
}
APPLICATION_PARTS = ("app", "bench", "lm", "cli")
POINT_DOWN = "imports must point down"


def _part(module: str) -> str:
    """flexmoe.core.routing -> core; flexmoe -> __init__ (the package root)."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    names = list(relative.parts)
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def _imports(module: str, source: str, is_package: bool) -> list[str]:
    """Every flexmoe module `source` imports, absolute or relative, at any depth of the file."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "flexmoe"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "flexmoe":
                out.append(target)
    return out


def package_sources() -> dict[str, tuple[str, bool]]:
    """module name -> (source, is a package __init__) for every module of the installed package."""
    return {
        _module_name(path): (path.read_text(), path.name == "__init__.py")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Imports against the layer order, unknown parts, and cycles between top-level parts."""
    problems, edges = [], set()
    for module, (source, is_package) in sources.items():
        here = _part(module)
        if here not in LAYER_OF_PART:
            problems.append(f"{module}: part {here!r} has no layer (add it to LAYER_OF_PART)")
            continue
        for target in _imports(module, source, is_package):
            there = _part(target)
            if there not in LAYER_OF_PART:
                problems.append(f"{module} imports {target}: unknown part {there!r}")
            elif LAYER_OF_PART[there] > LAYER_OF_PART[here]:
                problems.append(
                    f"{module} (layer {LAYER_OF_PART[here]}) imports {target} "
                    f"(layer {LAYER_OF_PART[there]}): {POINT_DOWN}"
                )
            elif there != here:
                edges.add((here, there))
    problems += [f"import cycle between parts: {' -> '.join(c)}" for c in _cycles(edges)]
    return problems


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_imports_point_down_the_layers_without_cycles():
    assert violations(package_sources()) == []


def _with(sources: dict, module: str, *lines: str) -> dict:
    """`sources` with `lines` appended to `module`."""
    source, is_package = sources[module]
    return {**sources, module: (source + "\n" + "\n".join(lines) + "\n", is_package)}


def test_the_check_catches_a_wrong_import_a_lazy_one_and_a_cycle():
    sources = package_sources()
    wrong = violations(_with(sources, "flexmoe.core.routing", "from flexmoe.tuning import tuner"))
    assert wrong == [
        "flexmoe.core.routing (layer 1) imports flexmoe.tuning (layer 3): imports must point down"
    ]
    lazy = violations(_with(sources, "flexmoe.parallel.comm", "def f():", "    from ..layer import MoELayer"))
    assert lazy == [
        "flexmoe.parallel.comm (layer 2) imports flexmoe.layer (layer 4): imports must point down"
    ]
    looped = _with(
        _with(sources, "flexmoe.bench.common", "import flexmoe.lm"), "flexmoe.lm.data", "import flexmoe.bench"
    )
    assert "import cycle between parts: bench -> lm -> bench" in violations(looped)


def test_import_flexmoe_loads_the_library_only():
    code = "import sys, flexmoe; print(' '.join(sorted(m for m in sys.modules if m.startswith('flexmoe'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = loaded.stdout.split()
    assert "flexmoe.layer" in modules
    assert [m for m in modules if _part(m) in APPLICATION_PARTS or LAYER_OF_PART.get(_part(m), 9) > 4] == []


def test_few_modules_sit_at_the_top_of_the_package():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
