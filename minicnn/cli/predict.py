"""Predict the facial expression of face images with a FER-2013 checkpoint.

    python examples/fer2013/predict.py face.jpg other.png              # table, shipped hw3_cnn weights
    python examples/fer2013/predict.py face.jpg --top 3 --json --checkpoint runs/fer2013/best.npz

Any image Pillow can read, of any size, colour or grayscale, is turned into
what the network was trained on: its EXIF orientation applied, converted to
grayscale (16-bit images scaled to 0..255, not clipped), resized to 48x48
(bilinear, as the FER-2013 loader does), then
normalised with the checkpoint's statistics. The image should be a face
cropped roughly as in FER-2013 (no face detection is done here).

Output: a table (image, predicted class, probability of every class; with
--top K the K most probable classes instead), or JSON with --json.
Exit codes: 0 ok, 2 unreadable image or unusable checkpoint (the message
names the file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import minicnn
from .common import PRETRAINED, open_checkpoint, to_model_input
from minicnn.data.fer2013 import to_grey48
from minicnn.inference import predict_proba


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--checkpoint", default=str(PRETRAINED),
                   help=f"checkpoint written by train.py (default {PRETRAINED})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--top", type=int, default=None, metavar="K", help="show only the K most probable classes")
    args = p.parse_args(argv)
    if args.top is not None and args.top < 1:
        p.error(f"--top must be at least 1, got {args.top}")
    return args


def load_image(path) -> np.ndarray:
    """``uint8 (48, 48)`` grey levels of the image file ``path``; :class:`ImageError` naming it otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415

    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here
            im = ImageOps.exif_transpose(im)  # phone photos are often stored rotated
            return to_grey48(im)  # as the FER-2013 loader decodes (16-bit images scaled, not clipped)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def ranked(probs_row, class_names, top=None) -> list[tuple[str, float]]:
    """(class, probability) pairs, most probable first, ``top`` of them (all when None)."""
    order = np.argsort(-probs_row, kind="stable")[: top or len(class_names)]
    return [(class_names[i], float(probs_row[i])) for i in order]


def format_table(paths, probs, class_names, top=None) -> str:
    """A plain-text table: one row per image, predicted class, then probabilities."""
    name_w = max(len("image"), *(len(str(p)) for p in paths))
    pred_w = max(len("predicted"), *(len(c) for c in class_names))
    if top is None:
        heads = list(class_names)
        cells = [[f"{p:.3f}" for p in row] for row in probs]
    else:
        heads = [f"top {k + 1}" for k in range(min(top, len(class_names)))]
        cells = [[f"{c} {p:.3f}" for c, p in ranked(row, class_names, top)] for row in probs]
    widths = [max(len(h), *(len(r[j]) for r in cells)) for j, h in enumerate(heads)]
    def line(name, pred, values):
        return "  ".join([f"{name:<{name_w}}", f"{pred:<{pred_w}}"] + [f"{v:>{w}}" for v, w in zip(values, widths)])

    lines = [line("image", "predicted", heads)]
    for path, row, cell in zip(paths, probs, cells):
        lines.append(line(str(path), class_names[int(np.argmax(row))], cell))
    return "\n".join(lines)


def to_json(paths, probs, class_names, checkpoint, top=None) -> dict:
    """The JSON document: per image the predicted class, every class's probability and the top K."""
    preds = []
    for path, row in zip(paths, probs):
        best = int(np.argmax(row))
        preds.append({
            "image": str(path),
            "predicted": class_names[best],
            "probability": float(row[best]),
            "probabilities": {c: float(p) for c, p in zip(class_names, row)},
            "top": [{"class": c, "probability": p} for c, p in ranked(row, class_names, top)],
        })
    return {"checkpoint": str(checkpoint), "class_names": list(class_names), "predictions": preds}


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = Path(args.checkpoint)
    try:
        if not ckpt.is_file():
            hint = (" (the shipped weights are not there: train a model with train.py and pass --checkpoint "
                    "runs/fer2013/best.npz)") if ckpt.resolve() == PRETRAINED.resolve() else ""
            raise minicnn.CheckpointError(f"{ckpt}: no such checkpoint file{hint}")
        model, norm, class_names, _ = open_checkpoint(ckpt)
    except minicnn.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Read every image before predicting, and report every bad one, not just the first.
    images, errors = [], []
    for p in args.images:
        try:
            images.append(load_image(p))
        except ImageError as exc:
            errors.append(str(exc))
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    probs = predict_proba(model, to_model_input(norm, np.stack(images)))
    if args.json:
        print(json.dumps(to_json(args.images, probs, class_names, ckpt, args.top), indent=1))
    else:
        print(format_table(args.images, probs, class_names, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
