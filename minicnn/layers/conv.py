"""2-D convolution: the teaching reference (loops) and the fast path (im2col + one GEMM).

Like PyTorch, Keras and CS231n, minicnn's "convolution" is a *cross-correlation*:
the kernel is not flipped (the formula below reads ``W[f, c, u, v]`` against
``x[.., i*sh + u, j*sw + v]``; a true convolution would read ``W[f, c, KH-1-u, KW-1-v]``).
``scipy.signal.correlate2d`` computes the same thing, ``convolve2d`` the flipped one.

Notation (NCHW): input ``x`` of shape (N, C, H, W), weight ``W`` of shape
(F, C, KH, KW), bias ``b`` of shape (F,), stride (sh, sw), zero padding (ph, pw).
Output (N, F, OH, OW) with

    OH = (H + 2 ph - KH) // sh + 1,     OW = (W + 2 pw - KW) // sw + 1
    out[n, f, i, j] = b[f] + sum_{c, u, v} W[f, c, u, v] * xpad[n, c, i*sh + u, j*sw + v]

im2col lays every receptive field out as a column, so the whole convolution is
one matrix product. minicnn uses the column matrix

    cols[(c, u, v), (n, i, j)] = xpad[n, c, i*sh + u, j*sw + v]     shape (C*KH*KW, N*OH*OW)

so that ``out = W.reshape(F, -1) @ cols`` is a single large GEMM (measured the
fastest of three layouts on a 2-core CPU: one big product beats N small ones).
col2im is the adjoint of im2col: it scatters each column entry back onto the
pixel it was read from, summing where receptive fields overlap, so that
``<im2col(x), y> == <x, col2im(y)>`` for all x, y.

A stride-1 convolution has a cheaper unfolding, :func:`shifted_rows` ("im2col along one
axis"). Lay the padded input out channel by channel, every image's rows end to end:
``z[c, (n*Hp + y)*Wp + x] = xpad[n, c, y, x]``. Moving the window one pixel right is then
a step of 1 along z and one pixel down a step of Wp, so the window at output position m
reads ``z[c, m + u*Wp + v]``. Copying only the KW horizontal shifts,

    R[(c, v), m] = z[c, m + v]                                     shape (C*KW, N*Hp*Wp + (KH-1)*Wp)

leaves the KH vertical ones as free views ``R[:, u*Wp : u*Wp + N*Hp*Wp]``, and

    out_wide = sum_u W[:, :, u, :].reshape(F, C*KW) @ R[:, u*Wp : u*Wp + N*Hp*Wp]

holds the output at every m whose window starts inside the image (i < OH, j < OW); the other
m straddle two rows or two images and are thrown away. R is KW times the padded input where
im2col's matrix is KH*KW times the output: about a third of the memory for a 3x3 convolution.
"""
from __future__ import annotations

import numbers

from .. import initializers, kernels
from ..backend import get_array_module
from .base import Layer, positive_int

__all__ = ["Conv2D", "im2col", "col2im", "col2im_input_grad", "conv_input_grad", "conv2d_naive", "conv_output_size", "pair",
           "shifted_rows", "conv2d_shifted", "conv2d_shifted_backward", "CONV_ALGORITHMS", "set_conv_algorithm"]

CONV_ALGORITHMS = ("auto", "im2col", "shifted")


def pair(v, name="value"):
    """``3 -> (3, 3)``; ``(3, 1) -> (3, 1)``; ``name`` labels the error for anything else.

    Only integers are taken (Python's or NumPy's, not bool): a size of 2.7 is refused rather than cut to 2.
    """
    items = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(items) != 2 or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(items[0]), int(items[1])


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Window positions along one axis: ``(size + 2 padding - kernel) // stride + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def _windows(xpad, kh, kw, sh, sw, oh, ow):
    """Strided *view* of shape (N, C, KH, KW, OH, OW) over the padded input (no copy)."""
    xp = get_array_module(xpad)
    sn, sc, sy, sx = xpad.strides
    n, c = xpad.shape[:2]
    return xp.lib.stride_tricks.as_strided(
        xpad, shape=(n, c, kh, kw, oh, ow), strides=(sn, sc, sy, sx, sy * sh, sx * sw)
    )


