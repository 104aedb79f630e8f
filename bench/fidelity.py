"""Seed fidelity: each changed mechanism before and after, on generated data, quick profiles (not a test).

One run trains every arm on SynthFACS data written in the real on-disk formats and prints one
Markdown table (``--out`` writes it, e.g. ``/tmp/fidelity.md``, pasted into the README) plus a JSON of all numbers:

* ``ca_resnet``: the target-class focal loss (before) vs the method's two-sided form (after);
  metric test accuracy.
* ``ca_resnet_recipe``: the quick recipe (cosine, no smoothing, mild augmentation) vs the method's
  (hold then ×0.9 decay times cosine, label smoothing 0.1, its augmentation) at the same epochs.
* ``ca_resnet_augment``: the method's augmentations one at a time on the quick recipe.
* ``au_cotrain``: class-balanced ``pos_weight`` BCE + |cos| (before) vs the method's per-AU α^k BCE
  + signed cosine (after); metric test mean F1.
* ``au_augment``: the quick augmentation vs the method's ((224/256)² square crop, flip, greyscale
  p 0.1); metric test mean F1.
* ``micro_lsh`` attention: Reformer shared Q/K (before), separate W_Q/W_K with plain hashing (the
  method's letter, the collapse), separate W_Q/W_K with hashing normalised over the frames (after);
  metrics test UF1 and the share of queries with an empty bucket at initialisation and after training.
* ``micro_lsh`` preprocessing: whole frames (before) vs face registration + crop (after); test UF1.
* ``multitask_fer``: encoders in series on the bottom-up path fed appearance + heatmaps (before), on
  the lateral links fed heatmaps only (after), and lateral with appearance concat (the option);
  metrics test accuracy and landmark NME.
* ``c3d_ecstfl``: time interpolation alone (before) vs key frames + interpolation (after); test UAR.
* ``magnifier``: reconstruction MSE on held-out magnified pairs (unseen subjects) of the pre-trained
  magnifier vs identity (output = apex) and linear magnification.

Quick profiles with short schedules on a shared 2-core CPU: the numbers are single seeds on small
generated sets, so small differences are noise; the table says what was run.

Usage: ``python bench/fidelity.py [--only ca_resnet micro ...] [--out /tmp/fidelity.md]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fer_core.data import formats  # noqa: E402
from fer_core.training.tasks import create_task, get_recipe  # noqa: E402
from fer_core.training.trainer import Trainer  # noqa: E402

Row = dict[str, Any]


def _train(network: str, root: Path, run_dir: Path, overrides: dict[str, Any]) -> tuple[Trainer, Any]:
    recipe = get_recipe(network, "quick").with_overrides({"device": "cpu", **overrides})
    task = create_task(network, root, recipe)
    trainer = Trainer(recipe, task, run_dir)
    result = trainer.fit()
    return trainer, result


def _metric(result: Any, name: str) -> str:
    """``split name value`` of the final split (test, or val when the data has no test rows)."""
    for split in ("test", "val"):
        value = result.test_metrics.get(f"{split}/{name}")
        if value is not None:
            return f"{split} {name} {value:.3f}"
    return f"{name} n/a"


def _dataset(fmt: str, folder: Path, **kwargs: Any) -> Path:
    src = formats.get_format(fmt).write_synthetic(folder / "src", **kwargs)
    formats.adapt(fmt, src, folder / "prepared", name=f"{fmt}-fidelity")
    return folder / "prepared"


def bench_ca_resnet(tmp: Path, args) -> list[Row]:
    root = _dataset("fer2013", tmp / "fer", seed=0, size=args.static_size, num_subjects=16)
    rows = []
    for arm, loss in (("before: target-class focal, mean", {"form": "target", "gamma": 2.0}),
                      ("after: method focal (α 0.25, γ 2), summed", {"form": "method", "gamma": 2.0, "alpha": 0.25})):
        _, result = _train("ca_resnet", root, tmp / f"ca-{len(rows)}", {"loss_kwargs": loss, "epochs": args.epochs})
        rows.append({"mechanism": "CA-ResNet focal loss", "arm": arm,
                     "metric": _metric(result, "accuracy")})
    return rows


def bench_ca_resnet_recipe(tmp: Path, args) -> list[Row]:
    """The quick recipe against the method's schedule, smoothing and augmentation at the same length,
    each alone and all three (the 50-epoch hold scaled to a third of the epochs: a short run has
    nothing to hold for 50)."""
    root = _dataset("fer2013", tmp / "fer", seed=0, size=args.static_size, num_subjects=16)
    paper = get_recipe("ca_resnet", "paper")
    quick = get_recipe("ca_resnet", "quick")
    schedule = {"scheduler": paper.scheduler, "gamma": paper.gamma, "step_size": max(1, args.epochs // 3)}
    smoothing = {"loss_kwargs": {**quick.loss_kwargs, "label_smoothing": paper.loss_kwargs["label_smoothing"]}}
    augment = {"augment": dict(paper.augment)}
    arms = (("quick: cosine, no smoothing, mild augmentation", {}),
            ("+ the method's schedule: hold, then x0.9 decay times cosine", schedule),
            ("+ the method's label smoothing 0.1", smoothing),
            ("+ the method's augmentation (v-flip, 30-90 deg rotation, 50-100 % crops, erasing p 0.5)", augment),
            ("all three: the method's recipe at this length", {**schedule, **smoothing, **augment}))
    rows = []
    for arm, overrides in arms:
        _, result = _train("ca_resnet", root, tmp / f"car-{len(rows)}", {**overrides, "epochs": args.epochs})
        rows.append({"mechanism": "CA-ResNet schedule, smoothing, augmentation", "arm": arm,
                     "metric": _metric(result, "accuracy")})
    return rows


def bench_ca_resnet_augment(tmp: Path, args) -> list[Row]:
    """The method's augmentations one at a time on the quick recipe: which one a short run pays for."""
    root = _dataset("fer2013", tmp / "fer", seed=0, size=args.static_size, num_subjects=16)
    quick = dict(get_recipe("ca_resnet", "quick").augment)
    paper = dict(get_recipe("ca_resnet", "paper").augment)
    arms = (("quick augmentation", quick),
            ("+ vertical flip p 0.5", {**quick, "vflip": True}),
            ("+ rotation 30-90 deg p 0.5", {**quick, "rotation_deg": 0.0, "rotation_range": paper["rotation_range"],
                                            "rotation_prob": paper["rotation_prob"]}),
            ("+ crops of 50-100 %", {**quick, "crop_area": paper["crop_area"]}),
            ("+ erasing p 0.5", {**quick, "erase_prob": paper["erase_prob"]}),
            ("+ gamma 2 p 0.5", {**quick, "gamma_max": 1.0, "gamma": paper["gamma"], "gamma_prob": paper["gamma_prob"]}),
            ("the method's augmentation without its vertical flip", {**paper, "vflip": False}))
    rows = []
    for arm, augment in arms:
        _, result = _train("ca_resnet", root, tmp / f"cag-{len(rows)}", {"augment": augment, "epochs": args.epochs})
        rows.append({"mechanism": "CA-ResNet augmentation, one at a time", "arm": arm,
                     "metric": _metric(result, "accuracy")})
    return rows


