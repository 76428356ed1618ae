"""Teaching references: every fast path of minicnn written the way its formula reads.

The layers in :mod:`minicnn.layers` are written for speed: convolution is one
matrix product over an im2col matrix, max-pooling a separable maximum with
arg-max bookkeeping, BatchNorm a few fused einsum passes, the optimisers
in-place updates. This module computes the same things *plainly*, with loops
over output positions or one line of NumPy that copies the formula, so a
student can read the code against the maths, and the tests use it as the
oracle that the fast paths must match (``tests/test_reference.py``).

Everything here is a pure function of NumPy arrays (host memory; move device
arrays with :func:`minicnn.to_host` first). Forward functions return the
output; backward functions take the upstream gradient ``dout`` = dL/d(out)
and return dL/d(input) (and the parameter gradients), recomputing whatever
they need from the inputs instead of keeping a cache, except BatchNorm,
whose backward passes read the forward pass's intermediate values as
CS231n's assignment does.

Index notation, NCHW layout (see ``docs/conventions.md``): ``x[n, c, y, x]``;
a window of a convolution or pooling with kernel (KH, KW), stride (sh, sw)
and padding (ph, pw) at output position (i, j) covers the padded input rows
``i*sh .. i*sh + KH - 1`` and columns ``j*sw .. j*sw + KW - 1``, and

    OH = (H + 2 ph - KH) // sh + 1,      OW = (W + 2 pw - KW) // sw + 1

Contents:

* convolution: :func:`im2col`, :func:`conv2d_forward`, :func:`conv2d_backward`;
* pooling: :func:`maxpool2d_forward`, :func:`maxpool2d_backward`, :func:`avgpool2d_forward`,
  :func:`avgpool2d_backward`, :func:`global_avgpool2d_forward`, :func:`global_avgpool2d_backward`;
* BatchNorm (1-D and spatial): :func:`batchnorm_forward`, :func:`batchnorm_backward_steps`,
  :func:`batchnorm_backward_compact`, :func:`batchnorm_running_stats`,
  :func:`batchnorm_eval_forward`, :func:`batchnorm_eval_backward`;
* dense and element-wise: :func:`dense_forward`, :func:`dense_backward`, :func:`relu_forward`,
  :func:`relu_backward`, :func:`leaky_relu_forward`, :func:`leaky_relu_backward`,
  :func:`dropout_keep_mask`, :func:`dropout_forward`, :func:`dropout_backward`;
* losses: :func:`softmax`, :func:`softmax_cross_entropy`, :func:`mse_softmax`;
* optimiser updates: :func:`sgd_step`, :func:`adam_step`, :func:`rmsprop_step`.

    >>> import numpy as np
    >>> from minicnn import reference
    >>> x, W = np.random.randn(2, 3, 5, 5), np.random.randn(4, 3, 3, 3)
    >>> out = reference.conv2d_forward(x, W, padding=1)          # (2, 4, 5, 5)
    >>> dx, dW, db = reference.conv2d_backward(np.ones_like(out), x, W, padding=1)
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "output_size",
    "im2col",
    "conv2d_forward",
    "conv2d_backward",
    "maxpool2d_forward",
    "maxpool2d_backward",
    "avgpool2d_forward",
    "avgpool2d_backward",
    "global_avgpool2d_forward",
    "global_avgpool2d_backward",
    "batchnorm_forward",
    "batchnorm_backward_steps",
    "batchnorm_backward_compact",
    "batchnorm_running_stats",
    "batchnorm_eval_forward",
    "batchnorm_eval_backward",
    "dense_forward",
    "dense_backward",
    "relu_forward",
    "relu_backward",
    "leaky_relu_forward",
    "leaky_relu_backward",
    "dropout_keep_mask",
    "dropout_forward",
    "dropout_backward",
    "softmax",
    "softmax_cross_entropy",
    "mse_softmax",
    "sgd_step",
    "adam_step",
    "rmsprop_step",
]


def _pair(v):
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Number of window positions along one axis: ``(size + 2 padding - kernel) // stride + 1``.

    Parameters:
        size: input height or width; kernel, stride, padding: along the same axis.
    """
    return (size + 2 * padding - kernel) // stride + 1


