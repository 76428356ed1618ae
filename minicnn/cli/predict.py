"""Predict the facial expression of face images with a FER-2013 checkpoint.

    python -m minicnn predict face.jpg other.png                  # table, the shipped hw3_cnn weights
    python -m minicnn predict photos/ --json --top 3              # every image under photos/, as JSON
    python examples/fer2013/predict.py face.jpg --checkpoint runs/fer2013/best.npz --backend cupy

IMAGE arguments are image files or folders; a folder gives every image file
under it (recursively, sorted, hidden files skipped, only extensions Pillow
reads: :func:`minicnn.data.images.find_images`). Any image Pillow can read, of
any size, colour or grayscale, is turned into what the network was trained on
(:func:`minicnn.data.images.load_image`): its EXIF orientation applied,
converted to grayscale (16-bit images scaled to 0..255, not clipped), resized
to 48x48 (bilinear, as the FER-2013 loader does), then normalised with the
checkpoint's statistics. The image should be a face cropped roughly as in
FER-2013 (no face detection is done here).

A file that cannot be read (not an image, truncated) is skipped with a
message on stderr naming it, and the others are still predicted; with --json
the document lists it under "skipped" (also when nothing could be predicted:
"predictions" is then empty).

Output: a table (image, predicted class, probability of every class; with
--top K the K most probable classes instead), or JSON with --json.
Exit codes: 0 every image predicted; 1 some files skipped (each reported on
stderr) and the others predicted; 2 nothing predicted (no readable image, or
a folder without images), a named file or folder that does not exist (the
others are still predicted), or an unusable checkpoint or backend (the message
names the file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import minicnn
from .common import open_checkpoint
from minicnn.backend import BackendUnavailableError
from minicnn.classifier import ImageClassifier, pretrained_path
from minicnn.data.images import ImageError, find_images
from minicnn.data.images import load_image as _load_image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (any format Pillow reads) or folders of them")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint written by train.py (default: the shipped hw3_cnn weights, "
                        "minicnn.classifier.pretrained_path('hw3_cnn'))")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--top", type=int, default=None, metavar="K", help="show only the K most probable classes")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    if args.top is not None and args.top < 1:
        p.error(f"--top must be at least 1, got {args.top}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def load_image(path, size=(48, 48)) -> np.ndarray:
    """``uint8 (48, 48)`` grey levels of the image file ``path``: :func:`minicnn.data.images.load_image`."""
    return _load_image(path, size)


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


def open_classifier(checkpoint) -> tuple[ImageClassifier, Path]:
    """(classifier, path) of ``checkpoint`` (None: the shipped weights); CheckpointError naming it otherwise."""
    ckpt = pretrained_path("hw3_cnn") if checkpoint is None else Path(checkpoint)
    if not ckpt.is_file():
        raise minicnn.CheckpointError(f"{ckpt}: no such checkpoint file")
    model, norm, class_names, meta = open_checkpoint(ckpt)  # also checks the normaliser is usable
    return ImageClassifier(model, norm, class_names, meta), ckpt


def read_images(args_paths, size):
    """(paths read, images uint8 (N, H, W), skipped [(path, reason)], missing [(path, reason)])."""
    paths, images, skipped, missing = [], [], [], []
    for arg in args_paths:
        try:
            files = find_images([arg])
        except ImageError as exc:
            missing.append((arg, str(exc)))
            continue
        if not files:
            missing.append((arg, f"{arg}: a folder with no image files in it"))
        for f in files:
            try:
                images.append(load_image(f, size))
                paths.append(f)
            except ImageError as exc:
                skipped.append((f, str(exc)))
    return paths, images, skipped, missing


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        minicnn.set_backend(args.backend)
        minicnn.backend.use_heap_allocator()  # CPU: reuse freed activations, no fresh page faults per batch
        clf, ckpt = open_classifier(args.checkpoint)
    except (minicnn.CheckpointError, BackendUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths, images, skipped, missing = read_images(args.images, clf.image_size)
    for _, reason in missing:
        print(f"error: {reason}", file=sys.stderr)
    for _, reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    if not images:
        print("error: no image could be read" + (f" ({len(skipped)} skipped)" if skipped else ""), file=sys.stderr)
    probs = (clf.predict_proba(np.stack(images), batch_size=args.batch_size) if images
             else np.empty((0, len(clf.class_names))))
    if args.json:  # a document even when nothing was predicted: "predictions" is empty, "skipped" says why
        doc = to_json(paths, probs, clf.class_names, ckpt, args.top)
        doc["skipped"] = [{"image": str(p), "error": r} for p, r in skipped + missing]
        print(json.dumps(doc, indent=1))
    elif images:
        print(format_table(paths, probs, clf.class_names, args.top))
    if images and (skipped or missing):
        print(f"predicted {len(paths)} images; {len(skipped) + len(missing)} could not be used (see above)",
              file=sys.stderr)
    return 2 if missing or not images else 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