def bench_au_augment(tmp: Path, args) -> list[Row]:
    """The quick augmentation against the method's (a square (224/256)^2 crop, flip, greyscale p 0.1);
    face alignment stays off in both: the generated faces are centred crops already."""
    root = _dataset("au_table", tmp / "au", seed=0, size=args.au_size, image_size=40, flip_rate=0.3)
    rows = []
    for arm, augment in (("quick: crops of 90-100 %, flip, gamma", None),
                         ("the method's: (224/256)^2 square crop, flip, greyscale p 0.1",
                          dict(get_recipe("au_cotrain", "paper").augment))):
        overrides = {"epochs": args.epochs, **({"augment": augment} if augment else {})}
        _, result = _train("au_cotrain", root, tmp / f"aua-{len(rows)}", overrides)
        rows.append({"mechanism": "AU co-training augmentation", "arm": arm, "metric": _metric(result, "mean_f1")})
    return rows


def bench_au(tmp: Path, args) -> list[Row]:
    root = _dataset("au_table", tmp / "au", seed=0, size=args.au_size, image_size=40, flip_rate=0.3)
    rows = []
    for arm, loss in (("before: pos_weight BCE, |cos|", {"bce": "pos_weight", "orthogonality": "abs"}),
                      ("after: per-AU α^k BCE, signed cos", {"bce": "au_weighted", "orthogonality": "signed"})):
        _, result = _train("au_cotrain", root, tmp / f"au-{len(rows)}", {"loss_kwargs": loss, "epochs": args.epochs})
        rows.append({"mechanism": "AU co-training loss", "arm": arm,
                     "metric": _metric(result, "mean_f1")})
    return rows


