"""Action-unit detection with accurate, inaccurate and unlabelled images: the ``au_cotrain`` network.

Data: an ``au`` prepared dataset (:mod:`fer_core.data.formats.au_table`); each row's ``aus`` list
holds 1 / 0 / -1 (unknown) per AU of the card's ``au_names`` and ``label_set`` says how far to trust
it. Targets per row (all (L,) in {0, 1, -1} plus (,) row masks, see
:class:`~fer_core.losses.au_cotrain.AUCoTrainLoss`):

* ``clean`` rows -> ``accurate`` (clean heads), ``noisy`` rows -> ``inaccurate`` (noisy prediction
  ``sigmoid(f_clean + f_noisy)``), ``unlabelled`` rows -> neither: they train the consistency term
  and, when semi-supervised, the pseudo-label term.
* ``labels`` (the row's ``aus``), ``true_aus`` (the generator's truth where the manifest has it, else
  -1) and ``label_set`` (0 clean, 1 noisy, 2 unlabelled) are for the metrics only.

Semi-supervised (``loss_kwargs.semi_supervised: true``): pseudo labels for the unlabelled training
rows come from :func:`~fer_core.models.au_cotrain.pseudo_labels` (mean of the two clean heads, eval
mode, confident AUs only: ``pseudo_threshold``, default 0.9). They are refreshed once per epoch: the
trainer calls the training set's ``set_epoch(e)`` before each epoch, and from epoch
``pseudo_start_epoch`` (default 1: a fresh network's guesses are noise) the dataset recomputes them
from the current weights, i.e. the weights at the end of epoch e-1, on un-augmented images. A
resumed run recomputes them from its restored checkpoint, so it replays what the original would
have seen.

Splits: the manifest's ``val``/``test`` rows when it has them; otherwise ``data.val_fraction`` of the
clean rows and of the noisy rows (drawn separately with ``recipe.seed``) form val, and unlabelled
rows all stay in train. Label frequencies of the per-AU weighted BCE come from the training rows
(``loss_kwargs.label_frequencies: train``, add-one smoothed per AU) or from each batch (``batch``).
``loss_kwargs.bce`` ("au_weighted", the method's α^k on the whole term, default | "pos_weight") and
``loss_kwargs.orthogonality`` ("signed", the method's, default | "abs") pick the loss forms
(:mod:`fer_core.losses.au_cotrain`).

Metrics on labelled evaluation rows, clean-head inference (mean of the two clean logits, sigmoid >=
the model's threshold):

* ``mean_f1`` and ``f1/<AU>``: against the accurate labels of the ``clean`` rows (all labelled rows
  when the split has no clean row) -- the primary metric, monitored as ``val/mean_f1`` (max);
* ``mean_f1_noisy_labels`` and ``f1_noisy_labels/<AU>``: against the inaccurate labels of ``noisy`` rows;
* ``mean_f1_truth`` and ``f1_truth/<AU>``: against ``true_aus`` where the manifest has it (synthetic
  data keeps the truth of the noisy rows aside for exactly this).

Profiles: ``paper`` = the model defaults (two ResNet-34 views, 3x224x224) with Adam (lr 1e-4,
batch 64; the description gives no optimiser settings); ``quick`` = tiny views (one block per
stage, width 8, 40 px, small stem) for CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch

from fer_core.data.manifest import read_card, read_manifest
from fer_core.data.pipeline import InputPipeline, prepare_pixels
from fer_core.data.samples import read_image
from fer_core.data.transforms import AugmentConfig
from fer_core.losses.au_cotrain import AUCoTrainLoss
from fer_core.metrics.classification import multilabel_f1
from fer_core.models import create_model
from fer_core.models.au_cotrain import pseudo_labels
from fer_core.training.datasets import ManifestDataset
from fer_core.training.recipe import Recipe
from fer_core.training.tasks import TaskKind, register_task_kind

LABEL_SET_CODES = {"clean": 0, "noisy": 1, "unlabelled": 2}


@dataclass(frozen=True)
class AUData:
    """``data.*`` of the AU kind."""

    val_fraction: float = 0.15  # of the clean and of the noisy rows, when the manifest has no "val" split
    # Detect the face and align it on the eyes before resizing (training and serving alike: the
    # model package's input pipeline). The method crops on 5 landmarks; Haar + eyes gives 2 of them.
    align_faces: bool = False
LOSS_WEIGHT_KEYS = ("clean_weight", "noisy_weight", "pseudo_weight", "orthogonality_weight", "consistency_weight")
LOSS_OPTION_KEYS = ("semi_supervised", "pseudo_threshold", "pseudo_start_epoch", "label_frequencies", "bce",
                    "orthogonality")


def au_row(value: Any, num_aus: int) -> np.ndarray:
    """One manifest AU list (None / NaN = unknown row) -> int64 (L,) with -1 for unknown."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.full(num_aus, -1, dtype=np.int64)
    row = np.array(value, dtype=np.int64)  # a writable copy (Parquet lists are read-only)
    if row.shape != (num_aus,):
        raise ValueError(f"an AU list holds {row.size} values, expected {num_aus}")
    return row