def _pad(x, ph, pw, value=0.0):
    if ph == 0 and pw == 0:
        return x
    xp = get_array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="constant", constant_values=value)


@kernels.gpu_fast_path(kernels.im2col)  # on CuPy: one gather kernel (minicnn/kernels.py)
def im2col(x, kh, kw, stride=1, padding=0):
    """Unfold receptive fields into columns: ``cols[(c, u, v), (n, i, j)] = xpad[n, c, i*sh + u, j*sw + v]``.

    Shapes:
        x (N, C, H, W)  ->  cols (C*KH*KW, N*OH*OW); row index (c, u, v), column index (n, i, j)

    Parameters:
        x: input images; kh, kw: kernel height and width;
        stride, padding: an int or an (h, w) pair (padding adds zeros).

    Built with one strided copy; :func:`minicnn.reference.im2col` builds the same
    matrix entry by entry.
    """
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    win = _windows(_pad(x, ph, pw), kh, kw, sh, sw, oh, ow)  # (N, C, KH, KW, OH, OW)
    # One gather copy into (C, KH, KW, N, OH, OW), then a free reshape.
    return win.transpose(1, 2, 3, 0, 4, 5).reshape(c * kh * kw, n * oh * ow)


@kernels.gpu_fast_path(kernels.col2im)  # on CuPy: one gather kernel, no atomics
def col2im(cols, x_shape, kh, kw, stride=1, padding=0):
    """Adjoint of :func:`im2col`: sum every column entry back onto its source pixel.

    Shapes:
        cols (C*KH*KW, N*OH*OW)  ->  dx (N, C, H, W) = ``x_shape``

    Parameters:
        cols: a matrix laid out as :func:`im2col`'s; x_shape: the image shape (N, C, H, W);
        kh, kw, stride, padding: as for :func:`im2col`.

    ``dxpad[n, c, i*sh + u, j*sw + v] += cols[(c, u, v), (n, i, j)]``, then the padding
    is cut off, so ``<im2col(x), y> == <x, col2im(y)>``. The loop runs over the KH*KW
    kernel offsets only; each iteration adds a whole (N, C, OH, OW) slab.
    """
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    n, c, h, w = x_shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xp = get_array_module(cols)
    cols6 = cols.reshape(c, kh, kw, n, oh, ow)
    dxpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for u in range(kh):
        for v in range(kw):
            dxpad[:, :, u : u + sh * oh : sh, v : v + sw * ow : sw] += cols6[:, u, v].transpose(1, 0, 2, 3)
    return dxpad[:, :, ph : ph + h, pw : pw + w]


def col2im_input_grad(g, W, x_shape, stride=1, padding=0):
    """The input gradient of any convolution by col2im: ``dx = col2im(W_mat^T @ G)``.

    Shapes:
        g (F, N*OH*OW): dout rearranged as the forward product's output,
        W (F, C, KH, KW)  ->  dx (N, C, H, W) = ``x_shape``

    ``W_mat^T @ G`` (C*KH*KW, N*OH*OW) is the gradient of every entry of the column
    matrix, and col2im sums each back onto the pixel it was read from.
    """
    f, _, kh, kw = W.shape
    return col2im(W.reshape(f, -1).T @ g, x_shape, kh, kw, stride, padding)


def _turned_kernel(W):
    """``W_rot[c, f, u, v] = W[f, c, KH-1-u, KW-1-v]`` (C, F, KH, KW): the filters turned 180 degrees, channels swapped."""
    return get_array_module(W).ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


