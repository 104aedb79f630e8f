"""Serving performance settings (serving.tuning) and the configs the repository derives from them.
No server here: test_serving_triton.py loads such configs into the real tritonserver."""

from __future__ import annotations

import re

import pytest
import torch

from fer_core.errors import UsageError
from fer_core.models import create_model
from serving.export import export_onnx
from serving.repository import ModelRepository, network_config
from serving.tuning import (FALLBACK_QUEUE_DELAY_US, MAX_QUEUE_DELAY_US, MIN_QUEUE_DELAY_US, ServingTuning,
                            measure_latency, queue_delay_from_latency)


@pytest.fixture(scope="module")
def ca_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("ca_resnet", width=4)
    # TorchScript: seconds less than dynamo, same graph interface (the dynamo export: test_serving_export).
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "ca.onnx", exporter="torchscript"), model.metadata


def test_defaults_follow_the_cores_and_the_instance_kind():
    cpu = ServingTuning.defaults("KIND_CPU", cpu_count=2)
    assert (cpu.instances, cpu.intra_op_threads, cpu.allow_spinning) == (2, 1, False)
    assert cpu.max_queue_delay_us == 0 and cpu.preferred_batch_sizes == () and cpu.preprocess_instances == 2
    assert ServingTuning.defaults("KIND_CPU", cpu_count=1).instances == 1
    assert ServingTuning.defaults("KIND_CPU", cpu_count=64).instances == 4  # capped: stubs cost memory
    gpu = ServingTuning.defaults("KIND_GPU", cpu_count=64)
    assert gpu.instances == 2 and gpu.preferred_batch_sizes == (8, 16, 32) and gpu.max_queue_delay_us is None
    assert gpu.preferred_for(16) == (8, 16)
    # The ensemble: one fused stub on CPU, the network on its own (GPU) backend between two steps on GPU.
    assert cpu.ensemble_layout == "fused" and gpu.ensemble_layout == "steps"


def test_environment_overrides_the_defaults():
    env = {"FER_TRITON_INSTANCES": "3", "FER_TRITON_INTRA_OP_THREADS": "0", "FER_TRITON_ALLOW_SPINNING": "1",
           "FER_TRITON_QUEUE_DELAY_US": "250", "FER_TRITON_PREFERRED_BATCH": "16, 4",
           "FER_TRITON_PREPROCESS_INSTANCES": "1"}
    tuning = ServingTuning.load("KIND_CPU", env=env, cpu_count=2)
    assert (tuning.instances, tuning.intra_op_threads, tuning.allow_spinning) == (3, 0, True)
    assert tuning.max_queue_delay_us == 250 and tuning.preferred_batch_sizes == (16, 4)
    assert tuning.preprocess_instances == 1 and tuning.postprocess_instances == 1
    assert ServingTuning.load(env={"FER_TRITON_QUEUE_DELAY_US": "auto"}).max_queue_delay_us is None
    assert ServingTuning.load(env={"FER_TRITON_ENSEMBLE": " Steps "}).ensemble_layout == "steps"
    assert ServingTuning.load("KIND_GPU", env={"FER_TRITON_ENSEMBLE": "fused"}).ensemble_layout == "fused"


@pytest.mark.parametrize("variable, value", [
    ("FER_TRITON_INSTANCES", "0"), ("FER_TRITON_INSTANCES", "two"), ("FER_TRITON_INTRA_OP_THREADS", "-1"),
    ("FER_TRITON_QUEUE_DELAY_US", "soon"), ("FER_TRITON_PREFERRED_BATCH", "8,x"),
    ("FER_TRITON_PREFERRED_BATCH", "0"), ("FER_TRITON_ALLOW_SPINNING", "maybe"),
    ("FER_TRITON_ENSEMBLE", "chained"),
])
def test_a_bad_value_is_one_line_naming_the_variable(variable, value):
    with pytest.raises(UsageError) as info:  # a ValueError: the CLI prints one line, exit 2
        ServingTuning.load(env={variable: value})
    message = str(info.value)
    assert variable in message and repr(value.strip()) in message and "\n" not in message


