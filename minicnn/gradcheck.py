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


def numerical_gradient(f, x, h=1e-6, indices=None, progress=None):
    """Central-difference gradient of the scalar function ``f()`` with respect to array ``x``.

    ``x`` is perturbed *in place* one element at a time (and restored), so ``f``
    may close over it (e.g. a layer parameter).

    Shapes: x (any) -> grad (same shape): ``grad[i] = (f(x + h e_i) - f(x - h e_i)) / (2 h)``;
    with ``indices``, a vector of those entries only.

    Parameters:
        f: a function of no arguments returning a scalar that depends on ``x``.
        x: the array to differentiate with respect to (float64 for accurate results).
        h: the step.
        indices: flat indices into ``x`` to compute (None: all of them).
        progress: an object with ``update(n)`` (a tqdm bar), advanced by one per entry.
    """
    xp = get_array_module(x)
    flat = x.reshape(-1)
    which = range(flat.size) if indices is None else [int(i) for i in indices]
    values = np.zeros(len(which))
    for k, i in enumerate(which):
        old = flat[i].copy() if hasattr(flat[i], "copy") else flat[i]
        flat[i] = old + h
        plus = float(f())
        flat[i] = old - h
        minus = float(f())
        flat[i] = old
        values[k] = (plus - minus) / (2 * h)
        if progress is not None:
            progress.update(1)
    if indices is not None:
        return values
    return xp.asarray(values.reshape(x.shape))


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


#: more entries than this in all checked arrays together and :func:`gradcheck` refuses (two forward passes each)
MAX_ENTRIES = 20_000


def gradcheck(layer, x, dout=None, training=True, h=1e-6, tolerance=1e-6, seed=0, check_params=True,
              samples=None, max_entries=MAX_ENTRIES, progress=None):
    """Compare ``layer.backward`` with central differences, in float64, on a copy of ``layer``.

    The layer you pass is *copied* and the copy cast to float64 (a float32 check drowns in
    rounding error): your layer is left exactly as it was, dtype, parameters and buffers included.
    Returns a :class:`GradCheckReport` with entries ``"x"`` and one per parameter.

    Shapes:
        x: the layer's input (any shape it takes); dout: the shape of ``layer.forward(x)``

    Parameters:
        layer: any minicnn layer or container (a whole :class:`~minicnn.Sequential` too).
        x: the input at which to check.
        dout: the upstream gradient G in L = sum(f(x) * G); None: standard normal (seeded).
        training: the mode of every forward pass (BatchNorm: batch or running statistics). Layers
            with randomness (Dropout) must be checked with a fixed mask, e.g. ``training=False``.
        h: the central-difference step.
        tolerance: the largest relative error that counts as correct (``report.ok``).
        seed: seeds the default ``dout`` and the choice of ``samples``.
        check_params: also check every parameter's gradient, not only dx.
        samples: check only this many randomly chosen entries of each array (CS231n's "sparse"
            gradient check): the way to check a whole network in seconds.
        max_entries: refuse (ValueError) to check more entries than this in all, since each costs
            two forward passes; None lifts the limit.
        progress: show a progress bar (tqdm); default: when more than 2,000 entries are checked.
    """
    import copy  # noqa: PLC0415

    xp = get_array_module(x)
    layer = copy.deepcopy(layer).astype(np.float64)  # never change the caller's layer
    x = xp.array(x, dtype=np.float64)
    arrays = {"x": x, **(dict(layer.params) if check_params else {})}
    rng = np.random.default_rng(seed)
    chosen = {name: (None if samples is None or a.size <= samples
                     else np.sort(rng.choice(a.size, size=int(samples), replace=False)))
              for name, a in arrays.items()}
    total = sum(a.size if chosen[name] is None else len(chosen[name]) for name, a in arrays.items())
    if max_entries is not None and total > max_entries:
        sizes = ", ".join(f"{name} {a.size:,}" for name, a in arrays.items())
        raise ValueError(f"gradcheck: {total:,} entries to check ({sizes}), two forward passes each, more than "
                         f"max_entries={max_entries:,}: pass samples=K to check K random entries of each array, "
                         "a smaller input, or max_entries=None to check them all")
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

    bar = None
    if progress or (progress is None and total > 2000):
        try:
            from tqdm.auto import tqdm  # noqa: PLC0415

            bar = tqdm(total=total, desc="gradcheck", unit="entry", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    report = GradCheckReport(tolerance=tolerance)
    try:
        for name, a in arrays.items():
            idx = chosen[name]
            numeric = numerical_gradient(loss, a, h, indices=idx, progress=bar)
            exact = analytic[name] if idx is None else to_host(analytic[name]).reshape(-1)[idx]
            report.errors[name] = relative_error(exact, numeric)
    finally:
        if bar is not None:
            bar.close()
    return report
