"""Figures for run review: learning curves and confusion matrices (matplotlib, headless)."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_learning_curves(history: Sequence[Mapping[str, float]]) -> Figure:
    """Loss (train/val) and the validation metrics per epoch, one panel each."""
    epochs = np.arange(1, len(history) + 1)
    keys = sorted({k for h in history for k in h})
    losses = [k for k in keys if k.endswith("/loss")]
    val_metrics = [k for k in keys if k.startswith("val/") and k != "val/loss" and k.count("/") == 1]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key in losses:
        axes[0].plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    axes[0].set_title("loss")
    for key in val_metrics:
        axes[1].plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    axes[1].set_title("validation metrics")
    axes[2].plot(epochs, [h.get("lr", np.nan) for h in history], marker="o", label="lr")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm: np.ndarray, labels: Sequence[str], title: str = "confusion matrix") -> Figure:
    """Row-normalised confusion matrix with counts in the cells."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def plot_per_label_f1(f1: Mapping[str, float], title: str = "F1 per label") -> Figure:
    """Bar chart of F1 per label (AUs), with the mean as a dashed line."""
    names, values = list(f1), [float(v) for v in f1.values()]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 2), 3.4))
    ax.bar(range(len(names)), values, color="#4C72B0")
    if values:
        ax.axhline(float(np.mean(values)), color="black", linestyle="--", linewidth=1,
                   label=f"mean {np.mean(values):.3f}")
        ax.legend(loc="upper right")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(title)
    fig.tight_layout()
    return fig
