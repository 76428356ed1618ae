"""Numerical gradient checking: the way to *prove* a backward pass.

For a layer ``f`` and a random upstream gradient ``G`` (all-ones would hide
errors that cancel, e.g. in BatchNorm), the scalar ``L(x) = sum(f(x) * G)`` has

    dL/dx = f.backward(G)        (analytic, what the layer computes)
    dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / (2 h)        (central difference)

and likewise for every parameter. Both are compared by the relative error

    rel = max_i |a_i - n_i| / max_i max(|a_i|, |n_i|)

computed in float64, where a correct layer gives about 1e-8 or less and a
wrong one about 1e-2 or more. (The error is scaled by the largest entry, not
entry by entry: BatchNorm's dx sums to zero per channel, so some of its
entries are tiny differences whose own relative error says nothing.)

    >>> import numpy as np, minicnn
    >>> layer = minicnn.Conv2D(2, 3, 3, padding=1)
    >>> report = minicnn.gradcheck(layer, np.random.randn(2, 2, 5, 5))
    >>> print(report)            # one line per checked array
    >>> report.ok                # True when every relative error < tolerance
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backend import get_array_module, to_host

__all__ = ["numerical_gradient", "gradcheck", "GradCheckReport", "relative_error"]


def relative_error(a, n) -> float:
    """max |a - n| / max(|a|, |n|): the largest difference relative to the largest entry."""
    a, n = to_host(a).astype(np.float64), to_host(n).astype(np.float64)
    if a.shape != n.shape:
        raise ValueError(f"relative_error: shapes differ, {a.shape} vs {n.shape}")
    if not a.size:
        return 0.0
    scale = max(float(np.abs(a).max()), float(np.abs(n).max()), 1e-12)
    return float(np.abs(a - n).max()) / scale


def numerical_gradient(f, x, h=1e-6):
    """Central-difference gradient of the scalar function ``f()`` with respect to array ``x``.

    ``x`` is perturbed *in place* one element at a time (and restored), so ``f``
    may close over it (e.g. a layer parameter).

    Shapes: x (any) -> grad (same shape): ``grad[i] = (f(x + h e_i) - f(x - h e_i)) / (2 h)``.

    Parameters:
        f: a function of no arguments returning a scalar that depends on ``x``.
        x: the array to differentiate with respect to (float64 for accurate results).
        h: the step.
    """
    xp = get_array_module(x)
    grad = xp.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i].copy() if hasattr(flat[i], "copy") else flat[i]
        flat[i] = old + h
        plus = float(f())
        flat[i] = old - h
        minus = float(f())
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


@dataclass
class GradCheckReport:
    """Relative errors (analytic vs numerical) per checked array; what :func:`gradcheck` returns.

    Parameters:
        errors: name (``"x"``, ``"W"``, ...) -> relative error of that array's gradient.
        tolerance: an error below it is "ok"; ``ok`` is True when every error is.
    """

    errors: dict = field(default_factory=dict)
    tolerance: float = 1e-6

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_error < self.tolerance

    def __str__(self):
        lines = [f"{name:>20s}: rel. error {err:.2e} {'ok' if err < self.tolerance else 'FAIL'}" for name, err in self.errors.items()]
        return "\n".join(lines + [f"{'max':>20s}: {self.max_error:.2e} (tolerance {self.tolerance:.0e})"])


def gradcheck(layer, x, dout=None, training=True, h=1e-6, tolerance=1e-6, seed=0, check_params=True):
    """Compare ``layer.backward`` with central differences, in float64.

    The layer's parameters and buffers are cast to float64 (a float32 check
    drowns in rounding error). ``dout`` defaults to a random upstream gradient.
    Layers with randomness (Dropout) must be checked with a fixed mask, e.g.
    ``training=False`` or by seeding identically before each call.

    Returns a :class:`GradCheckReport` with entries ``"x"`` and one per parameter.

    Shapes:
        x: the layer's input (any shape it takes); dout: the shape of ``layer.forward(x)``

    Parameters:
        layer: any minicnn layer (or container); it is cast to float64.
        x: the input at which to check.
        dout: the upstream gradient G in L = sum(f(x) * G); None: standard normal (seeded).
        training: the mode of every forward pass (BatchNorm: batch or running statistics).
        h: the central-difference step.
        tolerance: the largest relative error that counts as correct (``report.ok``).
        seed: seeds the default ``dout``.
        check_params: also check every parameter's gradient, not only dx.
    """
    xp = get_array_module(x)
    layer.astype(np.float64)
    x = xp.array(x, dtype=np.float64)
    buffers0 = {k: v.copy() for k, v in layer.buffers.items()}

    def restore_buffers():
        # Running statistics must not drift between the many forward passes.
        for k, v in buffers0.items():
            if hasattr(layer, "assign"):
                layer.assign("buffers", k, v.copy())
            else:
                layer.buffers[k] = v.copy()

    out = layer.forward(x, training)
    if dout is None:
        dout = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape))
    dout = xp.asarray(dout, dtype=np.float64)
    dx = layer.backward(dout)
    analytic = {"x": dx}
    analytic.update({k: v.copy() for k, v in layer.grads.items()})
    restore_buffers()

    def loss():
        val = (layer.forward(x, training) * dout).sum()
        restore_buffers()
        return val

    report = GradCheckReport(tolerance=tolerance)
    report.errors["x"] = relative_error(analytic["x"], numerical_gradient(loss, x, h))
    if check_params:
        for name, p in layer.params.items():
            report.errors[name] = relative_error(analytic[name], numerical_gradient(loss, p, h))
    return report
