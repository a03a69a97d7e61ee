"""The package's layering: no import cycle, and the runtime layer sits below both arms and the analysis.

Every ``import``/``from ... import`` of a pefttune module counts, lazy ones inside functions
included (a lazy import is still a dependency; only ``TYPE_CHECKING`` blocks are skipped).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pefttune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # TYPE_CHECKING blocks are not runtime dependencies
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("pefttune"):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        deps = _imports(path, modules) - {name}
        # a package __init__ importing its own submodules is not a dependency of theirs
        graph[name] = {d for d in deps if not (path.name == "__init__.py" and d.startswith(name + "."))}
        # importing pefttune.x.y executes pefttune.x/__init__ first: not counted as an edge
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep == "pefttune" or dep not in graph:
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def _deps_under(graph, prefix):
    return {(m, d) for m, deps in graph.items() if m == prefix or m.startswith(prefix + ".") for d in deps}


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("pefttune.runtime", ("pefttune.search", "pefttune.darts", "pefttune.trainables", "pefttune.analysis",
                              "pefttune.study", "pefttune.cli")),
        ("pefttune.trainables", ("pefttune.search", "pefttune.darts.run", "pefttune.analysis",
                                 "pefttune.study", "pefttune.cli")),
        ("pefttune.search", ("pefttune.darts", "pefttune.analysis", "pefttune.study", "pefttune.cli")),
        ("pefttune.darts", ("pefttune.search", "pefttune.analysis", "pefttune.study", "pefttune.cli")),
        ("pefttune.analysis", ("pefttune.search", "pefttune.darts", "pefttune.trainables", "pefttune.study",
                               "pefttune.cli")),
        ("pefttune.analysis.store", ("pefttune.analysis",)),  # the store only reads
        # the learning-rate protocol: both arms and the analysis use it; it runs the trainable it is given
        ("pefttune.tuning", ("pefttune.search", "pefttune.darts", "pefttune.trainables", "pefttune.analysis",
                             "pefttune.study", "pefttune.cli")),
        # the findings decide on the numeric modules and the store; the report and the suite assemble them
        ("pefttune.analysis.findings", ("pefttune.analysis.report", "pefttune.analysis.plots",
                                        "pefttune.analysis.export", "pefttune.analysis.status", "pefttune.suite",
                                        "pefttune.more_seeds", "pefttune.study", "pefttune.cli")),
        ("pefttune.study", ("pefttune.suite", "pefttune.cli")),  # a suite runs studies, not the reverse
        ("pefttune.suite", ("pefttune.cli", "pefttune.search", "pefttune.darts", "pefttune.trainables")),
        # model-level exports: merging and the shared-backbone ensemble sit on the model, below every arm
        ("pefttune.merge", ("pefttune.predictor", "pefttune.analysis", "pefttune.search", "pefttune.darts",
                            "pefttune.trainables", "pefttune.runtime", "pefttune.study", "pefttune.cli")),
        ("pefttune.shared_backbone", ("pefttune.predictor", "pefttune.analysis", "pefttune.search",
                                      "pefttune.darts", "pefttune.trainables", "pefttune.runtime",
                                      "pefttune.study", "pefttune.cli")),
        ("pefttune.data", ("pefttune.search", "pefttune.darts", "pefttune.trainables", "pefttune.analysis",
                           "pefttune.runtime", "pefttune.cli")),
        # the starter configs check data and models, and run nothing
        ("pefttune.profiles", ("pefttune.cli", "pefttune.search", "pefttune.darts", "pefttune.trainables",
                               "pefttune.analysis", "pefttune.runtime", "pefttune.study", "pefttune.suite")),
    ],
)
def test_layers_import_only_downwards(layer, forbidden):
    graph = import_graph()
    bad = sorted(
        f"{m} -> {d}" for m, d in _deps_under(graph, layer)
        if any(d == f or d.startswith(f + ".") for f in forbidden) and not d.startswith(layer + ".")
        and not (layer == "pefttune.analysis.store" and d == layer)
    )
    assert not bad, bad


#: The core's one door to the demo's tooling (the data source ``synth``, imported on use), and the
#: CLI, which offers the demo's own commands (``pefttune data synth``, ``pefttune backbone pretrain``).
DEMO_DOORS = {"pefttune.data.sources"}
DEMO = "pefttune.demo"


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_core_imports_the_demo_only_through_its_door():
    graph = import_graph()
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                 if _in(d, DEMO) and not _in(m, DEMO) and not _in(m, "pefttune.cli") and m not in DEMO_DOORS)
    assert not bad, bad
    assert any(_in(d, DEMO) for door in DEMO_DOORS for d in graph[door])  # the door is used, so it is named right


def test_the_door_to_the_demo_opens_on_use_only():
    """The door's imports of the demo sit inside functions: importing the core loads no demo module."""
    for door in DEMO_DOORS:
        tree = ast.parse((PACKAGE.parent / (door.replace(".", "/") + ".py")).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
        assert not [n for n in names if _in(n, DEMO)], (door, names)


def test_the_demo_sits_beside_the_core_not_above_the_cli():
    graph = import_graph()
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if _in(m, DEMO) for d in deps
                 if any(_in(d, up) for up in ("pefttune.cli", "pefttune.study", "pefttune.suite", "pefttune.search",
                                                "pefttune.darts", "pefttune.analysis", "pefttune.trainables")))
    assert not bad, bad


def test_the_schema_sits_low():
    """pefttune.schema imports the standard library and pefttune.metrics only: every layer may import it."""
    assert import_graph()["pefttune.schema"] <= {"pefttune.metrics"}


NUMERIC = {"pefttune.analysis.intervals", "pefttune.analysis.seeds_speakers", "pefttune.analysis.sequential"}


def test_the_interval_maths_imports_no_finding_and_no_store():
    """The numeric modules (intervals, tests, the seeds x speakers and sequential maths) import only
    each other and the metrics: no verdict rule, no results store, no report."""
    graph = import_graph()
    bad = {m: sorted(graph[m] - NUMERIC - {"pefttune.metrics"}) for m in NUMERIC}
    assert not any(bad.values()), bad


def test_each_finding_module_stands_alone():
    """A finding module imports no other finding module: its rule, decision and rendering are its own."""
    graph = import_graph()
    findings = {f"pefttune.analysis.findings.{m}" for m in ("darts_vs_uniform", "ensembles", "error_diversity")}
    bad = {m: sorted(graph[m] & findings) for m in findings}
    assert all(m in graph for m in findings) and not any(bad.values()), bad
