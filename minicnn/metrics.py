"""Classification metrics on host arrays: accuracy, log loss, confusion matrix, precision / recall / F1."""
from __future__ import annotations

import numpy as np

from .backend import to_host

__all__ = ["accuracy", "log_loss", "confusion_matrix", "classification_report"]


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = to_host(y_true), to_host(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def log_loss(probs, y_true) -> float:
    """Mean cross-entropy -log p(true class) of probabilities ``probs`` (N, K), in float64.

    Probabilities are clipped to [1e-12, 1] so a confident mistake costs about 27.6, not infinity.
    """
    probs, y_true = to_host(probs), to_host(y_true).astype(np.int64)
    p_true = probs[np.arange(len(probs)), y_true].astype(np.float64)
    return float(-np.log(np.clip(p_true, 1e-12, 1.0)).mean())


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """counts[i, j] = number of examples of true class i predicted as class j."""
    y_true, y_pred = to_host(y_true).astype(np.int64), to_host(y_pred).astype(np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_report(y_true, y_pred, class_names) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, macro averages and the confusion matrix.

    precision_c = TP / (TP + FP), recall_c = TP / (TP + FN), F1 = 2 P R / (P + R);
    a ratio with a zero denominator is reported as 0. The row-normalised matrix
    divides each row (true class) by its support.
    """
    k = len(class_names)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        normalised = np.where(support[:, None] > 0, cm / support[:, None], 0.0)
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "num_examples": int(cm.sum()),
        "per_class": per_class,
        "macro_avg": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "class_names": list(class_names),
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": np.round(normalised, 4).tolist(),
    }
