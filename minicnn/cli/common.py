"""What the FER-2013 scripts share: finding the data, preparing it, reading checkpoints, rebuilding splits.

Splits: :func:`make_splits` is the one place where train.py's training and
validation images are chosen, and evaluate.py / precise_bn.py rebuild them with
it. Runs choose by content (a seeded hash of each image's pixels and label), so
the same images give the same split in any row or file order, and every
checkpoint records a fingerprint of its training and validation images
(``data_fingerprint``) which is checked whenever a split is rebuilt from it.
Checkpoints written before fingerprints existed (the shipped hw3_cnn.npz was
trained that way) used the legacy split by row position (``split_method``
"order"), which is rebuilt for them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import minicnn
from minicnn.data import (CLASS_NAMES, DataError, Normalizer, content_sample, load_fer2013,
                          merge_disgust_into_angry, stratified_split, undersample)
from minicnn.classifier import PRETRAINED_DIR
from minicnn.training import load_checkpoint

PRETRAINED = PRETRAINED_DIR / "hw3_cnn.npz"  # shipped inside the package: minicnn.pretrained("hw3_cnn")
# train.py's defaults, used when a checkpoint does not record its arguments
TRAIN_DEFAULTS = {"val_fraction": 0.1, "seed": 0, "undersample": None, "limit": None}
#: evaluate.py's splits and the FER-2013 Usage each is drawn from
SPLIT_USAGE = {"test": "PublicTest", "privatetest": "PrivateTest", "val": "Training", "train": "Training"}

WHERE_TO_GET_IT = """FER-2013 was not found. Get it from Kaggle, either
  - the image folders of https://www.kaggle.com/datasets/msambare/fer2013 (train/<class>/*.jpg, test/<class>/*.jpg;
    its archive.zip as downloaded works too, unpacked or not), or
  - fer2013.csv from the 2013 challenge (columns emotion,pixels,Usage),
then pass --data PATH, or set FER2013_DATA=PATH, or put it at ./data/fer2013 (folders) or ./data/fer2013.csv."""


def resolve_data_path(arg: str | None) -> Path:
    """--data, else $FER2013_DATA, else ./data/fer2013 or ./data/fer2013.csv; exits with advice otherwise."""
    candidates = [arg] if arg else []
    if not arg and os.environ.get("FER2013_DATA"):
        candidates.append(os.environ["FER2013_DATA"])
    if not candidates:
        candidates += ["data/fer2013", "data/fer2013.csv"]
    for c in candidates:
        if c and Path(c).exists():
            return Path(c)
    raise DataError(f"no data at {', '.join(map(str, candidates))}\n{WHERE_TO_GET_IT}")


def parse_undersample(spec: str):
    """``"happy:4215"`` -> ("happy", 4215); ``"happy:0.6"`` -> ("happy", 0.6); ValueError saying what is wrong."""
    name, sep, amount = str(spec).partition(":")
    if not sep or not name:
        raise ValueError(f"expected CLASS:KEEP, e.g. happy:4215 or happy:0.6, got {spec!r}")
    if name not in CLASS_NAMES:
        raise ValueError(f"unknown class {name!r} in {spec!r}: expected one of {list(CLASS_NAMES)}")
    try:
        value = float(amount)
    except ValueError:
        raise ValueError(f"KEEP in {spec!r} must be a count or a fraction, got {amount!r}") from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"KEEP in {spec!r} must be a count >= 1 or a fraction in [0, 1), got {amount!r}")
    if value >= 1:
        if value != int(value):
            raise ValueError(f"KEEP in {spec!r} is a count of images and must be a whole number, got {amount!r}")
        return name, int(value)
    return name, value


def select_classes(ds, classes: int, undersample_spec: str | None, seed: int, method: str = "content"):
    """7 classes, or 6 with disgust merged into angry; optional undersampling 'happy:3000' or 'happy:0.6'."""
    if classes == 6:
        ds = merge_disgust_into_angry(ds)
    elif classes != 7:
        raise DataError(f"--classes must be 7 or 6, got {classes}")
    if undersample_spec:
        try:
            name, keep = parse_undersample(undersample_spec)
            ds = undersample(ds, name, keep, seed=seed, method=method)
        except ValueError as exc:
            raise DataError(f"--undersample {undersample_spec}: {exc}") from None
    return ds


def make_splits(full, targs: dict):
    """(train, val) FERDatasets of a run with arguments ``targs``: train.py's choice, rebuilt identically anywhere.

    ``targs``: classes, undersample, val_fraction, seed, limit and split_method
    ("content", the default: chosen by content and then sorted by content, so
    the same images give the very same arrays in any row order; or "order",
    the legacy row-position split of checkpoints without a data fingerprint).
    """
    method = targs.get("split_method") or "content"
    seed = int(targs["seed"])
    pool = select_classes(full.split("Training"), targs["classes"], targs.get("undersample"), seed, method)
    train_ds, val_ds = stratified_split(pool, float(targs["val_fraction"]), seed=seed, method=method)
    limit = targs.get("limit")
    if method == "order":
        if limit:  # the legacy seeded random subset (the splits are ordered by class)
            rng = np.random.default_rng(seed)
            train_ds = train_ds.subset(rng.permutation(len(train_ds))[:limit])
            val_ds = val_ds.subset(rng.permutation(len(val_ds))[: max(limit // 4, 1)])
        return train_ds, val_ds
    if limit:
        train_ds = content_sample(train_ds, limit, seed, "limit/train")
        val_ds = content_sample(val_ds, max(limit // 4, 1), seed, "limit/val")
    # A canonical row order: the same images train on the same batches whatever order they were read in.
    return tuple(ds.subset(np.argsort(ds.content_keys(), kind="stable")) for ds in (train_ds, val_ds))


def data_fingerprint(train_ds, val_ds, method: str) -> dict:
    """What a checkpoint records of the images it was trained and selected on."""
    return {"split_method": method,
            "train": {"images": len(train_ds), "sha256": train_ds.fingerprint()},
            "val": {"images": len(val_ds), "sha256": val_ds.fingerprint()}}


def check_fingerprint(record, split: str, ds, data_path, checkpoint) -> bool:
    """DataError unless ``ds`` holds the images ``checkpoint``'s run had as ``split``; False if it records none."""
    want = (record or {}).get(split)
    if not want:
        return False
    name = {"train": "training", "val": "validation"}[split]
    got = ds.fingerprint()
    if got != want.get("sha256"):
        raise DataError(
            f"{data_path}: its {name} split ({len(ds)} images, fingerprint {got[:12]}) is not the one {checkpoint} "
            f"was trained and selected on ({want.get('images')} images, fingerprint {str(want.get('sha256'))[:12]}): "
            "other data, or other split arguments; results on it would not mean what they say")
    return True