def test_queue_delay_is_about_one_execution_within_bounds():
    assert queue_delay_from_latency(0.00035) == 350
    assert queue_delay_from_latency(1e-6) == MIN_QUEUE_DELAY_US
    assert queue_delay_from_latency(1.0) == MAX_QUEUE_DELAY_US
    assert queue_delay_from_latency(0.0) == FALLBACK_QUEUE_DELAY_US


def test_measured_latency_is_a_real_timing(ca_onnx):
    path, meta = ca_onnx
    specs = [(s.name, s.dtype, tuple(s.shape)) for s in meta.inputs]
    latency = measure_latency(str(path), specs, runs=5)
    assert latency is not None and 0 < latency < 1.0
    assert measure_latency(str(path), [("image", "float32", (-1, 48, 48))]) is None  # dynamic: not timed


def test_network_config_writes_threads_spinning_and_preferred_sizes(ca_onnx):
    _, meta = ca_onnx
    text = network_config(meta, [1], max_batch_size=32, instances=2, max_queue_delay_us=400, intra_op_threads=1,
                          inter_op_threads=1, allow_spinning=False, preferred_batch_sizes=(16, 8))
    assert "dynamic_batching { preferred_batch_size: [8, 16] max_queue_delay_microseconds: 400 }" in text
    assert "count: 2" in text and 'key: "session.intra_op.allow_spinning" value: { string_value: "0" }' in text
    assert 'key: "intra_op_thread_count" value: { string_value: "1" }' in text
    plain = network_config(meta, [1])  # ORT's defaults: no thread parameters at all
    assert "parameters" not in plain and "preferred_batch_size" not in plain
    with pytest.raises(ValueError, match="within 1..max_batch_size"):
        network_config(meta, [1], max_batch_size=8, preferred_batch_sizes=(16,))
    with pytest.raises(ValueError, match="max_queue_delay_us"):
        network_config(meta, [1], max_queue_delay_us=-1)


def test_repository_derives_instances_and_batching_from_the_tuning(tmp_path, ca_onnx):
    path, _ = ca_onnx
    tuning = ServingTuning(instances=3, intra_op_threads=1, inter_op_threads=1, allow_spinning=False,
                           max_queue_delay_us=None, preferred_batch_sizes=(4, 64), preprocess_instances=2,
                           postprocess_instances=1)
    repo = ModelRepository(tmp_path / "models", face_detection="off", tuning=tuning)
    repo.install("ca_resnet", 1, path, max_batch_size=16)
    config = (repo.root / "ca_resnet" / "config.pbtxt").read_text()
    assert "instance_group [ { kind: KIND_CPU count: 3 } ]" in config
    assert "preferred_batch_size: [4]" in config  # 64 > max_batch_size is left out
    delay = int(re.search(r"max_queue_delay_microseconds: (\d+)", config).group(1))
    assert MIN_QUEUE_DELAY_US <= delay <= MAX_QUEUE_DELAY_US  # measured on this machine at install
    assert "count: 2" in (repo.root / "ca_resnet_preprocess" / "config.pbtxt").read_text()
    assert "count: 1" in (repo.root / "ca_resnet_postprocess" / "config.pbtxt").read_text()
    # Explicit arguments still win over the tuning.
    repo.write_model("ca_resnet", 2, path, instances=1, max_queue_delay_us=0)
    config = (repo.root / "ca_resnet" / "config.pbtxt").read_text()
    assert "count: 1" in config and "max_queue_delay_microseconds: 0 " in config