def _pad(x, ph, pw, value=0.0):
    """x (N, C, H, W) -> (N, C, H + 2 ph, W + 2 pw), the border filled with ``value``."""
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="constant", constant_values=value)


# --------------------------------------------------------------------------- convolution


def im2col(x, kh, kw, stride=1, padding=0):
    """The im2col matrix built entry by entry: one column per receptive field.

    Shapes:
        x (N, C, H, W)  ->  cols (C*KH*KW, N*OH*OW)

    Parameters:
        x: input images.
        kh, kw: kernel height and width.
        stride, padding: an int or an (h, w) pair.

    Row ``(c, u, v)`` (flattened as ``c*KH*KW + u*KW + v``) and column ``(n, i, j)``
    (flattened as ``n*OH*OW + i*OW + j``) hold

        cols[(c, u, v), (n, i, j)] = xpad[n, c, i*sh + u, j*sw + v]

    so that the convolution is the single matrix product
    ``W.reshape(F, C*KH*KW) @ cols``, which :func:`minicnn.im2col` builds
    with one strided copy instead of these loops.
    """
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    xpad = _pad(x, ph, pw)
    cols = np.zeros((c * kh * kw, n * oh * ow), dtype=x.dtype)
    for ci in range(c):
        for u in range(kh):
            for v in range(kw):
                row = (ci * kh + u) * kw + v
                for ni in range(n):
                    for i in range(oh):
                        for j in range(ow):
                            cols[row, (ni * oh + i) * ow + j] = xpad[ni, ci, i * sh + u, j * sw + v]
    return cols


def conv2d_forward(x, W, b=None, stride=1, padding=0):
    """2-D convolution (a cross-correlation: the kernel is *not* flipped), one output at a time.

    Shapes:
        x (N, C, H, W), W (F, C, KH, KW), b (F,)  ->  out (N, F, OH, OW)

    Parameters:
        x: input; W: filters; b: biases or None.
        stride, padding: an int or an (h, w) pair; padding adds zeros.

    Formula:
        out[n, f, i, j] = b[f] + sum_{c, u, v} W[f, c, u, v] * xpad[n, c, i*sh + u, j*sw + v]

    (A true convolution would read ``W[f, c, KH-1-u, KW-1-v]``; deep-learning
    libraries, PyTorch included, compute this correlation and call it convolution.)
    """
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    n, c, h, w = x.shape
    f, _, kh, kw = W.shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    xpad = _pad(x, ph, pw)
    out = np.zeros((n, f, oh, ow), dtype=np.result_type(x, W))
    for ni in range(n):
        for fi in range(f):
            for i in range(oh):
                for j in range(ow):
                    window = xpad[ni, :, i * sh : i * sh + kh, j * sw : j * sw + kw]  # (C, KH, KW)
                    out[ni, fi, i, j] = np.sum(W[fi] * window) + (0.0 if b is None else b[fi])
    return out


def conv2d_backward(dout, x, W, stride=1, padding=0):
    """Gradients of :func:`conv2d_forward`: every output pixel sends its gradient back along
    the products that made it.

    Shapes:
        dout (N, F, OH, OW), x (N, C, H, W), W (F, C, KH, KW)
        ->  dx (N, C, H, W), dW (F, C, KH, KW), db (F,)

    Parameters:
        dout: dL/d(out); x, W: the forward pass's input and filters; stride, padding: as forward.

    Formulas (sums over every (n, i, j), or (n, f, i, j) for dx):
        db[f]          = sum_{n, i, j} dout[n, f, i, j]
        dW[f, c, u, v] = sum_{n, i, j} dout[n, f, i, j] * xpad[n, c, i*sh + u, j*sw + v]
        dxpad[n, c, i*sh + u, j*sw + v] += dout[n, f, i, j] * W[f, c, u, v]
        dx = dxpad without its padding border

    With stride 1, dx is the "full" convolution of dout with the flipped
    kernel, the textbook statement of the same sum.
    """
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    n, c, h, w = x.shape
    f, _, kh, kw = W.shape
    _, _, oh, ow = dout.shape
    xpad = _pad(x, ph, pw)
    dxpad = np.zeros_like(xpad, dtype=np.result_type(dout, W))
    dW = np.zeros(W.shape, dtype=np.result_type(dout, x))
    db = np.zeros(f, dtype=dout.dtype)
    for ni in range(n):
        for fi in range(f):
            for i in range(oh):
                for j in range(ow):
                    g = dout[ni, fi, i, j]
                    rows, cols = slice(i * sh, i * sh + kh), slice(j * sw, j * sw + kw)
                    db[fi] += g
                    dW[fi] += g * xpad[ni, :, rows, cols]
                    dxpad[ni, :, rows, cols] += g * W[fi]
    return dxpad[:, :, ph : ph + h, pw : pw + w], dW, db


