"""Python client of the FER ensembles: pictures in, typed predictions out.

``FERClient(url).predict(images, network="ca_resnet")`` sends encoded images (or, for video
networks, the encoded frames of each clip) to ``<network>_ensemble`` and returns one
:class:`Prediction` per input. Every failure is a :class:`ServingError` with a one-line reason:
unreachable server, unknown network, malformed/oversized image, wrong dtype or shape.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import cv2
import numpy as np

from fer_core.metadata import ModelMetadata
from serving.ensembles.processing import MAX_IMAGE_BYTES, is_video_network
from fer_core.metadata import metadata_from_json
from serving.server import ServingError, TritonEndpoint, _one_line

__all__ = ["FERClient", "Prediction", "ServingError", "ImageInput", "encode_image", "read_clip_frames"]

ImageInput = Union[bytes, str, Path, np.ndarray]
_VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
_SHM_MIN_BYTES = 1 << 20  # the first region; it grows (re-registered) for larger requests
_shm_ids = itertools.count()


@dataclass(frozen=True)
class Prediction:
    """One result. ``probabilities`` maps class (or AU) names to probabilities; ``active`` lists the
    AUs at or above threshold (AU networks); ``valence``/``arousal`` and ``landmarks`` (``(x, y)``
    in the pixels of the image that was sent) are set when the network predicts them."""

    network: str
    label: str
    probabilities: dict[str, float]
    face_found: bool
    active: tuple[str, ...] | None = None
    valence: float | None = None
    arousal: float | None = None
    landmarks: tuple[tuple[float, float], ...] | None = None

    @property
    def confidence(self) -> float:
        return float(self.probabilities.get(self.label, max(self.probabilities.values(), default=0.0)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_image(image: np.ndarray, fmt: str = ".png") -> bytes:
    """Encode a uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB array (the platform's convention)."""
    if not isinstance(image, np.ndarray):
        raise ServingError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ServingError(f"image arrays must be uint8, got {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
        raise ServingError(f"image arrays must be (H, W) or (H, W, 3), got shape {image.shape}")
    if image.size == 0:
        raise ServingError(f"image array is empty: shape {image.shape}")
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 and image.shape[2] == 3 else image
    ok, buffer = cv2.imencode(fmt, pixels)
    if not ok:
        raise ServingError(f"cannot encode an image of shape {image.shape} as {fmt}")
    return buffer.tobytes()


def read_clip_frames(path: str | Path, max_frames: int = 300) -> list[bytes]:
    """Encoded frames of a clip: a folder of image files (natural order) or a video file."""
    path = Path(path)
    if path.is_dir():
        from fer_core.data.samples import frame_files

        files = frame_files(path)
        if not files:
            raise ServingError(f"{path} holds no image frames")
        return [f.read_bytes() for f in files[:max_frames]]
    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while len(frames) < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.imencode(".png", frame)[1].tobytes())  # BGR already: no conversion
    finally:
        capture.release()
    if not frames:
        raise ServingError(f"cannot read video frames from {path}")
    return frames


class FERClient:
    """Client of a Triton serving this platform's ensembles (gRPC by default, or HTTP)."""

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", batch_size: int = 16,
                 timeout_s: float = 60.0, key: str | None = None, shared_memory: bool = False,
                 streaming: bool = False) -> None:
        """``key``: the workspace's control key (:func:`serving.server.control_key`); needed over HTTP,
        where the platform's Triton serves key holders only, and to list networks.

        ``shared_memory`` (opt-in, for a client on the server's machine): the encoded inputs travel
        through a POSIX shared-memory region (``tritonclient.utils.shared_memory``) registered with
        the server once, instead of inside each gRPC/HTTP message; the outputs come back as usual.
        Registering is a restricted API on the platform's Triton: it needs ``key``. One request is in
        flight per client at a time on this path (the region is reused): use one client per thread.

        ``streaming`` (gRPC only): a :meth:`predict` that needs several requests (a video network's
        clips go one per request; images in batches of ``batch_size``) sends them all on one gRPC
        stream (``stream_infer``) without waiting for each answer, then collects the answers by
        request id; a single request goes the plain way. Not combinable with ``shared_memory``.
        """
        if streaming and shared_memory:
            raise ValueError("streaming and shared_memory cannot be combined (one region, many requests in flight)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.endpoint = TritonEndpoint(url, protocol, timeout_s=timeout_s, key=key)
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self._configs: dict[str, tuple[ModelMetadata, int, int]] = {}
        self.shared_memory = shared_memory
        self.streaming = streaming
        if streaming and self.endpoint.protocol != "grpc":
            raise ValueError("streaming needs the gRPC protocol")
        self._shm: tuple[Any, str, int] | None = None  # (handle, registered name, byte size)
        self._shm_lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.endpoint.url

    def close(self) -> None:
        with self._shm_lock:
            self._release_region()
        self.endpoint.close()

    def _release_region(self) -> None:
        if self._shm is None:
            return
        import tritonclient.utils.shared_memory as shm

        handle, name, _ = self._shm
        self._shm = None
        # Triton can hold a region a moment after the last response ("currently in use"): retry for
        # up to a second; a server that is gone or keeps refusing does not stop the region being freed.
        for _ in range(50):
            try:
                self.endpoint.client.unregister_system_shared_memory(name, headers=self.endpoint.headers)
                break
            except Exception as exc:  # noqa: BLE001 -- InferenceServerException, gRPC errors
                if "in use" not in str(exc):
                    break
                time.sleep(0.02)
        shm.destroy_shared_memory_region(handle)

    def _region(self, size: int) -> tuple[Any, str]:
        """A registered region of at least ``size`` bytes (caller holds ``_shm_lock``)."""
        if self._shm is not None and self._shm[2] >= size:
            return self._shm[0], self._shm[1]
        import tritonclient.utils.shared_memory as shm

        self._release_region()
        size = max(_SHM_MIN_BYTES, 1 << (size - 1).bit_length())
        name = f"fer-client-{os.getpid()}-{next(_shm_ids)}"
        try:
            handle = shm.create_shared_memory_region(name, f"/{name}", size)
        except Exception as exc:  # noqa: BLE001 -- SharedMemoryException
            raise ServingError(f"cannot create a shared-memory region of {size} bytes: {_one_line(exc)}") from None
        try:
            self.endpoint.client.register_system_shared_memory(name, f"/{name}", size, headers=self.endpoint.headers)
        except Exception as exc:  # noqa: BLE001
            shm.destroy_shared_memory_region(handle)
            hint = "" if self.endpoint.headers else " (registering needs the workspace's control key)"
            raise ServingError(f"shared memory refused by {self.url}: {_one_line(exc)}{hint}") from None
        self._shm = (handle, name, size)
        return handle, name

    def __enter__(self) -> "FERClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def networks(self) -> list[str]:
        """Networks whose ensemble is loaded and ready."""
        self._check_reachable()
        return sorted(m["name"][: -len("_ensemble")] for m in self.endpoint.index()
                      if m.get("name", "").endswith("_ensemble") and m.get("state") == "READY")

    def _check_reachable(self) -> None:
        # Liveness, not readiness: Triton reports "not ready" while any model version unloads.
        if not self.endpoint.server_live():
            raise ServingError(f"Triton at {self.url} is unreachable")

    def _network(self, network: str) -> tuple[ModelMetadata, int, int]:
        """(metadata, max_batch_size, max_image_bytes) of a served network, cached."""
        if network not in self._configs:
            self._check_reachable()
            model = f"{network}_ensemble"
            if not self.endpoint.model_ready(model):
                try:
                    served = ", ".join(self.networks()) or "none"
                except ServingError:  # the index is behind the control key
                    served = "not listed without the control key"
                raise ServingError(f"unknown network {network!r} at {self.url} (served: {served})")
            config = self.endpoint.model_config(model)
            params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
            if "fer_metadata" not in params:
                raise ServingError(f"{model} at {self.url} is not a FER ensemble (no fer_metadata)")
            max_bytes = int(params.get("max_image_bytes", MAX_IMAGE_BYTES))
            self._configs[network] = (metadata_from_json(params["fer_metadata"]),
                                      int(config.get("max_batch_size", 1)) or 1, max_bytes)
        return self._configs[network]

    @staticmethod
    def _encode_one(item: ImageInput, index: int) -> bytes:
        if isinstance(item, (bytes, bytearray, memoryview)):
            return bytes(item)
        if isinstance(item, (str, Path)):
            path = Path(item)
            if not path.is_file():
                raise ServingError(f"input {index}: {path} is not a file")
            return path.read_bytes()
        if isinstance(item, np.ndarray):
            try:
                return encode_image(item)
            except ServingError as exc:
                raise ServingError(f"input {index}: {exc}") from None
        raise ServingError(f"input {index}: expected bytes, a path or a uint8 array, got {type(item).__name__}")

    def _encode_clip(self, item: Any, index: int) -> list[bytes]:
        if isinstance(item, (str, Path)):
            return read_clip_frames(item)
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8:
                raise ServingError(f"clip {index}: frames must be uint8, got {item.dtype}")
            if item.ndim not in (3, 4) or 0 in item.shape:
                raise ServingError(f"clip {index}: expected (T, H, W[, 3]) frames, got shape {item.shape}")
            return [encode_image(frame) for frame in item]
        if isinstance(item, (list, tuple)):
            return [self._encode_one(frame, index) for frame in item]
        raise ServingError(f"clip {index}: expected frames (list or array) or a video/folder path, "
                           f"got {type(item).__name__}")

    def predict(self, images: Sequence[Any], network: str = "ca_resnet", validate: bool = True) -> list[Prediction]:
        """Predict for each input, in order.

        Image networks take encoded bytes, image paths or uint8 RGB/grey arrays. Video networks
        (``c3d_ecstfl``, ``micro_lsh``) take clips: lists of frames, ``(T, H, W[, 3])`` uint8 arrays,
        or video files / frame folders. ``validate`` checks sizes on this side first (the server
        checks again either way).
        """
        if isinstance(images, (bytes, str, Path, np.ndarray)):
            raise ValueError("predict takes a list of inputs; wrap a single one in a list")
        metadata, max_batch, max_bytes = self._network(network)
        video = is_video_network(metadata)
        samples = [self._encode_clip(x, i) if video else [self._encode_one(x, i)] for i, x in enumerate(images)]
        if validate:
            for i, sample in enumerate(samples):
                for data in sample:
                    if not data:
                        raise ServingError(f"input {i}: empty image (0 bytes)")
                    if len(data) > max_bytes:
                        raise ServingError(f"input {i}: image of {len(data)} bytes exceeds the limit of {max_bytes}")
        # Clips of different lengths cannot share one tensor: one request per clip.
        step = 1 if video else min(self.batch_size, max_batch)
        chunks = [(start, samples[start : start + step]) for start in range(0, len(samples), step)]
        if self.streaming and len(chunks) > 1:
            return self._infer_stream(network, metadata, chunks)
        results: list[Prediction] = []
        for start, chunk in chunks:
            results += self._infer(network, metadata, chunk, start)
        return results

    def _input(self, metadata: ModelMetadata, samples: list[list[bytes]]) -> tuple[Any, np.ndarray]:
        name = "FRAMES" if is_video_network(metadata) else "IMAGE"
        array = np.empty((len(samples), len(samples[0])), dtype=object)
        for i, sample in enumerate(samples):
            array[i, :] = sample
        return self.endpoint.module.InferInput(name, list(array.shape), "BYTES"), array

    def _infer_stream(self, network: str, metadata: ModelMetadata,
                      chunks: list[tuple[int, list[list[bytes]]]]) -> list[Prediction]:
        """All ``chunks`` on one gRPC stream, answers matched by request id (= the chunk's offset)."""
        import queue

        answers: "queue.Queue[tuple[Any, Any]]" = queue.Queue()
        client = self.endpoint.client
        where = f"inputs 0-{chunks[-1][0] + len(chunks[-1][1]) - 1}"
        try:
            client.start_stream(callback=lambda result, error: answers.put((result, error)),
                                headers=self.endpoint.headers)
        except Exception as exc:  # noqa: BLE001
            raise ServingError(f"{network}: cannot open a gRPC stream at {self.url}: {_one_line(exc)}") from None
        results: dict[int, Any] = {}
        try:
            for offset, chunk in chunks:
                tensor, array = self._input(metadata, chunk)
                tensor.set_data_from_numpy(array)
                client.async_stream_infer(f"{network}_ensemble", [tensor], request_id=str(offset))
            while len(results) < len(chunks):
                try:
                    result, error = answers.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise ServingError(f"{network}: {where}: no answer on the stream within {self.timeout_s:.0f}s") from None
                if error is not None:
                    raise ServingError(f"{network}: {where}: {_one_line(error)}")
                results[int(result.get_response().id)] = result
        except ServingError:
            raise
        except Exception as exc:  # noqa: BLE001 -- tritonclient / gRPC errors while sending
            raise ServingError(f"{network}: {where}: {_one_line(exc)}") from None
        finally:
            client.stop_stream()
        return [p for offset, _ in chunks for p in _predictions(network, metadata, results[offset])]

    def _infer(self, network: str, metadata: ModelMetadata, samples: list[list[bytes]], offset: int) -> list[Prediction]:
        tensor, array = self._input(metadata, samples)
        if not self.shared_memory:
            tensor.set_data_from_numpy(array)
            return _predictions(network, metadata, self._send(network, [tensor], samples, offset))
        import tritonclient.utils as tritonutils
        import tritonclient.utils.shared_memory as shm

        serialized = tritonutils.serialize_byte_tensor(array)
        size = tritonutils.serialized_byte_size(serialized)
        with self._shm_lock:
            handle, region = self._region(size)
            shm.set_shared_memory_region(handle, [serialized])
            tensor.set_shared_memory(region, size)
            result = self._send(network, [tensor], samples, offset)
        return _predictions(network, metadata, result)

    def _send(self, network: str, tensors: list[Any], samples: list[list[bytes]], offset: int) -> Any:
        try:
            return self.endpoint.client.infer(f"{network}_ensemble", tensors, headers=self.endpoint.headers)
        except Exception as exc:  # noqa: BLE001 -- tritonclient's InferenceServerException and gRPC errors
            where = f"input {offset}" if len(samples) == 1 else f"inputs {offset}-{offset + len(samples) - 1}"
            raise ServingError(f"{network}: {where}: {_one_line(exc)}") from None


def _predictions(network: str, metadata: ModelMetadata, result: Any) -> list[Prediction]:
    labels = _primary_labels(metadata)
    label = result.as_numpy("LABEL").reshape(-1)
    probs = result.as_numpy("PROBABILITIES")
    face = result.as_numpy("FACE_FOUND").reshape(-1)
    active = _maybe(result, "ACTIVE")
    va = _maybe(result, "VALENCE_AROUSAL")
    landmarks = _maybe(result, "LANDMARKS")
    out = []
    for i in range(len(label)):
        out.append(Prediction(
            network=network,
            label=label[i].decode() if isinstance(label[i], bytes) else str(label[i]),
            probabilities={name: float(p) for name, p in zip(labels, probs[i])},
            face_found=bool(face[i]),
            active=tuple(n for n, on in zip(labels, active[i]) if on) if active is not None else None,
            valence=float(va[i, 0]) if va is not None else None,
            arousal=float(va[i, 1]) if va is not None else None,
            landmarks=tuple((float(x), float(y)) for x, y in landmarks[i]) if landmarks is not None else None,
        ))
    return out


def _primary_labels(metadata: ModelMetadata) -> tuple[str, ...]:
    spec = {s.name: s for s in metadata.outputs}[metadata.primary_output or metadata.outputs[0].name]
    return tuple(spec.labels or metadata.label_names)


def _maybe(result: Any, name: str) -> np.ndarray | None:
    try:
        return result.as_numpy(name)
    except Exception:  # noqa: BLE001 -- absent outputs raise or return None depending on protocol
        return None


def predictions_to_json(predictions: Sequence[Prediction]) -> str:
    """JSON array of predictions (for ``fer infer --json``)."""
    return json.dumps([p.to_dict() for p in predictions], indent=2)
