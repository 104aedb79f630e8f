"""The model package: one artefact that training's decode, the MLflow pyfunc and Triton read alike.

A module-scoped fixture builds, for each of the five networks, a small synthetic dataset in its
real on-disk format, an untrained model of the task's effective recipe, and its package
(:func:`serving.package.write_package`) from raw held-out samples. Untrained weights are enough
here: the question is whether the three paths compute the same thing from the same raw bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from tests.mlflow_serve import wait_for_ping
import torch

from fer_core.data.formats import adapt, get_format
from fer_core.models import create_model
from fer_core.training.tasks import create_task, get_recipe
from fer_core.training.trainer import effective_recipe
from registry.export import raw_sample
from serving.ensembles import processing
from serving.export import export_onnx
from serving.package import ModelPackage, PackageError, PackageRunner, write_package

pytestmark = pytest.mark.slow  # the module fixture builds and packages every network (~35 s)

# network -> (format, write_synthetic kwargs, adapt kwargs, recipe overrides)
NETWORKS = {
    "ca_resnet": ("fer2013", {"size": 60}, {}, {"model_kwargs.width": 4}),
    "multitask_fer": ("affectnet", {"size": 60, "image_size": 64}, {}, {}),
    "micro_lsh": ("casme2", {"size": 10, "image_size": 32, "num_frames": 6, "num_subjects": 4}, {}, {}),
    "c3d_ecstfl": ("dfew", {"size": 40, "image_size": 32, "num_frames": 8}, {"fold": 1},
                   {"model_kwargs.width": 4, "model_kwargs.fc_width": 32}),
    "au_cotrain": ("au_table", {"size": 40, "image_size": 40}, {}, {}),
}
SAMPLES = 6


def _build(network: str, root: Path):
    fmt, synth, adapt_kwargs, overrides = NETWORKS[network]
    source = get_format(fmt).write_synthetic(root / "src", seed=0, **synth)
    adapt(fmt, source, root / "prepared", name=f"{network}-synth", **adapt_kwargs)
    recipe = get_recipe(network, "quick").with_overrides(overrides) if overrides else get_recipe(network, "quick")
    task = create_task(network, root / "prepared", recipe)
    recipe = effective_recipe(recipe, task)
    torch.manual_seed(0)
    model = create_model(network, **recipe.model_kwargs).eval()
    datasets = task.build_datasets(recipe)
    split = next(s for s in ("test", "val") if s in datasets and len(datasets[s]))
    dataset = datasets[split]
    count = min(SAMPLES, len(dataset))
    raw = [raw_sample(dataset.root, dataset.rows.iloc[i], task.meta) for i in range(count)]
    inputs = np.stack([dataset[i][0].numpy() for i in range(count)]).astype(np.float32)
    onnx_path = export_onnx(model, root / "export" / "model.onnx")
    pipeline = task.input_pipeline()  # as registry.export does: choices like align_faces 'auto' resolved
    package = write_package(root / "package", onnx_path, model.metadata, pipeline, raw,
                            info={"network": network, "recipe": recipe.to_dict()})
    return SimpleNamespace(network=network, task=task, recipe=recipe, model=model, raw=raw, inputs=inputs,
                           package=package)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    return {n: _build(n, tmp_path_factory.mktemp(n)) for n in NETWORKS}


def _training_probabilities(item) -> np.ndarray:
    """Training's decode (the task's dataset) → the package's ONNX → post-processing."""
    runner = PackageRunner(item.package)
    raw = runner.run_inputs(item.inputs)
    return processing.postprocess(raw, item.package.metadata, np.zeros((len(item.inputs), 2, 3), np.float32))[
        "PROBABILITIES"]


def _pyfunc_input(item) -> pd.DataFrame:
    samples = item.package.smoke_samples()
    if item.package.pipeline.kind == "clip":
        return pd.DataFrame({"frames": [list(s) for s in samples]})
    return pd.DataFrame({"image": [s[0] for s in samples]})


