"""The ``fer app`` window (PySide6): the static method's four actions over a live overlay.

*Open camera* starts a capture thread on the source in the text field (camera index, video file --
played at its own frame rate, like a camera -- or stream URL); every frame goes through
:class:`~fer_core.video.pipeline.FrameProcessor` (detect, track, crop, recognise) and is shown with
the overlay and the FPS / latency line. *Select a face image* recognises a picture file. *Take a photo
and recognise* freezes the current frame, saves it and shows its recognition. *Close camera* stops
the capture. Failures (no camera, unreadable video, a stream that drops, a server error) are shown
in the window and the status bar; the window keeps running.

PySide6 rather than the method's PyQt5: the same Qt widgets, but LGPL (PyQt5 is GPL or commercial,
which an Apache-2.0 platform cannot ship), and Qt 6 is maintained where Qt 5.15's open-source
support has ended; the ``PySide6-Essentials`` wheel carries only the modules used here.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PySide6.QtCore import QThread, QTimer, Qt, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (QApplication, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QMainWindow, QPushButton,
                               QVBoxLayout, QWidget)

from fer_core.video.overlay import FaceAnnotation, draw_faces, draw_status
from fer_core.video.pipeline import FrameProcessor, PipelineConfig, Recognizer
from fer_core.video.source import Frame, VideoSource, VideoSourceError

__all__ = ["FERWindow", "CaptureWorker", "run_app", "VIEW_SIZE"]

VIEW_SIZE = (640, 480)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def to_qimage(bgr: np.ndarray) -> QImage:
    rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return QImage(rgb.data, rgb.shape[1], rgb.shape[0], rgb.strides[0], QImage.Format.Format_RGB888).copy()


class CaptureWorker(QThread):
    """Reads, recognises and draws frames until stopped, on its own thread."""

    frame_ready = Signal(QImage, object, str)  # annotated frame, list[FaceAnnotation], status line
    failed = Signal(str)
    ended = Signal(str)

    def __init__(self, spec: str, processor: FrameProcessor, where: str) -> None:
        super().__init__()
        self.spec = spec
        self.processor = processor
        self.where = where
        self.last_frame: Frame | None = None
        self._stop = False

    def stop(self) -> None:
        self._stop = True
        self.wait(10_000)

    def run(self) -> None:
        try:
            source = VideoSource(self.spec)
        except VideoSourceError as exc:
            self.failed.emit(str(exc))
            return
        shown: collections.deque = collections.deque(maxlen=30)
        latencies: collections.deque = collections.deque(maxlen=100)
        start = time.monotonic()
        try:
            while not self._stop:
                frame = source.read()
                if frame is None:
                    self.ended.emit(f"end of {source.description}")
                    return
                if not source.live:  # a file plays at its own rate, like a camera
                    delay = frame.time_s - (time.monotonic() - start)
                    if delay > 0:
                        time.sleep(delay)
                t0 = time.perf_counter()
                faces = self.processor.process(frame)
                latencies.append((time.perf_counter() - t0) * 1e3)
                self.last_frame = frame
                shown.append(time.monotonic())
                fps = (len(shown) - 1) / (shown[-1] - shown[0]) if len(shown) > 1 and shown[-1] > shown[0] else 0.0
                p95 = float(np.percentile(latencies, 95))
                status = (f"FPS {fps:4.1f} | latency {latencies[-1]:4.0f} ms (p95 {p95:.0f}) | "
                          f"{len(faces)} face(s) | {self.processor.recognizer.network} via {self.where}")
                short = f"FPS {fps:.1f} | {latencies[-1]:.0f} ms | {len(faces)} face(s)"
                image = draw_status(draw_faces(frame.pixels.copy(), faces), [short] if faces else [short, "no face found"])
                self.frame_ready.emit(to_qimage(image), faces, status)
        except VideoSourceError as exc:
            self.failed.emit(str(exc))
        except Exception as exc:  # noqa: BLE001 -- a server error must not kill the window
            self.failed.emit(f"recognition failed: {_one_line(exc)}")
        finally:
            source.close()


class FERWindow(QMainWindow):
    """Main window: the view, a source field, the four buttons and a status line."""

    def __init__(self, recognizer: Recognizer, config: PipelineConfig | None = None, source: str = "0",
                 photos: Path | None = None) -> None:
        super().__init__()
        self.recognizer = recognizer
        self.config = config or PipelineConfig()
        self.photos = photos or Path(os.environ.get("FER_HOME", ".fer")) / "app" / "photos"
        self.worker: CaptureWorker | None = None
        self.last_faces: list[FaceAnnotation] = []
        self.last_message = ""
        self.setWindowTitle("FER - real-time facial expression recognition")

        self.view = QLabel("Open the camera, or select a face image")
        self.view.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.view.setFixedSize(*VIEW_SIZE)
        self.view.setStyleSheet("background: #202020; color: #e0e0e0;")
        self.source_edit = QLineEdit(source)
        self.source_edit.setToolTip("camera index, video file or stream URL")
        self.open_button = QPushButton("Open camera")
        self.image_button = QPushButton("Select a face image")
        self.photo_button = QPushButton("Take a photo and recognise")
        self.close_button = QPushButton("Close camera")
        self.stats_label = QLabel(f"{recognizer.network} via {getattr(recognizer, 'where', '?')}")

        self.open_button.clicked.connect(self.open_camera)
        self.image_button.clicked.connect(self.select_image)
        self.photo_button.clicked.connect(self.take_photo)
        self.close_button.clicked.connect(self.close_camera)

        source_row = QHBoxLayout()
        source_row.addWidget(QLabel("Source:"))
        source_row.addWidget(self.source_edit)
        buttons = QHBoxLayout()
        for b in (self.open_button, self.image_button, self.photo_button, self.close_button):
            buttons.addWidget(b)
        layout = QVBoxLayout()
        layout.addWidget(self.view)
        layout.addLayout(source_row)
        layout.addLayout(buttons)
        layout.addWidget(self.stats_label)
        central = QWidget()
        central.setLayout(layout)
        self.setCentralWidget(central)
        self._set_running(False)

    # -- state ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.worker is not None and self.worker.isRunning()

    def _set_running(self, running: bool) -> None:
        self.open_button.setEnabled(not running)
        self.photo_button.setEnabled(running)
        self.close_button.setEnabled(running)

    def message(self, text: str, error: bool = False) -> None:
        """Show ``text`` in the status bar (errors also on the view when nothing is playing)."""
        self.last_message = text
        self.statusBar().showMessage(text)
        if error:
            print(f"fer app: {text}", file=sys.stderr, flush=True)
            if not self.running:
                self.view.setText(text)

    def _show(self, image: QImage) -> None:
        pixmap = QPixmap.fromImage(image)
        if (pixmap.width(), pixmap.height()) != VIEW_SIZE:
            pixmap = pixmap.scaled(*VIEW_SIZE, Qt.AspectRatioMode.KeepAspectRatio,
                                   Qt.TransformationMode.SmoothTransformation)
        self.view.setPixmap(pixmap)

    # -- the four actions -------------------------------------------------------------------
    def open_camera(self) -> None:
        if self.running:
            return
        spec = self.source_edit.text().strip() or "0"
        self.worker = CaptureWorker(spec, FrameProcessor(self.recognizer, config=self.config),
                                    getattr(self.recognizer, "where", "?"))
        self.worker.frame_ready.connect(self._on_frame)
        self.worker.failed.connect(self._on_failed)
        self.worker.ended.connect(self._on_ended)
        self.worker.finished.connect(lambda: self._set_running(self.running))
        self._set_running(True)
        self.message(f"opening {spec} ...")
        self.worker.start()

    def close_camera(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self._set_running(False)
        self.view.clear()
        self.view.setText("Camera closed")
        self.message("camera closed")

    def select_image(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Select a face image", "", "Images (*.png *.jpg *.jpeg *.bmp)")
        if not path:
            return
        pixels = cv2.imread(path, cv2.IMREAD_COLOR)
        if pixels is None:
            self.message(f"cannot read {path} as an image", error=True)
            return
        if self.running:
            self.close_camera()
        self.recognise_still(pixels, Path(path).name)

    def take_photo(self) -> None:
        frame = self.worker.last_frame if self.worker is not None else None
        if frame is None:
            self.message("no frame yet: open the camera first", error=True)
            return
        self.close_camera()
        self.photos.mkdir(parents=True, exist_ok=True)
        saved = self.photos / f"photo-{time.strftime('%Y%m%d-%H%M%S')}.png"
        cv2.imwrite(str(saved), frame.pixels)
        self.recognise_still(frame.pixels, str(saved))

    def recognise_still(self, bgr: np.ndarray, name: str) -> list[FaceAnnotation]:
        """Recognise one picture (a fresh tracker: a still is not part of the live sequence)."""
        processor = FrameProcessor(self.recognizer, config=self.config)
        try:
            faces = processor.process(Frame(0, 0.0, bgr))
        except Exception as exc:  # noqa: BLE001 -- keep the window alive
            self.message(f"recognition failed: {_one_line(exc)}", error=True)
            return []
        self.last_faces = faces
        lines = [f"{name}: {len(faces)} face(s)"] if faces else [f"{name}: no face found"]
        self._show(to_qimage(draw_status(draw_faces(bgr.copy(), faces), lines)))
        self.message(lines[0], error=not faces)
        return faces

    # -- worker signals ---------------------------------------------------------------------
    def _on_frame(self, image: QImage, faces: list, status: str) -> None:
        if not self.last_message.startswith("playing"):
            self.message(f"playing {self.worker.spec if self.worker else ''}")
        self.last_faces = faces
        self._show(image)
        self.stats_label.setText(status)

    def _on_failed(self, text: str) -> None:
        self._set_running(False)
        self.message(text, error=True)
        self.view.setText(text)

    def _on_ended(self, text: str) -> None:
        self._set_running(False)
        self.message(text)

    def closeEvent(self, event) -> None:  # noqa: N802 -- Qt's name
        if self.worker is not None:
            self.worker.stop()
        super().closeEvent(event)


def run_app(args: argparse.Namespace, recognizer: Recognizer, config: PipelineConfig) -> int:
    """Start the event loop (``fer app``); ``--screenshot`` saves the window after a while and quits."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM")):
        from fer_cli.main import EXIT_USAGE, CommandError

        raise CommandError("fer app needs a display (DISPLAY is not set); on a server use `fer annotate`", EXIT_USAGE)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    from fer_platform.workspace import Workspace

    photos = args.photos or Workspace.load().root / "app" / "photos"  # FER_HOME or the settings file's home
    window = FERWindow(recognizer, config, source=args.source, photos=photos)
    window.show()
    if args.open:
        window.open_camera()
    if args.screenshot is not None:
        def snap() -> None:
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            window.grab().save(str(args.screenshot))
            window.close()
            app.quit()

        QTimer.singleShot(int(args.screenshot_after * 1000), snap)
    return int(app.exec())
