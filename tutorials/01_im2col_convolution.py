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
# # 1. im2col: the whole convolution as one matrix product
#
# A convolution layer slides every filter over every position of every image. Written as
# the formula reads that is six nested loops; written the way minicnn runs it, it is **one
# matrix product**. This tutorial builds the second from the first and checks every step:
#
# 1. the convolution sum, as loops (`minicnn.reference.conv2d_forward`);
# 2. the im2col matrix, entry by entry, then with one strided copy (`minicnn.im2col`);
# 3. the convolution as `W_mat @ cols`, which is what `minicnn.Conv2D` computes;
# 4. the backward pass: `dW = G @ cols.T` and `dx = col2im(W_mat.T @ G)`, where `col2im`
#    is the adjoint (transpose) of `im2col`;
# 5. how much faster the matrix product is.
#
# Run it top to bottom (`python tutorials/01_im2col_convolution.py`, or as a notebook: see
# `tutorials/README.md`). Every claim is checked with an `assert`.

# %%
import os
import time
from pathlib import Path

import numpy as np

import minicnn
from minicnn import reference

QUICK = os.environ.get("MINICNN_TUTORIAL_QUICK") == "1"  # CI: smaller timings
OUT = Path(os.environ.get("MINICNN_TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## The convolution sum
#
# Input `x` of shape `(N, C, H, W)`, filters `W` of shape `(F, C, KH, KW)`, bias `b` of
# shape `(F,)`, stride `s`, zero padding `p`. The output has shape `(N, F, OH, OW)` with
# `OH = (H + 2p - KH) // s + 1` and
#
# $$\text{out}[n, f, i, j] = b[f] + \sum_{c, u, v} W[f, c, u, v]\; x_{pad}[n, c, i s + u, j s + v]$$
#
# Note the indices: `W[.., u, v]` multiplies `x[.., i s + u, j s + v]`. The kernel is **not
# flipped**: strictly this is a *cross-correlation*. PyTorch, Keras and CS231n all compute the
# same thing and call it convolution. A kernel with a single 1 in its top-left corner shows it:
# output `(i, j)` picks input `(i, j)`, not `(i + 2, j + 2)` as a flipped kernel would.

# %%
x = np.arange(16.0).reshape(1, 1, 4, 4)
corner = np.zeros((1, 1, 3, 3))
corner[0, 0, 0, 0] = 1.0
out = reference.conv2d_forward(x, corner)
print("input:\n", x[0, 0])
print("output with a top-left one-hot kernel:\n", out[0, 0])
assert np.array_equal(out[0, 0], x[0, 0, :2, :2])  # cross-correlation: no flip

# %% [markdown]
# ## The im2col matrix
#
# Every output pixel `(n, i, j)` reads one *receptive field*: `C * KH * KW` input values.
# im2col writes each receptive field as one **column**:
#
# $$\text{cols}[(c, u, v), (n, i, j)] = x_{pad}[n, c, i s + u, j s + v]$$
#
# a matrix of shape `(C*KH*KW, N*OH*OW)`. `reference.im2col` fills it entry by entry;
# `minicnn.im2col` builds the same matrix with a strided *view* of the padded input and a
# single copy.

# %%
x = rng.standard_normal((2, 3, 5, 5))
kh = kw = 3
cols_loops = reference.im2col(x, kh, kw, stride=1, padding=1)
cols_fast = minicnn.im2col(x, kh, kw, stride=1, padding=1)
print("cols:", cols_fast.shape, "= (C*KH*KW, N*OH*OW) =", (3 * 3 * 3, 2 * 5 * 5))
assert np.array_equal(cols_loops, cols_fast)

# Column (n=1, i=2, j=3) is the receptive field of that output pixel, flattened in (c, u, v) order.
xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
column = cols_fast[:, 1 * 25 + 2 * 5 + 3]
assert np.array_equal(column, xpad[1, :, 2:5, 3:6].reshape(-1))

# %% [markdown]
# A picture of the matrix for a tiny image whose pixels are numbered 0..15: each column is
# one 2x2 window; neighbouring windows share pixels, so the same numbers reappear.

# %%
import matplotlib.pyplot as plt  # noqa: E402

tiny = np.arange(16.0).reshape(1, 1, 4, 4)
tiny_cols = minicnn.im2col(tiny, 2, 2)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].imshow(tiny[0, 0], cmap="viridis")
axes[0].set_title("image (pixel numbers)")
for (r, c), v in np.ndenumerate(tiny[0, 0]):
    axes[0].text(c, r, int(v), ha="center", va="center", color="w")
axes[1].imshow(tiny_cols, cmap="viridis", aspect="auto")
axes[1].set_title("im2col: one column per 2x2 window")
axes[1].set_xlabel("window (n, i, j)")
axes[1].set_ylabel("offset (c, u, v)")
for (r, c), v in np.ndenumerate(tiny_cols):
    axes[1].text(c, r, int(v), ha="center", va="center", color="w", fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "01_im2col_matrix.png", dpi=80)
plt.show()

# %% [markdown]
# ## The convolution as one matrix product
#
# Reshape the filters to `W_mat` of shape `(F, C*KH*KW)`: row `f` is filter `f`, flattened in
# the same `(c, u, v)` order as the columns. Then `W_mat @ cols` has shape `(F, N*OH*OW)` and
# entry `(f, (n, i, j))` is exactly the convolution sum. Reshape to `(F, N, OH, OW)`, move the
# batch axis first, add the bias, done. That is `minicnn.Conv2D.forward`.

# %%
F = 4
W = rng.standard_normal((F, 3, kh, kw))
b = rng.standard_normal(F)
gemm = (W.reshape(F, -1) @ cols_fast).reshape(F, 2, 5, 5).transpose(1, 0, 2, 3) + b.reshape(1, F, 1, 1)
loops = reference.conv2d_forward(x, W, b, stride=1, padding=1)
print("max |GEMM - loops| =", np.abs(gemm - loops).max())
assert np.allclose(gemm, loops, rtol=1e-12, atol=1e-12)

layer = minicnn.Conv2D(3, F, 3, padding=1)
layer.astype(np.float64)
layer.params["W"][...], layer.params["b"][...] = W, b
assert np.allclose(layer.forward(x), loops, rtol=1e-12, atol=1e-12)

# %% [markdown]
# Strides, paddings and rectangular kernels change nothing but the column geometry:

# %%
for stride, padding, (KH, KW) in [(2, 0, (3, 3)), ((1, 2), (2, 1), (2, 4)), (3, 1, (1, 1))]:
    W2 = rng.standard_normal((2, 3, KH, KW))
    cols2 = minicnn.im2col(x, KH, KW, stride, padding)
    ref = reference.conv2d_forward(x, W2, None, stride, padding)
    fast = (W2.reshape(2, -1) @ cols2).reshape(2, x.shape[0], *ref.shape[2:]).transpose(1, 0, 2, 3)
    assert np.allclose(fast, ref)
    print(f"stride {stride}, padding {padding}, kernel {KH}x{KW}: output {ref.shape}, cols {cols2.shape}  ok")

# %% [markdown]
# ## Backward: two more matrix products and col2im
#
# With `G` the upstream gradient `dout` rearranged to `(F, N*OH*OW)` (the same layout as the
# forward product), the chain rule through `out = W_mat @ cols + b` gives
#
# * `dW_mat = G @ cols.T`, i.e. $dW[f,c,u,v] = \sum_{n,i,j} dout[n,f,i,j]\, x_{pad}[n,c,is+u,js+v]$;
# * `db = G.sum(axis=1)`;
# * `dcols = W_mat.T @ G`, the gradient of every entry of the column matrix. Each input pixel
#   was copied into several columns (the windows overlap), so its gradient is the **sum** of
#   the gradients of its copies: `col2im` scatters each column entry back to the pixel it was
#   read from and adds. That makes `col2im` the adjoint of `im2col`:
#   $\langle \text{im2col}(x), y\rangle = \langle x, \text{col2im}(y)\rangle$ for all `x`, `y`.

# %%
dout = rng.standard_normal(loops.shape)
G = dout.transpose(1, 0, 2, 3).reshape(F, -1)
dW = (G @ cols_fast.T).reshape(W.shape)
db = G.sum(axis=1)
dx = minicnn.col2im(W.reshape(F, -1).T @ G, x.shape, kh, kw, stride=1, padding=1)

ref_dx, ref_dW, ref_db = reference.conv2d_backward(dout, x, W, stride=1, padding=1)
for name, ours, theirs in (("dx", dx, ref_dx), ("dW", dW, ref_dW), ("db", db, ref_db)):
    print(f"{name}: max |matrix products - loops| = {np.abs(ours - theirs).max():.1e}")
    assert np.allclose(ours, theirs, rtol=1e-10, atol=1e-12)

y = rng.standard_normal(cols_fast.shape)
lhs = float((minicnn.im2col(x, kh, kw, 1, 1) * y).sum())
rhs = float((x * minicnn.col2im(y, x.shape, kh, kw, 1, 1)).sum())
print(f"<im2col(x), y> = {lhs:.10f}   <x, col2im(y)> = {rhs:.10f}")
assert abs(lhs - rhs) < 1e-9 * max(1.0, abs(lhs))

# %% [markdown]
# With stride 1 the same `dx` is itself a convolution: of `dout`, zero-padded by `K-1-p`, with the
# kernel turned by 180 degrees and its input and output channels swapped,
# $dx[n,c,y,x] = \sum_{f,u,v} dout[n,f,y+p-u,x+p-v]\, W[f,c,u,v]$. A copy (im2col of `dout`)
# replaces the scatter-add, and `Conv2D.backward` takes this route when it moves less memory
# (stride 1 and `C_out <= 2 C_in`; see `minicnn.layers.conv.conv_input_grad`).

# %%
W_rot = W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # (C, F, KH, KW)
dx_as_conv = reference.conv2d_forward(dout, W_rot, None, stride=1, padding=(kh - 1 - 1, kw - 1 - 1))
print(f"dx: max |turned-kernel convolution - col2im| = {np.abs(dx_as_conv - dx).max():.1e}")
assert np.allclose(dx_as_conv, dx, rtol=1e-10, atol=1e-12)

# %% [markdown]
# And the layer's own backward, checked against numerical gradients with `minicnn.gradcheck`
# (float64, a random upstream gradient):

# %%
minicnn.set_default_dtype("float64")
report = minicnn.gradcheck(minicnn.Conv2D(3, 4, (3, 2), stride=(2, 1), padding=1), rng.standard_normal((2, 3, 6, 5)))
print(report)
assert report.ok
minicnn.set_default_dtype("float32")

# %% [markdown]
# ## Why bother: speed
#
# The loops run Python code for every output value; the matrix product hands all the
# multiply-adds to an optimised BLAS routine in one call. The price is memory: `cols` holds
# every input value `KH*KW` times.

# %%
n, c, h, f = (4, 4, 12, 8) if QUICK else (8, 8, 24, 16)
xb = rng.standard_normal((n, c, h, h)).astype(np.float32)
conv = minicnn.Conv2D(c, f, 3, padding=1)


def seconds(fn, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


t_loops = seconds(lambda: reference.conv2d_forward(xb, conv.params["W"], conv.params["b"], 1, 1), 1)
t_gemm = seconds(lambda: conv.forward(xb), 10)
print(f"x {xb.shape}, {f} filters 3x3: loops {1e3 * t_loops:.1f} ms, im2col + GEMM {1e3 * t_gemm:.2f} ms "
      f"({t_loops / t_gemm:.0f}x faster); cols holds {9 * xb.size:,} values for {xb.size:,} inputs")

# %% [markdown]
# ## Less memory: unfold one axis only
#
# With stride 1 there is a leaner unfolding. Lay the padded input out channel by channel, every
# image's rows end to end: a pixel one row further down is then `Wp` (the padded width) further
# along. Copy only the `KW` horizontal shifts, `R[(c, v), m] = z[c, m + v]`
# (`minicnn.layers.conv.shifted_rows`), and each vertical kernel offset `u` is the free view
# `R[:, u*Wp : u*Wp + N*Hp*Wp]`. The convolution is `KH` matrix products,
# $out = \sum_u W[:, :, u, :]\,R_u$, read at the positions whose window starts inside the image.
# `R` holds each input value `KW` times instead of `KH*KW`; the price is smaller products that also
# compute the discarded positions, so on a CPU it trades time for memory
# (`Conv2D(..., algorithm="shifted")`; README, "Convolution algorithms").

# %%
from minicnn.layers.conv import shifted_rows  # noqa: E402

R = shifted_rows(x, kh, kw, 1)  # x (2, 3, 5, 5), W (F, 3, 3, 3), b (F,) from above; padding 1
hp, wp = x.shape[2] + 2, x.shape[3] + 2
m = x.shape[0] * hp * wp
out_wide = sum(W[:, :, u, :].reshape(F, -1) @ R[:, u * wp : u * wp + m] for u in range(kh))  # (F, N*Hp*Wp)
out_rows = out_wide.reshape(F, x.shape[0], hp, wp)[:, :, : hp - kh + 1, : wp - kw + 1].transpose(1, 0, 2, 3)
out_rows = out_rows + b.reshape(1, F, 1, 1)
ref = reference.conv2d_forward(x, W, b, stride=1, padding=1)
print(f"row shifts: max |KH products - loops| = {np.abs(out_rows - ref).max():.1e}; "
      f"R holds {R.size:,} values, cols {minicnn.im2col(x, kh, kw, 1, 1).size:,}")
assert np.allclose(out_rows, ref, rtol=1e-10, atol=1e-12)
