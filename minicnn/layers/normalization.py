"""Batch normalisation for dense (N, D) and convolutional (N, C, H, W) activations.

Training mode normalises with the statistics of the batch and updates the
running statistics with PyTorch's momentum convention

    running = (1 - momentum) * running + momentum * batch_statistic

(the running variance takes the *unbiased* batch variance, as PyTorch does);
evaluation mode normalises with the running statistics.

:func:`recalibrate_batchnorm` ("precise BatchNorm") replaces a trained
network's running statistics by those of a given set of inputs, seen the way
evaluation sees them (no dropout, no augmentation).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .. import initializers, kernels
from ..backend import get_array_module, module_of, to_array_module
from .activations import Dropout
from .base import Layer, positive_int

__all__ = ["BatchNorm1D", "BatchNorm2D", "batchnorm_layers", "recalibrate_batchnorm"]


class _BatchNorm(Layer):
    """Shared math of :class:`BatchNorm1D` and :class:`BatchNorm2D` (whose docstrings repeat it);
    subclasses say which axes are reduced.

    With m values per feature, mu and var their batch mean and (biased) variance:

        xhat = (x - mu) / sqrt(var + eps),        y = gamma * xhat + beta

    Backward (training mode, statistics depend on x):
        dbeta  = sum dy
        dgamma = sum dy * xhat
        dx     = gamma / (m * sqrt(var + eps)) * (m * dy - sum(dy) - xhat * sum(dy * xhat))

    Backward (evaluation mode, running statistics are constants):
        dx = dy * gamma / sqrt(running_var + eps)

    All sums run over the reduced axes, per feature.
    """

    axes: tuple = ()
    layout: str = ""
    sum_of_products: str = ""  # einsum: per-feature sum of a * b over the reduced axes

    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        super().__init__()
        name = type(self).__name__
        self.num_features = positive_int(num_features, f"{name}: num_features")
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{name}: momentum is the weight of each new batch in the running statistics and must "
                             f"be a number in [0, 1], got {momentum!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0.0 or not math.isfinite(eps):
            raise ValueError(f"{name}: eps is added to the variance and must be a finite number > 0, got {eps!r}")
        self.momentum, self.eps = float(momentum), float(eps)
        self.params["gamma"] = initializers.ones((self.num_features,))
        self.params["beta"] = initializers.zeros((self.num_features,))
        self.buffers["running_mean"] = initializers.zeros((self.num_features,))
        self.buffers["running_var"] = initializers.ones((self.num_features,))

    def extra_repr(self):
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"

    def _check(self, x):
        if x.ndim != len(self.axes) + 1 or x.shape[1] != self.num_features:
            raise self._bad_input(self.layout.format(self.num_features), x)
        if x.dtype.kind != "f":  # integer input would be normalised in integer arithmetic: all zeros
            raise TypeError(f"{self!r}: expects floating-point input, got dtype {x.dtype}; convert it first "
                            "(e.g. x.astype(np.float32))")

    def forward(self, x, training=True):
        """Normalise ``x`` with the batch statistics (training, which also updates the running
        ones) or with the running statistics (evaluation); the output has x's shape."""
        self._check(x)
        gamma, beta = self.params["gamma"], self.params["beta"]
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        if training:
            m = x.size // self.num_features
            if m < 2:
                raise ValueError(f"{self!r}: training needs more than one value per feature, got input {x.shape}")
            out, xhat, inv_std = _train_forward(x, gamma, beta, rm, rv, self.eps, self.momentum, self.axes,
                                                self.sum_of_products)
        else:
            out, xhat, inv_std = _eval_forward(x, gamma, beta, rm, rv, self.eps)
        self.cache = (training, xhat, inv_std)
        return out

    def backward(self, dout):
        """dout (x's shape) -> dx; sets ``grads["gamma"]`` = sum dout * xhat and ``grads["beta"]`` = sum dout.

        dx = gamma / (m sqrt(var + eps)) (m dout - sum dout - xhat sum dout * xhat) after a
        training-mode forward, dout * gamma / sqrt(running_var + eps) after an evaluation one.
        """
        batch_stats, xhat, inv_std = self._saved()
        self._check_dout(dout, xhat.shape)
        dx, self.grads["gamma"], self.grads["beta"] = _backward(dout, xhat, inv_std, self.params["gamma"],
                                                                batch_stats, self.axes, self.sum_of_products)
        self.cache = None
        return dx


