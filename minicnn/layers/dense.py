"""Fully connected layer and the reshape that feeds it."""
from __future__ import annotations

import math

from .. import initializers
from .base import Layer, positive_int

__all__ = ["Dense", "Flatten"]


class Dense(Layer):
    """Affine (fully connected) layer.

    Shapes:
        x (N, D_in) -> out (N, D_out);  W (D_in, D_out);  b (D_out,)

    Parameters:
        in_features, out_features: D_in and D_out.
        bias: learn a bias ``b`` (starts at zero).
        init: initialiser name for W (default ``"he_normal"``).

    Forward:  out = x @ W + b,             out[n, k] = b[k] + sum_d x[n, d] W[d, k]
    Backward: dx = dout @ W^T,   dW = x^T @ dout,   db = sum over N of dout

    (Note the weight layout (in, out), as in CS231n and Keras; ``torch.nn.Linear`` stores
    the transpose: ``W = linear.weight.T``.) Reference: :func:`minicnn.reference.dense_forward`
    / :func:`minicnn.reference.dense_backward`.
    """

    def __init__(self, in_features, out_features, bias=True, init="he_normal"):
        super().__init__()
        self.in_features = positive_int(in_features, "Dense: in_features")
        self.out_features = positive_int(out_features, "Dense: out_features")
        self.params["W"] = initializers.get_initializer(init)(
            (self.in_features, self.out_features), self.in_features, self.out_features
        )
        if bias:
            self.params["b"] = initializers.zeros((self.out_features,))

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}" + ("" if "b" in self.params else ", bias=False")

    cache_attrs = ("x",)

    def forward(self, x, training=True):
        """out = x @ W + b; keeps x for backward."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise self._bad_input(f"(N, {self.in_features})", x)
        self.x = x
        out = x @ self.params["W"]
        if "b" in self.params:
            out += self.params["b"]
        return out

    def backward(self, dout):
        """dout (N, D_out) -> dx = dout @ W^T; sets ``grads["W"]`` = x^T @ dout, ``grads["b"]`` = sum dout."""
        x = self._saved("x")
        self._check_dout(dout, (x.shape[0], self.out_features))
        self.grads["W"] = x.T @ dout
        if "b" in self.params:
            self.grads["b"] = dout.sum(axis=0)
        dx = dout @ self.params["W"].T
        self.x = None
        return dx


class Flatten(Layer):
    """Flatten everything but the batch axis (row-major, as ``torch.flatten(x, 1)``).

    Shapes:
        x (N, d1, d2, ...) -> out (N, d1 * d2 * ...)

    Parameters: none.

    Forward:  out = x.reshape(N, -1)
    Backward: dx = dout.reshape(x.shape)
    """

    cache_attrs = ("shape",)

    def forward(self, x, training=True):
        """out = x.reshape(N, -1)."""
        if x.ndim < 2:
            raise self._bad_input("(N, ...)", x)
        self.shape = x.shape
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))

    def backward(self, dout):
        """dx = dout reshaped back to the input's shape."""
        shape = self._saved("shape")
        self._check_dout(dout, (shape[0], math.prod(shape[1:])))
        return dout.reshape(shape)