def _empty_share(trainer: Trainer, split: str = "test") -> float:
    model = trainer.model.eval()
    ds = trainer.datasets[split]
    x = torch.stack([ds[i][0] for i in range(min(len(ds), 64))])
    with torch.no_grad():
        return model.attention.empty_bucket_share(model.frame_features(x))


def bench_micro(tmp: Path, args) -> list[Row]:
    root = _dataset("casme2", tmp / "casme2", seed=1, size=args.micro_size, image_size=64, num_frames=6,
                    num_subjects=8)
    rows = []
    arms = (
        ("before: shared W_Q = W_K (Reformer)",
         {"model_kwargs.shared_qk": True, "model_kwargs.hash_norm": "none", "model_kwargs.n_hashes": 1}),
        ("separate W_Q, W_K, plain hashing",
         {"model_kwargs.shared_qk": False, "model_kwargs.hash_norm": "none", "model_kwargs.n_hashes": 1}),
        ("separate W_Q, W_K, hashing normalised over frames, 1 round",
         {"model_kwargs.shared_qk": False, "model_kwargs.hash_norm": "frames", "model_kwargs.n_hashes": 1}),
        ("separate W_Q, W_K, plain hashing, 8 hash rounds",
         {"model_kwargs.shared_qk": False, "model_kwargs.hash_norm": "none", "model_kwargs.n_hashes": 8}),
        ("after: separate W_Q, W_K, normalised hashing, 4 hash rounds (default)",
         {"model_kwargs.shared_qk": False, "model_kwargs.hash_norm": "frames", "model_kwargs.n_hashes": 4}),
    )
    for arm, overrides in arms:
        recipe = get_recipe("micro_lsh", "quick").with_overrides(
            {"device": "cpu", "epochs": args.epochs, "data.face_crop": True, **overrides})
        task = create_task("micro_lsh", root, recipe)
        trainer = Trainer(recipe, task, tmp / f"micro-{len(rows)}")
        at_init = _empty_share(trainer)
        result = trainer.fit()
        frames = recipe.model_kwargs.get("num_mag_frames", 32)
        rows.append({"mechanism": f"micro_lsh LSH attention ({frames} magnified frames)", "arm": arm,
                     "metric": f"{_metric(result, 'uf1')}; empty-bucket queries "
                               f"{at_init:.0%} at init → {_empty_share(trainer):.0%} trained"})
    for arm, crop in (("before: whole frames resized", False), ("after: face registration + crop", True)):
        _, result = _train("micro_lsh", root, tmp / f"micro-crop-{crop}",
                           {"epochs": args.epochs, "data.face_crop": crop})
        rows.append({"mechanism": "micro_lsh preprocessing", "arm": arm,
                     "metric": _metric(result, "uf1")})
    return rows


def bench_multitask(tmp: Path, args) -> list[Row]:
    root = tmp / "affectnet" / "prepared"
    src = formats.get_format("affectnet").write_synthetic(tmp / "affectnet" / "src", seed=0, size=args.multitask_size,
                                                          image_size=64, num_subjects=16, difficulty=0.3)
    formats.adapt("affectnet", src, root, name="affectnet-fidelity")
    rows = []
    arms = (
        ("before: encoders in series bottom-up, appearance + heatmaps",
         {"model_kwargs.encoder_placement": "bottom_up", "model_kwargs.pyramid_input": "heatmaps+features"}),
        ("after: encoder per lateral link, heatmaps",
         {"model_kwargs.encoder_placement": "lateral", "model_kwargs.pyramid_input": "heatmaps"}),
        ("option: lateral, appearance + heatmaps",
         {"model_kwargs.encoder_placement": "lateral", "model_kwargs.pyramid_input": "heatmaps+features"}),
    )
    for arm, overrides in arms:
        _, result = _train("multitask_fer", root, tmp / f"mt-{len(rows)}", {"epochs": args.epochs, **overrides})
        rows.append({"mechanism": "multitask FPN", "arm": arm,
                     "metric": f"{_metric(result, 'accuracy')}; {_metric(result, 'nme')}"})
    return rows


