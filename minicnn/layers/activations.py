"""Element-wise activations and dropout. Shapes: any -> the same shape."""
from __future__ import annotations

import numbers

from .. import backend, kernels
from ..backend import get_array_module
from .base import Layer

__all__ = ["ReLU", "LeakyReLU", "Dropout"]


class ReLU(Layer):
    """Rectified linear unit, element-wise.

    Shapes:
        x (any) -> out (same shape)

    Parameters: none.

    Forward:  out = max(x, 0)
    Backward: dx = dout * [x > 0]   (the derivative at 0 is taken as 0, as PyTorch)

    Reference: :func:`minicnn.reference.relu_forward` / :func:`minicnn.reference.relu_backward`.
    """

    cache_attrs = ("mask",)

    def forward(self, x, training=True):
        """out = max(x, 0); keeps the mask [x > 0] for backward."""
        out, self.mask = _leaky_relu_forward(x, 0.0)
        return out

    def backward(self, dout):
        """dx = dout * [x > 0]."""
        mask = self._saved("mask")
        self._check_dout(dout, mask.shape)
        return _leaky_relu_backward(dout, mask, 0.0)


class LeakyReLU(Layer):
    """Leaky ReLU, element-wise.

    Shapes:
        x (any) -> out (same shape)

    Parameters:
        negative_slope: the slope for x <= 0; default 0.01, as ``torch.nn.LeakyReLU``
            (Keras' ``LeakyReLU`` defaults to 0.3).

    Forward:  out = x if x > 0 else negative_slope * x
    Backward: dx = dout * (1 if x > 0 else negative_slope)

    Reference: :func:`minicnn.reference.leaky_relu_forward` / ``..._backward``.
    """

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = float(negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"

    cache_attrs = ("slope",)

    def forward(self, x, training=True):
        """out = x where x > 0, negative_slope * x elsewhere; keeps the local derivative."""
        out, self.slope = _leaky_relu_forward(x, self.negative_slope)
        return out

    def backward(self, dout):
        """dx = dout * (1 if x > 0 else negative_slope)."""
        slope = self._saved("slope")
        self._check_dout(dout, slope.shape)
        return _leaky_relu_backward(dout, slope, self.negative_slope)


@kernels.gpu_fast_path(kernels.leaky_relu_forward)  # on CuPy: one kernel, and the cache is x itself
def _leaky_relu_forward(x, negative_slope):
    """``(out, local derivative)``; ReLU is slope 0."""
    if negative_slope == 0.0:
        mask = (x > 0).astype(x.dtype)  # float mask: multiplying by a bool array is slower
        return x * mask, mask
    # Keep the local derivative (1 or slope) itself: backward is then one multiply.
    # Built as [x > 0] * (1 - slope) + slope: two in-place passes, ~2x faster than where().
    slope = x.dtype.type(negative_slope)
    local = (x > 0).astype(x.dtype)
    local *= 1 - slope
    local += slope
    return x * local, local


@kernels.gpu_fast_path(kernels.leaky_relu_backward)
def _leaky_relu_backward(dout, local, negative_slope):
    """dx = dout * local derivative."""
    return dout * local


class Dropout(Layer):
    """Inverted dropout; ``p`` is the probability of *dropping* a unit (as PyTorch and Keras;
    CS231n's ``p`` is the probability of keeping it).

    Shapes:
        x (any) -> out (same shape)

    Parameters:
        p: drop probability in [0, 1) (default 0.5); 0 makes the layer the identity.

    Forward, training:   keep ~ Bernoulli(1 - p),  mask = keep / (1 - p),  out = x * mask
    Forward, evaluation: out = x (the 1 / (1 - p) scaling at training time keeps E[out] = x)
    Backward: dx = dout * mask (the mask of the last forward pass; dx = dout in evaluation)

    The mask is drawn from the seeded stream of the input's backend
    (:func:`minicnn.backend.random_state`), so runs are reproducible.
    Reference: :func:`minicnn.reference.dropout_forward` / ``..._backward`` with
    :func:`minicnn.reference.dropout_keep_mask`.
    """

    def __init__(self, p=0.5):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p is the drop probability and must be a number in [0, 1), got {p!r}")
        self.p = float(p)

    def extra_repr(self):
        return f"p={self.p}"

    # mask: the last training pass's; identity_pass: True after a pass that dropped nothing (evaluation, p = 0).
    cache_attrs = ("mask", "identity_pass")

    def forward(self, x, training=True):
        """Training: out = x * mask with a fresh mask; evaluation: out = x."""
        if not training or self.p == 0.0:
            self.mask, self.identity_pass = None, True
            return x
        xp = get_array_module(x)
        out, self.mask = _dropout_forward(x, self.p, backend.random_state(xp))
        self.identity_pass = None
        return out

    def backward(self, dout):
        """dx = dout * mask (the same mask as the forward pass), or dout after an evaluation pass."""
        if getattr(self, "identity_pass", None):
            return dout
        mask = self._saved("mask")
        self._check_dout(dout, mask.shape)
        return _dropout_backward(dout, mask, self.p)


# On CuPy: one float32 draw and one kernel; ``mask`` then holds the draws the kernel compares with p.
@kernels.gpu_fast_path(kernels.dropout_forward)
def _dropout_forward(x, p, rng):
    """``(out, mask)`` with mask = [u >= p] / (1 - p), u uniform on [0, 1)."""
    keep = rng.random_sample(x.shape) >= p
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, mask


@kernels.gpu_fast_path(kernels.dropout_backward)
def _dropout_backward(dout, mask, p):
    """dx = dout * mask."""
    return dout * mask