# --------------------------------------------------------------------------- pooling


def _pool_geometry(x_shape, kernel_size, stride, padding):
    (kh, kw) = _pair(kernel_size)
    (sh, sw) = (kh, kw) if stride is None else _pair(stride)
    (ph, pw) = _pair(padding)
    n, c, h, w = x_shape
    return kh, kw, sh, sw, ph, pw, output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)


def maxpool2d_forward(x, kernel_size, stride=None, padding=0):
    """Max pooling, one window at a time.

    Shapes:
        x (N, C, H, W)  ->  out (N, C, OH, OW)

    Parameters:
        x: input; kernel_size, stride, padding: an int or an (h, w) pair;
        stride defaults to the kernel size; padding adds -inf (it never wins).

    Formula:
        out[n, c, i, j] = max_{u, v} xpad[n, c, i*sh + u, j*sw + v]
    """
    kh, kw, sh, sw, ph, pw, oh, ow = _pool_geometry(x.shape, kernel_size, stride, padding)
    xpad = _pad(x, ph, pw, -np.inf)
    n, c = x.shape[:2]
    out = np.zeros((n, c, oh, ow), dtype=x.dtype)
    for ni in range(n):
        for ci in range(c):
            for i in range(oh):
                for j in range(ow):
                    out[ni, ci, i, j] = xpad[ni, ci, i * sh : i * sh + kh, j * sw : j * sw + kw].max()
    return out


def maxpool2d_backward(dout, x, kernel_size, stride=None, padding=0):
    """Gradient of :func:`maxpool2d_forward`: each window's gradient goes to its maximum.

    Shapes:
        dout (N, C, OH, OW), x (N, C, H, W)  ->  dx (N, C, H, W)

    Parameters:
        dout: dL/d(out); x: the forward pass's input; kernel_size, stride, padding: as forward.

    Formula: with (u*, v*) the position of the maximum of window (i, j), the
    first one in row-major order when several are equal (as PyTorch),

        dxpad[n, c, i*sh + u*, j*sw + v*] += dout[n, c, i, j]

    Overlapping windows (stride < kernel) add up where they share a maximum.
    """
    kh, kw, sh, sw, ph, pw, oh, ow = _pool_geometry(x.shape, kernel_size, stride, padding)
    xpad = _pad(x, ph, pw, -np.inf)
    n, c, h, w = x.shape
    dxpad = np.zeros(xpad.shape, dtype=dout.dtype)
    for ni in range(n):
        for ci in range(c):
            for i in range(oh):
                for j in range(ow):
                    window = xpad[ni, ci, i * sh : i * sh + kh, j * sw : j * sw + kw]
                    u, v = np.unravel_index(np.argmax(window), window.shape)  # argmax: first maximum
                    dxpad[ni, ci, i * sh + u, j * sw + v] += dout[ni, ci, i, j]
    return dxpad[:, :, ph : ph + h, pw : pw + w]


