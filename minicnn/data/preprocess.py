"""Dataset surgery and input normalisation for FER-2013.

* :func:`merge_disgust_into_angry`: the 7-class problem becomes 6 classes
  (disgust has only ~1.5% of the images and is mostly confused with angry).
* :func:`undersample`: drop part of one class (the Technical Review Document
  cut about 3,000 of the 7,215 training "happy" faces).
* :func:`stratified_split`: a seeded validation split with the class
  proportions of the input, chosen by the images' content (so the same
  images give the same split whatever their row or file order).
* :func:`content_sample`: a seeded subset of a given size, chosen by content.
* :class:`Normalizer`: maps ``uint8`` images to ``float32`` network inputs
  ``(N, 1, 48, 48)`` with statistics fitted on training images only, and
  stores those statistics as plain arrays for a ``.npz`` checkpoint.

Dataset functions never modify their input; they return new
:class:`~minicnn.data.fer2013.FERDataset` objects.
"""
from __future__ import annotations

import numbers

import numpy as np

from ..backend import get_array_module, to_host
from .fer2013 import FERDataset

__all__ = ["merge_disgust_into_angry", "undersample", "stratified_split", "content_sample", "Normalizer",
           "SPLIT_METHODS"]

#: How rows are chosen: "content" ranks images by a seeded hash of pixels and label (independent of
#: row order); "order" is the legacy seeded permutation of the row positions (depends on row order).
SPLIT_METHODS = ("content", "order")


def _check_method(method):
    if method not in SPLIT_METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {SPLIT_METHODS}")


