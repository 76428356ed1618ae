"""A trained network ready to use: model, input normalisation and class names, from one file.

    >>> import minicnn
    >>> clf = minicnn.pretrained("hw3_cnn")        # the shipped FER-2013 network (inside the package)
    >>> clf = minicnn.load("runs/fer2013/best.npz")  # or any checkpoint written by train.py
    >>> clf.predict(images)          # class ids (N,)
    >>> clf.predict_labels(images)   # class names, e.g. ["happy", "sad", ...]
    >>> clf.predict_proba(images)    # (N, K) probabilities, rows sum to 1
    >>> clf.predict_proba(images, tta=True)   # 10-crop test-time augmentation

``images`` are what FER-2013 holds: grey levels 0-255 (``uint8`` or float), shaped
``(N, 48, 48)``, ``(48, 48)`` or ``(N, 1, 48, 48)``; or image files (paths), of any size
and colour, which are read as the data loader reads FER-2013 (EXIF orientation, grey,
resized to 48x48: :func:`minicnn.data.images.load_image`); a folder stands for its image
files, in the order :func:`minicnn.data.images.find_images` lists them (recursively, sorted). The normalisation the network was trained with is part of the
checkpoint and applied here, so raw pixels go in and the shipped network gives its
reported accuracy; a network's raw ``model.predict`` wants inputs already normalised.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError
from .inference import predict_proba, predict_tta

__all__ = ["ImageClassifier", "load", "pretrained", "pretrained_path", "PRETRAINED_NAMES"]

#: the folder inside the package that holds the shipped weights (package data, so a wheel has them)
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
#: the shipped networks: name -> what it is
PRETRAINED_NAMES = {
    "hw3_cnn": "Machine Learning Homework 3 CNN trained on FER-2013 (7 classes); see README's results table",
    "amth667_cnn": "AMTH 667 CNN trained on FER-2013 (7 classes) with minicnn's recipe; see README's results table",
    "dlcv_cnn": "Deep Learning / Computer Vision CNN trained on FER-2013 (7 classes), int8 weights; see README's "
                "results table",
}


class ImageClassifier:
    """A network with everything needed to classify raw images: model, normaliser, class names.

    Shapes: images (N, H, W) grey levels 0-255 (or file paths)  ->  probabilities (N, K), class ids (N,)

    Parameters:
        model: a :class:`~minicnn.Sequential` taking normalised ``(N, 1, H, W)`` inputs.
        normalizer: the fitted :class:`~minicnn.data.Normalizer` of its training set.
        class_names: the names of the model's K outputs, in order.
        meta: the checkpoint's metadata (history, training arguments, ...), kept for reference.

    Every prediction runs in evaluation mode and changes nothing in the model.
    """

    def __init__(self, model, normalizer, class_names, meta=None):
        self.model, self.normalizer = model, normalizer
        self.class_names = list(class_names)
        self.meta = dict(meta or {})
        k = self._num_outputs()
        if k is not None and k != len(self.class_names):
            raise ValueError(f"ImageClassifier: the model has {k} outputs but {len(self.class_names)} class names "
                             f"were given ({self.class_names})")

    def _num_outputs(self):
        """K, from one evaluation-mode forward pass of a blank image (None without an input shape)."""
        shape = getattr(self.model, "input_shape", None)
        if not shape:
            return None
        from .backend import get_array_module  # noqa: PLC0415

        xp = get_array_module(*self.model.params.values())
        return int(self.model.forward_only(xp.zeros((1, *shape), dtype=self.model.dtype)).shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        shape = self.model.input_shape or (1, 48, 48)
        return int(shape[-2]), int(shape[-1])

    @property
    def tta_padding(self) -> int:
        """The test-time-augmentation shift recorded in the checkpoint (chosen on validation), else 4."""
        return int((self.meta.get("tta") or {}).get("padding", 4))

    def __repr__(self):
        name = getattr(self.model, "name", type(self.model).__name__)
        return f"ImageClassifier({name!r}, classes={self.class_names}, {self.normalizer!r})"

    # -- inputs ---------------------------------------------------------------------------
    def preprocess(self, images):
        """Raw images (see the module docstring) -> normalised model inputs ``float (N, 1, H, W)``."""
        if isinstance(images, (str, Path)) or (isinstance(images, (list, tuple)) and images
                                               and isinstance(images[0], (str, Path))):
            from .data.images import find_images, load_image  # noqa: PLC0415  (needs Pillow)

            paths = find_images([images] if isinstance(images, (str, Path)) else list(images))
            if not paths:
                raise ValueError(f"ImageClassifier: no image files in {images}")
            images = np.stack([load_image(p, self.image_size) for p in paths])
        x = images if hasattr(images, "ndim") else np.asarray(images)
        h, w = self.image_size
        if x.ndim == 2:
            x = x[None]
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3 or tuple(x.shape[1:]) != (h, w):
            raise ValueError(f"ImageClassifier: expected images of shape (N, {h}, {w}), ({h}, {w}) or "
                             f"(N, 1, {h}, {w}) with grey levels 0-255, or image file paths; got shape "
                             f"{tuple(x.shape)}")
        if x.dtype.kind == "f" and x.size and float(x.max()) <= 1.0 and float(x.min()) >= 0.0:
            raise ValueError("ImageClassifier: the images look scaled to [0, 1]; give grey levels 0-255 as "
                             "FER-2013 stores them (multiply by 255): the network's own normalisation is applied here")
        if x.dtype.kind not in "uif":
            raise ValueError(f"ImageClassifier: expected numeric grey levels, got dtype {x.dtype}")
        return self.normalizer.transform(x).astype(self.model.dtype, copy=False)

    # -- predictions ----------------------------------------------------------------------
    def predict_proba(self, images, tta: bool = False, batch_size: int = 256) -> np.ndarray:
        """Class probabilities ``(N, K)`` (NumPy); ``tta=True`` averages 10 crops (shift: :attr:`tta_padding`)."""
        x = self.preprocess(images)
        if tta:
            return predict_tta(self.model, x, batch_size, padding=self.tta_padding)
        return predict_proba(self.model, x, batch_size)

    def predict(self, images, tta: bool = False, batch_size: int = 256) -> np.ndarray:
        """Predicted class ids ``(N,)`` (int64)."""
        return self.predict_proba(images, tta, batch_size).argmax(axis=1).astype(np.int64)

    def predict_labels(self, images, tta: bool = False, batch_size: int = 256) -> list[str]:
        """Predicted class names, one per image."""
        return [self.class_names[i] for i in self.predict(images, tta, batch_size)]

    def predict_logits(self, images, batch_size: int = 256):
        """The network's raw scores ``(N, K)`` (before softmax), where the computation ran."""
        return self.model.predict_logits(self.preprocess(images), batch_size)

    def evaluate(self, images, labels, tta: bool = False, batch_size: int = 256) -> dict:
        """``{"accuracy": ..., "loss": ...}`` (mean negative log-likelihood) on labelled images."""
        from .metrics import _class_ids, accuracy, log_loss  # noqa: PLC0415

        # Checked before the (long) prediction: each label names one of this network's classes.
        labels = _class_ids("ImageClassifier.evaluate: labels", labels, len(self.class_names))
        probs = self.predict_proba(images, tta, batch_size)
        if len(labels) != len(probs):
            raise ValueError(f"ImageClassifier.evaluate: expected one label per image ({len(probs)}), "
                             f"got {len(labels)} labels")
        return {"accuracy": accuracy(labels, probs.argmax(axis=1)), "loss": float(log_loss(probs, labels))}