def conv_input_grad(dout, W, padding=0):
    """The input gradient of a stride-1 convolution, computed as a convolution of ``dout``.

    Shapes:
        dout (N, F, OH, OW), W (F, C, KH, KW)  ->  dx (N, C, H, W)
        with H = OH + KH - 1 - 2 ph (stride 1), W likewise

    Parameters:
        dout: the gradient of the loss w.r.t. the convolution's output;
        W: the convolution's filters; padding: its padding (ph, pw), each at most K - 1.

    Forward was ``out[n, f, i, j] = sum_{c, u, v} W[f, c, u, v] xpad[n, c, i + u, j + v]``, so

        dx[n, c, y, x] = sum_{f, u, v} dout[n, f, y + ph - u, x + pw - v] W[f, c, u, v]

    (terms with an index outside dout are zero). Substituting u' = KH-1-u, v' = KW-1-v
    turns it into a forward convolution of dout, zero-padded by (KH-1-ph, KW-1-pw), with
    the kernel ``W_rot[c, f, u', v'] = W[f, c, KH-1-u', KW-1-v']``: the filters turned
    by 180 degrees, input and output channels swapped. This is the same dx as
    ``col2im(W_mat^T @ G)``, reached by a copy (im2col) instead of a scatter-add.
    """
    ph, pw = pair(padding, "padding")
    f, c, kh, kw = W.shape
    if ph > kh - 1 or pw > kw - 1:
        raise ValueError(f"conv_input_grad: padding {(ph, pw)} must be at most kernel - 1 = {(kh - 1, kw - 1)}")
    xp = get_array_module(dout)
    n, _, oh, ow = dout.shape
    h, w = oh + kh - 1 - 2 * ph, ow + kw - 1 - 2 * pw
    w_rot = _turned_kernel(W).reshape(c, f * kh * kw)
    dx = w_rot @ im2col(dout, kh, kw, 1, (kh - 1 - ph, kw - 1 - pw))  # (C, N*H*W)
    return xp.ascontiguousarray(dx.reshape(c, n, h, w).transpose(1, 0, 2, 3))


def shifted_rows(x, kh, kw, padding=0):
    """The row-shift matrix of a stride-1 convolution: im2col along the width axis only.

    Shapes:
        x (N, C, H, W)  ->  R (C*KW, N*Hp*Wp + (KH-1)*Wp),  Hp = H + 2 ph,  Wp = W + 2 pw

    Parameters:
        x: input images; kh, kw: kernel height and width; padding: an int or an (h, w) pair.

    With ``z`` the padded input in channel-major order, flattened and followed by zeros,
    ``z[c, (n*Hp + y)*Wp + x] = xpad[n, c, y, x]``:

        R[(c, v), m] = z[c, m + v]          (row index c*KW + v)

    The kernel's vertical offset u needs no copy: ``R[:, u*Wp + m]`` reads ``z[c, m + u*Wp + v]``,
    the pixel u rows further down (see the module docstring).
    """
    ph, pw = pair(padding, "padding")
    xp = get_array_module(x)
    n, c, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    length = n * hp * wp + (kh - 1) * wp  # every column any vertical view reads
    z = xp.zeros((c, length + kw - 1), dtype=x.dtype)
    z[:, : n * hp * wp].reshape(c, n, hp, wp)[:, :, ph : ph + h, pw : pw + w] = x.transpose(1, 0, 2, 3)
    step_c, step = z.strides
    shifted = xp.lib.stride_tricks.as_strided(z, shape=(c, kw, length), strides=(step_c, step, step))
    return xp.ascontiguousarray(shifted).reshape(c * kw, length)


def conv2d_shifted(x, W, padding=0):
    """A stride-1 convolution (no bias) by :func:`shifted_rows` and KH matrix products.

    Shapes:
        x (N, C, H, W), W (F, C, KH, KW)  ->  out (N, F, OH, OW), R (C*KW, N*Hp*Wp + (KH-1)*Wp)
        OH = Hp - KH + 1,  OW = Wp - KW + 1

    Parameters:
        x: input images; W: filters; padding: an int or an (h, w) pair (zeros added).

    ``out_wide = sum_u W[:, :, u, :].reshape(F, C*KW) @ R[:, u*Wp : u*Wp + N*Hp*Wp]`` (F, N*Hp*Wp),
    of which the (F, N, :OH, :OW) corner is the convolution, equal to
    ``W.reshape(F, -1) @ im2col(x, KH, KW, 1, padding)``. ``out`` is a view of that corner
    (not contiguous); R is returned for the backward pass (:func:`conv2d_shifted_backward`).
    """
    ph, pw = pair(padding, "padding")
    f, c, kh, kw = W.shape
    n, _, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    m = n * hp * wp
    R = shifted_rows(x, kh, kw, (ph, pw))
    wide = W[:, :, 0, :].reshape(f, c * kw) @ R[:, :m]
    for u in range(1, kh):
        wide += W[:, :, u, :].reshape(f, c * kw) @ R[:, u * wp : u * wp + m]
    out = wide.reshape(f, n, hp, wp)[:, :, : hp - kh + 1, : wp - kw + 1].transpose(1, 0, 2, 3)
    return out, R