def _content_first(keys: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` of rows ``idx`` whose content ``keys`` (one per row of the dataset) are smallest."""
    return idx[np.argsort(keys[idx], kind="stable")[:n]]


def merge_disgust_into_angry(ds: FERDataset) -> FERDataset:
    """Relabel disgust as angry and drop the disgust class.

    The remaining classes keep their relative order, so the 7 standard classes
    become ``("angry", "fear", "happy", "sad", "surprise", "neutral")`` with
    labels ``0 1 0 2 3 4 5`` for the old ``0..6``.

    Raises:
        ValueError: ``ds`` has no ``"angry"`` or no ``"disgust"`` class.
    """
    names = list(ds.class_names)
    for needed in ("angry", "disgust"):
        if needed not in names:
            raise ValueError(f"cannot merge disgust into angry: class {needed!r} not in {tuple(names)}")
    disgust, angry = names.index("disgust"), names.index("angry")
    new_names = tuple(n for n in names if n != "disgust")
    remap = np.array([new_names.index(names[angry] if i == disgust else n) for i, n in enumerate(names)])
    return FERDataset(ds.images.copy(), remap[ds.labels], ds.usage.copy(), new_names)


def undersample(ds: FERDataset, class_name: str, n_or_fraction, seed: int = 0, method: str = "content") -> FERDataset:
    """Keep only part of the images of one class, chosen at random.

    Args:
        ds: the dataset (usually the training split).
        class_name: the class to shrink, e.g. ``"happy"``.
        n_or_fraction: how many images of that class to **keep**: an int
            count (``0 <= n <= count``) or a float fraction in ``[0, 1]``
            (rounded to the nearest count). To cut 3,000 of 7,215 happy
            faces, pass ``4215`` (or ``1 - 3000 / 7215``).
        seed: seeds the choice (same seed and images, same result).
        method: ``"content"`` (default) chooses by the images' content, so the
            same images give the same result in any row order; ``"order"`` is
            the legacy choice by row position.

    Returns:
        A new dataset; the other classes are untouched and all kept rows stay
        in their original order.
    """
    if class_name not in ds.class_names:
        raise ValueError(f"unknown class {class_name!r}: expected one of {ds.class_names}")
    idx = np.flatnonzero(ds.labels == ds.class_names.index(class_name))
    count = idx.size
    if isinstance(n_or_fraction, bool):
        raise TypeError("n_or_fraction must be an int count or a float fraction, not a bool")
    if isinstance(n_or_fraction, numbers.Integral):
        keep = int(n_or_fraction)
        if not 0 <= keep <= count:
            raise ValueError(f"cannot keep {keep} {class_name!r} images: the dataset has {count}")
    elif isinstance(n_or_fraction, numbers.Real):
        if not 0.0 <= float(n_or_fraction) <= 1.0:
            raise ValueError(f"fraction to keep must lie in [0, 1], got {n_or_fraction}")
        keep = int(round(float(n_or_fraction) * count))
    else:
        raise TypeError(f"n_or_fraction must be an int or a float, got {type(n_or_fraction).__name__}")
    _check_method(method)
    if method == "content":
        dropped = _content_first(ds.content_keys(f"undersample/{seed}/{class_name}"), idx, count - keep)
    else:
        rng = np.random.RandomState(seed)
        dropped = rng.choice(idx, size=count - keep, replace=False)
    mask = np.ones(len(ds), dtype=bool)
    mask[dropped] = False
    return ds.subset(mask)


def stratified_split(ds: FERDataset, val_fraction: float, seed: int = 0,
                     method: str = "content") -> tuple[FERDataset, FERDataset]:
    """Split ``ds`` into ``(train, val)`` keeping each class's proportion.

    Each class ``c`` with ``n_c`` images gives ``round(val_fraction * n_c)``
    of them to ``val``; so per-class proportions match the input to within one
    image. Both parts keep the input's row order.

    ``method="content"`` (default) gives ``val`` the images whose seeded hash
    of pixels and label (:meth:`FERDataset.content_keys`) is smallest: the same
    ``seed`` and the same images give the same split in any row order (a
    shuffled CSV, a folder copy). ``method="order"`` is the legacy split, a
    seeded permutation of row positions, which depends on the row order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    _check_method(method)
    rng = np.random.RandomState(seed)
    keys = ds.content_keys(f"split/{seed}") if method == "content" else None
    val_mask = np.zeros(len(ds), dtype=bool)
    for c in range(ds.num_classes):  # fixed class order: the stream of draws is reproducible
        idx = np.flatnonzero(ds.labels == c)
        n_val = int(round(val_fraction * idx.size))
        if method == "content":
            val_mask[_content_first(keys, idx, n_val)] = True
        else:
            val_mask[rng.permutation(idx)[:n_val]] = True
    return ds.subset(~val_mask), ds.subset(val_mask)


def content_sample(ds: FERDataset, n: int, seed: int = 0, salt: str = "sample") -> FERDataset:
    """``n`` images of ``ds`` (all if fewer) chosen by a seeded hash of their content, in row order.

    The same images give the same sample in any row order.
    """
    if int(n) < 0:
        raise ValueError(f"content_sample: n must be >= 0, got {n}")
    chosen = _content_first(ds.content_keys(f"{salt}/{seed}"), np.arange(len(ds)), int(n))
    return ds.subset(np.sort(chosen))


class Normalizer:
    """Turn ``uint8`` images into normalised ``float32`` inputs ``(N, 1, H, W)``.

    Modes:
        ``"per_pixel"`` (HW3): subtract the per-pixel mean image of the
            training set, then divide by the largest absolute value of the
            centred training pixels, so training inputs lie in ``[-1, 1]``.
        ``"mean_std"`` (ECE 662): ``(x / 255 - mean) / std`` with the scalar
            mean and standard deviation of the training pixels (in ``[0, 1]``
            units).

    Fit on the training images only (:meth:`fit`), then apply the same
    statistics to every split (:meth:`transform`). The statistics live on the
    host; :meth:`transform` copies them once to the backend of its input, so
    NumPy and CuPy inputs both work.

        >>> norm = Normalizer("per_pixel").fit(train.images)
        >>> x = norm.transform(train.images)          # float32 (N, 1, 48, 48)
        >>> np.savez("ckpt.npz", **norm.to_arrays(prefix="norm/"))
        >>> norm2 = Normalizer.from_arrays(np.load("ckpt.npz"), prefix="norm/")
    """

    MODES = ("per_pixel", "mean_std")

    def __init__(self, mode: str = "per_pixel"):
        if mode not in self.MODES:
            raise ValueError(f"unknown normalisation mode {mode!r}: expected one of {self.MODES}")
        self.mode = mode
        self.mean: np.ndarray | None = None  # per_pixel: (H, W) grey levels; mean_std: scalar in [0, 1]
        self.scale: np.ndarray | None = None  # per_pixel: max |x - mean|; mean_std: std
        self._device_stats: dict = {}

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, images) -> "Normalizer":
        """Compute the statistics from training images ``(N, H, W)`` or ``(N, 1, H, W)``, grey levels 0-255.

        Returns ``self``. ``uint8`` input is the expected case; statistics are
        computed in float64 without a float copy of the whole set.
        """
        xp = get_array_module(images)
        x = _as_nhw(images)
        if x.shape[0] == 0:
            raise ValueError("cannot fit a Normalizer on zero images")
        if self.mode == "per_pixel":
            mean = x.mean(axis=0, dtype=xp.float64)
            # max |x - mean| over all pixels = the larger of (max - mean) and
            # (mean - min) per pixel: no (N, H, W) float temporary needed.
            hi = x.max(axis=0).astype(xp.float64) - mean
            lo = mean - x.min(axis=0).astype(xp.float64)
            scale = float(xp.maximum(hi, lo).max())
            self.mean = to_host(mean).astype(np.float32)
        else:
            if x.dtype == xp.uint8:
                # Exact moments from the 256-bin histogram: cheap and no big temporaries.
                counts = to_host(xp.bincount(x.ravel(), minlength=256)).astype(np.float64)
                levels = np.arange(256) / 255.0
                total = counts.sum()
                mean = float((counts * levels).sum() / total)
                scale = float(np.sqrt(max((counts * (levels - mean) ** 2).sum() / total, 0.0)))
            else:
                xf = x.astype(xp.float64) / 255.0
                mean, scale = float(xf.mean()), float(xf.std())
            self.mean = np.asarray(mean, dtype=np.float64)
        # A constant training set would divide by zero; leave it unscaled instead.
        self.scale = np.asarray(scale if scale > 0 else 1.0, dtype=np.float64)
        self._device_stats = {}
        return self

    def transform(self, images):
        """Normalise images ``(N, H, W)`` or ``(N, 1, H, W)`` to ``float32 (N, 1, H, W)`` on the input's backend."""
        if not self.fitted:
            raise RuntimeError("Normalizer.transform called before fit() (or from_arrays())")
        xp = get_array_module(images)
        x = _as_nhw(images)
        if self.mode == "per_pixel" and x.shape[1:] != self.mean.shape:
            raise ValueError(f"images are {x.shape[1:]} but the Normalizer was fitted on {self.mean.shape}")
        mean, inv_scale = self._stats_on(xp)
        x = x.astype(xp.float32)
        if self.mode == "per_pixel":
            out = (x - mean) * inv_scale
        else:
            out = (x * xp.float32(1.0 / 255.0) - mean) * inv_scale
        return out.reshape(x.shape[0], 1, *x.shape[1:])

    __call__ = transform

    def _stats_on(self, xp):
        # Copy the statistics to each backend once, not at every batch.
        key = xp.__name__
        if key not in self._device_stats:
            mean = xp.asarray(self.mean, dtype=xp.float32)
            inv_scale = xp.float32(1.0 / float(self.scale))
            self._device_stats[key] = (mean, inv_scale)
        return self._device_stats[key]

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The statistics as plain NumPy arrays (no pickling) for ``np.savez``.

        Keys: ``mode`` (a 0-d str array), ``mean`` and ``scale``, each preceded
        by ``prefix`` so they can share a checkpoint with model parameters.
        """
        if not self.fitted:
            raise RuntimeError("Normalizer.to_arrays called before fit()")
        return {
            prefix + "mode": np.array(self.mode),
            prefix + "mean": np.array(self.mean),
            prefix + "scale": np.array(self.scale),
        }

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "") -> "Normalizer":
        """Rebuild a fitted Normalizer from :meth:`to_arrays` output (or an ``np.load`` of it)."""
        try:
            mode = str(np.asarray(arrays[prefix + "mode"]).item())
            mean = np.asarray(arrays[prefix + "mean"])
            scale = np.asarray(arrays[prefix + "scale"])
        except KeyError as exc:
            raise KeyError(f"no Normalizer statistics under prefix {prefix!r}: missing {exc}") from None
        norm = cls(mode)
        norm.mean = mean.astype(np.float32) if mode == "per_pixel" else mean.astype(np.float64)
        norm.scale = scale.astype(np.float64)
        return norm

    def __repr__(self) -> str:
        state = "fitted" if self.fitted else "not fitted"
        return f"Normalizer(mode={self.mode!r}, {state})"


def _as_nhw(images):
    """View ``(N, H, W)`` or ``(N, 1, H, W)`` as ``(N, H, W)``."""
    if images.ndim == 4 and images.shape[1] == 1:
        return images.reshape(images.shape[0], *images.shape[2:])
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W) or (N, 1, H, W), got {images.shape}")
    return images
