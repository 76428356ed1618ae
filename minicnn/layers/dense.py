"""Fully connected layer and the reshape that feeds it."""
from __future__ import annotations

import math

from .. import initializers
from .base import Layer

__all__ = ["Dense", "Flatten"]


class Dense(Layer):
    """Affine layer.

    Shapes: x (N, D_in) -> out (N, D_out);  W (D_in, D_out);  b (D_out,)

    Forward:  out = x @ W + b
    Backward: dx = dout @ W^T,   dW = x^T @ dout,   db = sum over N of dout

    (Note the weight layout (in, out), as in CS231n; ``torch.nn.Linear`` stores the transpose.)
    """

    def __init__(self, in_features, out_features, bias=True, init="he_normal"):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.params["W"] = initializers.get_initializer(init)(
            (self.in_features, self.out_features), self.in_features, self.out_features
        )
        if bias:
            self.params["b"] = initializers.zeros((self.out_features,))

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}" + ("" if "b" in self.params else ", bias=False")

    def forward(self, x, training=True):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise self._bad_input(f"(N, {self.in_features})", x)
        self.x = x
        out = x @ self.params["W"]
        if "b" in self.params:
            out += self.params["b"]
        return out

    def backward(self, dout):
        self.grads["W"] = self.x.T @ dout
        if "b" in self.params:
            self.grads["b"] = dout.sum(axis=0)
        dx = dout @ self.params["W"].T
        self.x = None
        return dx


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...); backward reshapes back."""

    def forward(self, x, training=True):
        if x.ndim < 2:
            raise self._bad_input("(N, ...)", x)
        self.shape = x.shape
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))

    def backward(self, dout):
        return dout.reshape(self.shape)
