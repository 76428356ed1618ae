"""Batch normalisation for dense (N, D) and convolutional (N, C, H, W) activations.

Training mode normalises with the statistics of the batch and updates the
running statistics with PyTorch's momentum convention

    running = (1 - momentum) * running + momentum * batch_statistic

(the running variance takes the *unbiased* batch variance, as PyTorch does);
evaluation mode normalises with the running statistics.
"""
from __future__ import annotations

from .. import initializers
from ..backend import get_array_module
from .base import Layer

__all__ = ["BatchNorm1D", "BatchNorm2D"]


class _BatchNorm(Layer):
    """Shared math; subclasses say which axes are reduced.

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
        self.num_features = int(num_features)
        self.momentum, self.eps = float(momentum), float(eps)
        self.params["gamma"] = initializers.ones((self.num_features,))
        self.params["beta"] = initializers.zeros((self.num_features,))
        self.buffers["running_mean"] = initializers.zeros((self.num_features,))
        self.buffers["running_var"] = initializers.ones((self.num_features,))

    def extra_repr(self):
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"

    def _shape(self, v):
        """Reshape a per-feature vector so it broadcasts against the input."""
        return v.reshape((1, -1) + (1,) * (len(self.axes) - 1))

    def _check(self, x):
        if x.ndim != len(self.axes) + 1 or x.shape[1] != self.num_features:
            raise self._bad_input(self.layout.format(self.num_features), x)

    def forward(self, x, training=True):
        self._check(x)
        xp = get_array_module(x)
        gamma, beta = self._shape(self.params["gamma"]), self._shape(self.params["beta"])
        if training:
            m = x.size // self.num_features
            if m < 2:
                raise ValueError(f"{self!r}: training needs more than one value per feature, got input {x.shape}")
            mu = x.mean(axis=self.axes, keepdims=True)
            xhat = x - mu
            var = self._shape(xp.einsum(self.sum_of_products, xhat, xhat) / m)  # no (x - mu)**2 temporary
            inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(x.dtype, copy=False)
            xhat *= inv_std  # in place: x - mu is not needed any more
            mom = self.momentum
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            rm *= 1 - mom
            rm += mom * mu.reshape(-1)
            rv *= 1 - mom
            rv += (mom * m / (m - 1)) * var.reshape(-1)
        else:
            inv_std = (1.0 / xp.sqrt(self._shape(self.buffers["running_var"]) + self.eps)).astype(x.dtype, copy=False)
            xhat = (x - self._shape(self.buffers["running_mean"])) * inv_std
        self.cache = (training, xhat, inv_std)
        out = xhat * gamma
        out += beta
        return out

    def backward(self, dout):
        xp = get_array_module(dout)
        batch_stats, xhat, inv_std = self.cache
        gamma = self._shape(self.params["gamma"])
        dbeta = dout.sum(axis=self.axes)
        dgamma = xp.einsum(self.sum_of_products, dout, xhat)  # sum of dout * xhat, no temporary
        self.grads["gamma"], self.grads["beta"] = dgamma, dbeta
        if not batch_stats:
            return dout * (gamma * inv_std)
        m = dout.size // self.num_features
        # dx = gamma * inv_std / m * (m * dout - dbeta - xhat * dgamma), built in place
        dx = xhat * (-self._shape(dgamma) / m)
        dx += dout
        dx -= self._shape(dbeta) / m
        dx *= gamma * inv_std
        self.cache = None
        return dx


class BatchNorm1D(_BatchNorm):
    """Batch normalisation of dense features: x (N, D) -> y (N, D); statistics over N."""

    axes = (0,)
    layout = "(N, {})"
    sum_of_products = "nc,nc->c"


class BatchNorm2D(_BatchNorm):
    """Spatial batch normalisation: x (N, C, H, W) -> y (N, C, H, W); statistics per channel over (N, H, W)."""

    axes = (0, 2, 3)
    layout = "(N, {}, H, W)"
    sum_of_products = "nchw,nchw->c"
