# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Backpropagation through BatchNorm, checked with `gradcheck`
#
# BatchNorm is the layer whose backward pass students most often get wrong: the mean and the
# variance depend on *every* input of the batch, so each input's gradient depends on all the
# others. This tutorial
#
# 1. writes the forward pass as a computational graph of elementary steps (as CS231n does:
#    `minicnn.reference.batchnorm_forward`);
# 2. walks the graph backwards, one chain-rule step per line (`batchnorm_backward_steps`);
# 3. simplifies the result on paper to one line (`batchnorm_backward_compact`), which is what
#    `minicnn.BatchNorm1D` / `BatchNorm2D` compute;
# 4. proves all three with numerical gradients, and shows why the check needs a *random*
#    upstream gradient.

# %%
import os
import time

import numpy as np

import minicnn
from minicnn import reference
from minicnn.gradcheck import numerical_gradient, relative_error

QUICK = os.environ.get("MINICNN_TUTORIAL_QUICK") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## The forward graph
#
# For a batch `x` of shape `(N, D)` (`m = N` values per feature):
#
# | step | forward | backward (chain rule) |
# |---|---|---|
# | 1 | `mu = sum(x) / m` | `dx += dmu / m` |
# | 2 | `xmu = x - mu` | `dx = dxmu`, `dmu = -sum(dxmu)` |
# | 3 | `var = sum(xmu**2) / m` | `dxmu += 2 xmu dvar / m` |
# | 4 | `std = sqrt(var + eps)` | `dvar = dstd / (2 std)` |
# | 5 | `ivar = 1 / std` | `dstd = -divar / std**2` |
# | 6 | `xhat = xmu * ivar` | `dxmu = dxhat ivar`, `divar = sum(dxhat xmu)` |
# | 7 | `y = gamma xhat + beta` | `dbeta = sum(dy)`, `dgamma = sum(dy xhat)`, `dxhat = dy gamma` |
#
# The backward column is read bottom-up. `xmu` is used twice (steps 3 and 6), so its gradient
# is the sum of two contributions. `var` is the *biased* variance (divided by `m`).

# %%
N, D = 8, 5
x = rng.standard_normal((N, D)) * 3 + 1
gamma, beta = rng.uniform(0.5, 1.5, D), rng.standard_normal(D)
y, cache = reference.batchnorm_forward(x, gamma, beta)
print("per-feature mean of xhat:", np.round(cache["xhat"].mean(axis=0), 12))
print("per-feature variance of xhat:", np.round(cache["xhat"].var(axis=0), 4))
assert np.allclose(cache["xhat"].mean(axis=0), 0) and np.allclose(cache["xhat"].var(axis=0), 1, atol=1e-4)

# %% [markdown]
# ## Step-by-step backward, checked numerically
#
# `numerical_gradient(f, a)` perturbs each entry of `a` by `±h` and takes the central
# difference of the scalar `f()`. For a layer output `y(x)` and an upstream gradient `G`, the
# scalar is `L = sum(y * G)`, whose gradient is exactly what backward computes from `dout = G`.

# %%
G = rng.standard_normal((N, D))


def loss():
    return float((reference.batchnorm_forward(x, gamma, beta)[0] * G).sum())


dx, dgamma, dbeta = reference.batchnorm_backward_steps(G, cache)
for name, analytic, wrt in (("dx", dx, x), ("dgamma", dgamma, gamma), ("dbeta", dbeta, beta)):
    err = relative_error(analytic, numerical_gradient(loss, wrt))
    print(f"steps   {name:>6}: relative error {err:.1e}")
    assert err < 1e-7

# %% [markdown]
# ## The compact formula
#
# Substituting the steps into each other (write `s = sqrt(var + eps)`):
#
# * from steps 5-6: `divar = gamma sum(dy xmu)`, so `dvar = -gamma sum(dy xmu) / (2 s^3)`;
# * `dx = gamma dy / s + 2 xmu dvar / m + dmu / m`, and `dmu = -sum(dxmu)` is
#   `-gamma sum(dy) / s` (the `xmu` term sums to zero, because `sum(xmu) = 0`);
# * with `xhat = xmu / s` everything has the common factor `gamma / (m s)`:
#
# $$dx = \frac{\gamma}{m\,\sqrt{var + \epsilon}}\Big(m\,dy - \sum dy - \hat{x} \sum (dy\,\hat{x})\Big)$$
#
# Three reductions and a few element-wise operations instead of a dozen steps.

# %%
dx_c, dgamma_c, dbeta_c = reference.batchnorm_backward_compact(G, cache)
print("max |steps - compact|:", max(np.abs(dx - dx_c).max(), np.abs(dgamma - dgamma_c).max()))
assert np.allclose(dx, dx_c, rtol=1e-10, atol=1e-12)
assert np.allclose(dgamma, dgamma_c) and np.allclose(dbeta, dbeta_c)

