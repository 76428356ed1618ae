"""Weight initialisers: He/Kaiming and Glorot/Xavier, normal and uniform.

Weights are drawn on the host from the seeded NumPy stream
(:func:`minicnn.backend.random_state`) and then moved to the active backend,
so the same seed gives the same initial network on NumPy and on CuPy.

For a weight with fan-in ``n_in`` and fan-out ``n_out``:

=================  ==========================================
``he_normal``      N(0, 2 / n_in)        (ReLU family default)
``he_uniform``     U(-a, a), a = sqrt(6 / n_in)
``glorot_normal``  N(0, 2 / (n_in + n_out))
``glorot_uniform`` U(-a, a), a = sqrt(6 / (n_in + n_out))
=================  ==========================================

For a convolution ``n_in = C_in * kh * kw`` and ``n_out = C_out * kh * kw``.
"""
from __future__ import annotations

import numpy as np

from . import backend

__all__ = ["he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "get_initializer", "INITIALIZERS"]


def _draw(kind: str, shape, std_or_bound: float, dtype):
    rs = backend.random_state(np)
    if kind == "normal":
        w = rs.standard_normal(shape) * std_or_bound
    else:
        w = rs.uniform(-std_or_bound, std_or_bound, size=shape)
    dtype = backend.get_default_dtype() if dtype is None else dtype
    return backend.to_device(w.astype(dtype))


def he_normal(shape, fan_in, fan_out=None, dtype=None):
    return _draw("normal", shape, np.sqrt(2.0 / fan_in), dtype)


def he_uniform(shape, fan_in, fan_out=None, dtype=None):
    return _draw("uniform", shape, np.sqrt(6.0 / fan_in), dtype)


def glorot_normal(shape, fan_in, fan_out, dtype=None):
    return _draw("normal", shape, np.sqrt(2.0 / (fan_in + fan_out)), dtype)


def glorot_uniform(shape, fan_in, fan_out, dtype=None):
    return _draw("uniform", shape, np.sqrt(6.0 / (fan_in + fan_out)), dtype)


INITIALIZERS = {
    "he_normal": he_normal,
    "he_uniform": he_uniform,
    "glorot_normal": glorot_normal,
    "glorot_uniform": glorot_uniform,
}


def get_initializer(name_or_fn):
    """Look an initialiser up by name (or pass a callable through)."""
    if callable(name_or_fn):
        return name_or_fn
    try:
        return INITIALIZERS[name_or_fn]
    except KeyError:
        raise ValueError(f"unknown initialiser {name_or_fn!r}: expected one of {sorted(INITIALIZERS)}") from None


def zeros(shape, dtype=None):
    dtype = backend.get_default_dtype() if dtype is None else dtype
    return backend.get_xp().zeros(shape, dtype=dtype)


def ones(shape, dtype=None):
    dtype = backend.get_default_dtype() if dtype is None else dtype
    return backend.get_xp().ones(shape, dtype=dtype)
