"""No function in the package is over :data:`LIMIT` lines (``def`` to its last line, docstring
included) unless :data:`ALLOWED` names it with the reason it stays whole."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pefttune"
LIMIT = 80

#: "module path:qualified name" -> why it is one function.
ALLOWED = {
    "pefttune/analysis/report.py:render_report": "the report's template, one section after another in print "
                                                 "order; the findings' sections go to their modules' render()",
    "pefttune/analysis/report.py:analyze": "every output of the analysis in the order written; the findings' "
                                           "patches go to their modules' decide()",
    "pefttune/predictor.py:export_model": "the three export sources (a trial, the best trial, an ensemble) share "
                                          "the folder's writing; four lines over the limit",
}


def long_functions(package: Path = PACKAGE, limit: int = LIMIT) -> dict[str, int]:
    """``{"pefttune/x.py:Class.method": lines}`` of every function over ``limit`` lines."""
    found: dict[str, int] = {}

    def walk(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    found[f"{path}:{prefix}{child.name}"] = lines
                walk(child, path, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, path, f"{prefix}{child.name}.")

    for file in sorted(package.rglob("*.py")):
        walk(ast.parse(file.read_text()), file.relative_to(package.parent).as_posix(), "")
    return found


def test_long_functions_finds_methods_and_nested_functions(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    source = ["def short():", "    pass", "", "", "class A:", "    def long(self):"]
    source += [f"        x{i} = {i}" for i in range(5)]
    source += ["        def inner():"] + [f"            y{i} = {i}" for i in range(5)]
    (package / "m.py").write_text("\n".join(source) + "\n")
    assert long_functions(package, limit=3) == {"pkg/m.py:A.long": 12, "pkg/m.py:A.long.inner": 6}


def test_no_function_is_over_the_limit_without_a_reason():
    unexplained = {name: lines for name, lines in long_functions().items() if name not in ALLOWED}
    assert not unexplained, f"functions over {LIMIT} lines (split them, or add them with a reason): {unexplained}"
    assert all(reason.strip() for reason in ALLOWED.values())
