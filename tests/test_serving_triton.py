"""End-to-end serving through the real ``tritonserver`` (embedded, loopback, free ports, no mocks).

One server per module over a repository holding tiny random-weight models: ``ca_resnet`` (two
registry versions, 3 and 5), ``multitask_fer`` and ``c3d_ecstfl``, each with its ensemble.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from fer_core.data.preprocess import HaarFaceDetector
from fer_core.data.synthfacs import SynthFACS
from fer_core.models import create_model
from serving.client import FERClient, ServingError, encode_image
from serving.ensembles import processing
from serving.export import export_onnx
from serving.repository import ModelRepository
from serving.server import EmbeddedTriton, TritonEndpoint, free_port

pytestmark = pytest.mark.integration  # starts the embedded tritonserver

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

CA_KWARGS = dict(width=4)  # 1x48x48 input, the served size
MULTITASK_KWARGS = dict(img_size=32, width=16, num_stacks=1, hourglass_depth=2, pyramid_dim=16, num_heads=2,
                        head_hidden=32)
C3D_KWARGS = dict(num_frames=8, img_size=32, width=4, fc_width=32)


def _randomise_batch_norm(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics so that random models give spread-out, seed-dependent outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _tiny(name: str, seed: int, **kwargs):
    torch.manual_seed(seed)
    return _randomise_batch_norm(create_model(name, **kwargs), seed)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serving")
    repo = ModelRepository(root / "models", face_detection="haar")  # full-photo mode: exercise the detector
    models = {
        ("ca_resnet", 3): _tiny("ca_resnet", 3, **CA_KWARGS),
        ("ca_resnet", 5): _tiny("ca_resnet", 5, **CA_KWARGS),
        ("multitask_fer", 1): _tiny("multitask_fer", 1, **MULTITASK_KWARGS),
        ("c3d_ecstfl", 2): _tiny("c3d_ecstfl", 2, **C3D_KWARGS),
    }
    onnx = {key: export_onnx(m, root / "onnx" / f"{key[0]}-{key[1]}.onnx") for key, m in models.items()}
    repo.install("ca_resnet", 3, onnx["ca_resnet", 3])
    repo.write_model("ca_resnet", 5, onnx["ca_resnet", 5], keep_versions=[3])  # candidate beside champion 3
    repo.install("multitask_fer", 1, onnx["multitask_fer", 1])
    repo.install("c3d_ecstfl", 2, onnx["c3d_ecstfl", 2])
    server = EmbeddedTriton(repo, root / "workspace", models=repo.load_order(), allow_http=True)
    start = time.perf_counter()
    server.start()
    print(f"tritonserver ready with {len(repo.load_order())} models in {time.perf_counter() - start:.1f}s")
    yield {"server": server, "repo": repo, "models": models}
    server.stop()


@pytest.fixture(scope="module")
def faces():
    return SynthFACS(0, image_size=96).expression_set(6).images


def _pytorch(model: nn.Module, batch: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model.outputs_as_dict(model(torch.from_numpy(batch)))
    return {k: v.numpy() for k, v in out.items()}


def _reference(model, encoded: list[bytes]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """What the ensemble should answer: the same pre-processing, then PyTorch, then post-processing."""
    detector = HaarFaceDetector()
    prepared = [processing.prepare([data], model.metadata, detector) for data in encoded]
    raw = _pytorch(model, np.stack([p.tensor for p in prepared]))
    to_input = np.stack([p.to_input for p in prepared])
    return processing.postprocess(raw, model.metadata, to_input), np.array([p.face_found for p in prepared]), to_input


def test_server_ready_metrics_and_versions(served):
    server = served["server"]
    endpoint = server.endpoint()
    assert endpoint.server_ready()
    assert server.endpoint("http").server_ready()
    for model in ("ca_resnet", "ca_resnet_ensemble", "multitask_fer_ensemble", "c3d_ecstfl_ensemble"):
        assert endpoint.model_ready(model), model
    assert endpoint.served_versions("ca_resnet") == [3, 5]
    assert endpoint.model_ready("ca_resnet", 5) and not endpoint.model_ready("ca_resnet", 4)
    assert not any(m["name"].startswith(".") for m in endpoint.index())  # staging is not in the repository
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    assert "nv_inference_request_success" in text or "nv_cpu_utilization" in text
    assert server.log_path.is_file()


@pytest.mark.parametrize("fmt", [".png", ".jpg"])
def test_ensemble_matches_pytorch(served, faces, fmt):
    champion = served["repo"].champion("ca_resnet")
    model = served["models"]["ca_resnet", champion]
    encoded = [encode_image(face, fmt) for face in faces]
    with FERClient(served["server"].grpc_url, batch_size=4) as client:  # 6 images: two batches
        predictions = client.predict(encoded, network="ca_resnet")
    expected, face_found, _ = _reference(model, encoded)
    got = np.array([[p.probabilities[name] for name in model.metadata.label_names] for p in predictions])
    assert np.abs(got - expected["PROBABILITIES"]).max() <= 1e-4
    assert [p.label for p in predictions] == [b.decode() for b in expected["LABEL"].ravel()]
    assert [p.face_found for p in predictions] == face_found.tolist()
    assert face_found.mean() >= 0.5  # SynthFACS faces are found by the Haar cascade
    assert len({p.label for p in predictions}) >= 1 and all(p.valence is None for p in predictions)


def test_multitask_valence_arousal_and_landmarks_over_http(served, faces):
    model = served["models"]["multitask_fer", 1]
    encoded = [encode_image(face) for face in faces[:3]]
    with FERClient(served["server"].http_url, protocol="http", key=served["server"].key) as client:
        predictions = client.predict(list(faces[:3]), network="multitask_fer")  # arrays, encoded as PNG
    expected, _, to_input = _reference(model, encoded)
    got_va = np.array([[p.valence, p.arousal] for p in predictions])
    assert np.abs(got_va - expected["VALENCE_AROUSAL"]).max() <= 1e-4
    landmarks = np.array([p.landmarks for p in predictions])
    assert landmarks.shape == (3, 68, 2)
    assert np.abs(landmarks - expected["LANDMARKS"]).max() <= 1e-3  # pixels of the 96x96 picture
    # Mapped back to the picture: applying to_input again gives model-input coordinates (0..31).
    back = landmarks[0] @ to_input[0][:, :2].T + to_input[0][:, 2]
    assert back.min() > -8 and back.max() < 40


def test_c3d_clip_through_ensemble(served, faces):
    model = served["models"]["c3d_ecstfl", 2]
    clip = np.stack([faces[0]] * 3 + [faces[1]] * 3)  # 6 frames, resampled to the model's 8
    with FERClient(served["server"].grpc_url) as client:
        (prediction,) = client.predict([clip], network="c3d_ecstfl")
    prepared = processing.prepare([encode_image(f) for f in clip], model.metadata, HaarFaceDetector())
    assert prepared.tensor.shape == (8, 3, 32, 32)
    expected = processing.softmax(_pytorch(model, prepared.tensor[None])["logits"])[0]
    got = np.array([prediction.probabilities[n] for n in model.metadata.label_names])
    assert np.abs(got - expected).max() <= 1e-4
    assert prediction.face_found == prepared.face_found


def test_version_switch_keeps_serving(served, faces):
    server, repo, models = served["server"], served["repo"], served["models"]
    endpoint = server.endpoint()
    encoded = [encode_image(face) for face in faces[:2]]
    errors, answered, stop = [], [0], threading.Event()

    def hammer():
        with FERClient(server.grpc_url) as client:
            while not stop.is_set():
                try:
                    client.predict(encoded, network="ca_resnet")
                    answered[0] += 1
                except ServingError as exc:
                    errors.append(str(exc))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.5)
        repo.set_champion("ca_resnet", 5, endpoint)  # promotion: v5 was loaded beside v3
        repo.set_served_versions("ca_resnet", [5])  # retire v3
        endpoint.load("ca_resnet")
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors[:3]
    assert answered[0] >= 2
    assert repo.champion("ca_resnet") == 5 and endpoint.served_versions("ca_resnet") == [5]
    with FERClient(server.grpc_url) as client:
        predictions = client.predict(encoded, network="ca_resnet")
    expected, _, _ = _reference(models["ca_resnet", 5], encoded)
    got = np.array([[p.probabilities[n] for n in models["ca_resnet", 5].metadata.label_names] for p in predictions])
    assert np.abs(got - expected["PROBABILITIES"]).max() <= 1e-4
    old, _, _ = _reference(models["ca_resnet", 3], encoded)
    assert np.abs(got - old["PROBABILITIES"]).max() > 1e-3  # really the other model


def _raw_infer(endpoint: TritonEndpoint, model: str, name: str, array: np.ndarray, datatype: str):
    tensor = endpoint.module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return endpoint.client.infer(model, [tensor])


def test_bad_inputs_give_clear_errors_and_server_keeps_serving(served, faces):
    server = served["server"]
    good = [encode_image(faces[0])]
    huge = cv2.imencode(".png", np.zeros((5000, 5000), np.uint8))[1].tobytes()  # 25 Mpx, small file
    cases = {
        b"this is not an image": "cannot decode",
        b"": "empty",
        huge: "exceeds the limit",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40: "cannot decode",  # truncated PNG
    }
    with FERClient(server.grpc_url) as client:
        for data, reason in cases.items():
            with pytest.raises(ServingError, match=reason) as info:
                client.predict([data], network="ca_resnet", validate=False)  # the server must say it
            assert "\n" not in str(info.value)
            assert client.predict(good, network="ca_resnet")[0].label  # still answering
        with pytest.raises(ServingError, match="empty"):
            client.predict([b""], network="ca_resnet")  # caught on the client side too
        with pytest.raises(ServingError, match="uint8"):
            client.predict([np.zeros((48, 48), np.float32)], network="ca_resnet")
        with pytest.raises(ServingError, match="shape"):
            client.predict([np.zeros((4, 48, 48, 2), np.uint8)], network="ca_resnet")
        # A batch mixing good and bad images fails as a whole, naming the bad sample.
        with pytest.raises(ServingError, match="sample 1"):
            client.predict(good + [b"garbage"], network="ca_resnet", validate=False)
        endpoint = client.endpoint
        with pytest.raises(Exception, match="data-type is .FP32., but model .ca_resnet_ensemble. expects .BYTES."):  # wrong dtype to the ensemble
            _raw_infer(endpoint, "ca_resnet_ensemble", "IMAGE", np.zeros((1, 1), np.float32), "FP32")
        with pytest.raises(Exception, match="(?i)shape|dims"):  # wrong shape to the network
            _raw_infer(endpoint, "ca_resnet", "image", np.zeros((1, 3, 48, 48), np.float32), "FP32")
        assert client.predict(good, network="ca_resnet")[0].label


def test_unknown_network_and_unreachable_server(served, faces):
    with FERClient(served["server"].grpc_url, key=served["server"].key) as client:  # the index needs the key
        with pytest.raises(ServingError, match="unknown network 'nope'.*ca_resnet"):
            client.predict([encode_image(faces[0])], network="nope")
        assert set(client.networks()) == {"ca_resnet", "multitask_fer", "c3d_ecstfl"}
    with FERClient(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(ServingError, match="unreachable"):
            client.predict([encode_image(faces[0])])


def test_fer_infer_cli(served, faces, tmp_path, capsys):
    from fer_cli import serve

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, face in enumerate(faces[:3]):
        (folder / f"face{i}.png").write_bytes(encode_image(face))
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    url = served["server"].grpc_url
    args = parser.parse_args(["infer", str(folder), "--url", url, "--network", "multitask_fer", "--json"])
    assert args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and all(len(r["landmarks"]) == 68 and r["valence"] is not None for r in rows)
    args = parser.parse_args(["infer", str(folder / "face0.png"), "--url", url])
    assert args.func(args) == 0
    assert "1 prediction(s) from ca_resnet" in capsys.readouterr().out
    args = parser.parse_args(["serve", "--url", f"grpc://{url}", "--repository", str(served["repo"].root)])
    assert args.func(args) == 0
    assert "ca_resnet_ensemble" in capsys.readouterr().out


def test_restart_after_crash_reloads_models(served, faces):
    """What `fer serve` does when tritonserver dies: restart on the same ports, load the models again."""
    server = served["server"]
    ports = (server.http_port, server.grpc_port, server.metrics_port)
    server.process.kill()
    server.process.wait(30)
    assert not server.running
    server.restart()
    assert (server.http_port, server.grpc_port, server.metrics_port) == ports
    with FERClient(server.grpc_url) as client:
        assert client.predict([encode_image(faces[0])], network="ca_resnet")[0].label


def test_shared_memory_inputs_match_the_plain_path(served, faces):
    """FERClient(shared_memory=True): inputs through a registered system shared-memory region give
    exactly the plain gRPC answers (images, in batches that grow the region, and a clip); without
    the control key the server refuses the registration with one line."""
    server = served["server"]
    noise = np.random.default_rng(0).integers(0, 256, (720, 720, 3), dtype=np.uint8)
    big = [encode_image(noise)]  # about 1.5 MB of PNG: more than the first region holds
    assert len(big[0]) > (1 << 20)
    encoded = [encode_image(face) for face in faces]
    clip = np.stack([faces[0]] * 3 + [faces[1]] * 3)
    with FERClient(server.grpc_url, batch_size=4) as plain, \
            FERClient(server.grpc_url, batch_size=4, key=server.key, shared_memory=True) as shared:
        sizes = []
        for network, inputs in (("ca_resnet", encoded), ("ca_resnet", big + encoded), ("c3d_ecstfl", [clip])):
            assert shared.predict(inputs, network=network) == plain.predict(inputs, network=network)
            sizes.append(shared._shm[2])
        assert sizes[0] < sizes[1] == sizes[2]  # the region grew once for the large image, then was reused
        region = shared._shm[1]
        status = server.endpoint().client.get_system_shared_memory_status(headers=server.endpoint().headers,
                                                                          as_json=True)
        assert region in json.dumps(status)
    status = server.endpoint().client.get_system_shared_memory_status(headers=server.endpoint().headers, as_json=True)
    assert region not in json.dumps(status)  # close() unregistered it
    with FERClient(server.grpc_url, shared_memory=True) as keyless:
        with pytest.raises(ServingError, match="shared memory refused") as err:
            keyless.predict(encoded[:1], network="ca_resnet")
        assert "\n" not in str(err.value)


def test_streaming_matches_the_plain_path(served, faces):
    """FERClient(streaming=True): several clips (one request each) and several image batches on
    one gRPC stream give exactly the plain answers, in order; an error on the stream is one line."""
    server = served["server"]
    clips = [np.stack([faces[i % 6]] * 3 + [faces[(i + 1) % 6]] * 3) for i in range(4)]
    encoded = [encode_image(face) for face in faces]
    with FERClient(server.grpc_url, batch_size=2) as plain, \
            FERClient(server.grpc_url, batch_size=2, streaming=True) as streamed:
        assert streamed.predict(clips, network="c3d_ecstfl") == plain.predict(clips, network="c3d_ecstfl")
        assert streamed.predict(encoded, network="ca_resnet") == plain.predict(encoded, network="ca_resnet")
        with pytest.raises(ServingError) as err:
            streamed.predict([b"not an image", b"neither", b"nor"], network="ca_resnet", validate=False)  # 2 requests
        assert "\n" not in str(err.value) and "ca_resnet" in str(err.value)
    with pytest.raises(ValueError, match="cannot be combined"):
        FERClient(server.grpc_url, streaming=True, shared_memory=True)
