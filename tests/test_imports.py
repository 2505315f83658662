"""Imports run one way: no module of ich_tune imports, at any depth, one that imports it back.

Every import statement counts, at the top of a module or inside a function: a function-level import
hides a dependency from the reader but not from the program.
"""

import ast
import graphlib
from pathlib import Path

import pytest

import ich_tune

PACKAGE = Path(ich_tune.__file__).parent


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package folder `root`."""
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that the file imports: `from a.b import c` is a.b.c where that is a
    module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return found & known


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        return err.args[1]
    return None


def test_no_module_of_ich_tune_is_in_an_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from pkg.sub import high\n    return high\n")
    (package / "sub" / "high.py").write_text("from pkg import low\n")
    graph = import_graph(package)
    assert graph["pkg.sub.high"] == {"pkg.low"} and graph["pkg.low"] == {"pkg.sub.high"}
    assert set(find_cycle(graph)) == {"pkg.low", "pkg.sub.high"}
    (package / "low.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(package)) is None


@pytest.mark.parametrize("module", ["ich_tune.config.schema", "ich_tune.config.loader",
                                    "ich_tune.config.markers"])
def test_the_config_language_knows_nothing_of_torch_or_ct(module):
    """config/ is a YAML -> dataclass language: it imports no model, data or training module."""
    graph = import_graph(PACKAGE)
    reached, todo = set(), [module]
    while todo:
        for name in graph[todo.pop()] - reached:
            reached.add(name)
            todo.append(name)
    assert {name for name in reached if not name.startswith("ich_tune.config")} <= {"ich_tune.errors"}