def _per_feature(v, x):
    """Reshape a per-feature vector so it broadcasts against ``x`` ((N, C) or (N, C, H, W))."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


# The formulas of _BatchNorm, written with array operations (the reference); on CuPy the decorator
# runs the fused kernels of minicnn/kernels.py instead (statistics in one launch, normalisation in one).
@kernels.gpu_fast_path(kernels.batchnorm_train_forward)
def _train_forward(x, gamma, beta, rm, rv, eps, momentum, axes, sum_of_products):
    """Training mode: ``(out, xhat, inv_std)``, the running statistics ``rm``, ``rv`` updated in place."""
    xp = get_array_module(x)
    m = x.size // gamma.size
    mu = x.mean(axis=axes, keepdims=True)
    xhat = x - mu
    var = _per_feature(xp.einsum(sum_of_products, xhat, xhat) / m, x)  # no (x - mu)**2 temporary
    inv_std = (1.0 / xp.sqrt(var + eps)).astype(x.dtype, copy=False)
    xhat *= inv_std  # in place: x - mu is not needed any more
    rm *= 1 - momentum
    rm += momentum * mu.reshape(-1)
    rv *= 1 - momentum
    rv += (momentum * m / (m - 1)) * var.reshape(-1)
    out = xhat * _per_feature(gamma, x)
    out += _per_feature(beta, x)
    return out, xhat, inv_std


@kernels.gpu_fast_path(kernels.batchnorm_eval_forward)
def _eval_forward(x, gamma, beta, rm, rv, eps):
    """Evaluation mode: ``(out, xhat, inv_std)`` with the running statistics."""
    xp = get_array_module(x)
    inv_std = (1.0 / xp.sqrt(_per_feature(rv, x) + eps)).astype(x.dtype, copy=False)
    xhat = (x - _per_feature(rm, x)) * inv_std
    out = xhat * _per_feature(gamma, x)
    out += _per_feature(beta, x)
    return out, xhat, inv_std


@kernels.gpu_fast_path(kernels.batchnorm_backward)
def _backward(dout, xhat, inv_std, gamma, batch_stats, axes, sum_of_products):
    """``(dx, dgamma, dbeta)``."""
    xp = get_array_module(dout)
    g = _per_feature(gamma, dout)
    dbeta = dout.sum(axis=axes)
    dgamma = xp.einsum(sum_of_products, dout, xhat)  # sum of dout * xhat, no temporary
    if not batch_stats:
        return dout * (g * inv_std), dgamma, dbeta
    m = dout.size // gamma.size
    # dx = gamma * inv_std / m * (m * dout - dbeta - xhat * dgamma), built in place
    dx = xhat * (-_per_feature(dgamma, dout) / m)
    dx += dout
    dx -= _per_feature(dbeta, dout) / m
    dx *= g * inv_std
    return dx, dgamma, dbeta


class BatchNorm1D(_BatchNorm):
    """Batch normalisation of dense features, statistics per feature over the batch.

    Shapes:
        x (N, D) -> y (N, D);  gamma, beta, running_mean, running_var (D,)
        m = N values per feature

    Parameters:
        num_features: D (or C), the number of normalised features.
        momentum: weight of each new batch in the running statistics, PyTorch's
            convention (default 0.1; CS231n's and Keras' momentum is 1 - this, see docs/conventions.md).
        eps: added to the variance (default 1e-5, as PyTorch).

    Forward, training mode (``training=True``), with mu and var the batch mean and
    *biased* variance (divided by m) of each feature:
        xhat = (x - mu) / sqrt(var + eps),        y = gamma * xhat + beta
        running_mean = (1 - momentum) * running_mean + momentum * mu
        running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)   (unbiased, as PyTorch)

    Forward, evaluation mode: the running statistics replace mu and var.

    Backward, training mode (mu and var depend on x; sums over the batch axis N):
        dbeta  = sum dy
        dgamma = sum dy * xhat
        dx     = gamma / (m * sqrt(var + eps)) * (m * dy - sum(dy) - xhat * sum(dy * xhat))

    Backward, evaluation mode (the statistics are constants):
        dx = dy * gamma / sqrt(running_var + eps)   (dgamma, dbeta as above)

    Reference: :func:`minicnn.reference.batchnorm_forward` with the step-by-step
    (:func:`~minicnn.reference.batchnorm_backward_steps`) and the compact
    (:func:`~minicnn.reference.batchnorm_backward_compact`) backward passes.
    """

    axes = (0,)
    layout = "(N, {})"
    sum_of_products = "nc,nc->c"


class BatchNorm2D(_BatchNorm):
    """Spatial batch normalisation: statistics per channel over (N, H, W).

    Shapes:
        x (N, C, H, W) -> y (N, C, H, W);  gamma, beta, running_mean, running_var (C,)
        m = N*H*W values per channel (every pixel counts as a sample, as in CS231n's
        spatial BatchNorm, which reshapes x to (N*H*W, C) and calls the 1-D version)

    Parameters:
        num_features: D (or C), the number of normalised features.
        momentum: weight of each new batch in the running statistics, PyTorch's
            convention (default 0.1; CS231n's and Keras' momentum is 1 - this, see docs/conventions.md).
        eps: added to the variance (default 1e-5, as PyTorch).

    Forward, training mode (``training=True``), with mu and var the batch mean and
    *biased* variance (divided by m) of each feature:
        xhat = (x - mu) / sqrt(var + eps),        y = gamma * xhat + beta
        running_mean = (1 - momentum) * running_mean + momentum * mu
        running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)   (unbiased, as PyTorch)

    Forward, evaluation mode: the running statistics replace mu and var.

    Backward, training mode (mu and var depend on x; sums over (N, H, W), per channel):
        dbeta  = sum dy
        dgamma = sum dy * xhat
        dx     = gamma / (m * sqrt(var + eps)) * (m * dy - sum(dy) - xhat * sum(dy * xhat))

    Backward, evaluation mode (the statistics are constants):
        dx = dy * gamma / sqrt(running_var + eps)   (dgamma, dbeta as above)

    Reference: :func:`minicnn.reference.batchnorm_forward` with the step-by-step
    (:func:`~minicnn.reference.batchnorm_backward_steps`) and the compact
    (:func:`~minicnn.reference.batchnorm_backward_compact`) backward passes.
    """

    axes = (0, 2, 3)
    layout = "(N, {}, H, W)"
    sum_of_products = "nchw,nchw->c"


def _walk(layer: Layer):
    """``layer`` and all its sub-layers, depth first."""
    yield layer
    for _, child in layer.children():
        yield from _walk(child)


def batchnorm_layers(model: Layer) -> list:
    """Every BatchNorm layer (1-D or 2-D, synchronised ones included) in ``model`` and its sub-layers, depth first."""
    return [layer for layer in _walk(model) if isinstance(layer, _BatchNorm)]


def recalibrate_batchnorm(model: Layer, x, batch_size: int = 256, seed: int = 0) -> dict:
    """Set every BatchNorm's running statistics to those of the inputs ``x`` ("precise BN").

    During training the running statistics are a moving average over
    *augmented* batches whose activations went through *dropout*, while the
    network is evaluated on clean images with dropout off. Dropout in
    particular changes the variance of what the next BatchNorm sees (in
    hw3_cnn, BatchNorm1D(256) follows Dropout(0.5)), so the statistics it
    normalises with at evaluation are not those of its evaluation inputs.
    This function runs ``x`` (e.g. the clean, normalised training images)
    through ``model`` with every BatchNorm in training mode and every Dropout
    switched off, and replaces the running statistics by averages over the
    batches, weighted by batch size:

        running_mean = sum_b n_b * mean_b / N
        running_var  = sum_b n_b * var_b  / N      (var_b: the unbiased variance of batch b)

    ``running_mean`` is thus the exact mean of the layer's inputs over all of
    ``x``; ``running_var`` is the within-batch variance the network normalised
    with while training (with random batches of a few hundred it differs from
    the variance over all of ``x`` by about 1 / batch size). All layers are
    recalibrated in one pass in which every BatchNorm normalises with its
    batch's statistics, as in training, so a deeper BatchNorm averages the
    statistics of inputs normalised that way (Detectron's "precise BN" does
    the same).

    ``x`` (N, ...) is shuffled with ``seed`` and cut into ``max(1, N // batch_size)``
    batches of nearly equal size (so no batch is smaller than ``batch_size``,
    unless N is); it may live on the host or the device. Parameters are not
    touched. Returns ``{"batchnorm_layers": L, "images": N, "batches": B}``.

    Shapes:
        x (N, ...) model inputs, e.g. (N, 1, 48, 48), N >= 2

    Parameters:
        model: a layer or container holding at least one BatchNorm.
        x: the inputs whose statistics to use (host or device).
        batch_size: images per forward pass (at least 2).
        seed: the shuffle that forms the batches.
    """
    norms = batchnorm_layers(model)
    if not norms:
        raise ValueError(f"recalibrate_batchnorm: {getattr(model, 'name', None) or type(model).__name__} "
                         "has no BatchNorm layer, so there are no statistics to recalibrate")
    n = len(x) if hasattr(x, "__len__") else 0
    if n < 2:
        raise ValueError(f"recalibrate_batchnorm: needs at least 2 inputs to compute statistics, got {n}")
    if int(batch_size) < 2:
        raise ValueError(f"recalibrate_batchnorm: batch_size must be at least 2, got {batch_size}")
    dropouts = [layer for layer in _walk(model) if isinstance(layer, Dropout)]
    saved_p = [layer.p for layer in dropouts]
    saved_momentum = [layer.momentum for layer in norms]
    order = np.random.default_rng(seed).permutation(n)
    batches = np.array_split(order, max(1, n // int(batch_size)))
    dtype = norms[0].params["gamma"].dtype
    x_xp = get_array_module(x)  # index x where it lives (host or device), then move each batch
    model_xp = module_of(model)  # to the model's device (not the active backend's)
    try:
        for layer in dropouts:
            layer.p = 0.0  # Dropout with p == 0 is the identity, in training mode too
        seen = 0
        for idx in batches:
            seen += len(idx)
            # momentum = n_b / (images so far) turns PyTorch's moving-average update into the
            # running, size-weighted average above; the first batch (momentum 1) overwrites.
            for layer in norms:
                layer.momentum = len(idx) / seen
            xb = to_array_module(x[x_xp.asarray(np.sort(idx))], model_xp, dtype=dtype)
            model.forward_only(xb, training=True)  # statistics only: no cache is kept
    finally:
        for layer, p in zip(dropouts, saved_p):
            layer.p = p
        for layer, momentum in zip(norms, saved_momentum):
            layer.momentum = momentum
    return {"batchnorm_layers": len(norms), "images": int(n), "batches": len(batches)}
