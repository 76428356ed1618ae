"""Minibatch iteration over arrays on NumPy or CuPy."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, random_state

__all__ = ["iterate_minibatches"]


def iterate_minibatches(images, labels, batch_size: int, shuffle: bool = True, rng=None, drop_last: bool = False):
    """Yield ``(x, y)`` minibatches covering ``images`` and ``labels`` once.

    Args:
        images: array ``(N, ...)`` (NumPy or CuPy).
        labels: array ``(N, ...)`` on the same backend, or ``None`` (then
            every ``y`` is ``None``).
        batch_size: rows per batch; the last batch may be smaller unless
            ``drop_last``.
        shuffle: visit the rows in a random order (a fresh permutation per
            call, i.e. per epoch).
        rng: a NumPy or CuPy ``RandomState`` for the permutation; default the
            library's seeded stream of the arrays' backend
            (:func:`minicnn.backend.random_state`).
        drop_last: skip a final batch smaller than ``batch_size``.

    Without shuffling the batches are views (basic slices); with shuffling
    they are copies gathered by fancy indexing on the arrays' own device.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(images)
    if labels is not None and len(labels) != n:
        raise ValueError(f"images and labels differ in length: {n} vs {len(labels)}")
    xp = get_array_module(images)
    order = None
    if shuffle:
        rng = random_state(xp) if rng is None else rng
        order = rng.permutation(n)
        if get_array_module(order) is not xp:  # the rng may live on the other backend
            order = xp.asarray(order) if xp is not np else order.get()
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if order is None:
            sel = slice(start, end)
        else:
            sel = order[start:end]
        yield images[sel], (None if labels is None else labels[sel])
