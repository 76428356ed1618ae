"""Pooling layers: max, average and global average, NCHW.

Both windowed poolings loop over the KH*KW *kernel offsets* (4 for the usual
2x2 pool), never over batch items or positions: for offset (u, v) the strided
slice ``xpad[:, :, u::sh, v::sw]`` (cut to OH x OW) holds that element of every
window at once, so each step is one vectorised operation on an (N, C, OH, OW)
array. Backward scatters with the same slices, the way col2im does.
"""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..backend import get_array_module
from .base import Layer
from .conv import _pad, conv_output_size, pair

__all__ = ["MaxPool2D", "AvgPool2D", "GlobalAvgPool2D"]


def _arg_dtype(positions):
    """The smallest unsigned dtype that numbers ``positions`` window offsets (uint8 up to 256)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if positions <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _record_winner(arg, better, k):
    """arg = k where ``better``, else unchanged, for offsets k visited in increasing order.

    Since every earlier winner is < k, this is ``arg = max(arg, k * better)``: one
    small uint8 operation (``copyto(where=)`` / ``where`` were 20-35x slower here).
    ``arg``'s dtype (see :func:`_arg_dtype`) holds every offset k, so nothing wraps around.
    """
    xp = get_array_module(arg)
    flag = better.view(xp.uint8) if arg.dtype == np.uint8 else better.astype(arg.dtype)
    xp.maximum(arg, flag * arg.dtype.type(k), out=arg)


class _Pool2D(Layer):
    """Window geometry shared by :class:`MaxPool2D` and :class:`AvgPool2D`."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding = pair(padding, "padding")
        kh, kw = self.kernel_size
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(f"{type(self).__name__}: kernel_size and stride must be >= 1, "
                             f"got kernel_size={self.kernel_size}, stride={self.stride}")
        if self.padding[0] > kh // 2 or self.padding[1] > kw // 2 or min(self.padding) < 0:
            raise ValueError(
                f"{type(self).__name__}: padding {self.padding} must be between 0 and half the kernel {self.kernel_size}"
            )

    def extra_repr(self):
        s = f"kernel_size={self.kernel_size}, stride={self.stride}"
        return s + (f", padding={self.padding}" if self.padding != (0, 0) else "")

    def output_shape(self, h, w):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)

    def _offsets(self, x, pad_value):
        """Padded input and, per kernel offset, the (N, C, OH, OW) slice it contributes."""
        if x.ndim != 4:
            raise self._bad_input("(N, C, H, W)", x)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
            raise ValueError(
                f"{self!r}: kernel ({kh}, {kw}) is larger than the padded input "
                f"({x.shape[2] + 2 * ph}, {x.shape[3] + 2 * pw}) of input shape {tuple(x.shape)}"
            )
        oh, ow = self.output_shape(x.shape[2], x.shape[3])
        self._slices = [
            (slice(None), slice(None), slice(u, u + sh * (oh - 1) + 1, sh), slice(v, v + sw * (ow - 1) + 1, sw))
            for u in range(kh)
            for v in range(kw)
        ]
        return _pad(x, ph, pw, pad_value)

    def _unpad(self, dxpad, x_shape):
        ph, pw = self.padding
        if ph == 0 and pw == 0:
            return dxpad
        return dxpad[:, :, ph : ph + x_shape[2], pw : pw + x_shape[3]]


