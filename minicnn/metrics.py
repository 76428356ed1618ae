"""Classification metrics on host arrays: accuracy, log loss, confusion matrix, precision / recall / F1."""
from __future__ import annotations

import numpy as np

from .backend import to_host

__all__ = ["accuracy", "log_loss", "confusion_matrix", "classification_report"]


def _class_ids(name, labels, num_classes=None, length=None) -> np.ndarray:
    """``labels`` as a host int64 vector after checking it: 1-D, integer, of ``length`` and in 0..num_classes-1.

    A wrong label would otherwise be counted silently (a negative index wraps around, a label past the last
    class lands in the next row of a flattened confusion matrix) or compared by broadcasting.
    """
    ids = np.asarray(to_host(labels))
    if ids.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of class ids, got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "iub":
        if ids.dtype.kind != "f" or not np.all(np.isfinite(ids)) or np.any(ids != np.round(ids)):
            raise ValueError(f"{name}: expected integer class ids, got dtype {ids.dtype}")
    if length is not None and len(ids) != length:
        raise ValueError(f"{name}: expected {length} class ids (one per example), got {len(ids)}")
    ids = ids.astype(np.int64)
    if num_classes is not None and ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"{name}: holds class id {bad}, expected ids 0..{num_classes - 1} ({num_classes} classes)")
    return ids


def accuracy(y_true, y_pred) -> float:
    """The fraction of examples whose predicted class id equals the true one (NaN for no examples)."""
    y_true = _class_ids("accuracy: y_true", y_true)
    y_pred = _class_ids("accuracy: y_pred", y_pred, length=len(y_true))
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def log_loss(probs, y_true) -> float:
    """Mean cross-entropy -log p(true class) of probabilities ``probs`` (N, K), in float64.

    Probabilities are clipped to [1e-12, 1] so a confident mistake costs about 27.6, not infinity.
    """
    probs = to_host(probs)
    if probs.ndim != 2:
        raise ValueError(f"log_loss: probs must be (N, K) class probabilities, got shape {probs.shape}")
    y_true = _class_ids("log_loss: y_true", y_true, probs.shape[1], length=len(probs))
    p_true = probs[np.arange(len(probs)), y_true].astype(np.float64)
    return float(-np.log(np.clip(p_true, 1e-12, 1.0)).mean())


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """counts[i, j] = number of examples of true class i predicted as class j.

    Shapes: y_true (N,), y_pred (N,) class ids in 0..num_classes-1  ->  counts (num_classes, num_classes), int64
    """
    y_true = _class_ids("confusion_matrix: y_true", y_true, num_classes)
    y_pred = _class_ids("confusion_matrix: y_pred", y_pred, num_classes, length=len(y_true))
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