def conv2d_shifted_backward(dout, R, W, padding=0):
    """dW of a stride-1 convolution from its row-shift matrix R, and dx as a convolution of dout.

    Shapes:
        dout (N, F, OH, OW), R (C*KW, N*Hp*Wp + (KH-1)*Wp), W (F, C, KH, KW)
        ->  dW (F, C, KH, KW), dx (N, C, H, W)

    Parameters:
        dout: the gradient of the loss w.r.t. the output; R: what :func:`conv2d_shifted` returned
        for the forward input; W: the filters; padding: the forward pass's.

    With G_wide (F, N*Hp*Wp) = dout written at its positions of out_wide and zeros at the
    discarded ones (so they add nothing):

        dW[:, :, u, :] = (G_wide @ R[:, u*Wp : u*Wp + N*Hp*Wp]^T).reshape(F, C, KW)
        dx = conv2d_shifted(dout, W_rot, (KH-1-ph, KW-1-pw)),   W_rot[c, f, u, v] = W[f, c, KH-1-u, KW-1-v]

    (the input gradient as a convolution, :func:`conv_input_grad`), which needs padding
    at most KH-1, KW-1; otherwise dx is ``col2im(W_mat^T @ G)``.
    """
    ph, pw = pair(padding, "padding")
    xp = get_array_module(dout)
    f, c, kh, kw = W.shape
    n, _, oh, ow = dout.shape
    hp, wp = oh + kh - 1, ow + kw - 1
    m = n * hp * wp
    g_wide = xp.zeros((f, n, hp, wp), dtype=dout.dtype)
    g_wide[:, :, :oh, :ow] = dout.transpose(1, 0, 2, 3)
    g_wide = g_wide.reshape(f, m)
    dW = xp.empty_like(W)
    for u in range(kh):
        dW[:, :, u, :] = (g_wide @ R[:, u * wp : u * wp + m].T).reshape(f, c, kw)
    x_shape = (n, c, hp - 2 * ph, wp - 2 * pw)
    if ph <= kh - 1 and pw <= kw - 1:
        dx = xp.ascontiguousarray(conv2d_shifted(dout, _turned_kernel(W), (kh - 1 - ph, kw - 1 - pw))[0])
    else:
        dx = col2im_input_grad(dout.transpose(1, 0, 2, 3).reshape(f, -1), W, x_shape, 1, (ph, pw))
    return dW, dx


