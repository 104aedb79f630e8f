"""Resident memory of the embedded Triton with the five networks' ensembles loaded.

Sums the RSS of ``tritonserver`` and all its children (each Python-backend model runs in its own
stub process) after the server starts with an empty repository and after the five ensembles are
loaded. Uses only APIs that exist before and after the model-package work, so the same script
measures an older checkout too::

    PYTHONPATH=/path/to/checkout python bench/triton_rss.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

# bench/serving.py would shadow the serving package: drop this folder from the path; the checkout
# measured is the one on PYTHONPATH, else this script's own.
sys.path.pop(0)
sys.path.append(str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from fer_core.models import create_model  # noqa: E402
from fer_core.training.tasks import get_recipe  # noqa: E402
from serving.export import export_onnx  # noqa: E402
from serving.repository import ModelRepository  # noqa: E402
from serving.server import EmbeddedTriton  # noqa: E402

NETWORKS = ("ca_resnet", "multitask_fer", "micro_lsh", "c3d_ecstfl", "au_cotrain")


def tree_rss_mib(pid: int) -> float:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = ModelRepository(tmp / "models")
        for network in NETWORKS:
            model = create_model(network, **get_recipe(network, "quick").model_kwargs).eval()
            repo.install(network, 1, export_onnx(model, tmp / "onnx" / network / "model.onnx"))
        server = EmbeddedTriton(repo, tmp / "triton").start()
        try:
            empty = tree_rss_mib(server.process.pid)
            start = time.perf_counter()
            failures = server.load_models(repo.load_order())
            seconds = time.perf_counter() - start
            time.sleep(2)
            loaded = tree_rss_mib(server.process.pid)
            stubs = len(psutil.Process(server.process.pid).children(recursive=True))
        finally:
            server.stop()
    print(json.dumps({"code": str(Path(sys.modules["serving"].__file__).parents[1]), "empty_mib": round(empty),
                      "five_ensembles_mib": round(loaded), "stub_processes": stubs,
                      "load_seconds": round(seconds, 1), "failures": failures}))


if __name__ == "__main__":
    main()