class MaxPool2D(_Pool2D):
    """Max pooling (padding with -inf, as PyTorch). ``stride`` defaults to ``kernel_size``.

    Shapes:
        x (N, C, H, W) -> out (N, C, OH, OW),  OH = (H + 2 ph - KH) // sh + 1,  OW likewise

    Parameters:
        kernel_size: an int or an (h, w) pair.
        stride: an int or a pair; None (default) = kernel_size, non-overlapping windows;
            smaller than the kernel: overlapping windows.
        padding: an int or a pair, at most half the kernel; padded cells hold -inf and never win.

    Forward:  out[n, c, i, j] = max_{u, v} xpad[n, c, i*sh + u, j*sw + v]; the layer keeps
              which offset (u, v) won (the first one in row-major order on ties, as PyTorch).
    Backward: the whole upstream gradient of a window goes to its arg-max (u*, v*):
              dxpad[n, c, i*sh + u*, j*sw + v*] += dout[n, c, i, j]
              (windows that overlap and share a maximum add up).

    Non-overlapping windows without padding take a faster separable path (max along
    W, then along H). Reference: :func:`minicnn.reference.maxpool2d_forward` /
    :func:`minicnn.reference.maxpool2d_backward` (one window at a time).
    """

    @kernels.gpu_fast_path(kernels.maxpool2d_forward)  # on CuPy: one kernel (minicnn/kernels.py)
    def forward(self, x, training=True):
        """x (N, C, H, W) -> out (N, C, OH, OW), the max of every window; keeps the arg-max offsets."""
        xpad = self._offsets(x, -np.inf)
        if self.stride == self.kernel_size and self.padding == (0, 0):
            return self._forward_separable(x)
        return self._forward_general(x, xpad)

    def backward(self, dout):
        """dout (N, C, OH, OW) -> dx (N, C, H, W): each window's dout goes to its arg-max, zero elsewhere."""
        n, c, h, w = self._saved()[1]  # the input's shape, in the cache of either path
        self._check_dout(dout, (n, c, *self.output_shape(h, w)))
        return self._backward(dout)

    @kernels.gpu_fast_path(kernels.maxpool2d_backward)
    def _backward(self, dout):
        """The backward pass after the check (on CuPy: one kernel)."""
        if self._saved()[0] == "separable":
            return self._backward_separable(dout)
        return self._backward_general(dout)

    # -- any kernel, stride and padding: one pass per kernel offset ------------------------
    def _forward_general(self, x, xpad):
        xp = get_array_module(x)
        out, arg = None, None
        for k, sl in enumerate(self._slices):
            view = xpad[sl]
            if out is None:
                out = view.copy()
                arg = xp.zeros(out.shape, dtype=_arg_dtype(len(self._slices)))
                continue
            _record_winner(arg, view > out, k)  # strict ">": the first maximum wins ties
            xp.maximum(out, view, out=out)
        self.cache = ("general", x.shape, xpad.shape, arg)
        return out

    def _backward_general(self, dout):
        xp = get_array_module(dout)
        _, x_shape, padded_shape, arg = self.cache
        dxpad = xp.zeros(padded_shape, dtype=dout.dtype)
        zero = dout.dtype.type(0)
        for k, sl in enumerate(self._slices):
            dxpad[sl] += xp.where(arg == k, dout, zero)
        self.cache = None
        return self._unpad(dxpad, x_shape)

    # -- non-overlapping windows (stride == kernel, no padding): max along W, then along H --
    # The max of a window is the max over its rows of each row's max, so two cheap passes
    # (KW strided reads, then KH reads of a 1/KW-size array) replace KH * KW strided ones.
    # Ties: the first column wins within a row, then the first row: the first maximum in
    # row-major order, as in PyTorch.
    def _forward_separable(self, x):
        xp = get_array_module(x)
        (kh, kw) = self.kernel_size
        oh, ow = self.output_shape(x.shape[2], x.shape[3])
        xc = x[:, :, : oh * kh, : ow * kw]
        colmax = xc[..., 0::kw].copy()  # (N, C, OH*KH, OW): max of each row segment
        colarg = xp.zeros(colmax.shape, dtype=_arg_dtype(kw))
        for v in range(1, kw):
            view = xc[..., v::kw]
            _record_winner(colarg, view > colmax, v)
            xp.maximum(colmax, view, out=colmax)
        out = colmax[:, :, 0::kh].copy()  # (N, C, OH, OW)
        rowarg = xp.zeros(out.shape, dtype=_arg_dtype(kh))
        for u in range(1, kh):
            view = colmax[:, :, u::kh]
            _record_winner(rowarg, view > out, u)
            xp.maximum(out, view, out=out)
        self.cache = ("separable", x.shape, colarg, rowarg)
        return out

    def _backward_separable(self, dout):
        xp = get_array_module(dout)
        _, x_shape, colarg, rowarg = self.cache
        kh, kw = self.kernel_size
        oh, ow = dout.shape[2], dout.shape[3]
        drow = xp.empty((dout.shape[0], dout.shape[1], oh * kh, ow), dtype=dout.dtype)
        for u in range(kh):  # each window's gradient goes to its winning row ...
            xp.multiply(dout, rowarg == u, out=drow[:, :, u::kh])
        dx = xp.zeros(x_shape, dtype=dout.dtype)
        for v in range(kw):  # ... and within that row to its winning column
            xp.multiply(drow, colarg == v, out=dx[:, :, : oh * kh, v : ow * kw : kw])
        self.cache = None
        return dx