def au_matrix(values: pd.Series, num_aus: int) -> np.ndarray:
    """A column of AU lists -> int64 (N, L), -1 for unknown."""
    if len(values) == 0:
        return np.empty((0, num_aus), dtype=np.int64)
    return np.stack([au_row(v, num_aus) for v in values])


def smoothed_frequencies(labels: np.ndarray) -> np.ndarray | None:
    """Per-AU positive frequency ``(n_pos + 1) / (n_known + 2)`` of 0/1/-1 labels; None without rows."""
    if len(labels) == 0:
        return None
    known = labels >= 0
    return ((labels == 1).sum(0) + 1.0) / (known.sum(0) + 2.0)


@dataclass(frozen=True)
class AUCoTrainOptions:
    """``loss_kwargs.*`` of the au kind; an unset weight keeps :class:`AUCoTrainLoss`'s default."""

    clean_weight: float | None = None
    noisy_weight: float | None = None
    pseudo_weight: float | None = None
    orthogonality_weight: float | None = None
    consistency_weight: float | None = None
    semi_supervised: bool = False
    pseudo_threshold: float = 0.9
    pseudo_start_epoch: int = 1
    label_frequencies: str = "train"  # "train" (whole train split) or "batch"
    bce: str = "au_weighted"  # the BCE form of AUCoTrainLoss
    orthogonality: str = "signed"  # the orthogonality form of AUCoTrainLoss


