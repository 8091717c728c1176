"""Every public function, class and method of the library layers has a docstring.

Read with `ast` (nothing is imported). Covered: the maths (losses, advantages, ops), data,
models, rollout, training, rewards and the small foundations (errors, io). Recipes, eval and the
applications are not covered yet. The message names each missing docstring as file:line.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import assert_only_allowed

PKG = Path(__file__).resolve().parents[2] / "src" / "alignkit"

COVERED = ["losses.py", "advantages.py", "rewards.py", "errors.py", "io.py", "ops", "data", "models", "rollout",
           "training"]

# Public definitions still without a docstring, in files other branches rewrite now (issue 13's
# one training loop: the Trainer, the critic through a second Trainer; the run-folder work in
# training/checkpoint.py; progress and trackers in training/logging.py). Empty it as those
# branches land; an entry that no longer names an undocumented definition fails the test.
ALLOWED: set[str] = set()


def files() -> list[Path]:
    out = []
    for name in COVERED:
        p = PKG / name
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def undocumented(source: str) -> list[tuple[str, int]]:
    """(qualified name, line) of each public top-level def / class, and each public method of a
    public class, that has no docstring."""
    missing = []
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if ast.get_docstring(node) is None:
            missing.append((node.name, node.lineno))
        if isinstance(node, ast.ClassDef):
            for m in node.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith("_") \
                        and ast.get_docstring(m) is None:
                    missing.append((f"{node.name}.{m.name}", m.lineno))
    return missing


def test_public_definitions_have_docstrings():
    found = []
    for f in files():
        rel = f.relative_to(PKG).as_posix()
        found += [(f"{rel}:{name}", f"src/alignkit/{rel}:{line}: {name}")
                  for name, line in undocumented(f.read_text(encoding="utf-8"))]
    assert_only_allowed(found, ALLOWED, "public definitions without a docstring")


def test_the_checker_finds_functions_classes_and_methods():
    src = ('def f():\n    pass\n\n\ndef _private():\n    pass\n\n\nclass C:\n    """Doc."""\n\n'
           '    def m(self):\n        pass\n\n    def _h(self):\n        pass\n\n\ndef g():\n    """Doc."""\n')
    assert undocumented(src) == [("f", 1), ("C.m", 12)]
