"""Every test module that runs diffusers' reference code carries the ``reference`` marker, so
``pytest -m "not reference"`` leaves out all of them (pyproject.toml declares the marker).

Read from the sources (ast), nothing imported or run: a module runs the reference when it imports from
tests/refenv.py anything but the path and environment helpers the weights generator also uses, or
imports another module's fixture that calls such a function. The generated weights alone (the
session fixtures test_model_dir, comfy_server) do not count.
"""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HELPERS = {"REFERENCE_DIR", "REF_PYTHON", "reference_python", "offline_env"}  # paths, weights generator


def parse(name: str) -> ast.Module:
    return ast.parse((TESTS / f"{name}.py").read_text(), filename=f"{name}.py")


def refenv_runners(tree: ast.Module) -> set[str]:
    """The names this module takes from refenv to run the reference with (``refenv.x`` included)."""
    found, aliases = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "refenv":
            found |= {a.asname or a.name for a in node.names if a.name not in HELPERS}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "refenv"}
    return found | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                    and n.value.id in aliases and n.attr not in HELPERS}


def is_fixture(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "fixture"


def reference_fixtures(tree: ast.Module) -> set[str]:
    """Module-level fixtures whose body calls one of the module's refenv runners."""
    runners = refenv_runners(tree)
    return {f.name for f in tree.body if isinstance(f, ast.FunctionDef) and any(map(is_fixture, f.decorator_list))
            and any(isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in runners
                    for c in ast.walk(f))}


def module_marks(tree: ast.Module) -> set[str]:
    """The X of every pytest.mark.X in the module's ``pytestmark``."""
    marks = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in stmt.targets):
            marks |= {n.attr for n in ast.walk(stmt.value) if isinstance(n, ast.Attribute)
                      and isinstance(n.value, ast.Attribute) and n.value.attr == "mark"}
    return marks


def runs_reference(name: str, trees: dict[str, ast.Module]) -> list[str]:
    """Why this module runs the reference (empty: it does not)."""
    tree = trees[name]
    why = [f"refenv.{n}" for n in sorted(refenv_runners(tree))]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in trees and node.module != name:
            shared = {a.name for a in node.names} & reference_fixtures(trees[node.module])
            why += [f"{node.module}.{n} (fixture)" for n in sorted(shared)]
    return why


def test_every_module_that_runs_the_reference_is_marked():
    trees = {p.stem: parse(p.stem) for p in sorted(TESTS.glob("test_*.py"))}
    reasons = {name: runs_reference(name, trees) for name in trees}
    unmarked = {name: why for name, why in reasons.items() if why and "reference" not in module_marks(trees[name])}
    assert unmarked == {}, f"add pytest.mark.reference to these modules' pytestmark: {unmarked}"
    # the scan sees what it should: the sampler comparison runs the reference, the security tests do not
    assert reasons["test_pndm"] == ["refenv.run_reference"] and reasons["test_security"] == []


def test_helpers_are_refenv_names_and_run_reference_is_not_one():
    body = parse("refenv").body
    defined = {n.name for n in body if isinstance(n, ast.FunctionDef)}
    defined |= {t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    defined |= {a.asname or a.name for n in body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert HELPERS <= defined, HELPERS - defined
    assert "run_reference" in defined - HELPERS
