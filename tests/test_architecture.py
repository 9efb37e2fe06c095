"""The layering of docs/DESIGN.md, checked on the source: imports flow one way, core ->
passes -> api (merge, save/load, inspection) -> applications, with no cycle; no library
module over 400 lines; the passes install as pleas_fx.passes, never as a top-level package."""
from __future__ import annotations

import ast
import os
import tomllib
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 400

# layer of a module: by the longest matching name prefix
LAYERS = [
    ("pleas_fx.core", 0), ("pleas_fx.errors", 0),
    ("pleas_fx.passes", 1),
    ("pleas_fx.api", 2), ("pleas_fx.options", 2), ("pleas_fx.calibration", 2), ("pleas_fx.report", 2),
    ("pleas_fx.io", 2), ("pleas_fx.inspection", 2),
    ("pleas_fx.apps", 3), ("pleas_fx.__main__", 3),
]
NAMES = {0: "core", 1: "passes", 2: "api", 3: "applications"}


def _modules() -> dict[str, Path]:
    """Library module name -> file: pleas_fx/** and passes/** (installed as pleas_fx.passes)."""
    out = {}
    for base, package in ((ROOT / "pleas_fx", "pleas_fx"), (ROOT / "passes", "pleas_fx.passes")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Library modules `name` imports (anywhere in the file, function-level imports included)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _layer(name: str) -> int:
    if name == "pleas_fx":
        return 2  # the package's __init__ re-exports the API
    match = max((p for p, _ in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    assert match is not None, f"{name} belongs to no layer: add it to LAYERS and to docs/DESIGN.md"
    return dict(LAYERS)[match]


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for name, path in MODULES.items():
        g.add_node(name)
        for target in _imports(name, path):
            # importing a package's submodule runs the package's __init__ too; that edge is implicit
            if not name.startswith(target + "."):
                g.add_edge(name, target)
    return g


def test_the_walker_sees_the_known_imports():
    g = _graph()
    assert ("pleas_fx.api", "pleas_fx.passes.fill") in g.edges
    assert ("pleas_fx.passes.fill", "pleas_fx.core.ir") in g.edges
    assert len(MODULES) > 40


def test_imports_have_no_cycle():
    cycles = list(nx.simple_cycles(_graph()))
    assert cycles == [], f"import cycles: {cycles[:5]}"


def test_imports_flow_one_way_between_layers():
    upward = [(a, b) for a, b in _graph().edges if _layer(a) < _layer(b)]
    assert upward == [], "imports from a lower layer to a higher one: " + ", ".join(
        f"{a} ({NAMES[_layer(a)]}) -> {b} ({NAMES[_layer(b)]})" for a, b in upward)


def test_passes_never_import_api_io_or_applications():
    g = _graph()
    bad = [(a, b) for a, b in g.edges if a.startswith("pleas_fx.passes") and _layer(b) >= 2]
    assert bad == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_the_limit(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= LIMIT, f"{MODULES[name].relative_to(ROOT)} has {lines} lines (limit {LIMIT}): split it by concern"


def test_passes_install_as_pleas_fx_passes():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = config["packages"]
    assert all(p == "pleas_fx" or p.startswith("pleas_fx.") for p in packages), packages
    assert config["package-dir"] == {"pleas_fx.passes": "passes"}
    # every library package on disk is listed (a missing one would not be installed)
    on_disk = {n for n, p in MODULES.items() if p.name == "__init__.py"} | {"pleas_fx"}
    assert on_disk == set(packages), on_disk ^ set(packages)
    import pleas_fx.passes

    assert Path(pleas_fx.passes.__file__).resolve() == ROOT / "passes" / "__init__.py"


def test_tests_do_not_import_a_top_level_passes_package():
    for path in (ROOT / "tests").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert node.module.split(".")[0] != "passes", f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "passes" for a in node.names), path.name


def test_design_doc_is_in_the_repository_and_names_every_layer():
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    for word in ("pleas_fx.core", "pleas_fx.passes", "pleas_fx.api", "pleas_fx.apps", "OpSpec", "Invariants"):
        assert word in text, word
    assert os.path.getsize(ROOT / "docs" / "DESIGN.md") > 4000