def to_model_input(norm: Normalizer, images) -> np.ndarray:
    return norm.transform(images).astype(minicnn.get_default_dtype(), copy=False)


def open_checkpoint(path):
    """(model, normalizer, class_names, meta) from a checkpoint written by train.py."""
    model, arrays, meta = load_checkpoint(path)
    try:
        norm = Normalizer.from_arrays(arrays, prefix="data/norm/")
    except (KeyError, ValueError) as exc:
        raise minicnn.CheckpointError(f"{path}: has no usable normalisation statistics ({exc}); "
                                      "was it written by train.py?") from None
    if not (np.isfinite(norm.mean).all() and np.isfinite(norm.scale).all() and float(norm.scale) > 0):
        raise minicnn.CheckpointError(f"{path}: its normalisation statistics (data/norm/) are not finite and positive")
    class_names = meta.get("class_names")
    if not class_names:
        raise minicnn.CheckpointError(f"{path}: has no class names; was it written by train.py?")
    return model, norm, list(class_names), meta


def full_history(meta: dict) -> list[dict]:
    """The epochs behind a checkpoint, across ``--init-from`` phases: one row per epoch, numbered on.

    A run started with ``--init-from`` keeps the history of the weights it
    started from under ``meta["init"]["epochs_before"]`` (itself already a
    full history); its own epochs follow, renumbered to continue the count,
    with their per-run number kept as ``phase_epoch``. Each row carries
    ``phase`` (0 for the first run) so plots can mark where a phase began.
    """
    before = [dict(h) for h in ((meta.get("init") or {}).get("epochs_before") or [])]
    for h in before:
        h.setdefault("phase", 0)
        h.setdefault("phase_epoch", h.get("epoch"))
    phase = before[-1]["phase"] + 1 if before else 0
    rows = []
    for i, h in enumerate(meta.get("history") or []):
        rows.append(dict(h, epoch=len(before) + i + 1, phase=phase, phase_epoch=h.get("epoch", i + 1)))
    return before + rows


__all__ = ["resolve_data_path", "full_history", "select_classes", "to_model_input", "open_checkpoint", "PRETRAINED",
           "load_fer2013", "stratified_split", "training_args", "load_split", "TRAIN_DEFAULTS", "make_splits",
           "data_fingerprint", "check_fingerprint", "parse_undersample", "SPLIT_USAGE"]


def training_args(meta: dict, class_names) -> dict:
    """train.py's arguments from the checkpoint, with train.py's defaults for what is missing.

    ``split_method`` comes from the checkpoint's data fingerprint; a checkpoint
    without one was written before content-keyed splits and used "order".
    """
    args = dict(TRAIN_DEFAULTS)
    args.update(meta.get("args") or {})
    # The number of classes is a property of the network: trust the class names over the arguments.
    args["classes"] = len(class_names)
    args["split_method"] = (meta.get("data_fingerprint") or {}).get("split_method", "order")
    return args


def load_split(data_path, split: str, targs: dict, class_names, fingerprint=None, checkpoint="the checkpoint"):
    """The FERDataset of ``split`` ("test", "privatetest", "val" or "train") as the checkpoint's run saw it.

    ``test`` is PublicTest and ``privatetest`` PrivateTest (disgust merged into
    angry for a 6-class run, never undersampled); ``val`` and ``train`` are
    rebuilt from ``targs`` by :func:`make_splits`, train.py's own steps, and
    checked against the checkpoint's ``fingerprint`` record when there is one
    (DataError if the images differ).
    """
    ds = load_fer2013(data_path)
    seed = int(targs["seed"])
    if split in ("test", "privatetest"):
        usage = SPLIT_USAGE[split]
        # The test sets are never undersampled: only the class merge applies.
        ds = select_classes(ds.split(usage), targs["classes"], None, seed)
        if len(ds) == 0:
            where = ("test/<class>/*.jpg or Usage=PublicTest" if split == "test" else
                     "Usage=PrivateTest rows of fer2013.csv, PrivateTest_* files, or a privatetest/ or val/ folder")
            raise DataError(f"{data_path}: holds no {usage} images ({where})")
    elif split in ("val", "train"):
        train_ds, val_ds = make_splits(ds, targs)
        ds = val_ds if split == "val" else train_ds
        if len(ds) == 0:
            raise DataError(f"{data_path}: the {split} split is empty "
                            "(no Training images, or a --val-fraction too small for them)")
        check_fingerprint(fingerprint, split, ds, data_path, checkpoint)
    else:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLIT_USAGE)}")
    if list(ds.class_names) != list(class_names):
        raise DataError(f"{data_path}: classes {list(ds.class_names)} do not match "
                        f"the checkpoint's {list(class_names)}")
    return ds
