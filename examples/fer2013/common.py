"""What the FER-2013 scripts share: finding the data, preparing it, reading checkpoints, rebuilding splits."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import minicnn
from minicnn.data import DataError, Normalizer, load_fer2013, merge_disgust_into_angry, stratified_split, undersample
from minicnn.classifier import PRETRAINED_DIR
from minicnn.training import load_checkpoint

HERE = Path(__file__).resolve().parent
PRETRAINED = PRETRAINED_DIR / "hw3_cnn.npz"  # shipped inside the package: minicnn.pretrained("hw3_cnn")
# train.py's defaults, used when a checkpoint does not record its arguments
TRAIN_DEFAULTS = {"val_fraction": 0.1, "seed": 0, "undersample": None, "limit": None}

WHERE_TO_GET_IT = """FER-2013 was not found. Get it from Kaggle, either
  - the image folders of https://www.kaggle.com/datasets/msambare/fer2013 (train/<class>/*.jpg, test/<class>/*.jpg), or
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
    sys.exit(f"error: no data at {', '.join(map(str, candidates))}\n{WHERE_TO_GET_IT}")


def select_classes(ds, classes: int, undersample_spec: str | None, seed: int):
    """7 classes, or 6 with disgust merged into angry; optional undersampling 'happy:3000' or 'happy:0.6'."""
    if classes == 6:
        ds = merge_disgust_into_angry(ds)
    elif classes != 7:
        raise SystemExit(f"error: --classes must be 7 or 6, got {classes}")
    if undersample_spec:
        name, _, amount = undersample_spec.partition(":")
        value = float(amount)
        ds = undersample(ds, name, int(value) if value >= 1 else value, seed=seed)
    return ds


def to_model_input(norm: Normalizer, images) -> np.ndarray:
    return norm.transform(images).astype(minicnn.get_default_dtype(), copy=False)


def open_checkpoint(path):
    """(model, normalizer, class_names, meta) from a checkpoint written by train.py."""
    model, arrays, meta = load_checkpoint(path)
    try:
        norm = Normalizer.from_arrays(arrays, prefix="data/norm/")
    except KeyError as exc:
        raise minicnn.CheckpointError(f"{path}: has no normalisation statistics ({exc}); was it written by train.py?") from None
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
           "load_fer2013", "stratified_split", "training_args", "load_split", "TRAIN_DEFAULTS"]


def training_args(meta: dict, class_names) -> dict:
    """train.py's arguments from the checkpoint, with train.py's defaults for what is missing."""
    args = dict(TRAIN_DEFAULTS)
    args.update(meta.get("args") or {})
    # The number of classes is a property of the network: trust the class names over the arguments.
    args["classes"] = len(class_names)
    return args


def load_split(data_path, split: str, targs: dict, class_names):
    """The FERDataset of ``split`` ("test", "val" or "train") as the checkpoint's training run saw it.

    ``test`` is PublicTest (disgust merged into angry for a 6-class run, never
    undersampled); ``val`` and ``train`` are rebuilt from ``targs`` (the run's
    --classes, --undersample, --val-fraction, --seed, --limit) by train.py's
    own steps, so they hold the very images it validated and trained on.
    """
    ds = load_fer2013(data_path)
    seed = int(targs["seed"])
    if split == "test":
        # The test set is never undersampled: only the class merge applies.
        ds = select_classes(ds.split("PublicTest"), targs["classes"], None, seed)
        if len(ds) == 0:
            raise DataError(f"{data_path}: holds no PublicTest images (test/<class>/*.jpg or Usage=PublicTest)")
    else:
        # Exactly train.py's steps, in its order, so the same random draws pick the same images.
        pool = select_classes(ds.split("Training"), targs["classes"], targs.get("undersample"), seed)
        train_ds, val_ds = stratified_split(pool, float(targs["val_fraction"]), seed=seed)
        if targs.get("limit"):
            rng = np.random.default_rng(seed)
            train_ds = train_ds.subset(rng.permutation(len(train_ds))[: targs["limit"]])
            val_ds = val_ds.subset(rng.permutation(len(val_ds))[: max(targs["limit"] // 4, 1)])
        ds = val_ds if split == "val" else train_ds
        if len(ds) == 0:
            raise DataError(f"{data_path}: the {split} split is empty "
                            "(no Training images, or a --val-fraction too small for them)")
    if list(ds.class_names) != list(class_names):
        raise DataError(f"{data_path}: classes {list(ds.class_names)} do not match "
                        f"the checkpoint's {list(class_names)}")
    return ds
