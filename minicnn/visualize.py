"""Pictures of a trained network: training curves, confusion matrix, mistakes, saliency, filters, activations.

Two kinds of functions live here:

* computations, backend-generic and without matplotlib:
  :func:`saliency_maps`, :func:`top_activations`, :func:`conv_layer_indices`,
  :func:`default_activation_layer`;
* ``plot_*`` functions, each of which draws one figure, saves it as a PNG at
  the given path (folders are created) and returns that path.

Matplotlib is imported inside the plotting functions only, so ``import
minicnn`` (and even ``import minicnn.visualize``) never needs it. Figures are
drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``,
no ``pyplot``): nothing touches the global pyplot state or the user's
interactive backend, and no figure is left open.

Images to display may be ``uint8`` grey levels ``(N, H, W)`` / ``(N, 1, H, W)``
(shown on a fixed 0-255 scale) or float model inputs (each image stretched to
its own range). Arrays may live on the GPU: everything is copied to the host
with :func:`minicnn.to_host` before plotting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import get_array_module, module_of, to_array_module, to_host
from .layers.activations import LeakyReLU, ReLU
from .layers.base import Container
from .layers.conv import Conv2D
from .layers.dense import Flatten

__all__ = [
    "plot_history",
    "plot_confusion_matrix",
    "plot_misclassified",
    "saliency_maps",
    "plot_saliency",
    "plot_filters",
    "conv_layer_indices",
    "default_activation_layer",
    "LayerActivations",
    "top_activations",
    "plot_activations",
]


# --------------------------------------------------------------------------- helpers


def _figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas (no pyplot, so no global state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("minicnn.visualize (and --plots) needs matplotlib: pip install matplotlib, or "
                          "pip install -e '.[data]' from the minicnn checkout") from exc
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def _images_nhw(images) -> np.ndarray:
    """Host array ``(N, H, W)`` from ``(N, H, W)`` or ``(N, 1, H, W)``."""
    images = to_host(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W) or (N, 1, H, W), got {images.shape}")
    return images


def _show_gray(ax, img, title=None, fontsize=8):
    """Grey image: uint8 on the fixed 0-255 scale, floats stretched to their own range."""
    if img.dtype == np.uint8:
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(img, cmap="gray", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def _blank(ax):
    ax.axis("off")


# --------------------------------------------------------------------------- training curves


def plot_history(history, path) -> Path:
    """Training curves: loss (left) and accuracy (right) per epoch, training vs validation.

    ``history`` is the list of per-epoch dicts written by
    :class:`minicnn.training.Trainer` (keys ``epoch``, ``train_loss``,
    ``train_acc``, ``val_loss``, ``val_acc``; validation values may be None
    when a run had no validation split, and are then not drawn). The epoch of
    the best validation accuracy is marked. Rows may carry ``phase`` (runs
    chained with ``train.py --init-from``): a dotted line marks where each
    later phase begins.
    """
    history = list(history)
    if not history:
        raise ValueError("plot_history: the history is empty (no epoch was completed)")

    def column(key):
        return np.array([np.nan if h.get(key) is None else float(h[key]) for h in history])

    epochs = np.array([h.get("epoch", i + 1) for i, h in enumerate(history)])
    fig = _figure(11, 4)
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = column(f"{split}_{metric}")
            if np.isfinite(values).any():
                ax.plot(epochs, values, style, markersize=3, label="training" if split == "train" else "validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    phases = [h.get("phase", 0) for h in history]
    for i in range(1, len(history)):
        if phases[i] != phases[i - 1]:
            for ax in axes:
                ax.axvline(epochs[i] - 0.5, color="tab:green", linestyle=":", linewidth=1.2)
            axes[0].annotate(f"phase {phases[i] + 1}", (epochs[i] - 0.5, 1.0), xycoords=("data", "axes fraction"),
                             textcoords="offset points", xytext=(3, -12), fontsize=8, color="tab:green")
    val_acc = column("val_acc")
    if np.isfinite(val_acc).any():
        best = int(np.nanargmax(val_acc))
        axes[1].axvline(epochs[best], color="gray", linestyle="--", linewidth=1)
        axes[1].annotate(f"best {val_acc[best]:.3f} (epoch {epochs[best]})", (epochs[best], val_acc[best]),
                         textcoords="offset points", xytext=(5, -12), fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(matrix_counts, class_names, path, normalize=True) -> Path:
    """Confusion matrix: rows are true classes, columns predicted classes, every cell annotated.

    With ``normalize`` (the default) each row is divided by its number of
    examples, so the diagonal reads as per-class recall and the colours are
    comparable between rare (disgust) and frequent (happy) classes; cells show
    the fraction and, below it, the count. Otherwise the raw counts are shown.
    """
    counts = to_host(matrix_counts).astype(np.float64)  # a list (from JSON) or a host / device array
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"plot_confusion_matrix: matrix has shape {counts.shape}, expected ({k}, {k}) "
                         f"for {k} class names")
    support = counts.sum(axis=1, keepdims=True)
    values = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0) if normalize else counts
    fig = _figure(1.0 + 0.85 * k, 0.6 + 0.8 * k)
    ax = fig.subplots()
    vmax = 1.0 if normalize else max(values.max(), 1.0)
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for i in range(k):
        for j in range(k):
            text = f"{values[i, j]:.2f}\n({int(counts[i, j])})" if normalize else f"{int(counts[i, j])}"
            # white text on dark cells, black on light ones
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if values[i, j] > 0.6 * vmax else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(counts.sum())
    acc = np.trace(counts) / total if total else float("nan")
    ax.set_title(f"confusion matrix{' (row-normalised)' if normalize else ''}: {total} images, accuracy {acc:.3f}")
    return _save(fig, path)


# --------------------------------------------------------------------------- mistakes


def plot_misclassified(images, y_true, y_pred, class_names, path, per_class=3, confidence=None) -> Path:
    """Misclassified examples: one row per true class, each image titled with the predicted class.

    Row ``c`` shows up to ``per_class`` images of true class ``c`` that the
    model got wrong (as in the ECE 662 report's figure). Without
    ``confidence`` they are the first mistakes in data order; with
    ``confidence`` (the probability of the predicted class, shape ``(N,)``)
    they are the most confidently wrong ones, and the probability is added to
    the title. A class without mistakes gets an empty row saying so.
    """
    images = _images_nhw(images)
    y_true, y_pred = to_host(y_true).astype(np.int64), to_host(y_pred).astype(np.int64)
    if not len(images) == len(y_true) == len(y_pred):
        raise ValueError(f"plot_misclassified: {len(images)} images, {len(y_true)} labels and "
                         f"{len(y_pred)} predictions: they must match")
    conf = None if confidence is None else to_host(confidence).astype(np.float64)
    k, per_class = len(class_names), max(1, int(per_class))
    fig = _figure(1.5 * per_class + 1.0, 1.65 * k)
    axes = fig.subplots(k, per_class, squeeze=False)
    for c in range(k):
        wrong = np.flatnonzero((y_true == c) & (y_pred != c))
        if conf is not None:
            wrong = wrong[np.argsort(-conf[wrong], kind="stable")]
        wrong = wrong[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            if j < len(wrong):
                i = wrong[j]
                title = f"pred: {class_names[y_pred[i]]}" + (f" {conf[i]:.2f}" if conf is not None else "")
                _show_gray(ax, images[i], title)
            else:
                _blank(ax)
                if j == 0:
                    ax.text(0.5, 0.5, "no mistakes", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            if j == 0:
                # set_ylabel is hidden by axis("off"), so the class name is written as text
                ax.text(-0.15, 0.5, class_names[c], ha="right", va="center", rotation=90,
                        transform=ax.transAxes, fontsize=10, fontweight="bold")
    fig.suptitle("misclassified examples (row: true class, title: predicted class)", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- saliency


def saliency_maps(model, x, classes=None, batch_size: int = 64) -> np.ndarray:
    """Saliency ``|d score_c / d x|`` of every input pixel, shape ``(N, H, W)`` (NumPy).

    ``score_c`` is the logit (pre-softmax score) of class ``c``: the given
    ``classes`` (one per image) or, when None, the class the model predicts.
    It is computed with minicnn's own backward pass: ``forward(x,
    training=False)``, then ``model.backward(onehot(c))`` returns
    d score_c / d x, of which the maximum absolute value over the input
    channels is kept (Simonyan et al., 2014). Evaluation mode makes the
    score of each image depend on that image only (BatchNorm uses its running
    statistics), so a batch gives each image's own gradient.

    ``x`` are model inputs ``(N, C, H, W)`` (normalised), on host or device.
    The model's parameter gradients (``model.grads``) are overwritten.
    """
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"saliency_maps: expected model inputs (N, C, H, W), got {getattr(x, 'shape', None)}")
    n = len(x)
    if classes is not None:
        classes = to_host(classes).astype(np.int64).reshape(-1)
        if classes.shape != (n,):
            raise ValueError(f"saliency_maps: got {classes.size} classes for {n} images")
    out = []
    for start in range(0, n, batch_size):
        xb = to_array_module(x[start : start + batch_size], module_of(model), dtype=model.dtype)
        scores = model.forward(xb, training=False)
        xp = get_array_module(scores)
        if classes is None:
            cb = scores.argmax(axis=1)
        else:
            cb = classes[start : start + batch_size]
            if cb.min() < 0 or cb.max() >= scores.shape[1]:
                raise ValueError(f"saliency_maps: classes must lie in 0..{scores.shape[1] - 1}, got {cb.tolist()}")
            cb = xp.asarray(cb)
        dout = xp.zeros_like(scores)
        dout[xp.arange(scores.shape[0]), cb] = 1.0
        dx = model.backward(dout)
        out.append(to_host(xp.abs(dx).max(axis=1)))
    return np.concatenate(out) if out else np.zeros((0,) + tuple(x.shape[2:]))


def plot_saliency(images, saliency, path, titles=None, keep_fraction=0.25) -> Path:
    """One row per image: the image, its saliency heat map, and the image with low-saliency pixels removed.

    The heat map is the saliency divided by its maximum (per image, so each
    row uses the full colour scale). The third column keeps the
    ``keep_fraction`` most salient pixels and replaces the others by the
    image's mean grey level, showing which part of the face the prediction
    rests on (the HW3 saliency figure). ``titles`` (one per image, e.g.
    "true happy / pred happy") label the rows.
    """
    images = _images_nhw(images)
    saliency = to_host(saliency).astype(np.float64)
    if saliency.shape != images.shape:
        raise ValueError(f"plot_saliency: saliency {saliency.shape} does not match images {images.shape}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"plot_saliency: {len(titles)} titles for {len(images)} images")
    n = len(images)
    fig = _figure(7.5, 2.5 * max(n, 1))
    axes = fig.subplots(max(n, 1), 3, squeeze=False)
    for i in range(n):
        img, sal = images[i], saliency[i]
        heat = sal / sal.max() if sal.max() > 0 else sal
        threshold = np.quantile(heat, 1.0 - keep_fraction)
        kept = img.astype(np.float64).copy()
        kept[heat < threshold] = img.mean()
        _show_gray(axes[i, 0], img, titles[i] if titles is not None else "image", fontsize=9)
        im = axes[i, 1].imshow(heat, cmap="jet", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[i, 1].set_xticks([])
        axes[i, 1].set_yticks([])
        axes[i, 1].set_title("saliency |d score / d pixel|", fontsize=9)
        fig.colorbar(im, ax=axes[i, 1], fraction=0.046, pad=0.04)
        if img.dtype == np.uint8:
            axes[i, 2].imshow(kept, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            axes[i, 2].imshow(kept, cmap="gray", vmin=float(img.min()), vmax=float(img.max()), interpolation="nearest")
        axes[i, 2].set_xticks([])
        axes[i, 2].set_yticks([])
        axes[i, 2].set_title(f"top {keep_fraction:.0%} salient pixels", fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------- filters


def _is_conv_block(layer) -> bool:
    """A Conv2D, or a container holding one (a ResidualBlock)."""
    if isinstance(layer, Conv2D):
        return True
    if isinstance(layer, Container):
        return any(_is_conv_block(child) for _, child in layer.children())
    return False


def conv_layer_indices(model) -> list[int]:
    """Indices in ``model.layers`` of the convolutional layers and blocks (Conv2D, ResidualBlock)."""
    return [i for i, layer in enumerate(model.layers) if _is_conv_block(layer)]


def plot_filters(model, path, layer_index=None) -> Path:
    """The filters of a Conv2D layer as a grid of small grey images (default: the first Conv2D).

    Each cell is one filter's kernel ``(KH, KW)``, on its own colour scale
    (light: positive weights, dark: negative). For a layer with several input
    channels the kernel is averaged over them. First-layer filters of a
    trained face model typically look like edge and blob detectors.
    """
    if layer_index is None:
        found = [i for i, layer in enumerate(model.layers) if isinstance(layer, Conv2D)]
        if not found:
            raise ValueError(f"plot_filters: model {getattr(model, 'name', '')!r} has no Conv2D layer")
        layer_index = found[0]
    layer = model.layers[layer_index]
    if not isinstance(layer, Conv2D):
        raise ValueError(f"plot_filters: layer {layer_index} is {layer!r}, not a Conv2D")
    w = to_host(layer.params["W"]).astype(np.float64)  # (F, C, KH, KW)
    kernels = w.mean(axis=1)
    f = len(kernels)
    cols = math.ceil(math.sqrt(f))
    rows = math.ceil(f / cols)
    fig = _figure(1.0 * cols, 1.05 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for idx in range(rows * cols):
        ax = axes[idx // cols, idx % cols]
        if idx < f:
            _show_gray(ax, kernels[idx], str(idx), fontsize=7)
        else:
            _blank(ax)
    channels = "" if w.shape[1] == 1 else f", mean over {w.shape[1]} input channels"
    fig.suptitle(f"layer {layer_index}: {f} filters {w.shape[2]}x{w.shape[3]}{channels}", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- activations


def default_activation_layer(model) -> int:
    """Index of the output of the 2nd convolutional block (the HW3 "layer 2" figure).

    The Conv2D layers (and residual blocks) are found by type; the second one
    is taken (the first when there is only one). For a plain Conv2D the block
    output is its activation function (the first ReLU / LeakyReLU after it,
    past a BatchNorm), so the maps are those after the non-linearity; a
    residual block already ends with its ReLU and is taken as it is.
    """
    convs = conv_layer_indices(model)
    if not convs:
        raise ValueError(f"model {getattr(model, 'name', '')!r} has no convolutional layer to show activations of")
    i = convs[1] if len(convs) > 1 else convs[0]
    if isinstance(model.layers[i], Conv2D):
        for j in range(i + 1, len(model.layers)):
            layer = model.layers[j]
            if _is_conv_block(layer) or isinstance(layer, Flatten):
                break
            if isinstance(layer, (ReLU, LeakyReLU)):
                return j
    return i


@dataclass
class LayerActivations:
    """What :func:`top_activations` found.

    Attributes:
        layer_index: index in ``model.layers`` of the layer whose output was taken.
        layer: ``repr`` of that layer.
        scores: ``(N, F)`` mean activation of each of the F filters (channels) on each image.
        top_indices: ``(F, top_k)`` for each filter, the indices into ``x`` of the
            images with the highest score, highest first.
        maps: ``(M, F, H', W')`` the layer's outputs on the first ``M`` images of ``x``.
    """

    layer_index: int
    layer: str
    scores: np.ndarray
    top_indices: np.ndarray
    maps: np.ndarray


def top_activations(model, x, layer_index=None, top_k: int = 6, keep_maps: int = 8,
                    batch_size: int = 64) -> LayerActivations:
    """Outputs of one layer, and for each filter the images that excite it most.

    Runs ``model.layers[: layer_index + 1]`` in evaluation mode on the model
    inputs ``x`` ``(N, C, H, W)``, in batches. An image excites a filter by
    the mean of that filter's output map over the image. ``layer_index``
    defaults to :func:`default_activation_layer` (the activation of the 2nd
    conv block). Only the maps of the first ``keep_maps`` images are kept
    (all of them would be 64 x 24 x 24 floats per image for hw3_cnn).
    """
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"top_activations: expected model inputs (N, C, H, W), got {getattr(x, 'shape', None)}")
    if len(x) == 0:
        raise ValueError("top_activations: no images given")
    if layer_index is None:
        layer_index = default_activation_layer(model)
    layer_index = int(layer_index)
    if not 0 <= layer_index < len(model.layers):
        raise ValueError(f"top_activations: layer_index {layer_index} outside 0..{len(model.layers) - 1}")
    scores, maps = [], []
    kept = 0
    for start in range(0, len(x), batch_size):
        h = to_array_module(x[start : start + batch_size], module_of(model), dtype=model.dtype)
        for layer in model.layers[: layer_index + 1]:
            h = layer.forward_only(h)
        if h.ndim != 4:
            raise ValueError(f"top_activations: layer {layer_index} ({model.layers[layer_index]!r}) gives "
                             f"output of shape {tuple(h.shape)}, not feature maps (N, F, H, W)")
        scores.append(to_host(h.mean(axis=(2, 3))))
        if kept < keep_maps:
            take = min(keep_maps - kept, h.shape[0])
            maps.append(to_host(h[:take]))
            kept += take
    scores = np.concatenate(scores).astype(np.float64)
    k = min(int(top_k), len(scores))
    # stable sort on -score: ties keep data order, so the result is deterministic
    top = np.argsort(-scores, axis=0, kind="stable")[:k].T
    maps = np.concatenate(maps) if maps else np.zeros((0,) + tuple(h.shape[1:]), dtype=scores.dtype)
    return LayerActivations(layer_index, repr(model.layers[layer_index]), scores, top, maps)


def plot_activations(images, activations: LayerActivations, path, filters=None, n_filters: int = 6,
                     image_index: int = 0) -> Path:
    """Filter outputs on one image, and the images that activate those filters most.

    The first row shows input image ``image_index``. Below, one row per
    filter: on the left the filter's output map on that image ("output of
    filters in layer 2" in HW3), then the ``top_k`` images of ``images`` that
    excite the filter most, titled with their mean activation ("images that
    activate those filters most"). ``images`` are the displayable images
    matching the ``x`` given to :func:`top_activations` (same order).
    ``filters`` defaults to the ``n_filters`` filters with the highest mean
    activation over all images.
    """
    images = _images_nhw(images)
    act = activations
    if len(images) != len(act.scores):
        raise ValueError(f"plot_activations: {len(images)} images but activations of {len(act.scores)}")
    if not 0 <= image_index < len(act.maps):
        raise ValueError(f"plot_activations: image_index {image_index} outside the {len(act.maps)} kept maps")
    if filters is None:
        filters = np.argsort(-act.scores.mean(axis=0), kind="stable")[:n_filters]
    filters = [int(f) for f in filters]
    top_k = act.top_indices.shape[1]
    cols = 1 + top_k
    fig = _figure(1.45 * cols, 1.6 * (len(filters) + 1))
    axes = fig.subplots(len(filters) + 1, cols, squeeze=False)
    _show_gray(axes[0, 0], images[image_index], f"input image {image_index}")
    for j in range(1, cols):
        _blank(axes[0, j])
    axes[0, 1].text(0, 0.5, f"left: filter outputs of layer {act.layer_index} {act.layer} on this image;\n"
                    f"right: the {top_k} images exciting each filter most (mean activation)",
                    va="center", ha="left", transform=axes[0, 1].transAxes, fontsize=8)
    for r, f in enumerate(filters, start=1):
        ax = axes[r, 0]
        ax.imshow(act.maps[image_index, f], cmap="viridis", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"filter {f}", fontsize=8)
        for j, i in enumerate(act.top_indices[f], start=1):
            _show_gray(axes[r, j], images[i], f"#{i}: {act.scores[i, f]:.2f}", fontsize=7)
    return _save(fig, path)