def avgpool2d_forward(x, kernel_size, stride=None, padding=0):
    """Average pooling, one window at a time (padding zeros count in the mean, as PyTorch).

    Shapes:
        x (N, C, H, W)  ->  out (N, C, OH, OW)

    Parameters:
        x: input; kernel_size, stride, padding: an int or an (h, w) pair; stride defaults to the kernel size.

    Formula:
        out[n, c, i, j] = (1 / (KH KW)) sum_{u, v} xpad[n, c, i*sh + u, j*sw + v]
    """
    kh, kw, sh, sw, ph, pw, oh, ow = _pool_geometry(x.shape, kernel_size, stride, padding)
    xpad = _pad(x, ph, pw, 0.0)
    n, c = x.shape[:2]
    out = np.zeros((n, c, oh, ow), dtype=x.dtype)
    for ni in range(n):
        for ci in range(c):
            for i in range(oh):
                for j in range(ow):
                    out[ni, ci, i, j] = xpad[ni, ci, i * sh : i * sh + kh, j * sw : j * sw + kw].sum() / (kh * kw)
    return out


def avgpool2d_backward(dout, x_shape, kernel_size, stride=None, padding=0):
    """Gradient of :func:`avgpool2d_forward`: each window shares its gradient equally.

    Shapes:
        dout (N, C, OH, OW)  ->  dx of shape ``x_shape`` = (N, C, H, W)

    Parameters:
        dout: dL/d(out); x_shape: the forward input's shape; kernel_size, stride, padding: as forward.

    Formula:
        dxpad[n, c, i*sh + u, j*sw + v] += dout[n, c, i, j] / (KH KW)     for every (u, v)
    """
    kh, kw, sh, sw, ph, pw, oh, ow = _pool_geometry(x_shape, kernel_size, stride, padding)
    n, c, h, w = x_shape
    dxpad = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dout.dtype)
    for ni in range(n):
        for ci in range(c):
            for i in range(oh):
                for j in range(ow):
                    dxpad[ni, ci, i * sh : i * sh + kh, j * sw : j * sw + kw] += dout[ni, ci, i, j] / (kh * kw)
    return dxpad[:, :, ph : ph + h, pw : pw + w]


def global_avgpool2d_forward(x):
    """Global average pooling.

    Shapes:
        x (N, C, H, W)  ->  out (N, C)

    Parameters:
        x: input feature maps.

    Formula: ``out[n, c] = (1 / (H W)) sum_{y, x} x[n, c, y, x]``.
    """
    return x.sum(axis=(2, 3)) / (x.shape[2] * x.shape[3])


def global_avgpool2d_backward(dout, x_shape):
    """Gradient of :func:`global_avgpool2d_forward`.

    Shapes:
        dout (N, C)  ->  dx of shape ``x_shape`` = (N, C, H, W)

    Parameters:
        dout: dL/d(out); x_shape: the forward input's shape.

    Formula: ``dx[n, c, y, x] = dout[n, c] / (H W)`` for every pixel (y, x).
    """
    n, c, h, w = x_shape
    return np.ones(x_shape, dtype=dout.dtype) * dout[:, :, None, None] / (h * w)


# --------------------------------------------------------------------------- batch normalisation


def _rows(x):
    """(N, D) stays; (N, C, H, W) -> (N*H*W, C): CS231n's spatial BatchNorm normalises each
    channel over every (n, y, x), i.e. treats every pixel as one more sample."""
    if x.ndim == 2:
        return x
    n, c, h, w = x.shape
    return x.transpose(0, 2, 3, 1).reshape(n * h * w, c)