class AUDataset(ManifestDataset):
    """Manifest rows -> ``(image, AU targets)``, with optional per-epoch pseudo labels."""

    def __init__(self, *args: Any, pseudo_refresh: Callable[["AUDataset", int], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pseudo_refresh = pseudo_refresh
        self.pseudo: np.ndarray | None = None  # int64 (N, L) when semi-supervised

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.pseudo_refresh is not None:
            self.pseudo_refresh(self, epoch)

    def clean_input(self, i: int) -> torch.Tensor:
        """Row ``i`` normalised, without augmentation (what inference sees)."""
        x = torch.from_numpy(np.ascontiguousarray(self.pixels(i))).float() / 255.0
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x - mean) / std

    def __getitem__(self, i: int):
        x, targets = super().__getitem__(i)
        if self.pseudo is not None:
            targets["pseudo"] = torch.from_numpy(self.pseudo[i])
            targets["has_pseudo"] = torch.tensor(bool((self.pseudo[i] >= 0).any()))
        return x, targets


class AUCoTrainTask:
    """Multi-label AU detection from clean, noisy and unlabelled images."""

    primary_metric = "mean_f1"

    def __init__(self, root: Path, recipe: Recipe, name: str = "au_cotrain") -> None:
        self.name, self.root, self.recipe = name, Path(root), recipe
        card = read_card(root)
        if not card.au_names:
            raise ValueError(f"{root}: the dataset card names no AUs")
        self.au_names = tuple(card.au_names)
        manifest = read_manifest(root)
        if "aus" not in manifest.columns:
            raise ValueError(f"{root}: the manifest has no 'aus' column")
        if "label_set" not in manifest.columns:
            manifest = manifest.assign(label_set="clean")
        unknown_sets = sorted(set(manifest["label_set"]) - set(LABEL_SET_CODES))
        if unknown_sets:
            raise ValueError(f"{root}: unknown label_set values {unknown_sets}; expected {sorted(LABEL_SET_CODES)}")
        self.manifest = manifest.reset_index(drop=True)
        self.options = self._loss_options(recipe)
        probe = create_model(recipe.network, **{**recipe.model_kwargs, **self.model_overrides()})
        self.meta = probe.metadata
        self.threshold = float(self.meta.extra.get("threshold", 0.5))
        self._model = None  # the trained model, captured in build_loss (pseudo labels need it)
        self._splits: dict[str, pd.DataFrame] | None = None

    @staticmethod
    def _loss_options(recipe: Recipe) -> dict[str, Any]:
        opts = AUCoTrainOptions(**recipe.loss_kwargs)  # keys and types were checked by the recipe
        options = {"semi_supervised": opts.semi_supervised, "pseudo_threshold": opts.pseudo_threshold,
                   "pseudo_start_epoch": opts.pseudo_start_epoch, "label_frequencies": opts.label_frequencies,
                   "forms": {"bce": opts.bce, "orthogonality": opts.orthogonality},
                   "weights": {k: getattr(opts, k) for k in LOSS_WEIGHT_KEYS if getattr(opts, k) is not None}}
        if options["label_frequencies"] not in ("train", "batch"):
            raise ValueError(f"loss_kwargs.label_frequencies must be 'train' or 'batch', got {options['label_frequencies']!r}")
        if not 0.5 <= options["pseudo_threshold"] <= 1.0:
            raise ValueError(f"loss_kwargs.pseudo_threshold must lie in [0.5, 1], got {options['pseudo_threshold']}")
        return options

    def model_overrides(self) -> dict[str, Any]:
        return {"num_aus": len(self.au_names), "au_names": list(self.au_names)}

    # -- data -------------------------------------------------------------------------------
    def _decode(self, root: Path, row: pd.Series) -> np.ndarray:
        image = read_image(root, row["path"])
        # The package's input-pipeline spec is the one source of this decode (serving interprets it too).
        return prepare_pixels([image], self.input_pipeline()).pixels

    def input_pipeline(self) -> InputPipeline:
        """The input-pipeline spec this task decodes with (the model package records it)."""
        return InputPipeline.for_model(self.meta, self.recipe.data)

    def _targets(self, row: pd.Series) -> dict[str, Any]:
        num_aus = len(self.au_names)
        labels, truth = au_row(row["aus"], num_aus), au_row(row.get("true_aus"), num_aus)
        unknown = np.full(num_aus, -1, dtype=np.int64)
        label_set = str(row["label_set"])
        return {
            "accurate": labels if label_set == "clean" else unknown,
            "has_accurate": label_set == "clean",
            "inaccurate": labels if label_set == "noisy" else unknown,
            "has_inaccurate": label_set == "noisy",
            "labels": labels, "true_aus": truth, "label_set": LABEL_SET_CODES[label_set],
        }

    def splits(self, recipe: Recipe) -> dict[str, pd.DataFrame]:
        """Rows per split (module docstring); the same for the same recipe seed."""
        manifest = self.manifest
        out = {s: manifest[manifest["split"] == s] for s in ("train", "val", "test")}
        val_fraction = AUData(**recipe.data).val_fraction
        if len(out["val"]) == 0 and val_fraction > 0:
            rng = np.random.default_rng(recipe.seed)
            train = out["train"]
            val_idx: list[int] = []
            for label_set in ("clean", "noisy"):
                pool = train.index[train["label_set"] == label_set].to_numpy()
                k = int(round(len(pool) * val_fraction))
                if k and len(pool) > 1:
                    val_idx.extend(rng.choice(pool, size=min(k, len(pool) - 1), replace=False).tolist())
            out["val"] = train.loc[sorted(val_idx)]
            out["train"] = train.drop(index=val_idx)
        return out

    def build_datasets(self, recipe: Recipe) -> dict[str, AUDataset]:
        self._splits = self.splits(recipe)
        aug = AugmentConfig.from_mapping(recipe.augment) if recipe.augment else None  # {} = off
        datasets = {}
        for split, rows in self._splits.items():
            refresh = self._refresh_pseudo_labels if split == "train" and self.options["semi_supervised"] else None
            ds = AUDataset(self.root, rows, self._decode, self._targets, self.meta.mean, self.meta.std,
                           augment_cfg=aug if split == "train" else None, seed=recipe.seed, pseudo_refresh=refresh)
            if refresh is not None:
                ds.pseudo = np.full((len(rows), len(self.au_names)), -1, dtype=np.int64)
            datasets[split] = ds
        return datasets

    def images(self, rows: pd.DataFrame) -> torch.Tensor:
        """Normalised, un-augmented model inputs (N, C, H, W) of ``rows`` (e.g. for label refinement)."""
        ds = AUDataset(self.root, rows, self._decode, self._targets, self.meta.mean, self.meta.std)
        if len(ds) == 0:
            return torch.empty(0, *self.meta.input.shape)
        return torch.stack([ds.clean_input(i) for i in range(len(ds))])

    def _refresh_pseudo_labels(self, ds: AUDataset, epoch: int) -> None:
        """Pseudo labels of the unlabelled rows of ``ds`` from the current model (module docstring)."""
        ds.pseudo = np.full((len(ds), len(self.au_names)), -1, dtype=np.int64)
        if self._model is None or epoch < self.options["pseudo_start_epoch"]:
            return
        rows = np.flatnonzero((ds.rows["label_set"] == "unlabelled").to_numpy())
        if len(rows) == 0:
            return
        device = next(self._model.parameters()).device
        images = torch.stack([ds.clean_input(int(i)) for i in rows]).to(device)
        labels = pseudo_labels(self._model, images, self.options["pseudo_threshold"], self.recipe.eval_batch_size)
        ds.pseudo[rows] = labels.cpu().numpy()

    # -- loss -------------------------------------------------------------------------------
    def build_loss(self, recipe: Recipe, model):
        self._model = model
        frequencies: dict[str, Any] = {}
        if self.options["label_frequencies"] == "train":
            train = (self._splits or self.splits(recipe))["train"]
            for key, label_set in (("accurate", "clean"), ("inaccurate", "noisy")):
                rows = train[train["label_set"] == label_set]
                freq = smoothed_frequencies(au_matrix(rows["aus"], len(self.au_names)))
                if freq is not None:
                    frequencies[f"{key}_label_frequencies"] = freq.tolist()
        criterion = AUCoTrainLoss(**self.options["weights"], **self.options["forms"], **frequencies).to(next(model.parameters()).device)

        def loss(outputs, targets):
            parts = criterion.loss_parts(outputs, targets)
            total = sum(criterion.weights[name] * value for name, value in parts.items())
            return total, {name: value.detach() for name, value in parts.items()}

        return loss

    # -- metrics ----------------------------------------------------------------------------
    def predictions(self, outputs: Mapping[str, torch.Tensor]) -> np.ndarray:
        """0/1 (N, L) clean-head predictions: sigmoid(mean clean logit) >= threshold."""
        return (torch.sigmoid(outputs["au_logits"].float()) >= self.threshold).to(torch.int64).numpy()

    def compute_metrics(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> dict[str, float]:
        pred = self.predictions(outputs)
        labels, truth = targets["labels"].numpy(), targets["true_aus"].numpy()
        label_set = targets["label_set"].numpy()
        metrics: dict[str, float] = {}
        clean = label_set == LABEL_SET_CODES["clean"]
        labelled = (labels >= 0).any(1)
        primary = clean if clean.any() else labelled
        if primary.any():
            metrics.update(multilabel_f1(labels[primary], pred[primary], self.au_names))
        for suffix, rows, reference in (
            ("noisy_labels", label_set == LABEL_SET_CODES["noisy"], labels),
            ("truth", (truth >= 0).any(1), truth),
        ):
            if rows.any():
                f1 = multilabel_f1(reference[rows], pred[rows], self.au_names)
                metrics[f"mean_f1_{suffix}"] = f1.pop("mean_f1")
                metrics.update({k.replace("f1/", f"f1_{suffix}/", 1): v for k, v in f1.items()})
        return metrics

    def report(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        metrics = self.compute_metrics(outputs, targets)
        labels = targets["labels"].numpy()
        per_au = {}
        for j, name in enumerate(self.au_names):
            per_au[name] = {key: metrics[f"{prefix}/{name}"] for key, prefix in
                            (("f1", "f1"), ("f1_noisy_labels", "f1_noisy_labels"), ("f1_truth", "f1_truth"))
                            if f"{prefix}/{name}" in metrics}
            per_au[name]["positives"] = int((labels[:, j] == 1).sum())
        return {"labels": list(self.au_names), "threshold": self.threshold, "per_au": per_au,
                **{k: v for k, v in metrics.items() if k.startswith("mean_f1")}}


register_task_kind(TaskKind(
    name="au", data_task="au", build=AUCoTrainTask,
    data_options=AUData, loss_options=AUCoTrainOptions, augment_options=AugmentConfig,
))