@pytest.fixture(scope="module")
def pyfuncs(built, tmp_path_factory):
    """Each package saved as the MLflow model the registry logs (pyfunc + onnx) and loaded back."""
    import mlflow

    from registry.pyfunc import _PackageFlavor

    out = {}
    for network, item in built.items():
        path = tmp_path_factory.mktemp(f"{network}-mlflow") / "model"
        _PackageFlavor.save_model(str(path), mlflow.models.Model(), package=item.package)
        out[network] = path
    return out


def test_package_manifest_is_torch_free_and_complete(built):
    package = built["ca_resnet"].package
    manifest = json.loads((package.root / "package.json").read_text())
    assert manifest["format_version"] == 1 and manifest["pipeline"]["face"] == "off"
    assert set(manifest["files"]) >= {"model.onnx", "smoke/expected.npz"} and len(manifest["smoke"]) == SAMPLES
    code = ("import sys; from serving.package import ModelPackage, PackageRunner; "
            f"p = ModelPackage.open({str(package.root)!r}); PackageRunner(p).predict(p.smoke_samples()); "
            "import serving.ensembles.processing, serving.repository; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_altered_missing_or_foreign_packages_are_refused_with_one_line(built, tmp_path):
    source = built["ca_resnet"].package
    cases = {}
    for case in ("truncated", "missing", "format", "digest", "json"):
        folder = tmp_path / case
        source.copy_to(folder)
        cases[case] = folder
    onnx = (cases["truncated"] / "model.onnx").read_bytes()
    (cases["truncated"] / "model.onnx").write_bytes(onnx[: len(onnx) // 2])
    (cases["missing"] / "smoke" / "000_00.png").unlink()
    manifest = json.loads((cases["format"] / "package.json").read_text())
    (cases["format"] / "package.json").write_text(json.dumps({**manifest, "format_version": 99}))
    (cases["json"] / "package.json").write_text("{not json")
    expected = {"truncated": "model.onnx was altered", "missing": "000_00.png is missing",
                "format": "format version 99", "json": "not valid JSON"}
    for case, message in expected.items():
        with pytest.raises(PackageError, match=message) as info:
            ModelPackage.open(cases[case])
        assert len(str(info.value).splitlines()) == 1
    with pytest.raises(PackageError, match="altered"):
        ModelPackage.open(cases["digest"], expected_digest="0" * 64)


@pytest.mark.parametrize("network", list(NETWORKS))
def test_training_decode_and_pyfunc_agree_on_raw_inputs(built, pyfuncs, network):
    """Same raw samples: training's decode + ONNX vs the MLflow pyfunc on encoded bytes (≤ 1e-4),
    and the package pipeline rebuilds training's exact model inputs."""
    import mlflow

    item = built[network]
    runner = PackageRunner(item.package)
    rebuilt = np.stack([runner.prepare(s).tensor for s in item.package.smoke_samples()])
    assert np.abs(rebuilt - item.inputs).max() <= 1e-6
    training = _training_probabilities(item)
    model = mlflow.pyfunc.load_model(str(pyfuncs[network]))
    answer = model.predict(_pyfunc_input(item))
    served = np.array(answer["probabilities"].tolist(), dtype=np.float64)
    assert served.shape == training.shape
    assert np.abs(served - training).max() <= 1e-4
    assert np.abs(served - item.package.expected()["PROBABILITIES"]).max() <= 1e-6
    labels = item.package.metadata.label_names
    if not item.package.metadata.extra.get("multi_label"):
        assert list(answer["label"]) == [labels[i] for i in training.argmax(1)]
    # Decoded uint8 arrays work through the unwrapped model (MLflow's schema knows no image arrays).
    arrays = [list(s) if len(s) > 1 else s[0] for s in item.raw]
    if item.package.pipeline.kind == "image":
        direct = model.unwrap_python_model().predict(None, np.stack(arrays) if len({a.shape for a in arrays}) == 1
                                                      else arrays)
        assert np.abs(np.array(direct["probabilities"].tolist()) - training).max() <= 1e-4
    # Models-from-code: the pyfunc is registry/pyfunc_model.py, not a cloudpickled object.
    import yaml

    conf = yaml.safe_load((Path(pyfuncs[network]) / "MLmodel").read_text())["flavors"]["python_function"]
    assert conf.get("model_code_path") and "python_model" not in conf, conf
    # The same MLflow model has the onnx flavour over the package's own file.
    onnx_model = mlflow.onnx.load_model(str(pyfuncs[network]))
    assert [i.name for i in onnx_model.graph.input] == [item.package.metadata.input.name]


def _tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (Triton's Python stubs are children)."""
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


@pytest.mark.integration
def test_training_decode_pyfunc_and_triton_ensemble_agree_for_each_network(built, tmp_path):
    """The five ensembles, generated from the packages, answer the raw smoke samples like training's
    decode does (≤ 1e-4), in both layouts: ``fused`` (the CPU default, ``<net>_ensemble``) and
    ``steps`` (served beside it as ``<net>_steps_ensemble``); Triton's resident memory with them
    loaded is printed for the README."""
    pytest.importorskip("pytriton")
    from registry.promotion import _infer_raw
    from serving.repository import ModelRepository
    from serving.server import EmbeddedTriton

    repo = ModelRepository(tmp_path / "models", face_detection=None, tuning_env={"FER_TRITON_ENSEMBLE": "fused"})
    steps = ModelRepository(repo.root, face_detection=None, tuning_env={"FER_TRITON_ENSEMBLE": "steps"})
    for network, item in built.items():
        repo.write_model(network, 1, item.package.root)
        repo.write_ensemble(network, 1)
        steps.write_ensemble(network, 1, stem=f"{network}_steps")
        assert 'key: "fer_pipeline"' in (repo.root / f"{network}_pipeline" / "config.pbtxt").read_text()
        assert 'key: "fer_pipeline"' in (repo.root / f"{network}_steps_preprocess" / "config.pbtxt").read_text()
    server = EmbeddedTriton(repo, tmp_path / "triton", models=repo.load_order()).start()
    try:
        endpoint = server.endpoint()
        print(f"\nTriton + stubs resident memory, five networks in both layouts: "
              f"{_tree_rss_mib(server.process.pid):.0f} MiB")
        for network, item in built.items():
            name = "FRAMES" if item.package.pipeline.kind == "clip" else "IMAGE"
            for ensemble in (f"{network}_ensemble", f"{network}_steps_ensemble"):
                got = np.stack([_infer_raw(endpoint, ensemble, name, s) for s in item.package.smoke_samples()])
                diff = float(np.abs(got - _training_probabilities(item)).max())
                print(f"\n{ensemble}: training decode vs Triton max |diff| {diff:.2e}")
                assert diff <= 1e-4, ensemble
    finally:
        server.stop()


@pytest.mark.integration
def test_mlflow_models_serve_answers_an_encoded_image(built, pyfuncs):
    """MLflow's own server (``mlflow models serve --env-manager local``) on the registered model
    format answers an HTTP request carrying an encoded image like the package does."""
    import base64
    import os
    import signal
    import urllib.request

    from serving.server import free_port

    port = free_port("127.0.0.1")
    item = built["ca_resnet"]
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", str(pyfuncs["ca_resnet"]),
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # MLflow execs the venv's uvicorn by name: the venv's bin folder must be on PATH.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        wait_for_ping(server, port, timeout_s=120)
        images = [s[0] for s in item.package.smoke_samples()[:3]]
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(b).decode()] for b in images]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())["predictions"]
        probabilities = np.array([row["probabilities"] for row in answer])
        assert np.abs(probabilities - item.package.expected()["PROBABILITIES"][:3]).max() <= 1e-6
        labels = item.package.metadata.label_names
        assert [row["label"] for row in answer] == [labels[i] for i in probabilities.argmax(1)]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
