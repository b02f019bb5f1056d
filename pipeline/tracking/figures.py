"""Figures for the tracked run: confusion matrix, misclassified digits, training curves."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.data.prepared import CLASSES  # noqa: E402


def confusion_figure(confusion: np.ndarray, title: str) -> Figure:
    figure, axes = plt.subplots(figsize=(7, 6))
    image = axes.imshow(np.log1p(confusion), cmap="Blues")
    for (row, col), count in np.ndenumerate(confusion):
        colour = "white" if confusion[row, col] > confusion.max() / 2 else "black"
        axes.text(col, row, str(count), ha="center", va="center", fontsize=7, color=colour)
    ticks = range(len(CLASSES))
    axes.set(xticks=ticks, yticks=ticks, xticklabels=CLASSES, yticklabels=CLASSES, title=title)
    axes.set(xlabel="predicted", ylabel="true")
    figure.colorbar(image, ax=axes, label="log(1 + count)")
    figure.tight_layout()
    return figure


def misclassified_figure(
    images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, limit: int
) -> Figure:
    """A grid of wrongly classified test images, each captioned `true -> predicted`."""
    wrong = np.flatnonzero(labels != predictions)[:limit]
    columns = 6
    rows = max(1, math.ceil(len(wrong) / columns))
    figure, grid = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.6), squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, index in zip(grid.flat, wrong, strict=False):
        axes.imshow(images[index], cmap="gray_r")
        axes.set_title(f"{labels[index]} -> {predictions[index]}", fontsize=9)
    figure.suptitle(f"misclassified test images (first {len(wrong)})")
    figure.tight_layout()
    return figure


def curves_figure(history: list[dict[str, float]], title: str) -> Figure:
    epochs = [int(row["epoch"]) for row in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train/loss", "val/loss"):
        loss_axes.plot(epochs, [row[key] for row in history], marker="o", label=key)
    loss_axes.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    loss_axes.legend()
    accuracy_axes.plot(epochs, [row["val/accuracy"] for row in history], marker="o")
    accuracy_axes.set(xlabel="epoch", ylabel="val/accuracy", title="validation accuracy")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def log_training_curves(history: list[dict[str, float]], name: str) -> None:
    figure = curves_figure(history, f"{name} training")
    mlflow.log_figure(figure, "training/curves.png")
    plt.close(figure)