def load(path) -> ImageClassifier:
    """The :class:`ImageClassifier` of a checkpoint written by ``train.py`` / the ``minicnn train`` command.

    Parameters:
        path: the ``.npz`` checkpoint (``best.npz``, ``last.npz`` or an exported one).

    Raises :class:`~minicnn.CheckpointError` naming the file when it is not such a checkpoint
    (a model saved with ``Sequential.save`` has no normalisation statistics or class names:
    load it with ``Sequential.load`` instead).
    """
    from .data import Normalizer  # noqa: PLC0415
    from .training import load_checkpoint  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    model, arrays, meta = load_checkpoint(path)
    try:
        norm = Normalizer.from_arrays(arrays, prefix="data/norm/")
    except KeyError as exc:
        raise CheckpointError(f"{path}: has no normalisation statistics ({exc}); was it written by train.py?") from None
    class_names = meta.get("class_names")
    if not class_names:
        raise CheckpointError(f"{path}: has no class names; was it written by train.py?")
    return ImageClassifier(model, norm, class_names, meta)


def pretrained_path(name: str = "hw3_cnn") -> Path:
    """Where the shipped weights ``name`` lie inside the installed package.

    Parameters:
        name: one of :data:`PRETRAINED_NAMES`.
    """
    if name not in PRETRAINED_NAMES:
        raise ValueError(f"no pretrained network {name!r}: minicnn ships {sorted(PRETRAINED_NAMES)}")
    path = PRETRAINED_DIR / f"{name}.npz"
    if not path.is_file():
        raise CheckpointError(f"{path}: the shipped weights of {name!r} are missing from this installation "
                              "(reinstall minicnn from its checkout: pip install -e .)")
    return path


def pretrained(name: str = "hw3_cnn") -> ImageClassifier:
    """The shipped, trained network ``name`` as a ready :class:`ImageClassifier`.

    Parameters:
        name: one of :data:`PRETRAINED_NAMES` (``"hw3_cnn"``: 65.3 % on FER-2013 PublicTest, see README).
    """
    return load(pretrained_path(name))
