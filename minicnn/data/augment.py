"""Batched, seeded data augmentation that runs unchanged on NumPy or CuPy.

:class:`Augmenter` applies a random horizontal flip, rotation, zoom and shift
(one affine warp with bilinear sampling), a random crop with padding and
random erasing to a whole batch ``(N, C, H, W)`` at once. Every random
parameter is drawn per image from the augmenter's own ``RandomState`` on the
batch's backend; the warp, the crop and the erasing are array ops (fancy
indexing, broadcast masks), with no Python loop over images or pixels.

Conventions:

* Pixels outside the image are filled by **edge replication** (nearest border
  pixel), for the warp and for the crop padding alike: black borders would be
  a strong artificial cue on 48x48 faces, and the border of a face crop is
  usually close to its neighbourhood.
* Rotation is about the image centre, counter-clockwise for positive angles
  (so +90 degrees equals ``np.rot90`` on the last two axes).
* ``zoom > 1`` magnifies (zooms in), ``zoom < 1`` shrinks.
* ``shift`` is a fraction of the image size (``0.1`` on 48 px moves the
  content by up to +-4.8 px, sub-pixel amounts interpolated), drawn
  independently for rows and columns.
* ``crop_padding=p`` is integer-pixel: pad by ``p`` on each side, then cut a
  random ``H x W`` window, i.e. shift by an integer in ``[-p, p]`` per axis.
* Random erasing (Zhong et al. 2017, "Random Erasing Data Augmentation")
  comes last: with probability ``erase_prob`` an image gets one axis-aligned
  rectangle set to ``erase_value`` on every channel. The rectangle's area is
  a fraction ``s ~ U(erase_scale)`` of the image and its aspect ratio
  ``r = h / w`` is log-uniform in ``erase_ratio``, so ``h = round(sqrt(s H W
  r))`` and ``w = round(sqrt(s H W / r))``, each clipped to ``[1, H]`` /
  ``[1, W]`` (torchvision's ``RandomErasing`` redraws up to 10 times and
  then skips the image instead; clipping keeps the batch loop-free). Its
  position is uniform over the places where it fits. The defaults are
  torchvision's (``scale=(0.02, 0.33)``, ``ratio=(0.3, 3.3)``, ``value=0``):
  minicnn normalises before augmenting, so ``0`` is the mean pixel.
"""
from __future__ import annotations

import math
import numbers

from .. import kernels
from ..backend import get_array_module, get_seed

__all__ = ["Augmenter", "affine_warp", "integer_shift", "erase_rectangles"]


