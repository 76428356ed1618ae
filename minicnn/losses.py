"""Loss functions: ``forward(logits, labels) -> scalar`` then ``backward() -> dlogits``.

Both losses take raw scores (logits) of shape (N, K) and integer labels of
shape (N,). The returned loss is a 0-d array on the logits' backend, so a
training loop can accumulate it on the GPU without a host round trip.
"""
from __future__ import annotations

import numpy as np

from . import kernels
from .backend import get_array_module

__all__ = ["SoftmaxCrossEntropy", "MSELoss", "softmax", "log_softmax", "softmax_cross_entropy",
           "softmax_cross_entropy_backward"]


def log_softmax(z):
    """Numerically stable log-softmax over the last axis: z - max - log(sum(exp(z - max))).

    Shapes: z (..., K) -> (..., K).

    Parameters:
        z: scores (logits).
    """
    xp = get_array_module(z)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(z):
    """Numerically stable softmax over the last axis: ``exp(z - max) / sum(exp(z - max))``.

    Shapes: z (..., K) -> p (..., K), summing to 1 over the last axis.

    Parameters:
        z: scores (logits), host or device array.
    """
    xp = get_array_module(z)
    e = xp.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _check(name, logits, labels):
    """Shapes and dtype always; the label range when the labels live on the host.

    Out-of-range labels must never index the scores: -1 would silently read the
    last class. The range check on a device array would cost a host sync per
    step, so there :class:`~minicnn.training.Trainer` checks every label once,
    on the host, before training, and the loss checks dtype and shape only.
    """
    if logits.ndim != 2:
        raise ValueError(f"{name}: expected logits of shape (N, K), got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"{name}: expected labels of shape ({logits.shape[0]},) to match logits {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}")
    if isinstance(labels, np.ndarray) and labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= logits.shape[1]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: label {bad} is not a class index in 0..{logits.shape[1] - 1} "
                             f"({logits.shape[1]} classes)")


def _saved_by_forward(loss):
    """What ``loss.forward`` kept for its backward; an error saying why when there is none."""
    cache = getattr(loss, "cache", None)
    if cache is None:
        raise RuntimeError(f"{type(loss).__name__}.backward: nothing saved by a forward pass: "
                           "call forward(logits, labels) first")
    return cache


