"""Scoring a network's predictions on a labelled test set whose classes may differ from its own.

A cross-dataset test set (CK+48 for a FER2013 network) often holds a subset of the network's classes
(no neutral) and sometimes classes the network does not know (``contempt`` kept as ``unknown``).
Choice recorded here: rows whose true class is not one of the network's are *unscored*: they are
counted and their predictions tallied, but kept out of every metric, because no prediction can be
right for them. UAR and UF1 average over the network classes present in the scored rows (as
:func:`classification_metrics` does), so a test set without neutral is not penalised for it;
predictions *of* an absent class still count as errors in accuracy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from fer_core.metrics.classification import classification_metrics, confusion_matrix, multilabel_f1


@dataclass(frozen=True)
class LabelScore:
    """Metrics of one evaluation, over the network's classes."""

    classes: tuple[str, ...]
    metrics: Mapping[str, float]
    confusion: np.ndarray  # (len(classes), len(classes)), rows true, columns predicted
    num_scored: int
    num_unscored: int
    unscored_predictions: Mapping[str, int] = field(default_factory=dict)  # predicted label -> count
    classes_present: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "classes": list(self.classes), "metrics": dict(self.metrics), "confusion": self.confusion.tolist(),
            "num_scored": self.num_scored, "num_unscored": self.num_unscored,
            "unscored_predictions": dict(self.unscored_predictions), "classes_present": list(self.classes_present),
        }


def score_labels(true_names: Sequence[str], predicted_names: Sequence[str], classes: Sequence[str]) -> LabelScore:
    """Score predicted class names against true class names over the network's ``classes``."""
    if len(true_names) != len(predicted_names):
        raise ValueError(f"{len(true_names)} true labels but {len(predicted_names)} predictions")
    classes = tuple(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown_predictions = sorted({p for p in predicted_names if p not in index})
    if unknown_predictions:
        raise ValueError(f"predictions {unknown_predictions} are none of the network's classes {classes}")
    scored = [(index[t], index[p]) for t, p in zip(true_names, predicted_names) if t in index]
    unscored = Counter(p for t, p in zip(true_names, predicted_names) if t not in index)
    if not scored:
        raise ValueError(f"no sample's class is one of the network's classes {classes}")
    y_true = np.array([t for t, _ in scored], dtype=np.int64)
    y_pred = np.array([p for _, p in scored], dtype=np.int64)
    metrics = classification_metrics(y_true, y_pred, len(classes), classes)
    present = tuple(c for i, c in enumerate(classes) if (y_true == i).any())
    # Recall/F1 of a class the set lacks is undefined, not 0: leave it out rather than report a 0.
    metrics = {k: v for k, v in metrics.items()
               if not (k.startswith(("recall/", "f1/")) and k.split("/", 1)[1] not in present)}
    return LabelScore(classes=classes, metrics=metrics, confusion=confusion_matrix(y_true, y_pred, len(classes)),
                      num_scored=len(scored), num_unscored=sum(unscored.values()),
                      unscored_predictions=dict(sorted(unscored.items())), classes_present=present)


@dataclass(frozen=True)
class AUScore:
    """Per-AU F1 of a multi-label (AU) network on a test set with AU labels.

    Only AUs the network predicts and the test set labels are scored (``au_names``); the others are
    listed (``network_only``: the set does not label them -- absent, or every cell unknown; ``data_only``: the network does not predict them).
    Unknown cells (-1, e.g. BP4D's 9) are left out of that AU's counts, as in training.
    """

    au_names: tuple[str, ...]
    metrics: Mapping[str, float]  # f1/<AU>, mean_f1, and support/<AU> (labelled-positive counts)
    num_samples: int
    network_only: tuple[str, ...] = ()
    data_only: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"au_names": list(self.au_names), "metrics": dict(self.metrics), "num_scored": self.num_samples,
                "network_only_aus": list(self.network_only), "data_only_aus": list(self.data_only)}


