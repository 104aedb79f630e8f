"""Regenerate the README's pictures of ``fer app`` and ``fer annotate`` (needs Xvfb for the window).

    PYTHONPATH=. .venv/bin/python docs/img/make_screenshots.py [--out docs/img]

1. Trains a small ca_resnet for 250 steps on SynthFACS crops of the video's four subjects (the recipe
   of tests/test_video_labels.py, about a minute on 2 cores), so the labels in the pictures are a
   trained network's, and exports it to ONNX.
2. Writes a generated 640x480 SynthFACS video with four faces (a new expression every second).
3. ``fer annotate VIDEO -o annotated.mp4 --model model.onnx``; frame ``--frame`` of the output is
   saved as ``annotated-frame.png``.
4. ``fer app --source VIDEO --model model.onnx --open`` on a private Xvfb, the window saved after
   ``--after`` seconds with the app's own ``--screenshot`` option as ``app-window.png``.

PNGs are reduced to a 256-colour palette to stay small (the README ships them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SEED, FACE_SIDE = 5, 182  # the video's subjects and face size (write_synthfacs_video's default for 4 faces)


def train_model(path: Path) -> Path:
    import numpy as np
    import torch

    from fer_core.data.preprocess import HaarFaceDetector, to_model_input
    from fer_core.data.synthfacs import SynthFACS
    from fer_core.losses.focal import FocalLoss
    from fer_core.models import create_model
    from fer_core.video.pipeline import face_crop
    from serving.export import export_onnx
    from tests.learning import epochs, fit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    detector = HaarFaceDetector(find_eyes=False)
    gen = SynthFACS(seed=SEED, image_size=FACE_SIDE)
    gen.expression_set(7, num_subjects=4)  # as in tests/test_video_labels.py: not the video's own draw
    train = gen.expression_set(840, num_subjects=4)
    crops = [face_crop(im, faces[0])[0] if (faces := detector.detect(im)) else im for im in train.images]
    x = torch.from_numpy(np.stack([to_model_input(c, 48, 1, 0.5, 0.5) for c in crops]))
    model = create_model("ca_resnet", width=8, downsample_input=True)
    fit(model, FocalLoss(gamma=2.0), epochs(x, {"label": torch.from_numpy(train.labels)}, batch_size=32), steps=250)
    return export_onnx(model.eval(), path)


def save_small_png(bgr, path: Path) -> None:
    import cv2
    from PIL import Image

    image = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, {image.width}x{image.height})")


def start_xvfb() -> tuple[subprocess.Popen, str]:
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                              pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()
    if not number:
        server.kill()
        raise SystemExit("Xvfb did not start")
    return server, f":{number}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--frame", type=int, default=25, help="frame of the annotated video to save")
    parser.add_argument("--after", type=float, default=3.5, help="seconds of playing before the window is saved")
    args = parser.parse_args()

    import cv2

    from fer_cli.main import main as fer
    from fer_core.video.source import VideoSource
    from fer_core.video.synthetic import write_synthfacs_video

    with tempfile.TemporaryDirectory(prefix="fer-screenshots-") as tmp:
        tmp = Path(tmp)
        model = train_model(tmp / "ca_resnet.onnx")
        video = tmp / "faces.mp4"
        write_synthfacs_video(video, num_faces=4, seconds=8.0, fps=10, segment_s=1.0, seed=SEED)

        annotated = tmp / "annotated.mp4"
        if fer(["annotate", str(video), "-o", str(annotated), "--model", str(model)]) != 0:
            return 1
        with VideoSource(str(annotated)) as source:
            frame = next(f for f in source if f.index == args.frame)
        save_small_png(frame.pixels, args.out / "annotated-frame.png")

        server, display = start_xvfb()
        try:
            shot = tmp / "window.png"
            env = {**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb", "FER_HOME": str(tmp / "home"),
                   "PYTHONPATH": str(ROOT)}
            subprocess.run([sys.executable, "-m", "fer_cli", "app", "--source", video.name, "--model", str(model),
                            "--open", "--screenshot", str(shot), "--screenshot-after", str(args.after)],
                           env=env, cwd=tmp, check=True, timeout=120)  # cwd: the source field shows a short name
        finally:
            server.terminate()
            server.wait(10)
        save_small_png(cv2.imread(str(shot)), args.out / "app-window.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
