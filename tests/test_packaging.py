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

from tests.mlflow_serve import wait_for_ping
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
        # the checkout itself is installed --no-deps (its dependencies came from the lock already)
        installs = [c for c in re.sub(r"\\\n", " ", text).splitlines() if "pip install" in c and "--upgrade pip" not in c
                    and not re.search(r"pip install --no-deps( --no-build-isolation)? -e \.", c)
                    and not c.lstrip().startswith("#")]
        assert installs and all("-c " in c for c in installs), (path, installs)
    dry = subprocess.run(["make", "-n", "-B", "venv"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    pip_lines = [line for line in dry.stdout.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert pip_lines and all("-c requirements/constraints.txt" in line for line in pip_lines), pip_lines
    assert "--index-url https://download.pytorch.org/whl/cpu" in dry.stdout
    mirror = subprocess.run(["make", "-n", "-B", "venv", "TORCH_INDEX_URL=https://mirror.example/whl/cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--index-url https://mirror.example/whl/cpu" in mirror.stdout


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with ``pip install -c lock <checkout>`` (the core) in it, shared by this
    file's clean-environment tests (the core test runs first, the platform test adds the extra)."""
    venv = tmp_path_factory.mktemp("clean") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(LOCK), str(ROOT)],
                             capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


@pytest.mark.slow
@pytest.mark.integration
def test_pip_install_of_the_checkout_in_a_clean_venv_gives_a_working_fer(clean_venv, tmp_path):
    """``python -m venv`` + ``pip install -c lock <checkout>``, then the venv's own ``fer``; and pip's
    resolver on ``.[all]`` (a dry run with a report) picks the locked versions and no CUDA extras.
    Uses pip's configured indexes (here: local wheel folders; the CPU torch wheel among them)."""
    venv = clean_venv
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
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


# Run in the clean venv: the registered champion through MLflow's own pyfunc loader, on PNG files.
_PYFUNC_PREDICT = """
import json, sys
import mlflow, pandas as pd
import fer_core
model = mlflow.pyfunc.load_model("models:/fer-ca_resnet@champion")
images = [open(path, "rb").read() for path in sys.argv[1:]]
answer = model.predict(pd.DataFrame({"image": images}))
print(json.dumps({"where": fer_core.__file__, "labels": list(answer["label"]),
                  "probabilities": answer["probabilities"].tolist(), "face_found": list(map(bool, answer["face_found"]))}))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_the_registered_champion_predicts_and_serves_in_a_clean_venv_with_the_platform(clean_venv, tmp_path,
                                                                                       monkeypatch):
    """Issue 13's first "done means": with only ``pip install -c lock <checkout>[platform]`` in a fresh
    venv, ``mlflow.pyfunc.load_model("models:/fer-ca_resnet@champion")`` predicts on real PNG bytes,
    and ``mlflow models serve --env-manager local`` answers ``/invocations`` with an encoded image,
    both like the version's package. The champion comes from a real training + registration here
    (SQLite MLflow store in a workspace); the venv gets only its tracking URI."""
    import base64
    import os
    import signal
    import time
    import urllib.request

    import numpy as np
    import torch

    from fer_core.data.formats import adapt, get_format
    from fer_platform.workspace import Workspace
    from registry import models as reg
    from registry.datasets import DatasetStore
    from registry.export import export_and_register
    from registry.promotion import download_package
    from registry.training import resolve_recipe, train_tracked
    from serving.server import free_port

    torch.set_num_threads(1)
    home = tmp_path / "home"
    monkeypatch.setenv("FER_HOME", str(home))
    for var in ("FER_TRACKING_URI", "FER_REGISTRY_URI", "FER_CONFIG", "FER_DVC_REMOTE", "FER_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    ws = Workspace(home).ensure()
    source = get_format("fer2013").write_synthetic(tmp_path / "src", size=80)
    adapt("fer2013", source, tmp_path / "prepared", name="fer")
    data = DatasetStore(ws).add("fer", tmp_path / "prepared")
    recipe = resolve_recipe("ca_resnet", "quick", None, {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16,
                                                         "model_kwargs.width": 8})
    version = export_and_register(train_tracked("ca_resnet", data.ref, recipe, progress=False, workspace=ws),
                                  workspace=ws)
    reg.set_alias("ca_resnet", "champion", version.version, ws)
    package = download_package(version, tmp_path / "package", ws)
    images = [s[0] for s in package.smoke_samples()[:3]]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"face{i}.png")
        paths[-1].write_bytes(image)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    expected = package.expected()["PROBABILITIES"][:3]
    labels = package.metadata.label_names

    venv = clean_venv
    start = time.perf_counter()
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(LOCK),
                              f"{ROOT}[platform]"], capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stderr[-3000:]
    print(f"\nclean venv: pip install [platform] {time.perf_counter() - start:.0f} s")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{ws.mlflow_db}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    run = subprocess.run([str(venv / "bin" / "python"), "-c", _PYFUNC_PREDICT, *map(str, paths)], capture_output=True,
                         text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert str(venv) in answer["where"]  # the platform came from the venv, not from this checkout
    assert np.abs(np.array(answer["probabilities"]) - expected).max() <= 1e-6
    assert answer["labels"] == [labels[i] for i in expected.argmax(1)]

    port = free_port("127.0.0.1")
    server = subprocess.Popen([str(venv / "bin" / "mlflow"), "models", "serve", "-m", "models:/fer-ca_resnet@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        wait_for_ping(server, port, timeout_s=180)
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(b).decode()] for b in images]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            served = json.loads(response.read())["predictions"]
        assert np.abs(np.array([row["probabilities"] for row in served]) - expected).max() <= 1e-6
        assert [row["label"] for row in served] == answer["labels"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