def test_repository_reads_the_environment_when_writing(tmp_path, ca_onnx, monkeypatch):
    path, _ = ca_onnx
    monkeypatch.setenv("FER_TRITON_QUEUE_DELAY_US", "123")
    monkeypatch.setenv("FER_TRITON_INSTANCES", "1")
    repo = ModelRepository(tmp_path / "models", face_detection="off")
    repo.write_model("ca_resnet", 1, path)
    config = (repo.root / "ca_resnet" / "config.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 123 " in config and "count: 1 " in config
    monkeypatch.setenv("FER_TRITON_INSTANCES", "none")
    with pytest.raises(ValueError, match="FER_TRITON_INSTANCES must be an integer"):
        repo.write_model("ca_resnet", 2, path)
    assert repo.versions("ca_resnet") == [1]  # the bad setting stopped before anything was installed


def test_the_settings_read_exactly_the_tuning_variables(tmp_path):
    from fer_platform.settings import SERVING_TUNING_VARS, Settings
    from serving.tuning import ENV as tuning_env

    assert tuple(tuning_env.values()) == SERVING_TUNING_VARS
    settings = Settings.load(env={"FER_HOME": str(tmp_path), "FER_TRITON_INSTANCES": "3", "FER_TRITON_QUEUE_DELAY_US": " ",
                                  "FER_TRITONX": "1"})
    assert dict(settings.serving_tuning) == {"FER_TRITON_INSTANCES": "3"}


def test_the_workspace_repository_is_tuned_by_the_platform_context_not_the_process_environment(
        tmp_path, ca_onnx, monkeypatch):
    from fer_platform.settings import Settings
    from fer_platform.workspace import Workspace

    path, _ = ca_onnx
    monkeypatch.setenv("FER_TRITON_INSTANCES", "3")  # what the process says now: not the context's
    settings = Settings.load(env={"FER_HOME": str(tmp_path / "home"), "FER_TRITON_INSTANCES": "1",
                                  "FER_TRITON_QUEUE_DELAY_US": "77"})
    repo = ModelRepository.of_workspace(Workspace.from_settings(settings).ensure(), face_detection="off")
    repo.write_model("ca_resnet", 1, path)
    config = (repo.root / "ca_resnet" / "config.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 77 " in config and "count: 1 " in config


@pytest.mark.integration  # starts the embedded tritonserver
def test_tuned_configs_load_and_concurrent_requests_are_batched_per_step(tmp_path, ca_onnx):
    """The real tritonserver loads what the tuning writes (session.* entry, 2 instances, preferred
    sizes) and a burst of concurrent requests is batched by the network and the post-processing
    step, each client still getting the answer it gets alone."""
    pytest.importorskip("pytriton")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from concurrent.futures import ThreadPoolExecutor

    from fer_core.data.synthfacs import SynthFACS
    from serving.client import FERClient, encode_image
    from serving.server import EmbeddedTriton

    path, _ = ca_onnx
    # A long queue delay on the network makes the burst one batch there, so its answers reach the
    # post-processing step together (one instance: they cannot spread over two).
    tuning = ServingTuning(instances=1, intra_op_threads=1, inter_op_threads=1, allow_spinning=False,
                           max_queue_delay_us=200_000, preferred_batch_sizes=(16,), preprocess_instances=2,
                           postprocess_instances=1)
    repo = ModelRepository(tmp_path / "models", face_detection="off", tuning=tuning)
    repo.install("ca_resnet", 1, path)  # max batch 32, like the ensemble's
    pngs = [encode_image(f) for f in SynthFACS(0, image_size=96).expression_set(8).images]
    with EmbeddedTriton(repo, tmp_path / "workspace", models=repo.load_order()) as server:
        with FERClient(server.grpc_url) as client:
            alone = [client.predict([p], network="ca_resnet")[0] for p in pngs]

        def one(png: bytes):
            with FERClient(server.grpc_url) as c:
                return c.predict([png], network="ca_resnet")[0]

        with ThreadPoolExecutor(len(pngs)) as pool:
            together = list(pool.map(one, pngs))
        stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("", as_json=True)
    assert [p.label for p in together] == [p.label for p in alone]
    for a, b in zip(alone, together):
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) < 1e-5
    sizes = {m["name"]: {int(b["batch_size"]) for b in m.get("batch_stats", [])} for m in stats["model_stats"]}
    assert max(sizes["ca_resnet"]) > 1 and max(sizes["ca_resnet_postprocess"]) > 1


def test_the_serving_bench_reads_the_hypervisors_steal_from_proc_stat(tmp_path):
    """bench/serving.py prints the stolen share of CPU beside every level: the 8th field of
    /proc/stat's first line over all eight (guest time is already inside user)."""
    from bench.serving import host_ticks, steal_percent

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 7 0\ncpu0 1 2 3\n")
    assert host_ticks(str(stat)) == (35, 1000)
    stat.write_text("cpu  150 0 75 1100 10 0 5 60 9 0\n")
    assert steal_percent((35, 1000), host_ticks(str(stat))) == pytest.approx(100 * 25 / 400)
    assert host_ticks(str(tmp_path / "absent")) == (0, 0)
    assert steal_percent((0, 0), (0, 0)) == 0.0
    steal, total = host_ticks()  # this machine's own (Linux): a real reading, steal within it
    assert total > 0 and 0 <= steal <= total


def test_the_serving_bench_ratios_pool_the_rounds_and_show_each_round(tmp_path):
    """A run's target ratio is of the pooled slices; the per-round ratios beside it pair slice k of
    one side with slice k of the other (measured next to each other)."""
    from bench.serving import _merge_slices, ratios, round_ratios

    def slices(rates):  # one slice per round: 100 requests at the given rate
        return [{"requests": 100, "throughput": r, "wall": 100 / r, "cpu_s": 0.1, "load": 1.0,
                 "latencies": [1 / r] * 100, "steal_ticks": 1, "all_ticks": 100} for r in rates]

    rows = {("ensemble", "triton", 8): _merge_slices(slices([400.0, 900.0])),
            ("ensemble", "threads", 8): _merge_slices(slices([500.0, 1000.0]))}
    assert rows[("ensemble", "triton", 8)]["steal"] == pytest.approx(1.0)
    per_round = round_ratios(rows)
    assert per_round["ensemble / in-process threads, c=8"] == pytest.approx([0.8, 0.9])
    pooled = ratios(rows)["ensemble / in-process threads, c=8"]  # 200 requests in 0.25+0.111 s vs 0.2+0.1 s
    assert pooled == pytest.approx((200 / (100 / 400 + 100 / 900)) / (200 / (100 / 500 + 100 / 1000)))
    assert "network / in-process threads, c=8" not in per_round


@pytest.mark.integration  # starts the embedded tritonserver
def test_the_serving_bench_ceilings_load_and_cross_the_stub_once_per_step(tmp_path, ca_onnx):
    """bench/serving.py's two ceilings, in the real tritonserver: the identity in the network's own
    config returns its input, and the identity ensemble returns it too after running the identity
    once per step (3 executions per request: as many stub crossings as the real ensemble)."""
    pytest.importorskip("pytriton")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import numpy as np

    from bench.serving import (IDENTITY, IDENTITY_ENSEMBLE, IDENTITY_ENSEMBLE_1, write_identity_ensemble,
                               write_identity_model)
    from serving.server import EmbeddedTriton

    path, metadata = ca_onnx
    repo = ModelRepository(tmp_path / "models", face_detection="off",
                           tuning=ServingTuning(instances=1, intra_op_threads=1, inter_op_threads=1,
                                                allow_spinning=False, max_queue_delay_us=0, preferred_batch_sizes=(),
                                                preprocess_instances=1, postprocess_instances=1))
    repo.install("ca_resnet", 1, path)
    extra = [write_identity_model(repo), write_identity_ensemble(repo),
             write_identity_ensemble(repo, name=IDENTITY_ENSEMBLE_1, steps=1)]
    x = np.random.default_rng(0).random((2, *metadata.input.shape), dtype=np.float32)
    with EmbeddedTriton(repo, tmp_path / "workspace", models=["ca_resnet", *extra]) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        outputs = {}
        for name in (IDENTITY, IDENTITY_ENSEMBLE, IDENTITY_ENSEMBLE_1):
            tensor = grpcclient.InferInput("image", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            outputs[name] = client.infer(name, [tensor]).as_numpy("logits")
        # Triton updates a step's statistics after the ensemble has answered: wait for the last one.
        import time
        deadline = time.monotonic() + 10
        while True:
            stats = client.get_inference_statistics(IDENTITY, as_json=True)["model_stats"][0]
            if int(stats["inference_stats"]["success"]["count"]) >= 5 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    for name, out in outputs.items():
        np.testing.assert_array_equal(out, x, err_msg=name)
    # one request of 2 straight to the identity, one through the 3-step ensemble, one through the
    # 1-step one (the fused layout's crossing): 5 executions of it
    assert int(stats["inference_stats"]["success"]["count"]) == 5, stats


@pytest.mark.integration  # starts the embedded tritonserver
def test_switching_the_ensemble_layout_on_a_running_server_keeps_the_answers(tmp_path, ca_onnx):
    """``FER_TRITON_ENSEMBLE`` changed under a served network: ``set_champion`` with the endpoint
    writes the new layout's step, reloads the ensemble, then unloads and deletes the old steps; the
    ensemble answers as before (the fused pipeline is the steps layout's arithmetic in one stub), a
    bad picture beside good ones fails only its own request, and the way back works too."""
    pytest.importorskip("pytriton")
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from fer_core.data.synthfacs import SynthFACS
    from serving.client import FERClient, ServingError, encode_image
    from serving.server import EmbeddedTriton

    path, _ = ca_onnx
    root = tmp_path / "models"
    # One pipeline instance: 8 concurrent clients queue behind it, so their requests share batches.
    layouts = {name: ModelRepository(root, face_detection="off", tuning_env={
        "FER_TRITON_ENSEMBLE": name, "FER_TRITON_PREPROCESS_INSTANCES": "1"}) for name in ("steps", "fused")}
    layouts["steps"].install("ca_resnet", 1, path)
    pngs = [encode_image(f) for f in SynthFACS(1, image_size=64).expression_set(6).images]

    def answers(url: str) -> np.ndarray:
        with FERClient(url) as client:
            return np.array([list(p.probabilities.values()) for p in client.predict(pngs, network="ca_resnet")])

    with EmbeddedTriton(layouts["steps"], tmp_path / "workspace", models=layouts["steps"].load_order()) as server:
        endpoint = server.endpoint()
        before = answers(server.grpc_url)
        assert endpoint.model_ready("ca_resnet_preprocess")
        layouts["fused"].set_champion("ca_resnet", 1, endpoint)
        assert endpoint.model_ready("ca_resnet_pipeline") and endpoint.model_ready("ca_resnet_ensemble")
        assert not endpoint.model_ready("ca_resnet_preprocess") and not endpoint.model_ready("ca_resnet_postprocess")
        assert sorted(layouts["fused"].models()) == ["ca_resnet", "ca_resnet_ensemble", "ca_resnet_pipeline"]
        fused = answers(server.grpc_url)

        def one(data: bytes):  # concurrent single-picture requests: some share a dynamic batch
            with FERClient(server.grpc_url) as client:
                try:
                    return client.predict([data], network="ca_resnet", validate=False)[0].label
                except ServingError as exc:
                    return exc
        def executions() -> dict[int, int]:  # batch size -> executions of the pipeline so far
            stats = endpoint.client.get_inference_statistics("ca_resnet_pipeline", as_json=True,
                                                             headers=endpoint.headers)["model_stats"][0]
            return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}
        earlier = executions()
        with ThreadPoolExecutor(8) as pool:
            mixed = list(pool.map(one, [b"not a picture" if i % 4 == 1 else pngs[i % len(pngs)] for i in range(32)]))
        shared = [size for size, count in executions().items() if size > 1 and count > earlier.get(size, 0)]
        layouts["steps"].set_champion("ca_resnet", 1, endpoint)
        assert endpoint.model_ready("ca_resnet_preprocess") and not endpoint.model_ready("ca_resnet_pipeline")
        after = answers(server.grpc_url)
    np.testing.assert_allclose(fused, before, atol=1e-5)
    np.testing.assert_allclose(after, before, atol=1e-5)
    bad = [m for i, m in enumerate(mixed) if i % 4 == 1]
    good = [m for i, m in enumerate(mixed) if i % 4 != 1]
    assert all(isinstance(m, ServingError) and "cannot decode" in str(m) for m in bad), bad
    assert all(isinstance(m, str) and m for m in good), good
    assert shared, "the concurrent single-picture requests never shared an execution"
