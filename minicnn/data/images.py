"""Any image file as the network's input: grey levels ``uint8 (H, W)``, read as the FER-2013 loader reads.

    >>> from minicnn.data.images import load_image, find_images
    >>> load_image("face.jpg")                     # uint8 (48, 48)
    >>> find_images(["photos/", "extra.png"])      # the image files of a folder (recursively), and a file

:func:`load_image` applies the file's EXIF orientation (phone photos are often
stored rotated and marked so), converts to grayscale (an alpha channel is
dropped; 16-bit images are scaled from 0..65535 to 0..255 rather than clipped,
which is what Pillow's ``convert("L")`` would do), and resizes to ``size``
with bilinear interpolation, as :func:`minicnn.data.load_fer2013` decodes its
images. No face detection is done: the image should be a face cropped roughly
as in FER-2013. Needs Pillow (``pip install -e '.[data]'``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .fer2013 import DataError

__all__ = ["ImageError", "load_image", "find_images", "image_extensions", "to_grey"]


class ImageError(DataError):
    """An input image that cannot be used; the message names the file and says why."""


def _pil():
    try:
        from PIL import Image  # noqa: PLC0415
    except ImportError:
        raise ImageError("reading image files needs Pillow: pip install -e '.[data]' from the minicnn checkout") from None
    return Image


def image_extensions() -> frozenset[str]:
    """The file name endings (lower case, with the dot) of every format this Pillow can open."""
    Image = _pil()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def to_grey(im, size=(48, 48)) -> np.ndarray:
    """A PIL image as ``uint8 (H, W)`` grey levels, ``size = (H, W)``: grayscale, resized (bilinear) if needed.

    16-bit images (PNG/TIFF, PIL modes ``I;16*`` and ``I``) are scaled from
    0..65535 to 0..255 (``round(v / 257)``); PIL's own ``convert("L")`` would
    clip them, so that any normal 16-bit photo came out all white.
    """
    Image = _pil()
    h, w = (int(s) for s in size)
    if im.mode.startswith("I;16") or im.mode == "I":
        wide = np.asarray(im).astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise ValueError(f"{im.mode} image with values {wide.min()}..{wide.max()}, outside the 16-bit range")
        im = Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L")
    elif im.mode != "L":
        im = im.convert("L")  # also drops an alpha channel
    if im.size != (w, h):  # PIL sizes are (width, height)
        im = im.resize((w, h), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def load_image(path, size=(48, 48)) -> np.ndarray:
    """``uint8 (H, W)`` grey levels of the image file ``path`` (``size = (H, W)``); :class:`ImageError` otherwise.

    The error names the file: missing, a folder, not an image Pillow can
    read, or truncated / corrupt (with Pillow's reason).
    """
    Image = _pil()
    from PIL import ImageOps, UnidentifiedImageError  # noqa: PLC0415

    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here
            im = ImageOps.exif_transpose(im)  # phone photos are often stored rotated
            return to_grey(im, size)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def _hidden(name: str) -> bool:
    return name.startswith(".")


def find_images(paths) -> list[Path]:
    """The image files named by ``paths``: files as given, folders walked recursively.

    A folder contributes its files whose extension is one Pillow reads
    (:func:`image_extensions`, any case), sorted by path, skipping hidden files
    and folders (names starting with "."); a file named explicitly is kept
    whatever its extension (reading it says whether it is an image). Order:
    the arguments' order, each folder's files sorted. A path that does not
    exist raises :class:`ImageError` naming it.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    exts = None
    found = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            exts = image_extensions() if exts is None else exts
            inside = []
            for root, dirs, files in os.walk(p):
                dirs[:] = [d for d in dirs if not _hidden(d)]
                inside += [Path(root) / f for f in files
                           if not _hidden(f) and os.path.splitext(f)[1].lower() in exts]
            found += sorted(inside)
        elif p.exists():
            found.append(p)
        else:
            raise ImageError(f"{p}: no such file or folder")
    return found