class AvgPool2D(_Pool2D):
    """Average pooling (zero padding counted in the average, as PyTorch's default).

    Shapes:
        x (N, C, H, W) -> out (N, C, OH, OW),  OH = (H + 2 ph - KH) // sh + 1,  OW likewise

    Parameters:
        kernel_size: an int or an (h, w) pair.
        stride: an int or a pair; None (default) = kernel_size.
        padding: an int or a pair, at most half the kernel; padded zeros count in the mean
            (PyTorch's ``count_include_pad=True``).

    Forward:  out[n, c, i, j] = (1 / (KH KW)) sum_{u, v} xpad[n, c, i*sh + u, j*sw + v]
    Backward: every input of a window receives an equal share:
              dxpad[n, c, i*sh + u, j*sw + v] += dout[n, c, i, j] / (KH KW)

    Reference: :func:`minicnn.reference.avgpool2d_forward` / :func:`minicnn.reference.avgpool2d_backward`.
    """

    def forward(self, x, training=True):
        """x (N, C, H, W) -> out (N, C, OH, OW), the mean of every window."""
        xpad = self._offsets(x, 0.0)
        out = None
        for sl in self._slices:
            out = xpad[sl].copy() if out is None else out + xpad[sl]
        self.cache = (x.shape, xpad.shape)
        return out * out.dtype.type(1.0 / len(self._slices))

    def backward(self, dout):
        """dout (N, C, OH, OW) -> dx (N, C, H, W): dout / (KH KW) added to every pixel of its window."""
        xp = get_array_module(dout)
        x_shape, padded_shape = self._saved()
        self._check_dout(dout, (*x_shape[:2], *self.output_shape(x_shape[2], x_shape[3])))
        share = dout * dout.dtype.type(1.0 / len(self._slices))
        dxpad = xp.zeros(padded_shape, dtype=dout.dtype)
        for sl in self._slices:
            dxpad[sl] += share
        return self._unpad(dxpad, x_shape)


class GlobalAvgPool2D(Layer):
    """Global average pooling: each feature map becomes its mean.

    Shapes:
        x (N, C, H, W) -> out (N, C)

    Parameters: none.

    Forward:  out[n, c] = (1 / (H W)) sum_{y, x} x[n, c, y, x]
    Backward: dx[n, c, y, x] = dout[n, c] / (H W)

    Reference: :func:`minicnn.reference.global_avgpool2d_forward` / ``..._backward``.
    """

    def forward(self, x, training=True):
        """x (N, C, H, W) -> out (N, C), the mean over (H, W)."""
        if x.ndim != 4:
            raise self._bad_input("(N, C, H, W)", x)
        self.cache = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dout):
        """dout (N, C) -> dx (N, C, H, W) = dout / (H W) broadcast over every pixel."""
        xp = get_array_module(dout)
        n, c, h, w = self._saved()
        self._check_dout(dout, (n, c))
        return xp.broadcast_to((dout / (h * w))[:, :, None, None], (n, c, h, w)).copy()
