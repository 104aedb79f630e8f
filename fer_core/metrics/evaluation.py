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

from fer_core.metrics.classification import classification_metrics, confusion_matrix


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
