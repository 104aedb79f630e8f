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


# fer_core is the bottom tier: nothing of the platform above it either. Configuration (Settings,
# Workspace) lives in fer_platform, which fer_core never needs.
PLATFORM_TIERS = ("fer_platform", "flows", "registry", "serving", "data_checks", "fer_cli")
ROOT = CORE.parent
# Library tiers take the platform context as an argument; only entry points (fer_cli commands,
# Prefect flow functions, scripts) build it from the environment.
LIBRARY_FILES = [p for d in ("registry", "serving", "data_checks") for p in (ROOT / d).rglob("*.py")] + [
    ROOT / "flows" / name for name in ("steps.py", "cache.py", "dispatch.py", "local_server.py")]


def test_fer_core_never_imports_the_platform_tiers():
    offenders = {
        str(p.relative_to(CORE)): sorted(_imported_roots(p) & set(PLATFORM_TIERS))
        for p in CORE.rglob("*.py")
        if _imported_roots(p) & set(PLATFORM_TIERS)
    }
    assert not offenders, f"fer_core imports platform tiers (settings belong to fer_platform): {offenders}"
    assert not (CORE / "settings.py").exists() and not (CORE / "workspace.py").exists()


def test_fer_platform_depends_on_nothing_of_the_platform():
    platform = ROOT / "fer_platform"
    imported = set().union(*(_imported_roots(p) for p in platform.rglob("*.py")))
    assert not imported & (set(PLATFORM_TIERS) - {"fer_platform"}) and "fer_core" not in imported, imported


def _ambient_loads(path: Path) -> list[int]:
    """Lines of ``Settings.load(...)`` / ``Workspace.load(...)`` / ``Workspace.load()`` calls."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("load", "from_env") and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("Settings", "Workspace")):
            lines.append(node.lineno)
    return lines


def test_library_tiers_never_read_the_configuration_themselves():
    offenders = {str(p.relative_to(ROOT)): _ambient_loads(p) for p in LIBRARY_FILES if _ambient_loads(p)}
    assert not offenders, f"library code loads Settings/Workspace from the environment: {offenders}"


def test_the_layering_checks_detect_a_settings_import_in_fer_core(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from fer_platform.settings import Settings\ns = Settings.load()\n")
    assert "fer_platform" in _imported_roots(bad) and _ambient_loads(bad) == [2]


# What starts a real server in a test: the embedded Triton, the temporary Prefect API, the moto S3
# server, ``mlflow models serve`` (tests/mlflow_serve.py). A test reaching one of them, itself or
# through the module's fixtures, must be marked ``integration`` (pyproject's definition), so the
# fast lane (``make test-fast``) never starts one.
SERVER_STARTERS = frozenset({"EmbeddedTriton", "LocalPrefectServer", "wait_for_ping", "ThreadedMotoServer"})
SERVER_STRINGS = frozenset({"moto.server"})
TESTS = Path(__file__).resolve().parent


def _marks(decorators: list[ast.expr]) -> set[str]:
    """The ``pytest.mark.X`` names among ``decorators`` (or a ``pytestmark`` value's elements)."""
    found = set()
    for node in decorators:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and sub.value.attr == "mark":
                found.add(sub.attr)
    return found


def _starts_server(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in SERVER_STARTERS:
            return True
        if isinstance(sub, ast.Attribute) and sub.attr in SERVER_STARTERS:
            return True
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value in SERVER_STRINGS:
            return True
    return False


def _unmarked_server_tests(path: Path) -> list[str]:
    """Tests of the module at ``path`` that start a server (directly or through the module's
    fixtures, transitively) without the ``integration`` marker."""
    tree = ast.parse(path.read_text(), str(path))
    module_marks: set[str] = set()
    functions: dict[str, ast.FunctionDef] = {}
    tests: list[tuple[ast.FunctionDef, set[str]]] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            module_marks |= _marks([node.value])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions[node.name] = node
            if node.name.startswith("test"):
                tests.append((node, _marks(node.decorator_list)))
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test"):
                    tests.append((item, _marks(node.decorator_list) | _marks(item.decorator_list)))
    memo: dict[str, bool] = {}

    def reaches(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name in memo:
            return memo[name]
        fn = functions[name]
        params = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
        hit = _starts_server(fn) or any(p in functions and p not in seen and reaches(p, seen | {name}) for p in params)
        memo[name] = hit
        return hit

    return [f"{path.name}::{fn.name}" for fn, marks in tests
            if "integration" not in module_marks | marks and reaches(fn.name)]


def test_every_test_that_starts_a_server_is_marked_integration():
    offenders = [t for p in sorted(TESTS.glob("test_*.py")) for t in _unmarked_server_tests(p)]
    assert not offenders, f"tests that start a server without @pytest.mark.integration: {offenders}"


def test_the_marker_check_detects_a_server_reached_through_a_fixture(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("import pytest\nfrom serving.server import EmbeddedTriton\n\n"
                   "@pytest.fixture\ndef served(tmp_path):\n    return EmbeddedTriton(tmp_path)\n\n"
                   "@pytest.fixture\ndef client(served):\n    return served\n\n"
                   "def test_a(client):\n    pass\n\n"
                   "@pytest.mark.integration\ndef test_b(client):\n    pass\n\n"
                   "def test_c(tmp_path):\n    pass\n")
    assert _unmarked_server_tests(bad) == ["test_bad.py::test_a"]
    bad.write_text("import pytest\npytestmark = [pytest.mark.integration]\n" + bad.read_text())
    assert _unmarked_server_tests(bad) == []
