"""Layering rules: fer_core stays a pure library."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import fer_core

FORBIDDEN = ("prefect", "mlflow", "dvc", "great_expectations", "tritonclient")
CORE = Path(fer_core.__file__).parent


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                roots.add(node.args[0].value.split(".")[0])
    return roots


def test_fer_core_source_never_imports_orchestration_or_serving_clients():
    offenders = {
        str(p.relative_to(CORE)): sorted(_imported_roots(p) & set(FORBIDDEN))
        for p in CORE.rglob("*.py")
        if _imported_roots(p) & set(FORBIDDEN)
    }
    assert not offenders, f"fer_core imports forbidden packages: {offenders}"


def test_importing_all_of_fer_core_loads_none_of_them():
    # A fresh interpreter, so that other tests' imports cannot hide a transitive import.
    modules = [m.name for m in pkgutil.walk_packages([str(CORE)], prefix="fer_core.")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing fer_core pulled in: {out.stdout.strip()}"


def test_the_check_itself_detects_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom mlflow.tracking import MlflowClient\nimportlib.import_module('prefect')\n")
    assert _imported_roots(bad) >= {"mlflow", "prefect"}