class SoftmaxCrossEntropy:
    """Softmax cross-entropy from logits, with optional class weights and label smoothing.

    Shapes:
        logits z (N, K), labels y (N,) integers in [0, K)  ->  loss () (a 0-d array);
        backward() -> dz (N, K)

    Parameters:
        class_weights: (K,) weights w, or None for all ones (as torch's ``weight``).
        label_smoothing: e in [0, 1) (as torch's ``label_smoothing``).

    With p = softmax(z), K classes, smoothing e, class weights w (all ones by default):

        target distribution  q_k = (1 - e) [k = y] + e / K
        l_i  = - sum_k w_k q_ik log p_ik          (as torch.nn.CrossEntropyLoss)
        loss = sum_i l_i / sum_i w_{y_i}          (weighted mean; plain mean when w = 1)

    Backward: with W = sum_i w_{y_i} and a_ik = w_k q_ik,
        dz_ik = (p_ik * sum_k a_ik - a_ik) / W

    which reduces to the familiar (p - onehot(y)) / N without weights or smoothing.
    Reference: :func:`minicnn.reference.softmax_cross_entropy` (one sample at a time).
    """

    def __init__(self, class_weights=None, label_smoothing=0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"SoftmaxCrossEntropy: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.class_weights = class_weights
        self.label_smoothing = float(label_smoothing)

    @property
    def class_weights(self):
        return self._class_weights

    @class_weights.setter
    def class_weights(self, value):
        self._class_weights = value
        self._weights_on_device = {}  # (array module, dtype) -> the weights there: copied once, not every step

    def _weights(self, xp, dtype, k):
        key = (xp.__name__, np.dtype(dtype))
        if key not in self._weights_on_device:
            self._weights_on_device = {key: xp.asarray(self.class_weights, dtype=dtype)}
        w = self._weights_on_device[key]
        if w.shape != (k,):
            raise ValueError(f"SoftmaxCrossEntropy: expected {k} class weights, got shape {tuple(w.shape)}")
        return w

    def forward(self, logits, labels):
        """loss = weighted mean over the batch of -sum_k w_k q_k log softmax(z)_k; keeps p for backward."""
        _check("SoftmaxCrossEntropy", logits, labels)
        xp = get_array_module(logits)
        w = None if self.class_weights is None else self._weights(xp, logits.dtype, logits.shape[1])
        loss, self.cache = softmax_cross_entropy(logits, labels, w, self.label_smoothing)
        return loss

    __call__ = forward

    def backward(self):
        """dL/dz (N, K) = (p * sum_k a_k - a) / W for the last forward pass ((p - onehot(y)) / N plainly)."""
        return softmax_cross_entropy_backward(*_saved_by_forward(self))


# On CuPy: one kernel for the rows and two reductions forward, one kernel backward (minicnn/kernels.py).
@kernels.gpu_fast_path(kernels.softmax_cross_entropy)
def softmax_cross_entropy(logits, labels, class_weights, label_smoothing):
    """``(loss, (p, a, W))``: the loss of :class:`SoftmaxCrossEntropy` and what its backward needs.

    Shapes: logits z (N, K), labels y (N,), class_weights w (K,) or None -> loss (), p (N, K), a (N, K).

    p = softmax(z), a_ik = w_k q_ik with q_ik = (1 - e) [k = y_i] + e / K, W = sum_i w_{y_i}
    (N without weights), loss = -sum_ik a_ik log p_ik / W.
    """
    xp = get_array_module(logits)
    n, k = logits.shape
    logp = log_softmax(logits)
    q = xp.full((n, k), label_smoothing / k, dtype=logits.dtype)
    q[xp.arange(n), labels] += 1.0 - label_smoothing
    if class_weights is None:
        a, total = q, n
    else:
        a, total = q * class_weights, class_weights[labels].sum()
    return -(a * logp).sum() / total, (xp.exp(logp), a, total)


@kernels.gpu_fast_path(kernels.softmax_cross_entropy_backward)
def softmax_cross_entropy_backward(p, a, total):
    """dz (N, K) = (p * sum_k a_k - a) / W, from :func:`softmax_cross_entropy`'s ``(p, a, W)``."""
    return (p * a.sum(axis=1, keepdims=True) - a) / total


class MSELoss:
    """Mean squared error between softmax(logits) and one-hot targets (the Keras recipe
    "softmax output + mse" that the "Deep Learning" report compares with cross-entropy).

    Shapes:
        logits z (N, K), labels y (N,)  ->  loss () (a 0-d array);  backward() -> dz (N, K)

    Parameters: none.

        p = softmax(z),  t = onehot(y),  loss = mean over all N*K entries of (p - t)^2

    Backward: g = 2 (p - t) / (N K), then through the softmax Jacobian
        dz = p * (g - sum_k g_k p_k)

    (the product with the softmax Jacobian diag(p) - p p^T, which
    :func:`minicnn.reference.mse_softmax` writes out).
    """

    def forward(self, logits, labels):
        """loss = mean over all N*K entries of (softmax(z) - onehot(y))**2; keeps p and t for backward."""
        _check("MSELoss", logits, labels)
        xp = get_array_module(logits)
        n, k = logits.shape
        p = softmax(logits)
        t = xp.zeros_like(p)
        t[xp.arange(n), labels] = 1.0
        self.cache = (p, t)
        return ((p - t) ** 2).mean()

    __call__ = forward

    def backward(self):
        """dL/dz (N, K) = p * (g - sum_k g_k p_k) with g = 2 (p - t) / (N K)."""
        p, t = _saved_by_forward(self)
        g = 2.0 * (p - t) / p.size
        return p * (g - (g * p).sum(axis=1, keepdims=True))