class Augmenter:
    """Random geometric augmentation of image batches ``(N, C, H, W)``.

    Args:
        flip: random horizontal (left-right) flip.
        rotation: maximum angle in degrees, drawn uniformly in
            ``[-rotation, rotation]``; or a pair ``(lo, hi)``.
        shift: maximum translation as a fraction of the image size (``0 <=
            shift < 1``), drawn uniformly in ``[-shift, shift]`` per axis.
        zoom: ``(lo, hi)`` range of the scale factor (``(1.0, 1.0)``: off).
        crop_padding: pad by this many pixels (edge replication) and take a
            random window of the original size (``0``: off).
        seed: seed of the augmenter's random stream; ``None`` takes the
            library seed (:func:`minicnn.backend.seed`) at first use.
        flip_prob: probability of flipping an image when ``flip`` is on.
        erase_prob: probability of random erasing per image (``0``: off).
        erase_scale: ``(lo, hi)`` range of the erased area as a fraction of
            the image, ``0 < lo <= hi <= 1``.
        erase_ratio: ``(lo, hi)`` range of the erased rectangle's aspect
            ratio height / width, ``0 < lo <= hi``, drawn log-uniformly.
        erase_value: the value written into the rectangle.

    ``aug(x, training=True)`` returns a new augmented array of the same shape
    and dtype on the same backend; with ``training=False`` or every option
    off it returns ``x`` itself.

    For a reproducible run, call :meth:`reseed` with e.g. ``base_seed +
    epoch`` at the start of every epoch.
    """

    def __init__(
        self,
        flip: bool = True,
        rotation=0.0,
        shift: float = 0.0,
        zoom=(1.0, 1.0),
        crop_padding: int = 0,
        seed: int | None = None,
        flip_prob: float = 0.5,
        erase_prob: float = 0.0,
        erase_scale=(0.02, 0.33),
        erase_ratio=(0.3, 3.3),
        erase_value: float = 0.0,
    ):
        self.flip = bool(flip)
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {flip_prob}")
        self.flip_prob = float(flip_prob)
        if isinstance(rotation, numbers.Real):
            if rotation < 0:
                raise ValueError(f"rotation must be >= 0 degrees (the range is +-rotation), got {rotation}")
            rotation = (-float(rotation), float(rotation))
        self.rotation = _pair(rotation, "rotation")
        if not 0.0 <= shift < 1.0:
            raise ValueError(f"shift is a fraction of the image size and must lie in [0, 1), got {shift}")
        self.shift = float(shift)
        self.zoom = _pair(zoom, "zoom")
        if self.zoom[0] <= 0:
            raise ValueError(f"zoom factors must be > 0, got {zoom}")
        if not isinstance(crop_padding, numbers.Integral) or crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative int (pixels), got {crop_padding!r}")
        self.crop_padding = int(crop_padding)
        if not 0.0 <= erase_prob <= 1.0:
            raise ValueError(f"erase_prob must lie in [0, 1], got {erase_prob}")
        self.erase_prob = float(erase_prob)
        self.erase_scale = _pair(erase_scale, "erase_scale")
        if not 0.0 < self.erase_scale[0] <= self.erase_scale[1] <= 1.0:
            raise ValueError(f"erase_scale is a fraction of the image area: need 0 < lo <= hi <= 1, got {erase_scale}")
        self.erase_ratio = _pair(erase_ratio, "erase_ratio")
        if self.erase_ratio[0] <= 0:
            raise ValueError(f"erase_ratio (height / width) must be > 0, got {erase_ratio}")
        if not isinstance(erase_value, numbers.Real) or not math.isfinite(erase_value):
            raise ValueError(f"erase_value must be a finite number, got {erase_value!r}")
        self.erase_value = float(erase_value)
        self.seed = seed
        self._rngs: dict = {}

    # -- random stream -----------------------------------------------------

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream from ``seed`` (on every backend)."""
        self.seed = seed
        self._rngs = {}

    def _rng(self, xp):
        key = xp.__name__
        if key not in self._rngs:
            self._rngs[key] = xp.random.RandomState(get_seed() if self.seed is None else self.seed)
        return self._rngs[key]

    # -- what is on --------------------------------------------------------

    @property
    def _warp_on(self) -> bool:
        return self.rotation != (0.0, 0.0) or self.shift > 0 or self.zoom != (1.0, 1.0)

    @property
    def _flip_on(self) -> bool:
        return self.flip and self.flip_prob > 0

    @property
    def active(self) -> bool:
        """True when at least one augmentation is switched on."""
        return self._warp_on or self._flip_on or self.crop_padding > 0 or self.erase_prob > 0

    # -- the transform -----------------------------------------------------

    def __call__(self, x, training: bool = True):
        """Augment a batch ``x`` of shape ``(N, C, H, W)`` (NumPy or CuPy)."""
        if not training or not self.active:
            return x
        if x.ndim != 4:
            raise ValueError(f"Augmenter expects a batch (N, C, H, W), got shape {x.shape}")
        xp = get_array_module(x)
        rng = self._rng(xp)
        n, _, h, w = x.shape
        # Draw in a fixed order so a seed reproduces the same parameters.
        flips = rng.rand(n) < self.flip_prob if self._flip_on else None
        if self._warp_on:
            angles = xp.deg2rad(rng.uniform(self.rotation[0], self.rotation[1], size=n))
            zooms = rng.uniform(self.zoom[0], self.zoom[1], size=n)
            shifts = rng.uniform(-self.shift, self.shift, size=(n, 2))
            shifts[:, 0] *= h  # (no host list [h, w] copied to the device every step)
            shifts[:, 1] *= w
            x = affine_warp(x, _inverse_matrices(xp, angles, zooms, shifts, flips, h, w))
        elif flips is not None:
            # Flip alone is an exact index reversal; no need to interpolate.
            x = xp.where(flips[:, None, None, None], x[..., ::-1], x)
        if self.crop_padding:
            p = self.crop_padding
            # floor(U * (2p + 1)) - p: uniform over -p..p, like randint(-p, p + 1), but CuPy's randint over a
            # range that is not a power of two samples by rejection and reads a count back to the host.
            offsets = (rng.random_sample((n, 2)) * (2 * p + 1)).astype(xp.int64) - p
            x = integer_shift(x, offsets)
        if self.erase_prob > 0:
            # Drawn after the crop's numbers, so turning erasing on leaves the other draws of a seed unchanged.
            erase = rng.random_sample(n) < self.erase_prob
            area = rng.uniform(self.erase_scale[0], self.erase_scale[1], size=n) * (h * w)
            log_lo, log_hi = math.log(self.erase_ratio[0]), math.log(self.erase_ratio[1])
            ratio = xp.exp(rng.uniform(log_lo, log_hi, size=n))
            heights = xp.clip(xp.floor(xp.sqrt(area * ratio) + 0.5), 1, h).astype(xp.int64)
            widths = xp.clip(xp.floor(xp.sqrt(area / ratio) + 0.5), 1, w).astype(xp.int64)
            # floor(U * (room + 1)): uniform over the room + 1 positions where the rectangle fits (see crop)
            tops = (rng.random_sample(n) * (h - heights + 1)).astype(xp.int64)
            lefts = (rng.random_sample(n) * (w - widths + 1)).astype(xp.int64)
            boxes = xp.stack([tops, lefts, heights, widths], axis=1)
            x = erase_rectangles(x, boxes, erase, self.erase_value)
        return x

    def __repr__(self) -> str:
        return (
            f"Augmenter(flip={self.flip}, rotation={self.rotation}, shift={self.shift}, zoom={self.zoom}, "
            f"crop_padding={self.crop_padding}, erase_prob={self.erase_prob}, erase_scale={self.erase_scale}, "
            f"erase_ratio={self.erase_ratio}, erase_value={self.erase_value}, seed={self.seed}, "
            f"flip_prob={self.flip_prob})"
        )


def _pair(value, name):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi), got {value!r}") from None
    if lo > hi:
        raise ValueError(f"{name} range must have lo <= hi, got {value!r}")
    return (lo, hi)


def _inverse_matrices(xp, angles, zooms, shifts, flips, h, w):
    """Per-image ``(N, 2, 3)`` maps from output to source pixel coordinates.

    Coordinates are ``(row, col)``, relative to the image centre. The forward
    transform is flip, then rotate, zoom and shift; its inverse is
    ``src = F R(-angle) (out - shift) / zoom``, with ``R`` a
    counter-clockwise rotation as seen on screen (rows point down).
    """
    n = angles.shape[0]
    cos, sin = xp.cos(angles) / zooms, xp.sin(angles) / zooms
    m = xp.empty((n, 2, 3), dtype=xp.float64)
    # src_row =  cos*u + sin*v ; src_col = -sin*u + cos*v, with (u, v) = out - centre - shift.
    m[:, 0, 0], m[:, 0, 1] = cos, sin
    m[:, 1, 0], m[:, 1, 1] = -sin, cos
    if flips is not None:
        sign = xp.where(flips, -1.0, 1.0)
        m[:, 1, :2] *= sign[:, None]  # mirror the source column about the centre
    # Fold "- shift" into the constant column: m[:, :, 2] = -A @ shift.
    m[:, :, 2] = -(m[:, :, :2] @ shifts[:, :, None])[:, :, 0]
    return m


@kernels.gpu_fast_path(kernels.affine_warp)  # on CuPy: one kernel (minicnn/kernels.py)
def affine_warp(x, inv_matrices):
    """Warp each image of ``x (N, C, H, W)`` with its own affine map, bilinear, edge fill.

    ``inv_matrices`` ``(N, 2, 3)`` maps an output pixel ``(row, col)`` to the
    source point it reads, both relative to the image centre
    ``((H - 1) / 2, (W - 1) / 2)``: ``src = M[:, :2] @ (out - c) + M[:, 2]``.
    Source points outside the image take the value of the nearest border
    point. Returns a new array of ``x``'s dtype.
    """
    xp = get_array_module(x)
    n, c, h, w = x.shape
    m = xp.asarray(inv_matrices, dtype=xp.float64)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    u = (xp.arange(h, dtype=xp.float64) - cy)[None, :, None]  # (1, H, 1)
    v = (xp.arange(w, dtype=xp.float64) - cx)[None, None, :]  # (1, 1, W)
    mm = m[:, :, :, None, None]  # (N, 2, 3, 1, 1), broadcast over the pixel grid
    src_r = mm[:, 0, 0] * u + mm[:, 0, 1] * v + mm[:, 0, 2] + cy  # (N, H, W)
    src_c = mm[:, 1, 0] * u + mm[:, 1, 1] * v + mm[:, 1, 2] + cx
    # Clamping the coordinate before interpolating = edge replication outside.
    src_r = xp.clip(src_r, 0.0, h - 1.0)
    src_c = xp.clip(src_c, 0.0, w - 1.0)
    r0 = xp.floor(src_r).astype(xp.int64)
    c0 = xp.floor(src_c).astype(xp.int64)
    wr = (src_r - r0).astype(x.dtype)[:, None]  # (N, 1, H, W), broadcast over channels
    wc = (src_c - c0).astype(x.dtype)[:, None]
    r1 = xp.minimum(r0 + 1, h - 1)  # on the last row the weight of r1 is 0
    c1 = xp.minimum(c0 + 1, w - 1)

    flat = x.reshape(n, c, h * w)
    ni = xp.arange(n)[:, None, None]
    ci = xp.arange(c)[None, :, None]

    def gather(r, col):
        return flat[ni, ci, (r * w + col).reshape(n, 1, h * w)].reshape(n, c, h, w)

    top = gather(r0, c0) * (1 - wc) + gather(r0, c1) * wc
    bottom = gather(r1, c0) * (1 - wc) + gather(r1, c1) * wc
    return (top * (1 - wr) + bottom * wr).astype(x.dtype, copy=False)


def integer_shift(x, offsets):
    """Random-crop-with-padding as a per-image integer shift, edge fill.

    Output pixel ``(i, j)`` of image ``k`` reads ``x[k, :, i + dy, j + dx]``
    (clamped to the image), with ``(dy, dx) = offsets[k]``. This equals
    padding by ``p >= |offset|`` with edge replication and cutting the window
    at ``(p + dy, p + dx)``. ``offsets`` is ``(N, 2)`` ints.
    """
    xp = get_array_module(x)
    n, c, h, w = x.shape
    offsets = xp.asarray(offsets)
    rows = xp.clip(xp.arange(h)[None, :] + offsets[:, 0:1], 0, h - 1)  # (N, H)
    cols = xp.clip(xp.arange(w)[None, :] + offsets[:, 1:2], 0, w - 1)  # (N, W)
    ni = xp.arange(n)[:, None, None, None]
    ci = xp.arange(c)[None, :, None, None]
    return x[ni, ci, rows[:, None, :, None], cols[:, None, None, :]]


def erase_rectangles(x, boxes, mask, value=0.0):
    """Set one rectangle of each selected image of ``x (N, C, H, W)`` to ``value``, on every channel.

    ``boxes`` is ``(N, 4)`` ints ``(top, left, height, width)``; image ``k``
    keeps its pixels unless ``mask[k]``, else pixels ``top <= i < top +
    height`` and ``left <= j < left + width`` become ``value``. Returns a new
    array of ``x``'s dtype; the rest of every image is copied unchanged.
    """
    xp = get_array_module(x)
    _, _, h, w = x.shape
    boxes = xp.asarray(boxes)
    rows = xp.arange(h)[None, :]
    cols = xp.arange(w)[None, :]
    in_rows = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 0:1] + boxes[:, 2:3])  # (N, H)
    in_cols = (cols >= boxes[:, 1:2]) & (cols < boxes[:, 1:2] + boxes[:, 3:4])  # (N, W)
    inside = xp.asarray(mask)[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]  # (N, H, W)
    # a NumPy scalar of x's dtype: no host-to-device copy, and the result keeps x's dtype
    return xp.where(inside[:, None], x.dtype.type(value), x).astype(x.dtype, copy=False)