# %% [markdown]
# ## Why a *random* upstream gradient
#
# With `dout = 1` everywhere the true `dx` is zero: `m * 1 - sum(1) = 0` and `sum(xhat) = 0`.
# A backward that forgets the `xhat * sum(dy * xhat)` term (the gradient through the variance)
# also returns zero for that `dout`, and passes a check with all-ones. A random `dout` catches it.
# That is why `minicnn.gradcheck` draws a random upstream gradient.


# %%
def forgetful_backward(dout, cache):
    """Wrong: treats the variance as a constant (only the mean's gradient is kept)."""
    m = dout.shape[0]
    return cache["gamma"] * cache["ivar"] / m * (m * dout - dout.sum(axis=0))


ones = np.ones_like(x)
for name, upstream in (("all-ones dout", ones), ("random dout", G)):
    def loss_with(upstream=upstream):
        return float((reference.batchnorm_forward(x, gamma, beta)[0] * upstream).sum())
    wrong, numeric = forgetful_backward(upstream, cache), numerical_gradient(loss_with, x)
    agrees = np.allclose(wrong, numeric, atol=1e-6)
    print(f"wrong backward, {name:>13}: max |wrong - numerical| = {np.abs(wrong - numeric).max():.1e}, "
          f"max |numerical| = {np.abs(numeric).max():.1e}  ->  {'passes!' if agrees else 'caught'}")
    assert agrees == (upstream is ones)

# %% [markdown]
# ## The layers: `BatchNorm1D` and `BatchNorm2D`
#
# `minicnn.BatchNorm1D` computes the compact formula with fused passes; `minicnn.gradcheck`
# casts it to float64 and compares every gradient (x, gamma, beta) with central differences,
# in both modes. In evaluation mode the running statistics are constants and
# `dx = dy * gamma / sqrt(running_var + eps)`.
#
# `BatchNorm2D` normalises each channel of `(N, C, H, W)` over `(N, H, W)`: CS231n's "spatial
# batchnorm" reshapes to `(N*H*W, C)` and reuses the 1-D version, and so does the reference.

# %%
minicnn.set_default_dtype("float64")
for layer, shape in ((minicnn.BatchNorm1D(D), (N, D)), (minicnn.BatchNorm2D(3), (4, 3, 5, 5))):
    for training in (True, False):
        report = minicnn.gradcheck(layer, rng.standard_normal(shape) * 2 + 1, training=training)
        print(f"{layer!r:<45} training={training!s:<5}  max relative error {report.max_error:.1e}")
        assert report.ok, str(report)

bn2 = minicnn.BatchNorm2D(3)
x4 = rng.standard_normal((4, 3, 5, 5))
out = bn2.forward(x4, training=True)
ref_out, cache4 = reference.batchnorm_forward(x4, bn2.params["gamma"], bn2.params["beta"])
G4 = rng.standard_normal(out.shape)
assert np.allclose(out, ref_out)
assert np.allclose(bn2.backward(G4), reference.batchnorm_backward_steps(G4, cache4)[0])
minicnn.set_default_dtype("float32")

# %% [markdown]
# ## Running statistics: PyTorch's convention
#
# In training mode the layer also updates
# `running = (1 - momentum) * running + momentum * batch_statistic` with `momentum = 0.1` and the
# **unbiased** variance, as PyTorch does. CS231n writes `momentum * running + (1 - momentum) *
# batch` with `momentum = 0.9` and the biased variance: the same update for `0.9 = 1 - 0.1`, up
# to the factor `m / (m - 1)` on the variance (`docs/conventions.md`).

# %%
bn = minicnn.BatchNorm1D(D)
bn.astype(np.float64)
bn.forward(x, training=True)
cs231n_mean = 0.9 * np.zeros(D) + (1 - 0.9) * x.mean(axis=0)
cs231n_var = 0.9 * np.ones(D) + (1 - 0.9) * x.var(axis=0)  # np.var: biased
assert np.allclose(bn.buffers["running_mean"], cs231n_mean)
assert np.allclose(bn.buffers["running_var"], 0.9 + 0.1 * x.var(axis=0) * N / (N - 1))
print("running_var minicnn:", np.round(bn.buffers["running_var"], 4))
print("running_var CS231n: ", np.round(cs231n_var, 4))

# %% [markdown]
# ## Cost of the two versions
#
# Both compute the same numbers; the compact one touches the `(m, D)` arrays fewer times.

# %%
m, d = (256, 64) if QUICK else (4096, 256)
xb = rng.standard_normal((m, d))
yb, cb = reference.batchnorm_forward(xb, np.ones(d), np.zeros(d))
gb = rng.standard_normal((m, d))
for fn in (reference.batchnorm_backward_steps, reference.batchnorm_backward_compact):
    start = time.perf_counter()
    for _ in range(20):
        fn(gb, cb)
    print(f"{fn.__name__:<28} {(time.perf_counter() - start) / 20 * 1e3:.2f} ms for ({m}, {d})")
