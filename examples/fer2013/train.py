#!/usr/bin/env python
"""Train a zoo network on FER-2013 with minicnn, then report its test accuracy.

    python examples/fer2013/train.py --backend cupy            # the HW3 recipe for hw3_cnn
    python examples/fer2013/train.py --model ece662_resnet --optimizer sgd --lr 0.01 --schedule plateau
    python examples/fer2013/train.py --out runs/hw3 --resume   # continue an interrupted run
    python examples/fer2013/train.py --init-from runs/hw3/best.npz --lr 3e-4 --schedule cosine \
        --epochs 20 --out runs/hw3_ft                           # a second phase: fresh optimiser and schedule

Defaults reproduce the Machine Learning Homework 3 recipe: hw3_cnn, Adam 1e-3,
per-pixel mean centring, rotation +-30 deg, horizontal flips, shifts of +-10 %,
zoom 0.8-1.2 (``--augment hw3``). The report gives no batch size, epochs or
schedule: batch 128, ReduceLROnPlateau on the validation loss (factor 0.5,
patience 5) and 60 epochs are this script's choices.

Training uses FER-2013 "Training" minus a stratified validation
split (--val-fraction); the best epoch on validation is evaluated on
"PublicTest" at the end (test_metrics.json in --out).

--init-from starts a new run from a checkpoint's weights and normalisation
(fine-tuning, or a learning-rate decay phase after a constant-rate one). It
refuses a checkpoint of another network, other classes or another
train/validation split, whose weights would have seen this run's validation
images; the checkpoint's path, epoch and history are kept under "init". The
new run's epochs draw the random streams (shuffle, dropout, augmentation) that
follow the epochs its weights were trained for, so it sees new augmented views
rather than replaying old ones; --resume keeps that offset and the provenance.

Several processes: ``mpirun -n 2 python examples/fer2013/train.py ...`` trains
data-parallel (minicnn.distributed): --batch-size is the global batch, split
over the ranks; each rank gets an equal share of the machine's cores for BLAS;
only rank 0 prints and writes; --sync-bn computes BatchNorm statistics over
the global batch. --resume needs the same number of ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import minicnn  # noqa: E402
from common import full_history, open_checkpoint, resolve_data_path, select_classes, to_model_input  # noqa: E402
from minicnn.data import Augmenter, Normalizer, load_fer2013, stratified_split  # noqa: E402
from minicnn.distributed import DistributedTrainer, world  # noqa: E402
from minicnn.losses import MSELoss, SoftmaxCrossEntropy  # noqa: E402
from minicnn.metrics import classification_report  # noqa: E402
from minicnn.models import MODELS, build_model  # noqa: E402
from minicnn.optim import make_optimizer, make_schedule  # noqa: E402
from minicnn.training import Trainer, TrainingDiverged  # noqa: E402


# The reports' augmentations; train.py's default is HW3's.
AUGMENT_PRESETS = {
    "hw3": {"flip": True, "rotation": 30.0, "shift": 0.1, "zoom": (0.8, 1.2), "crop_padding": 0},
    "ece662": {"flip": True, "rotation": 10.0, "shift": 0.1, "zoom": (1.0, 1.0), "crop_padding": 0},
    "trd": {"flip": True, "rotation": 30.0, "shift": 0.0, "zoom": (1.0, 1.0), "crop_padding": 0},
    "crop": {"flip": True, "rotation": 10.0, "shift": 0.0, "zoom": (1.0, 1.0), "crop_padding": 4},
    "none": {"flip": False, "rotation": 0.0, "shift": 0.0, "zoom": (1.0, 1.0), "crop_padding": 0},
}


def augmentation_settings(args) -> dict:
    """The preset named by --augment (or none with --no-augment), overridden by any flag given."""
    settings = dict(AUGMENT_PRESETS["none" if args.no_augment else args.augment])
    for key in settings:
        value = getattr(args, key)
        if value is not None:
            settings[key] = tuple(value) if key == "zoom" else value
    return settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--model", choices=sorted(MODELS), default="hw3_cnn")
    p.add_argument("--data", help="FER-2013 folder or CSV (default: $FER2013_DATA, ./data/fer2013, ./data/fer2013.csv)")
    p.add_argument("--out", default="runs/fer2013", help="folder for checkpoints, history and metrics")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "rmsprop"], default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=None, help="SGD/RMSprop momentum")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=["none", "step", "exponential", "cosine", "plateau"], default="plateau")
    p.add_argument("--step-size", type=int, default=20, help="step schedule: epochs between decays")
    p.add_argument("--gamma", type=float, default=0.5, help="step/exponential decay factor")
    p.add_argument("--warmup-epochs", type=int, default=0, help="cosine schedule warm-up")
    p.add_argument("--plateau-patience", type=int, default=5, help="plateau: epochs without better val loss")
    p.add_argument("--plateau-factor", type=float, default=0.5)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--early-stopping", type=int, default=None, metavar="EPOCHS",
                   help="stop after this many epochs without a better validation accuracy")
    p.add_argument("--loss", choices=["ce", "mse"], default="ce")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=None)
    p.add_argument("--augment", choices=sorted(AUGMENT_PRESETS), default="hw3",
                   help="augmentation preset (the flags below override its values): "
                        + "; ".join(f"{k}: {v}" for k, v in AUGMENT_PRESETS.items()))
    p.add_argument("--no-augment", action="store_true", help="same as --augment none")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips")
    p.add_argument("--rotation", type=float, default=None, help="max rotation, degrees")
    p.add_argument("--shift", type=float, default=None, help="max shift, fraction of the size")
    p.add_argument("--zoom", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="zoom range")
    p.add_argument("--crop-padding", type=int, default=None, help="random crop after padding by this many pixels")
    p.add_argument("--classes", type=int, choices=[6, 7], default=7, help="6 merges disgust into angry")
    p.add_argument("--undersample", default=None, metavar="CLASS:KEEP",
                   help="keep only KEEP images (or a fraction) of CLASS, e.g. happy:4215 cuts 3,000 of 7,215")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--normalize", choices=["per_pixel", "mean_std"], default="per_pixel")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.npz")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from these weights (and their normalisation) with a fresh optimiser, schedule and "
                        "epoch count: a second, fine-tuning phase with another recipe, written to a new --out")
    p.add_argument("--log-every", type=int, default=20, help="steps between progress updates")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-test", action="store_true", help="skip the final PublicTest evaluation")
    p.add_argument("--sync-bn", action="store_true",
                   help="under mpirun: BatchNorm statistics over the global batch (default: each rank's own shard)")
    return p.parse_args(argv)


# The options that decide which images land in the validation split: a second phase must keep them, or its
# validation set would hold images the initial weights were trained on.
SPLIT_OPTIONS = ("seed", "val_fraction", "classes", "undersample", "limit")


def load_initial_weights(path, args, class_names):
    """Weights, normaliser and provenance of a checkpoint to start a new run from (``--init-from``)."""
    try:
        model, norm, saved_classes, meta = open_checkpoint(path)
    except (OSError, minicnn.CheckpointError) as exc:
        sys.exit(f"error: --init-from {path}: {exc}")
    saved_model = (meta.get("model") or {}).get("name")
    if saved_model != args.model:
        sys.exit(f"error: --init-from {path} holds a {saved_model!r} network, this run trains {args.model!r} (--model)")
    if saved_classes != class_names:
        sys.exit(f"error: --init-from {path} was trained on classes {saved_classes}, this run has {class_names}")
    saved_args = meta.get("args", {})
    changed = [f"--{k.replace('_', '-')} {saved_args[k]!r} there, {getattr(args, k)!r} here"
               for k in SPLIT_OPTIONS if k in saved_args and saved_args[k] != getattr(args, k)]
    if changed:
        sys.exit(f"error: --init-from {path} used another train/validation split ({'; '.join(changed)}): "
                 "its weights have seen images of this run's validation set")
    provenance = {"checkpoint": str(path), "epoch": meta.get("epoch"), "epochs_before": full_history(meta)}
    return {"model": model, "norm": norm, "provenance": provenance}


def resumed_state(out: Path, resume: bool):
    """With --resume, (normaliser, "init" record) of the run being resumed, else (None, None).

    The resumed run normalises as the interrupted one did, and a resumed --init-from run keeps its
    provenance and its random-stream offset.
    """
    last = out / "last.npz"
    if not resume or not last.is_file():
        return None, None  # Trainer.resume reports a missing last.npz
    try:
        _, norm, _, meta = open_checkpoint(last)
    except (OSError, minicnn.CheckpointError) as exc:
        sys.exit(f"error: --resume: {exc}")
    return norm, meta.get("init")


def main(argv=None):
    args = parse_args(argv)
    if args.init_from and args.resume:  # before the data is loaded
        sys.exit("error: --init-from starts a new run and --resume continues one: give one of them")
    comm = world()  # one process, or every rank of an mpirun job
    if comm.rank:  # rank 0 speaks for the job; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
        args.no_progress = True
    minicnn.set_backend(args.backend)
    if comm.size > 1 and args.backend == "cupy":
        comm.use_local_gpu()  # one rank per GPU of each machine
    minicnn.backend.use_heap_allocator()  # fewer page faults per step on the CPU (see its docstring)
    minicnn.seed(args.seed)
    out = Path(args.out)

    data_path = resolve_data_path(args.data)
    t0 = time.perf_counter()
    full = load_fer2013(data_path, progress=not args.no_progress)
    print(f"data: {data_path} ({len(full)} images, {time.perf_counter() - t0:.1f}s)")
    # Class selection applies everywhere; undersampling only to the training pool (never to the test set).
    pool = select_classes(full.split("Training"), args.classes, args.undersample, args.seed)
    test = select_classes(full.split("PublicTest"), args.classes, None, args.seed)
    train_ds, val_ds = stratified_split(pool, args.val_fraction, seed=args.seed)
    if args.limit:  # a seeded random subset: the splits are ordered by class
        rng = np.random.default_rng(args.seed)
        train_ds = train_ds.subset(rng.permutation(len(train_ds))[: args.limit])
        val_ds = val_ds.subset(rng.permutation(len(val_ds))[: max(args.limit // 4, 1)])
    init = load_initial_weights(args.init_from, args, list(pool.class_names)) if args.init_from else None
    resumed_norm, resumed_init = resumed_state(out, args.resume)
    if init is not None:
        norm = init["norm"]  # the initial weights were learnt on inputs normalised this way
    elif resumed_norm is not None:
        norm = resumed_norm  # as the interrupted run normalised (it may come from an --init-from checkpoint)
    else:
        norm = Normalizer(args.normalize).fit(train_ds.images)  # statistics from the training split only
    x_train, x_val = to_model_input(norm, train_ds.images), to_model_input(norm, val_ds.images)
    print(f"train {len(train_ds)}, validation {len(val_ds)}, test {len(test)}, classes {list(pool.class_names)}")
    if comm.size > 1:
        threads = comm.limit_blas_threads()
        print(f"data-parallel on {comm.size} MPI ranks, global batch {args.batch_size}"
              + (f", {threads} BLAS thread(s) per rank" if threads else "")
              + (", synchronised BatchNorm" if args.sync_bn else ""))

    model = build_model(args.model, num_classes=len(pool.class_names))
    if init is not None:
        model.load_state_arrays(init["model"].state_arrays(), source=args.init_from)
        print(f"initialised from {args.init_from} (epoch {init['provenance']['epoch']} of its run)")
    opt_kw = {"lr": args.lr, "weight_decay": args.weight_decay}
    if args.optimizer in ("sgd", "rmsprop"):
        opt_kw["momentum"] = args.momentum
    if args.optimizer == "sgd" and args.nesterov:
        opt_kw["nesterov"] = True
    optimizer = make_optimizer(args.optimizer, model, **opt_kw)
    sched_kw = {
        "none": {},
        "step": {"step_size": args.step_size, "gamma": args.gamma},
        "exponential": {"gamma": args.gamma},
        "cosine": {"total_epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "min_lr": args.min_lr},
        "plateau": {"mode": "min", "factor": args.plateau_factor, "patience": args.plateau_patience, "min_lr": args.min_lr},
    }[args.schedule]
    schedule = make_schedule(args.schedule, optimizer, **sched_kw)
    augmenter = Augmenter(**augmentation_settings(args), seed=args.seed)
    if not augmenter.active:
        augmenter = None
    loss_fn = SoftmaxCrossEntropy(label_smoothing=args.label_smoothing) if args.loss == "ce" else MSELoss()

    trained, total = model.count_params()
    print(f"model {args.model}: {trained:,} trainable parameters; backend {args.backend}; {optimizer!r}; {schedule!r}")
    print(f"augmentation: {augmenter!r}")
    provenance = init["provenance"] if init else resumed_init
    # A run from another run's weights draws fresh shuffles, dropout masks and augmented views: its
    # epochs take the random streams that follow the epochs those weights were trained for.
    stream_offset = len(provenance["epochs_before"]) if provenance else 0
    trainer_cls, parallel = ((DistributedTrainer, {"comm": comm, "sync_batchnorm": args.sync_bn}) if comm.size > 1
                             else (Trainer, {}))
    trainer = trainer_cls(
        model, optimizer, loss_fn, schedule, augmenter, batch_size=args.batch_size, seed=args.seed, out_dir=out,
        early_stopping=args.early_stopping, clip_norm=args.clip_norm, log_every=args.log_every,
        progress=not args.no_progress, stream_offset=stream_offset,
        extra_meta={"class_names": list(pool.class_names), "args": vars(args) | {"data": str(data_path)},
                    "backend": args.backend, **({"init": provenance} if provenance else {})},
        extra_arrays=norm.to_arrays(prefix="data/norm/"), **parallel,
    )
    try:
        trainer.fit(x_train, train_ds.labels, x_val, val_ds.labels, epochs=args.epochs, resume=args.resume)
    except TrainingDiverged as exc:
        sys.exit(f"error: {exc}")
    if trainer.interrupted:
        sys.exit(130)
    if comm.rank:
        return 0  # rank 0 evaluates and writes the metrics

    if args.no_test or not (out / "best.npz").exists():
        return 0
    best_model, best_norm, class_names, meta = open_checkpoint(out / "best.npz")
    if len(test) == 0:
        print("no PublicTest images in the data: skipping the test evaluation")
        return 0
    logits = best_model.predict(to_model_input(best_norm, test.images))
    report = classification_report(test.labels, minicnn.to_host(logits.argmax(axis=1)), class_names)
    total_seconds = sum(h["seconds"] for h in trainer.history)
    summary = {"model": args.model, "trainable_params": trained, "best_epoch": meta["epoch"],
               "epochs_run": trainer.epoch, "train_seconds": round(total_seconds, 1), "backend": args.backend,
               "split": "PublicTest", **report}
    (out / "test_metrics.json").write_text(json.dumps(summary, indent=1))
    print(f"PublicTest accuracy of the best epoch ({meta['epoch']}): {report['accuracy']:.4f} "
          f"({report['num_examples']} images) -> {out / 'test_metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