def score_aus(true_aus: np.ndarray, data_au_names: Sequence[str], predicted_active: Sequence[Sequence[str]],
              network_au_names: Sequence[str]) -> AUScore:
    """Score predicted active-AU sets against an (N, A) matrix of 1/0/-1 over ``data_au_names``."""
    true_aus = np.asarray(true_aus, dtype=np.int64)
    if true_aus.ndim != 2 or true_aus.shape[1] != len(data_au_names):
        raise ValueError(f"AU labels must be (N, {len(data_au_names)}), got {true_aus.shape}")
    if len(predicted_active) != len(true_aus):
        raise ValueError(f"{len(true_aus)} AU label rows but {len(predicted_active)} predictions")
    # An AU the set lists but never labels (all cells unknown, e.g. a column the table lacks) is not
    # labelled by it: its F1 would be a meaningless 0.
    labelled = {a for j, a in enumerate(data_au_names) if (true_aus[:, j] >= 0).any()}
    shared = tuple(a for a in network_au_names if a in labelled)
    if not shared:
        raise ValueError(f"the test set's AUs {tuple(data_au_names)} share none with the network's "
                         f"{tuple(network_au_names)}")
    columns = [list(data_au_names).index(a) for a in shared]
    y_true = true_aus[:, columns]
    y_pred = np.array([[int(a in set(active)) for a in shared] for active in predicted_active], dtype=np.int64)
    metrics = multilabel_f1(y_true, y_pred, shared)
    metrics.update({f"support/{a}": float((y_true[:, j] == 1).sum()) for j, a in enumerate(shared)})
    return AUScore(au_names=shared, metrics=metrics, num_samples=len(y_true),
                   network_only=tuple(a for a in network_au_names if a not in shared),
                   data_only=tuple(a for a in data_au_names if a in labelled and a not in set(network_au_names)))


def score_affect(true_va: np.ndarray, predicted_va: np.ndarray) -> dict[str, float]:
    """CCC and RMSE of valence and arousal over the rows whose annotation is not NaN (AffectNet's -2)."""
    import torch

    from fer_core.metrics.affect import concordance_correlation

    true_va, predicted_va = np.asarray(true_va, dtype=np.float64), np.asarray(predicted_va, dtype=np.float64)
    if true_va.shape != predicted_va.shape or true_va.ndim != 2 or true_va.shape[1] != 2:
        raise ValueError(f"valence/arousal must be two (N, 2) arrays, got {true_va.shape} and {predicted_va.shape}")
    out: dict[str, float] = {}
    for j, name in enumerate(("valence", "arousal")):
        known = ~np.isnan(true_va[:, j])
        if known.sum() < 2:
            continue  # CCC needs two annotated samples
        t, p = true_va[known, j], predicted_va[known, j]
        out[f"ccc/{name}"] = float(concordance_correlation(torch.from_numpy(p), torch.from_numpy(t)))
        out[f"rmse/{name}"] = float(np.sqrt(np.mean((p - t) ** 2)))
        out[f"annotated/{name}"] = float(known.sum())
    return out


def score_landmarks(true: Sequence[np.ndarray | None], predicted: Sequence[np.ndarray | None]) -> dict[str, float]:
    """Mean inter-ocular NME over the faces with annotated (and predicted) landmarks, same frame."""
    import torch

    from fer_core.metrics.landmarks import nme

    pairs = [(np.asarray(t, dtype=np.float32).reshape(-1, 2), np.asarray(p, dtype=np.float32).reshape(-1, 2))
             for t, p in zip(true, predicted) if t is not None and p is not None and len(t) and len(p)]
    if not pairs:
        return {}
    if any(t.shape != p.shape for t, p in pairs):
        raise ValueError(f"the network predicts {pairs[0][1].shape[0]} landmarks, the test set has "
                         f"{pairs[0][0].shape[0]}: NME needs the same points")
    errors = nme(torch.from_numpy(np.stack([p for _, p in pairs])), torch.from_numpy(np.stack([t for t, _ in pairs])))
    return {"nme": float(errors.mean()), "annotated/landmarks": float(len(pairs))}
