"""Classification metrics: accuracy, per-class precision/recall/F1, confusion matrix, UAR/WAR, UF1,
multi-label (AU) F1, and leave-one-subject-out aggregation.

Conventions used in the FER literature: WAR (weighted average recall) = plain accuracy; UAR
(unweighted average recall) = mean of per-class recalls; UF1 = mean of per-class F1. For
leave-one-subject-out (micro-expressions) the predictions of all folds are pooled before UF1/UAR are
computed (the "composite" protocol of MEGC), not averaged per fold, because many subjects hold only
a few classes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; rows = true class, columns = predicted."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if len(y_true) and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_report(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, label_names: Sequence[str] | None = None
) -> dict[str, float]:
    """accuracy (= WAR), UAR, UF1, macro precision, and per-class recall/F1 as flat keys.

    UAR and UF1 average over the classes present in ``y_true`` (absent classes have no recall).
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    rep = per_class_report(cm)
    present = rep["support"] > 0
    total = cm.sum()
    out = {
        "accuracy": float(np.trace(cm) / total) if total else 0.0,
        "uar": float(rep["recall"][present].mean()) if present.any() else 0.0,
        "uf1": float(rep["f1"][present].mean()) if present.any() else 0.0,
        "macro_precision": float(rep["precision"][present].mean()) if present.any() else 0.0,
    }
    out["war"] = out["accuracy"]
    names = list(label_names) if label_names is not None else [str(i) for i in range(num_classes)]
    for i, name in enumerate(names):
        out[f"recall/{name}"] = float(rep["recall"][i])
        out[f"f1/{name}"] = float(rep["f1"][i])
    return out


def multilabel_f1(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str] | None = None) -> dict[str, float]:
    """Per-label F1 and their mean for 0/1 matrices (N, L); entries with y_true == -1 are ignored."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise ValueError(f"expected two (N, L) arrays, got {y_true.shape} and {y_pred.shape}")
    known = y_true >= 0
    tp = ((y_true == 1) & (y_pred == 1) & known).sum(0).astype(np.float64)
    fp = ((y_true == 0) & (y_pred == 1) & known).sum(0).astype(np.float64)
    fn = ((y_true == 1) & (y_pred == 0) & known).sum(0).astype(np.float64)
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    names = list(names) if names is not None else [str(i) for i in range(y_true.shape[1])]
    out = {f"f1/{n}": float(v) for n, v in zip(names, f1)}
    out["mean_f1"] = float(f1.mean()) if len(f1) else 0.0
    return out


def loso_folds(subjects: Sequence[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Leave-one-subject-out folds: (held-out subject, train indices, test indices)."""
    subjects = np.asarray(subjects)
    unique = sorted(set(subjects.tolist()))
    if len(unique) < 2:
        raise ValueError("leave-one-subject-out needs at least two subjects")
    idx = np.arange(len(subjects))
    return [(s, idx[subjects != s], idx[subjects == s]) for s in unique]