def bench_dynamic(tmp: Path, args) -> list[Row]:
    src = formats.get_format("dfew").write_synthetic(tmp / "dfew" / "src", seed=0, size=args.dynamic_size,
                                                     image_size=32, num_frames=12, num_subjects=16)
    formats.adapt("dfew", src, tmp / "dfew" / "prepared", name="dfew-fidelity", fold=1)
    rows = []
    for arm, method in (("before: time interpolation", "interpolate"),
                        ("after: key frames + interpolation", "keyframes+interpolate")):
        _, result = _train("c3d_ecstfl", tmp / "dfew" / "prepared", tmp / f"dyn-{method}",
                           {"epochs": args.epochs, "data.resample": method})
        rows.append({"mechanism": "C3D fixed length (12 → 8 frames)", "arm": arm,
                     "metric": _metric(result, "uar")})
    return rows


def bench_magnifier(tmp: Path, args) -> list[Row]:
    src = formats.get_format("magnified_pairs").write_synthetic(tmp / "pairs" / "src", seed=3, size=args.pairs_size,
                                                                image_size=32, num_subjects=10)
    formats.adapt("magnified_pairs", src, tmp / "pairs" / "prepared", name="pairs-fidelity")
    _, result = _train("magnifier", tmp / "pairs" / "prepared", tmp / "mag", {"epochs": args.epochs})
    m = result.test_metrics
    return [{"mechanism": "magnifier pre-training (held-out subjects)", "arm": arm, "metric": f"MSE {value:.5f}"}
            for arm, value in (("identity (output = apex)", m["test/mse_identity"]),
                               ("linear onset + (1+α)(apex − onset)", m["test/mse_linear"]),
                               ("learned magnifier, pre-trained", m["test/mse"]))]


BENCHES: dict[str, Callable[[Path, Any], list[Row]]] = {
    "ca_resnet": bench_ca_resnet, "ca_resnet_recipe": bench_ca_resnet_recipe,
    "ca_resnet_augment": bench_ca_resnet_augment, "au": bench_au,
    "au_augment": bench_au_augment, "micro": bench_micro, "multitask": bench_multitask,
    "dynamic": bench_dynamic, "magnifier": bench_magnifier,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=sorted(BENCHES))
    parser.add_argument("--epochs", type=int, default=8, help="epochs per arm (quick profiles' step caps stay)")
    parser.add_argument("--static-size", type=int, default=700)
    parser.add_argument("--au-size", type=int, default=400)
    parser.add_argument("--micro-size", type=int, default=200)
    parser.add_argument("--multitask-size", type=int, default=500)
    parser.add_argument("--dynamic-size", type=int, default=240)
    parser.add_argument("--pairs-size", type=int, default=240)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime before: {uptime}", flush=True)
    rows: list[Row] = []
    timings = {}
    with tempfile.TemporaryDirectory(prefix="fer-fidelity-") as folder:
        for name in args.only:
            start = time.perf_counter()
            new = BENCHES[name](Path(folder) / name, args)
            timings[name] = time.perf_counter() - start
            for row in new:
                print(f"{row['mechanism']:48s} | {row['arm']:60s} | {row['metric']}", flush=True)
            rows.extend(new)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = ["| Mechanism | Arm | Metric (generated data, quick profile) |", "|---|---|---|"]
    lines += [f"| {r['mechanism']} | {r['arm']} | {r['metric']} |" for r in rows]
    lines += ["", f"`python bench/fidelity.py --epochs {args.epochs}` (torch threads {args.threads}, "
              f"{os.cpu_count()} CPUs shared); wall time per block: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
              + f". Load: before `{uptime}`; after `{uptime_after}`."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "timings_s": timings, "uptime": [uptime, uptime_after]},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
