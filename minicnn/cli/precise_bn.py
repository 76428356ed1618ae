"""Recalibrate a FER-2013 checkpoint's BatchNorm statistics on its clean training images ("precise BN").

    python examples/fer2013/precise_bn.py --checkpoint runs/fer2013/best.npz --out runs/fer2013/best_pbn.npz
    python examples/fer2013/evaluate.py --checkpoint runs/fer2013/best_pbn.npz       # then evaluate as usual

A network trained with augmentation and dropout keeps BatchNorm running
statistics of augmented, dropped-out activations, yet is evaluated on clean
images with dropout off; a BatchNorm that follows a Dropout (hw3_cnn's
BatchNorm1D(256) follows Dropout(0.5)) then normalises with the wrong
variance. This script passes the checkpoint's own training images (the very
split train.py trained on, rebuilt from the checkpoint's arguments),
normalised but not augmented, through the network with dropout off, and
replaces every BatchNorm's running mean and variance by their averages (see
``minicnn.recalibrate_batchnorm``). The weights do not change.

It prints JSON with the validation accuracy and loss before and after, so the
choice between the two files is made on the validation split (never on
test), and writes a new checkpoint (atomically; the source is left as it is)
that records what was done under ``batchnorm_recalibration``.
Exit codes: 0 ok, 2 unusable checkpoint (a network without BatchNorm too), data, backend or --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import minicnn
from .common import load_split, open_checkpoint, resolve_data_path, to_model_input, training_args
from minicnn.backend import BackendUnavailableError
from minicnn.checkpoint import load_npz, save_npz
from minicnn.data import DataError
from minicnn.inference import predict_proba
from minicnn.layers.normalization import batchnorm_layers
from minicnn.metrics import accuracy, log_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint written by train.py")
    p.add_argument("--out", required=True, help="where to write the recalibrated checkpoint (not the source)")
    p.add_argument("--data", help="FER-2013: its folder, a zip/tar of it, or its CSV "
                                  "(default: $FER2013_DATA, ./data/fer2013, ./data/fer2013.csv)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per batch whose statistics are averaged (default 256)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    args = p.parse_args(argv)
    if args.batch_size < 2:
        p.error(f"--batch-size must be at least 2, got {args.batch_size}")
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        p.error(f"--out must differ from --checkpoint ({args.out}): the source checkpoint is kept as it is")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def val_metrics(model, x, labels) -> dict:
    probs = predict_proba(model, x)
    return {"accuracy": accuracy(labels, probs.argmax(axis=1)), "loss": log_loss(probs, labels)}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        minicnn.set_backend(args.backend)
        minicnn.backend.use_heap_allocator()  # CPU: reuse freed activations, no fresh page faults per batch
        model, norm, class_names, meta = open_checkpoint(args.checkpoint)
        if not batchnorm_layers(model):  # said before the data is loaded and scored
            print(f"error: {args.checkpoint}: its network ({model.name}) has no BatchNorm "
                  "layer, so there are no statistics to recalibrate", file=sys.stderr)
            return 2
        arrays, _ = load_npz(args.checkpoint)  # everything the file holds, to be copied unchanged
        targs = training_args(meta, class_names)
        data_path = resolve_data_path(args.data)
        log(f"loading the train and validation splits of {data_path} as {args.checkpoint} was trained on")
        record = meta.get("data_fingerprint")
        train_ds = load_split(data_path, "train", targs, class_names, fingerprint=record, checkpoint=args.checkpoint)
        val_ds = load_split(data_path, "val", targs, class_names, fingerprint=record, checkpoint=args.checkpoint)
    except (minicnn.CheckpointError, DataError, BackendUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    x_val = to_model_input(norm, val_ds.images)
    before = val_metrics(model, x_val, val_ds.labels)
    log(f"validation accuracy before: {before['accuracy']:.4f}; recalibrating on {len(train_ds)} training images")
    start = time.perf_counter()
    info = minicnn.recalibrate_batchnorm(model, to_model_input(norm, train_ds.images),
                                         batch_size=args.batch_size, seed=int(targs["seed"]))
    seconds = time.perf_counter() - start
    after = val_metrics(model, x_val, val_ds.labels)
    log(f"validation accuracy after: {after['accuracy']:.4f} ({seconds:.1f} s)")

    record = {"source": str(args.checkpoint), "batch_size": args.batch_size, **info,
              "val_before": before, "val_after": after, "seconds": round(seconds, 1)}
    arrays.update({k: v for k, v in model.state_arrays().items() if k.startswith("buffer/")})
    try:
        out = save_npz(args.out, arrays, dict(meta, batchnorm_recalibration=record))
    except OSError as exc:  # an unwritable folder, a full disk: nothing half-written is left (save_npz is atomic)
        print(f"error: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), **record}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