def _unrows(rows, shape):
    """Inverse of :func:`_rows`."""
    if len(shape) == 2:
        return rows
    n, c, h, w = shape
    return rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Training-mode BatchNorm as CS231n's computational graph, one elementary step per line.

    Shapes:
        x (N, D) or (N, C, H, W), gamma and beta (D,) or (C,)  ->  out (same as x), cache (a dict)

    Parameters:
        x: input; for (N, C, H, W) every channel is normalised over (N, H, W).
        gamma, beta: per-feature scale and shift; eps: added to the variance.

    With m samples per feature (m = N, or N*H*W), the steps are

        mu     = (1/m) sum_k x_k              (1)    xhat  = xmu * ivar      (6)
        xmu    = x - mu                       (2)    out   = gamma * xhat + beta   (7)
        var    = (1/m) sum_k xmu_k ** 2       (3)
        std    = sqrt(var + eps)              (4)
        ivar   = 1 / std                      (5)

    ``var`` is the *biased* batch variance (divided by m); the running
    statistics keep the unbiased one (:func:`batchnorm_running_stats`).
    ``cache`` holds every intermediate value for the two backward versions.
    """
    xr = _rows(x)
    m = xr.shape[0]
    mu = xr.sum(axis=0) / m  # (1)
    xmu = xr - mu  # (2)
    var = (xmu**2).sum(axis=0) / m  # (3)
    std = np.sqrt(var + eps)  # (4)
    ivar = 1.0 / std  # (5)
    xhat = xmu * ivar  # (6)
    out = gamma * xhat + beta  # (7)
    cache = {"shape": x.shape, "xmu": xmu, "var": var, "std": std, "ivar": ivar, "xhat": xhat,
             "gamma": gamma, "eps": eps}
    return _unrows(out, x.shape), cache


def batchnorm_backward_steps(dout, cache):
    """Backward through :func:`batchnorm_forward`'s graph, one step at a time, last step first.

    Shapes:
        dout (same as x), cache from :func:`batchnorm_forward`  ->  dx (same as x), dgamma, dbeta (D,)

    Parameters:
        dout: dL/d(out); cache: what the forward pass kept.

    Each line is the chain rule through one step of the forward graph
    (a variable used twice, like ``xmu``, collects the gradient of both uses):

        (7)  dbeta  = sum_k dout_k,   dgamma = sum_k dout_k * xhat_k,   dxhat = dout * gamma
        (6)  dxmu   = dxhat * ivar,   divar = sum_k dxhat_k * xmu_k
        (5)  dstd   = -divar / std**2
        (4)  dvar   = dstd / (2 std)
        (3)  dxmu  += 2 xmu * dvar / m
        (2)  dx     = dxmu,           dmu = -sum_k dxmu_k
        (1)  dx    += dmu / m
    """
    d = _rows(dout)
    xmu, std, ivar, xhat, gamma = cache["xmu"], cache["std"], cache["ivar"], cache["xhat"], cache["gamma"]
    m = d.shape[0]
    dbeta = d.sum(axis=0)  # (7)
    dgamma = (d * xhat).sum(axis=0)
    dxhat = d * gamma
    dxmu = dxhat * ivar  # (6)
    divar = (dxhat * xmu).sum(axis=0)
    dstd = -divar / std**2  # (5)
    dvar = dstd / (2.0 * std)  # (4)
    dxmu = dxmu + 2.0 * xmu * dvar / m  # (3)
    dx = dxmu  # (2)
    dmu = -dxmu.sum(axis=0)
    dx = dx + dmu / m  # (1)
    return _unrows(dx, cache["shape"]), dgamma, dbeta


def batchnorm_backward_compact(dout, cache):
    """The same gradients as :func:`batchnorm_backward_steps`, simplified on paper to one line.

    Shapes:
        dout (same as x), cache from :func:`batchnorm_forward`  ->  dx (same as x), dgamma, dbeta (D,)

    Parameters:
        dout: dL/d(out); cache: what the forward pass kept.

    Formulas (sums over the m samples of each feature):
        dbeta  = sum dout
        dgamma = sum dout * xhat
        dx     = gamma / (m * sqrt(var + eps)) * (m * dout - sum(dout) - xhat * sum(dout * xhat))

    This is what :class:`minicnn.BatchNorm1D` and :class:`minicnn.BatchNorm2D` compute.
    """
    d = _rows(dout)
    xhat, ivar, gamma = cache["xhat"], cache["ivar"], cache["gamma"]
    m = d.shape[0]
    dbeta = d.sum(axis=0)
    dgamma = (d * xhat).sum(axis=0)
    dx = gamma * ivar / m * (m * d - dbeta - xhat * dgamma)
    return _unrows(dx, cache["shape"]), dgamma, dbeta


def batchnorm_running_stats(running_mean, running_var, x, momentum=0.1):
    """The running statistics after one training batch, PyTorch's convention.

    Shapes:
        running_mean, running_var (D,), x (N, D) or (N, C, H, W)  ->  (new_mean, new_var), each (D,)

    Parameters:
        running_mean, running_var: the statistics before the batch; x: the batch;
        momentum: weight of the new batch (0.1 in PyTorch; CS231n's 0.9 is 1 - this).

    Formulas, with the batch mean ``mu`` and the *unbiased* batch variance
    ``var_u = sum (x - mu)**2 / (m - 1)``:

        new_mean = (1 - momentum) * running_mean + momentum * mu
        new_var  = (1 - momentum) * running_var  + momentum * var_u
    """
    xr = _rows(x)
    m = xr.shape[0]
    mu = xr.sum(axis=0) / m
    var_u = ((xr - mu) ** 2).sum(axis=0) / (m - 1)
    return (1 - momentum) * running_mean + momentum * mu, (1 - momentum) * running_var + momentum * var_u


def batchnorm_eval_forward(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """Evaluation-mode BatchNorm: normalise with the running statistics (constants).

    Shapes:
        x (N, D) or (N, C, H, W); gamma, beta, running_mean, running_var (D,)  ->  out (same as x)

    Parameters:
        x: input; gamma, beta: scale and shift; running_mean, running_var: the statistics; eps: as training.

    Formula: ``out = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``.
    """
    xr = _rows(x)
    return _unrows(gamma * (xr - running_mean) / np.sqrt(running_var + eps) + beta, x.shape)


def batchnorm_eval_backward(dout, x, gamma, running_mean, running_var, eps=1e-5):
    """Gradient of :func:`batchnorm_eval_forward`: the statistics do not depend on x.

    Shapes:
        dout, x (N, D) or (N, C, H, W); gamma, running_mean, running_var (D,)
        ->  dx (same as x), dgamma, dbeta (D,)

    Parameters:
        dout: dL/d(out); the rest as :func:`batchnorm_eval_forward`.

    Formulas, with xhat = (x - running_mean) / sqrt(running_var + eps):
        dx = dout * gamma / sqrt(running_var + eps),   dgamma = sum dout * xhat,   dbeta = sum dout
    """
    d, xr = _rows(dout), _rows(x)
    xhat = (xr - running_mean) / np.sqrt(running_var + eps)
    dx = d * gamma / np.sqrt(running_var + eps)
    return _unrows(dx, x.shape), (d * xhat).sum(axis=0), d.sum(axis=0)


# --------------------------------------------------------------------------- dense and element-wise


def dense_forward(x, W, b=None):
    """Affine layer, index by index.

    Shapes:
        x (N, D_in), W (D_in, D_out), b (D_out,)  ->  out (N, D_out)

    Parameters:
        x: input rows; W: weight, laid out (in, out) as in CS231n; b: bias or None.

    Formula: ``out[n, k] = b[k] + sum_d x[n, d] * W[d, k]``.
    """
    out = np.einsum("nd,dk->nk", x, W)
    return out if b is None else out + b


def dense_backward(dout, x, W):
    """Gradients of :func:`dense_forward`.

    Shapes:
        dout (N, D_out), x (N, D_in), W (D_in, D_out)  ->  dx (N, D_in), dW (D_in, D_out), db (D_out,)

    Parameters:
        dout: dL/d(out); x, W: the forward pass's input and weight.

    Formulas:
        dx[n, d] = sum_k dout[n, k] * W[d, k]
        dW[d, k] = sum_n x[n, d] * dout[n, k]
        db[k]    = sum_n dout[n, k]
    """
    return np.einsum("nk,dk->nd", dout, W), np.einsum("nd,nk->dk", x, dout), np.einsum("nk->k", dout)


def relu_forward(x):
    """``out = max(x, 0)``, element-wise.

    Shapes: x (any)  ->  out (same).

    Parameters:
        x: input.
    """
    return np.maximum(x, 0)


def relu_backward(dout, x):
    """``dx = dout * [x > 0]`` (the gradient at 0 is taken as 0, as PyTorch).

    Shapes: dout, x (any, equal)  ->  dx (same).

    Parameters:
        dout: dL/d(out); x: the forward pass's input.
    """
    return dout * (x > 0)


def leaky_relu_forward(x, negative_slope=0.01):
    """``out = x if x > 0 else negative_slope * x``, element-wise.

    Shapes: x (any)  ->  out (same).

    Parameters:
        x: input; negative_slope: the slope for x <= 0 (PyTorch's default 0.01; Keras' is 0.3).
    """
    return np.where(x > 0, x, negative_slope * x)


def leaky_relu_backward(dout, x, negative_slope=0.01):
    """``dx = dout * (1 if x > 0 else negative_slope)``.

    Shapes: dout, x (any, equal)  ->  dx (same).

    Parameters:
        dout: dL/d(out); x: the forward pass's input; negative_slope: as forward.
    """
    return dout * np.where(x > 0, 1.0, negative_slope)


def dropout_keep_mask(shape, p, rng):
    """Which units inverted dropout keeps: each independently with probability ``1 - p``.

    Shapes: ``shape``  ->  keep (shape), bool.

    Parameters:
        shape: the input's shape; p: the *drop* probability (PyTorch's convention;
        CS231n's ``p`` is the keep probability); rng: a ``numpy.random.RandomState``.

    ``keep = rng.random_sample(shape) >= p``: the draw :class:`minicnn.Dropout`
    makes from :func:`minicnn.backend.random_state`, so the same seed gives the same mask.
    """
    return rng.random_sample(shape) >= p


def dropout_forward(x, keep, p):
    """Inverted dropout with a given mask: kept units are scaled by ``1 / (1 - p)``.

    Shapes: x, keep (any, equal)  ->  out (same).

    Parameters:
        x: input; keep: bool mask of kept units (:func:`dropout_keep_mask`); p: the drop probability.

    Formula: ``out = x * keep / (1 - p)``, so that E[out] = x and evaluation is the identity.
    """
    return x * keep / (1.0 - p)


def dropout_backward(dout, keep, p):
    """``dx = dout * keep / (1 - p)``: the gradient flows through the kept units only.

    Shapes: dout, keep (any, equal)  ->  dx (same).

    Parameters:
        dout: dL/d(out); keep, p: as forward.
    """
    return dout * keep / (1.0 - p)


# --------------------------------------------------------------------------- losses


def softmax(z):
    """Softmax over the last axis, shifted by the maximum so that exp never overflows.

    Shapes: z (N, K)  ->  p (N, K), rows summing to 1.

    Parameters:
        z: scores (logits).

    Formula: ``p[n, k] = exp(z[n, k] - max_j z[n, j]) / sum_j exp(z[n, j] - max_j z[n, j])``.
    """
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_cross_entropy(logits, labels, class_weights=None, label_smoothing=0.0):
    """Softmax cross-entropy and its gradient, sample by sample (CS231n's ``softmax_loss``).

    Shapes:
        logits (N, K), labels (N,) integers in [0, K)  ->  (loss: float, dlogits (N, K))

    Parameters:
        logits: scores; labels: true classes; class_weights: (K,) or None;
        label_smoothing: e in [0, 1), as ``torch.nn.CrossEntropyLoss``.

    Formulas, with p_n = softmax(z_n), target q_nk = (1 - e) [k = y_n] + e / K, weights w:
        loss = sum_n sum_k -w_k q_nk log p_nk  /  sum_n w_{y_n}
        dz_n = (p_n * sum_k w_k q_nk - w * q_n)  /  sum_n w_{y_n}
    which is (p_n - onehot(y_n)) / N without weights or smoothing.
    """
    n, k = logits.shape
    w = np.ones(k) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    total = sum(w[labels[i]] for i in range(n))
    loss, dz = 0.0, np.zeros((n, k))
    for i in range(n):
        p = softmax(logits[i])
        q = np.full(k, label_smoothing / k)
        q[labels[i]] += 1.0 - label_smoothing
        loss += -(w * q * np.log(p)).sum()
        dz[i] = p * (w * q).sum() - w * q
    return loss / total, dz / total


def mse_softmax(logits, labels):
    """Mean squared error between softmax(logits) and one-hot labels, and its gradient.

    Shapes:
        logits (N, K), labels (N,)  ->  (loss: float, dlogits (N, K))

    Parameters:
        logits: scores; labels: true classes.

    Formulas, with p_n = softmax(z_n), t_n = onehot(y_n):
        loss = (1 / (N K)) sum_{n, k} (p_nk - t_nk)**2
        dp_n = 2 (p_n - t_n) / (N K)
        dz_n = J_n^T dp_n,    J_n = diag(p_n) - p_n p_n^T    (the softmax Jacobian, dp/dz)
    """
    n, k = logits.shape
    loss, dz = 0.0, np.zeros((n, k))
    for i in range(n):
        p = softmax(logits[i])
        t = np.eye(k)[labels[i]]
        loss += ((p - t) ** 2).sum() / (n * k)
        jacobian = np.diag(p) - np.outer(p, p)
        dz[i] = jacobian.T @ (2.0 * (p - t) / (n * k))
    return loss, dz


# --------------------------------------------------------------------------- optimiser updates


def sgd_step(w, g, buf=None, lr=0.01, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """One SGD update as ``torch.optim.SGD`` writes it; returns ``(new_w, new_buf)``.

    Shapes: w, g, buf (any, equal)  ->  new_w, new_buf (same; new_buf None without momentum).

    Parameters:
        w: parameter; g: its gradient; buf: the momentum buffer (None before the first step);
        lr, momentum, dampening, nesterov, weight_decay: as :class:`minicnn.optim.SGD`.

    Formulas:
        g = g + weight_decay * w
        buf = g (first step),   buf = momentum * buf + (1 - dampening) * g (later)
        w = w - lr * (g + momentum * buf)    if nesterov,   w - lr * buf   otherwise
    """
    g = g + weight_decay * w
    if momentum == 0:
        return w - lr * g, None
    buf = g if buf is None else momentum * buf + (1 - dampening) * g
    step = g + momentum * buf if nesterov else buf
    return w - lr * step, buf


def adam_step(w, g, m, v, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    """One Adam (or AdamW, ``decoupled=True``) update, written as the paper does; returns ``(w, m, v)``.

    Shapes: w, g, m, v (any, equal)  ->  new w, m, v (same).

    Parameters:
        w: parameter; g: gradient; m, v: first and second moments (zeros before the first step);
        t: this update's number, 1 for the first (bias corrections use it);
        lr, betas, eps, weight_decay: as :class:`minicnn.optim.Adam`;
        decoupled: AdamW's weight decay (shrink w) instead of Adam's L2 term (added to g).

    Formulas:
        g  = g + weight_decay * w                (Adam)   or   w = w * (1 - lr * weight_decay)   (AdamW)
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g**2
        mhat = m / (1 - beta1**t),   vhat = v / (1 - beta2**t)
        w  = w - lr * mhat / (sqrt(vhat) + eps)
    """
    beta1, beta2 = betas
    if weight_decay:
        if decoupled:
            w = w * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * w
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g**2
    mhat, vhat = m / (1 - beta1**t), v / (1 - beta2**t)
    return w - lr * mhat / (np.sqrt(vhat) + eps), m, v


def rmsprop_step(w, g, s, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0):
    """One (uncentred, momentum-free) RMSprop update as ``torch.optim.RMSprop``; returns ``(w, s)``.

    Shapes: w, g, s (any, equal)  ->  new w, s (same).

    Parameters:
        w: parameter; g: gradient; s: running mean of squared gradients (zeros at first);
        lr, alpha, eps, weight_decay: as :class:`minicnn.optim.RMSprop`.

    Formulas:
        g = g + weight_decay * w
        s = alpha * s + (1 - alpha) * g**2
        w = w - lr * g / (sqrt(s) + eps)
    """
    g = g + weight_decay * w
    s = alpha * s + (1 - alpha) * g**2
    return w - lr * g / (np.sqrt(s) + eps), s
