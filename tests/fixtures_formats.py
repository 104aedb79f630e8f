"""Tiny hand-written datasets in the real on-disk layouts (no generator involved), so the adapters'
tests pin the layouts themselves: file names, sheet columns, numbering conventions."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

FERPLUS_HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"


def write_image(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    assert cv2.imwrite(str(path), image), path


def random_rgb(rng: np.random.Generator, size: int = 16) -> np.ndarray:
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def smooth_frames(rng: np.random.Generator, count: int, peak: int, size: int = 32) -> np.ndarray:
    """A clip that rises from a neutral frame 0 to ``peak`` and relaxes part-way (smooth, so JPEG
    keeps it): frame ``peak`` is the one that differs most from frame 0."""
    base = np.tile(np.linspace(40, 200, size, dtype=np.float64), (size, 1))
    frames = []
    for t in range(count):
        if t <= peak:
            strength = 60.0 * t / max(peak, 1)
        else:
            strength = 60.0 * (1.0 - 0.7 * (t - peak) / max(count - 1 - peak, 1))
        frame = base.copy()
        frame[size // 4 : size // 2, size // 4 : 3 * size // 4] += strength
        frames.append(np.clip(np.stack([frame] * 3, axis=-1), 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_fer2013_csv(path: Path, emotions: list[int], usages: list[str], pixels: np.ndarray) -> None:
    """Kaggle layout; ``pixels`` (N, 48, 48) uint8."""
    lines = ["emotion,pixels,Usage"]
    for emotion, usage, image in zip(emotions, usages, pixels):
        lines.append(f"{emotion},{' '.join(str(v) for v in image.reshape(-1))},{usage}")
    data = ("\n".join(lines) + "\n").encode()
    if path.suffix == ".gz":
        import gzip

        data = gzip.compress(data)
    path.write_bytes(data)


def write_ferplus_csv(path: Path, rows: list[tuple[str, str, list[int]]]) -> None:
    """FER+ layout: (Usage, Image name, 10 votes) per row."""
    lines = [FERPLUS_HEADER] + [f"{u},{n},{','.join(map(str, v))}" for u, n, v in rows]
    path.write_text("\n".join(lines) + "\n")


def write_casme2(root: Path, rng: np.random.Generator, sheet_suffix: str = ".csv") -> dict[str, np.ndarray]:
    """CASME II: CASME2-RAW/subNN/EPxx/imgK.jpg + CASME2-coding sheet; returns clip -> frames."""
    clips = {
        ("01", "EP02_01f", 46, "happiness"): smooth_frames(rng, 5, 2),
        ("01", "EP03_02", 10, "repression"): smooth_frames(rng, 6, 3),
        ("2", "EP01_11f", 97, "fear"): smooth_frames(rng, 4, 1),
    }
    records, written = [], {}
    for (subject, name, start, emotion), frames in clips.items():
        folder = root / "CASME2-RAW" / f"sub{int(subject):02d}" / name
        for t, frame in enumerate(frames):
            write_image(folder / f"img{start + t}.jpg", frame)
        written[f"sub{int(subject):02d}/{name}"] = frames
        records.append(
            {
                "Subject": subject,
                "Filename": name,
                "OnsetFrame": start,
                # The real sheet has "/" for a few unknown apexes.
                "ApexFrame": "/" if name == "EP03_02" else start + 2,
                "OffsetFrame": start + len(frames) - 1,
                "Action Units": "12",
                "Estimated Emotion": emotion,
            }
        )
    records.append(  # listed in the sheet, frames missing on disk
        {"Subject": "02", "Filename": "EP09_09", "OnsetFrame": 1, "ApexFrame": 2, "OffsetFrame": 3,
         "Action Units": "4", "Estimated Emotion": "disgust"}
    )
    sheet = root / f"CASME2-coding-20140508{sheet_suffix}"
    if sheet_suffix == ".csv":
        pd.DataFrame(records).to_csv(sheet, index=False)
    else:
        pd.DataFrame(records).to_excel(sheet, index=False)
    return written


def write_samm(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """SAMM: SAMM/006/006_1_2/006_05562.jpg + xlsx with title rows above the header."""
    frames = smooth_frames(rng, 5, 3)
    folder = root / "SAMM" / "006" / "006_1_2"
    for t, frame in enumerate(frames):
        write_image(folder / f"006_{5562 + t:05d}.jpg", frame)
    table = pd.DataFrame(
        [
            {"Subject": 6, "Filename": "006_1_2", "Inducement Code": 1, "Onset Frame": 5562,
             "Apex Frame": 5565, "Offset Frame": 5566, "Duration": 5, "Type": "Micro - 1/2",
             "Action Units": "R12", "Notes": "", "Estimated Emotion": "Contempt"},
        ]
    )
    with pd.ExcelWriter(root / "SAMM_Micro_FACS_Codes_v2.xlsx") as writer:
        table.to_excel(writer, index=False, startrow=12, sheet_name="FACS")
        writer.sheets["FACS"].cell(row=1, column=1, value="SAMM Micro-FACS Codes")
    return {"006/006_1_2": frames}


def write_smic(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, int]]:
    """SMIC-HS: HS/sN/micro/<class>/<clip>/imageK.bmp; returns clip -> (frames, true apex)."""
    written = {}
    for subject, cls, clip, peak in (("s1", "negative", "s1_ne_01", 3), ("s2", "surprise", "s2_sur_01", 1)):
        frames = smooth_frames(rng, 6, peak)
        for t, frame in enumerate(frames):
            write_image(root / "HS" / subject / "micro" / cls / clip / f"image{106330 + t}.bmp", frame)
        written[f"{subject}/{clip}"] = (frames, peak)
    (root / "HS" / "s1" / "non_micro").mkdir(parents=True)  # real tree has it; the adapter skips it
    return written


def write_dfew(root: Path, rng: np.random.Generator, videos: bool = False) -> dict[str, tuple[np.ndarray, int]]:
    """DFEW: Clip/clip_224x224/NNNNN/NNNNN.jpg (or Clip/original/NNNNN.mp4) + EmoLabel_DataSplit.

    Clip i (1-based) gets DFEW label i and is a test clip of fold (i - 1) % 5 + 1.
    """
    written = {}
    for i in range(1, 8):
        video = f"{i:05d}"
        frames = smooth_frames(rng, 4, 2)
        if videos:
            path = root / "Clip" / "original" / f"{video}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, frames.shape[2:0:-1])
            for frame in frames:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            writer.release()
        else:
            for t, frame in enumerate(frames):
                write_image(root / "Clip" / "clip_224x224" / video / f"{t + 1:05d}.jpg", frame)
        written[video] = (frames, i)
    for k in range(1, 6):
        test = [(i, i) for i in range(1, 8) if (i - 1) % 5 + 1 == k]
        train = [(i, i) for i in range(1, 8) if (i - 1) % 5 + 1 != k]
        for kind, rows in (("test(single-labeled)", test), ("train(single-labeled)", train)):
            folder = root / "EmoLabel_DataSplit" / kind
            folder.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows, columns=["video_name", "label"]).to_csv(folder / f"set_{k}.csv", index=False)
    return written
