"""Inference helpers: softmax probabilities in batches, and test-time augmentation.

    >>> from minicnn.inference import predict_proba, predict_tta
    >>> p = predict_proba(model, x)          # (N, K) NumPy array, rows sum to 1
    >>> p_tta = predict_tta(model, x)        # averaged over 10 views of each image
    >>> p_tta = predict_tta(model, x, progress="TTA")  # with a progress bar (tqdm, on stderr)

Both run the model in evaluation mode on its own device (NumPy or CuPy)
and return host (NumPy) arrays, since what follows (metrics, printing,
plotting) happens on the host.
"""
from __future__ import annotations

import sys

import numpy as np

from .backend import get_array_module, module_of, to_array_module, to_host
from .losses import softmax

__all__ = ["predict_proba", "predict_tta", "tta_views", "progress_bar"]


def _check_input(x):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"expected model inputs of shape (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")


def progress_bar(progress, total: int, unit: str = "img"):
    """A tqdm bar on stderr counting ``total`` items, or None.

    ``progress``: None or False for no bar; True for a bar; a string for a bar
    with that description. No bar either when tqdm is not installed (progress
    bars are a nicety, not a requirement).
    """
    if progress is None or progress is False:
        return None
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
    except ImportError:
        return None
    desc = progress if isinstance(progress, str) else None
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def predict_proba(model, x, batch_size: int = 256, progress=None) -> np.ndarray:
    """Softmax probabilities ``(N, K)`` of ``model`` on inputs ``x`` ``(N, C, H, W)`` (host or device).

    Evaluation mode (BatchNorm running statistics, no dropout), in batches of
    ``batch_size`` so memory stays bounded; returns a NumPy array.
    ``progress``: None (default) for no progress bar, True or a description
    for a tqdm bar on stderr counting images (see :func:`progress_bar`).
    """
    _check_input(x)
    out = []
    bar = progress_bar(progress, len(x))
    for start in range(0, len(x), batch_size):
        xb = to_array_module(x[start : start + batch_size], module_of(model), dtype=model.dtype)
        out.append(to_host(softmax(model.forward_only(xb))))
        if bar is not None:
            bar.update(len(xb))
    if bar is not None:
        bar.close()
    if not out:
        return np.zeros((0, 0))
    return np.concatenate(out)


def tta_views(x, padding: int = 4, flip: bool = True) -> list:
    """The test-time-augmentation views of a batch ``(N, C, H, W)``, same shape each.

    The batch is padded by ``padding`` pixels on every side by edge
    replication (as the training augmentation pads; black borders would be an
    artificial cue), then five ``H x W`` windows are cut: the centre (which is
    the image itself) and the four corners, i.e. the image shifted by
    ``padding`` pixels along both axes. With ``flip`` the same five crops of
    the horizontally flipped image follow: the classic 10-crop evaluation, in
    which the image and its flip each appear exactly once.
    """
    _check_input(x)
    xp = get_array_module(x)
    p = int(padding)
    bases = [x, x[..., ::-1]] if flip else [x]
    views = []
    for base in bases:
        if p <= 0:
            views.append(base)
            continue
        h, w = base.shape[-2:]
        padded = xp.pad(base, ((0, 0), (0, 0), (p, p), (p, p)), mode="edge")
        # centre first, then top-left, top-right, bottom-left, bottom-right
        for dy, dx in ((p, p), (0, 0), (0, 2 * p), (2 * p, 0), (2 * p, 2 * p)):
            views.append(padded[:, :, dy : dy + h, dx : dx + w])
    return views


def predict_tta(model, x, batch_size: int = 256, padding: int = 4, flip: bool = True, progress=None) -> np.ndarray:
    """Test-time augmentation: softmax probabilities averaged over the views of :func:`tta_views`.

    For each image the probabilities of its 10 views (5 crops of the
    edge-padded image, and the same of its horizontal flip; 5 views when
    ``flip`` is False) are averaged, so the result ``(N, K)`` still sums to 1
    per row. Costs 10 forward passes per image; batches of ``batch_size``
    images are moved to the device once and all their views made there.
    ``progress``: None (default) for no progress bar, True or a description
    for a tqdm bar on stderr counting images (see :func:`progress_bar`).
    """
    _check_input(x)
    out = []
    bar = progress_bar(progress, len(x))
    for start in range(0, len(x), batch_size):
        xb = to_array_module(x[start : start + batch_size], module_of(model), dtype=model.dtype)
        views = tta_views(xb, padding, flip)
        total = None
        for v in views:
            # A crop of a padded array is a strided view: make it contiguous for the GEMMs.
            p = softmax(model.forward_only(get_array_module(v).ascontiguousarray(v)))
            total = p if total is None else total + p
        out.append(to_host(total / len(views)))
        if bar is not None:
            bar.update(len(xb))
    if bar is not None:
        bar.close()
    if not out:
        return np.zeros((0, 0))
    return np.concatenate(out)