def conv2d_naive(x, W, b=None, stride=1, padding=0):
    """Teaching reference: the convolution sum (a cross-correlation) written as explicit loops.

    Shapes:
        x (N, C, H, W), W (F, C, KH, KW), b (F,)  ->  out (N, F, OH, OW)

    Parameters:
        x: input; W: filters; b: biases or None; stride, padding: an int or an (h, w) pair.

    ``out[n, f, i, j] = b[f] + sum_{c, u, v} W[f, c, u, v] * xpad[n, c, i*sh + u, j*sw + v]``.
    Slow (Python loops over every output pixel); the tests' oracle together with
    :func:`minicnn.reference.conv2d_forward` and :func:`minicnn.reference.conv2d_backward`,
    which also loop over the batch and the filters and give the backward pass.
    """
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    xp = get_array_module(x)
    n, c, h, w = x.shape
    f, _, kh, kw = W.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xpad = _pad(x, ph, pw)
    out = xp.zeros((n, f, oh, ow), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            patch = xpad[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]  # (N, C, KH, KW)
            for k in range(f):
                out[:, k, i, j] = (patch * W[k]).sum(axis=(1, 2, 3))
    if b is not None:
        out += b.reshape(1, f, 1, 1)
    return out


class Conv2D(Layer):
    """2-D convolution by im2col and one matrix product, or (stride 1) by row shifts and KH products.

    It computes a *cross-correlation*, as PyTorch does: the kernel is not flipped.

    Shapes:
        x (N, C_in, H, W)  ->  out (N, C_out, OH, OW)
        W (C_out, C_in, KH, KW) (PyTorch's layout),  b (C_out,)
        OH = (H + 2 ph - KH) // sh + 1,   OW = (W + 2 pw - KW) // sw + 1

    Parameters:
        in_channels, out_channels: C_in and C_out.
        kernel_size, stride, padding: an int or an (h, w) pair; padding adds zeros.
        bias: learn a bias ``b`` (starts at zero); False for a conv followed by BatchNorm.
        init: initialiser name for W (default ``"he_normal"``, suited to the ReLU family).
        algorithm: ``"auto"``, ``"im2col"`` or ``"shifted"`` (stride 1 only); all compute the same
            thing (``tests/test_reference.py``), with different memory and speed.

    Forward:
        out[n, f, i, j] = b[f] + sum_{c, u, v} W[f, c, u, v] * xpad[n, c, i*sh + u, j*sw + v]
        computed as out = W_mat @ X + b, with X = im2col(x) (C_in*KH*KW, N*OH*OW)
        and W_mat = W.reshape(C_out, -1)

    Backward, with G = dout rearranged to (C_out, N*OH*OW):
        dW = (G @ X^T).reshape(W.shape)     i.e. dW[f, c, u, v] = sum_{n, i, j} dout[n, f, i, j] xpad[n, c, i*sh + u, j*sw + v]
        db = sum of dout over (N, OH, OW)
        dx = col2im(W_mat^T @ G)            i.e. dxpad[n, c, i*sh + u, j*sw + v] += dout[n, f, i, j] W[f, c, u, v]

    With stride 1 the input gradient is itself a convolution, of dout with the
    kernel turned by 180 degrees and its channel axes swapped (:func:`conv_input_grad`):
        dx[n, c, y, x] = sum_{f, u, v} dout[n, f, y + ph - u, x + pw - v] W[f, c, u, v]
                       = conv(dout, W_rot, padding=(KH-1-ph, KW-1-pw)),  W_rot[c, f, u, v] = W[f, c, KH-1-u, KW-1-v]
    Both give the same dx (``tests/test_reference.py``); the layer takes the convolution for
    stride 1, padding at most K - 1 and C_out <= 2 C_in, where it measured faster on the CPU
    (see :meth:`_dx_by_convolution`), and col2im otherwise.

    Algorithms (``algorithm``): ``"im2col"`` as above; ``"shifted"`` (stride 1 only) unfolds
    the input along its width alone (:func:`shifted_rows`, R of shape (C_in*KW, about N*Hp*Wp))
    and sums KH products, the vertical kernel offsets being views of R:
        out = sum_u W[:, :, u, :].reshape(C_out, C_in*KW) @ R_u,   dW[:, :, u, :] = G_wide @ R_u^T
    and dx as the convolution of dout with W_rot (:func:`conv2d_shifted_backward`). It keeps R
    for backward, KW times the padded input instead of im2col's KH*KW times the output (2.4x
    less over the zoo's 3x3 convolutions), but on a 2-core CPU it is slower (0.6-0.94x im2col's
    speed: its KH products have a third of the inner size, and also compute the discarded
    positions, 8 % more at 48x48 but 78 % at 6x6). ``"auto"`` (the default) is therefore im2col;
    take ``"shifted"`` when memory is short (:func:`set_conv_algorithm`, ``train.py
    --conv-algorithm shifted``). README, "Convolution algorithms", has the measurements.

    Reference: :func:`minicnn.reference.conv2d_forward` / :func:`minicnn.reference.conv2d_backward`
    (loops), proven equal in ``tests/test_reference.py``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, init="he_normal",
                 algorithm="auto"):
        super().__init__()
        self.in_channels = positive_int(in_channels, f"{type(self).__name__}: in_channels")
        self.out_channels = positive_int(out_channels, f"{type(self).__name__}: out_channels")
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(
                f"Conv2D: kernel_size and stride must be >= 1 and padding >= 0, "
                f"got kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
            )
        if algorithm not in CONV_ALGORITHMS:
            raise ValueError(f"Conv2D: algorithm must be one of {CONV_ALGORITHMS}, got {algorithm!r}")
        if algorithm == "shifted" and self.stride != (1, 1):
            raise ValueError(f"Conv2D: algorithm 'shifted' needs stride 1, got stride={self.stride}")
        self.algorithm = algorithm
        kh, kw = self.kernel_size
        fan_in, fan_out = self.in_channels * kh * kw, self.out_channels * kh * kw
        self.params["W"] = initializers.get_initializer(init)(
            (self.out_channels, self.in_channels, kh, kw), fan_in, fan_out
        )
        if bias:
            self.params["b"] = initializers.zeros((self.out_channels,))

    def extra_repr(self):
        kh, kw = self.kernel_size
        s = f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw})"
        if self.stride != (1, 1):
            s += f", stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if "b" not in self.params:
            s += ", bias=False"
        if self.algorithm != "auto":
            s += f", algorithm={self.algorithm!r}"
        return s

    def output_shape(self, h, w):
        kh, kw = self.kernel_size
        return (
            conv_output_size(h, kh, self.stride[0], self.padding[0]),
            conv_output_size(w, kw, self.stride[1], self.padding[1]),
        )

    def _check(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise self._bad_input(f"(N, {self.in_channels}, H, W)", x)
        kh, kw = self.kernel_size
        ph, pw = self.padding
        if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
            raise ValueError(
                f"{self!r}: kernel ({kh}, {kw}) is larger than the padded input "
                f"({x.shape[2] + 2 * ph}, {x.shape[3] + 2 * pw}) of input shape {tuple(x.shape)}"
            )

    def _uses_shifted(self):
        """Whether forward takes the ``"shifted"`` algorithm: only when asked for (``"auto"`` is im2col).

        Why not by default: on the 2-core development CPU it was slower than im2col on every 3x3
        convolution of the zoo, by 6-11 % at 24x24 and 48x48 and up to 40 % at 6x6 (``python
        benchmarks/bench_conv_algorithms.py --shapes zoo --batch 100 --threads 2``); what it saves
        is memory. (On a GPU the trade is unmeasured: ``benchmarks/gpu_suite.sh`` times both.)
        """
        return self.algorithm == "shifted"

    def forward(self, x, training=True):
        """x (N, C_in, H, W) -> out (N, C_out, OH, OW); keeps im2col(x), or R, for backward (``training`` is unused)."""
        self._check(x)
        n = x.shape[0]
        kh, kw = self.kernel_size
        oh, ow = self.output_shape(x.shape[2], x.shape[3])
        W = self.params["W"]
        if self._uses_shifted():
            out, R = conv2d_shifted(x, W, self.padding)
            self.cache = ("shifted", x.shape, R)
        else:
            cols = im2col(x, kh, kw, self.stride, self.padding)
            out = W.reshape(self.out_channels, -1) @ cols  # (F, N*OH*OW)
            out = out.reshape(self.out_channels, n, oh, ow).transpose(1, 0, 2, 3)
            self.cache = ("im2col", x.shape, cols)
        if "b" in self.params:
            # A new array, not a view; NumPy's ufuncs keep their input's memory order, so it stays laid out as
            # the GEMM's (F, N, OH, OW) (an NCHW array that is not C-contiguous). Layers go by shape, not order.
            out = out + self.params["b"].reshape(1, -1, 1, 1)
        else:
            out = get_array_module(out).ascontiguousarray(out)
        return out

    # forward_only builds the im2col (or row-shift) matrix for a slice of the batch at a time, of at most this many
    # bytes (at least one image): nothing is kept for backward, so the whole matrix need never exist at once.
    # ece662_resnet's 64 -> 64 convolutions at 48 x 48 take 5.3 MB an image by im2col (slices of 12 images),
    # 1.9 MB by row shifts (slices of 34).
    forward_only_cols_bytes = 64 * 2**20

    def _matrix_bytes_per_image(self, x):
        """Bytes of the unfolded matrix per image: C_in*KH*KW*OH*OW (im2col) or C_in*KW*Hp*Wp (row shifts)."""
        kh, kw = self.kernel_size
        (ph, pw), (h, w) = self.padding, x.shape[2:]
        if self._uses_shifted():
            return self.in_channels * kw * (h + 2 * ph) * (w + 2 * pw) * x.dtype.itemsize
        oh, ow = self.output_shape(h, w)
        return self.in_channels * kh * kw * oh * ow * x.dtype.itemsize

    def forward_only(self, x, training=False):
        """forward's output, computed a slice of the batch at a time and keeping no cache."""
        self._check(x)
        n = x.shape[0]
        step = max(1, int(self.forward_only_cols_bytes // self._matrix_bytes_per_image(x)))
        first = self.forward(x[:step], training)
        if step >= n:
            self.release_cache()
            return first
        out = get_array_module(first).empty((n,) + first.shape[1:], dtype=first.dtype)
        out[:step] = first
        for start in range(step, n, step):
            out[start : start + step] = self.forward(x[start : start + step], training)
        self.release_cache()
        return out

    def backward(self, dout):
        """dout (N, C_out, OH, OW) -> dx (N, C_in, H, W); sets ``grads["W"]`` = G @ X^T and ``grads["b"]``.

        See the class docstring for the formulas.
        """
        algorithm, x_shape, matrix = self._saved()
        self._check_dout(dout, (x_shape[0], self.out_channels, *self.output_shape(x_shape[2], x_shape[3])))
        W = self.params["W"]
        f = self.out_channels
        if algorithm == "shifted":
            self.grads["W"], dx = conv2d_shifted_backward(dout, matrix, W, self.padding)
            if "b" in self.params:
                self.grads["b"] = dout.sum(axis=(0, 2, 3))
            self.cache = None
            return dx
        cols = matrix
        g = dout.transpose(1, 0, 2, 3).reshape(f, -1)  # (F, N*OH*OW)
        self.grads["W"] = (g @ cols.T).reshape(W.shape)
        if "b" in self.params:
            self.grads["b"] = g.sum(axis=1)
        self.cache = None
        if self._dx_by_convolution():
            return conv_input_grad(dout, W, self.padding)
        return col2im_input_grad(g, W, x_shape, self.stride, self.padding)

    def _dx_by_convolution(self):
        """Whether backward computes dx as a convolution (stride 1) instead of by col2im.

        Why a choice: col2im scatters a (C_in*KH*KW, N*OH*OW) matrix after a GEMM of
        inner size C_out; the convolution copies dout into a (C_out*KH*KW, N*OH*OW)
        matrix with im2col, then one GEMM of inner size C_out*KH*KW writes dx directly.
        So the convolution wins while C_out is not much larger than C_in. Measured on
        a 2-core CPU, batch 100 (ms, col2im -> convolution; ``python
        benchmarks/bench_conv_algorithms.py --shapes zoo --batch 100 --threads 2``):
        64->64 at 48x48 209 -> 126, 128->128 at 24x24 167 -> 115, 64->128 at 24x24
        76 -> 69, 512->512 at 6x6 125 -> 102, 32->64 at 24x24 28.5 -> 29.2 (even);
        but 128->512 at 12x12 102 -> 122 and 1->64 at 48x48 8 -> 48. Hence:
        C_out <= 2 C_in. (On a GPU the trade is untested: see README.)
        """
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        return (
            self.stride == (1, 1) and ph <= kh - 1 and pw <= kw - 1
            and self.out_channels <= 2 * self.in_channels
        )


SHIFTED_MIN_CHANNELS = 8  # set_conv_algorithm(..., "shifted") leaves convolutions of fewer input channels to im2col


def set_conv_algorithm(layer, algorithm):
    """Set ``algorithm`` on every :class:`Conv2D` in ``layer`` (a model, a block or one layer); returns how many.

    Parameters:
        layer: a model, a container or a single layer, searched through all its sub-layers;
        algorithm: ``"auto"``, ``"im2col"`` or ``"shifted"`` (see :class:`Conv2D`).

    ``"shifted"`` goes only where it can and where it pays: stride 1 and at least
    ``SHIFTED_MIN_CHANNELS`` input channels. A first layer's single channel makes its products'
    inner size C_in*KW = 3, 2.3-2.7x slower than im2col (``bench_conv_algorithms.py``), to save a
    few MB. The other convolutions are left as they are and not counted. Parameters and results
    do not change, only memory and speed (``benchmarks/bench_conv_algorithms.py`` and
    ``bench_train_step.py --shifted`` measure both).
    """
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(f"set_conv_algorithm: algorithm must be one of {CONV_ALGORITHMS}, got {algorithm!r}")
    changed = 0
    if isinstance(layer, Conv2D) and (algorithm != "shifted" or (
            layer.stride == (1, 1) and layer.in_channels >= SHIFTED_MIN_CHANNELS)):
        layer.algorithm = algorithm
        changed += 1
    for _, child in layer.children():
        changed += set_conv_algorithm(child, algorithm)
    return changed
