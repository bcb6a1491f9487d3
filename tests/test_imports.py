"""Imports go one way (STYLE.md section 1): import-linter's contracts in pyproject.toml, plus the
one rule it cannot state, that the CLI imports the daemon only inside `serve`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_import_linter_contracts_are_kept():
    # NOTE: run from the repository root, which puts bench, tests and devtools on the path;
    # --no-cache leaves no cache directory in the working tree.
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=ROOT, check=False,
                          capture_output=True, encoding="utf-8", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _enclosing_functions(tree: ast.Module) -> dict[ast.AST, str | None]:
    """Every import node of the module, mapped to the name of the function it sits in (or None)."""
    found: dict[ast.AST, str | None] = {}

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found[child] = function
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            visit(child, inner)

    visit(tree, None)
    return found


def _imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""] if node.level == 0 else []
    return [alias.name for alias in node.names]


def test_the_cli_imports_the_daemon_only_inside_serve():
    """The layers contract lets cli import daemon anywhere; keep it lazy, inside `serve`, so that
    `maxtwo --help` and every other command never load falcon, waitress or the daemon."""
    tree = ast.parse((ROOT / "maxtwo_cli" / "cli.py").read_text(encoding="utf-8"))
    places = [
        (function, module, node.lineno)
        for node, function in _enclosing_functions(tree).items()
        for module in _imported_modules(node)
        if module == "daemon" or module.startswith("daemon.")
    ]
    assert places, "cli.py no longer imports the daemon: update this test and the layers contract"
    assert all(function == "serve" for function, _, _ in places), places
