"""pip's own client on the checkout: the lock pins every package the platform's cards name at the
version this environment runs, every installer uses it, and a clean venv gets a working ``fer``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "constraints.txt"
CARD_PACKAGES = ("mlflow", "prefect", "dvc", "great-expectations", "onnx", "onnxruntime", "onnxscript",
                 "tritonclient", "nvidia-pytriton", "torch", "fastapi", "sqlalchemy", "numpy")
NOT_WANTED = ("cuda-python", "cuda-bindings", "perf-analyzer")  # what tritonclient[all] drags in


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_pins_every_card_package_at_the_installed_version():
    from registry.requirements import lock_pins

    pins = lock_pins(LOCK)
    for package in CARD_PACKAGES:
        assert _canonical(package) in pins, f"{package} is not pinned in {LOCK}"
        installed = metadata.version(package).split("+", 1)[0]
        assert pins[_canonical(package)] == installed, f"{package}: lock {pins[_canonical(package)]}, installed {installed}"
    for package in NOT_WANTED:
        assert _canonical(package) not in pins
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[^+\s]+", line) for line in LOCK.read_text().splitlines()
               if line and not line.startswith("#")), "the lock holds only exact pins (no local +cpu labels)"


def test_pinned_requirements_come_from_the_lock():
    from registry.requirements import MODEL_PACKAGES, lock_pins, pinned_requirements

    pins = lock_pins(LOCK)
    assert pinned_requirements() == [f"{p}=={pins[_canonical(p)]}" for p in MODEL_PACKAGES]
    assert pinned_requirements(["mlflow"]) == [f"mlflow=={pins['mlflow']}"]
    with pytest.raises(LookupError):
        pinned_requirements(["no-such-package-xyz"])


def test_requirement_files_are_what_pyproject_reads_and_name_no_unwanted_extras():
    text = (ROOT / "pyproject.toml").read_text()
    for path in ("requirements/base.txt", "requirements/platform.txt", "docker/requirements-deploy.txt"):
        assert path in text
        for line in (ROOT / path).read_text().splitlines():
            if line.strip() and not line.startswith("#"):  # plain requirement lines, as setuptools reads them
                assert not line.startswith("-") and "#" not in line, f"{path}: {line!r}"
    platform = (ROOT / "requirements" / "platform.txt").read_text()
    assert "tritonclient[grpc,http]" in platform and "tritonclient[all]" not in platform
    assert "onnxscript" in platform


def test_prefect_yaml_uses_the_locked_prefect_version():
    from registry.requirements import lock_pins

    assert yaml.safe_load((ROOT / "prefect.yaml").read_text())["prefect-version"] == lock_pins(LOCK)["prefect"]


def test_every_installer_uses_the_lock_and_the_makefile_names_the_torch_index():
    for path in ("docker/Dockerfile", "docker/triton.Dockerfile"):
        text = (ROOT / path).read_text()
        installs = [c for c in re.sub(r"\\\n", " ", text).splitlines() if "pip install" in c and "--upgrade pip" not in c
                    and "--no-deps -e ." not in c]
        assert installs and all("-c " in c for c in installs), (path, installs)
    dry = subprocess.run(["make", "-n", "-B", "venv"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    pip_lines = [line for line in dry.stdout.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert pip_lines and all("-c requirements/constraints.txt" in line for line in pip_lines), pip_lines
    assert "--index-url https://download.pytorch.org/whl/cpu" in dry.stdout
    mirror = subprocess.run(["make", "-n", "-B", "venv", "TORCH_INDEX_URL=https://mirror.example/whl/cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--index-url https://mirror.example/whl/cpu" in mirror.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_pip_install_of_the_checkout_in_a_clean_venv_gives_a_working_fer(tmp_path):
    """``python -m venv`` + ``pip install -c lock <checkout>``, then the venv's own ``fer``; and pip's
    resolver on ``.[all]`` (a dry run with a report) picks the locked versions and no CUDA extras.
    Uses pip's configured indexes (here: local wheel folders; the CPU torch wheel among them)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    install = subprocess.run([*pip, "install", "-q", "-c", str(LOCK), str(ROOT)], capture_output=True,
                             text=True, timeout=1800)
    assert install.returncode == 0, install.stderr[-3000:]
    clean_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "FER_HOME": str(tmp_path / "home")}
    helped = subprocess.run([str(venv / "bin" / "fer"), "--help"], capture_output=True, text=True, timeout=300,
                            env=clean_env, cwd=tmp_path)
    assert helped.returncode == 0 and "COMMAND" in helped.stdout, helped.stderr[-2000:]
    synth = subprocess.run([str(venv / "bin" / "fer"), "data", "synth", "fer2013", str(tmp_path / "src"), "--size", "20"],
                           capture_output=True, text=True, timeout=600, env=clean_env, cwd=tmp_path)
    assert synth.returncode == 0, synth.stderr[-2000:]
    assert (tmp_path / "src" / "fer2013.csv").exists() or any((tmp_path / "src").rglob("*.csv"))
    listed = subprocess.run([str(venv / "bin" / "fer"), "train", "--list"], capture_output=True, text=True,
                            timeout=600, env=clean_env, cwd=tmp_path)
    assert listed.returncode == 0 and "ca_resnet" in listed.stdout, listed.stderr[-2000:]
    # the module came from the venv, not from this checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import fer_core; print(fer_core.__file__)"],
                           capture_output=True, text=True, timeout=120, env=clean_env, cwd=tmp_path)
    assert str(venv) in where.stdout

    report = tmp_path / "all.json"
    dry = subprocess.run([*pip, "install", "--dry-run", "--quiet", "--report", str(report), "-c", str(LOCK),
                          f"{ROOT}[all]"], capture_output=True, text=True, timeout=1800)
    assert dry.returncode == 0, dry.stderr[-3000:]
    resolved = {_canonical(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    from registry.requirements import lock_pins

    pins = lock_pins(LOCK)
    for package in CARD_PACKAGES:
        installed = resolved.get(_canonical(package)) or metadata.version(package)
        assert installed.split("+", 1)[0] == pins[_canonical(package)], package
    assert not set(map(_canonical, NOT_WANTED)) & set(resolved), sorted(set(map(_canonical, NOT_WANTED)) & set(resolved))
