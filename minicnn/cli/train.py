"""Train a zoo network on FER-2013 with minicnn, then report its test accuracy.

    python examples/fer2013/train.py --backend cupy            # the HW3 recipe for hw3_cnn
    python examples/fer2013/train.py --backend cupy --cuda-graph   # the same, each step replayed as a CUDA graph
    python examples/fer2013/train.py --model ece662_resnet --conv-algorithm shifted   # convolutions keep less memory
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

Run folders: a new run refuses an --out folder that is not empty (it would
overwrite another run's checkpoints) unless --overwrite is given, which
removes that run's files first. --resume continues the run in --out with the
arguments it was started with, stored in its checkpoint: it needs only --out
(and --data if the data moved; --epochs to train for longer), and refuses any
other option given with a value other than the run's own.

Data: the validation split is chosen by content (a seeded hash of each image's
pixels and label), so the same images give the same split in any row or file
order; every checkpoint records a fingerprint of its training and validation
images, and --resume, --init-from and evaluate.py refuse data that differs.

Robustness: SIGTERM stops like Ctrl-C (the last finished epoch is kept);
training stops (exit 1) when the training or validation loss, a weight or a
BatchNorm statistic becomes NaN or infinite, before anything non-finite is
written, naming the last good checkpoint. Exit codes: 0 done, 1 diverged,
2 bad flag, data, checkpoint, backend or an unwritable / full disk (the
message names it), 130 interrupted.

Several processes: ``mpirun -n 2 python examples/fer2013/train.py ...`` trains
data-parallel (minicnn.distributed): --batch-size is the global batch, split
over the ranks; each rank gets an equal share of the machine's cores for BLAS;
only rank 0 prints and writes; --sync-bn computes BatchNorm statistics over
the global batch. --resume needs the same number of ranks.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path


import minicnn
from .common import (check_fingerprint, data_fingerprint, full_history, make_splits, open_checkpoint,
                    parse_undersample, resolve_data_path, select_classes, to_model_input)
from minicnn.backend import BackendUnavailableError
from minicnn.checkpoint import clean_orphaned_tmp, write_json
from minicnn.data import Augmenter, DataError, Normalizer, load_fer2013
from minicnn.distributed import DistributedTrainer, world
from minicnn.losses import MSELoss, SoftmaxCrossEntropy
from minicnn.metrics import classification_report
from minicnn.layers.conv import CONV_ALGORITHMS, set_conv_algorithm
from minicnn.layers.normalization import batchnorm_layers
from minicnn.models import MODELS, build_model
from minicnn.optim import make_optimizer, make_schedule
from minicnn.training import RUN_FILES, Trainer, TrainingDiverged


class RunError(Exception):
    """A run that cannot start as asked (the message says why and what to do); exit code 2."""


# The reports' augmentations, "crop" (ours, for dlcv_cnn) and Khaireddin & Chen's (2021) VGG recipe, which
# vgg_fer and vgg_fer_slim follow; train.py's default is HW3's.
AUGMENT_PRESETS = {
    "hw3": {"flip": True, "rotation": 30.0, "shift": 0.1, "zoom": (0.8, 1.2), "crop_padding": 0, "erase_prob": 0.0},
    "ece662": {"flip": True, "rotation": 10.0, "shift": 0.1, "zoom": (1.0, 1.0), "crop_padding": 0, "erase_prob": 0.0},
    "trd": {"flip": True, "rotation": 30.0, "shift": 0.0, "zoom": (1.0, 1.0), "crop_padding": 0, "erase_prob": 0.0},
    "crop": {"flip": True, "rotation": 10.0, "shift": 0.0, "zoom": (1.0, 1.0), "crop_padding": 4, "erase_prob": 0.0},
    "khaireddin": {"flip": True, "rotation": 10.0, "shift": 0.2, "zoom": (0.8, 1.2), "crop_padding": 0,
                   "erase_prob": 0.5},
    "none": {"flip": False, "rotation": 0.0, "shift": 0.0, "zoom": (1.0, 1.0), "crop_padding": 0, "erase_prob": 0.0},
}


def augmentation_settings(args) -> dict:
    """The preset named by --augment (or none with --no-augment), overridden by any flag given."""
    settings = dict(AUGMENT_PRESETS["none" if args.no_augment else args.augment])
    for key in settings:
        value = getattr(args, key)
        if value is not None:
            settings[key] = tuple(value) if key == "zoom" else value
    return settings


# -- flag types: argparse calls these on the text given, and reports their message with the flag's name
def _number(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: ``kind`` (int or float), finite, within the bounds (open or closed)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and (value >= hi if hi_open else value > hi)
        if low_bad or high_bad:
            left = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
            right = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
            raise argparse.ArgumentTypeError(f"must be {' and '.join(x for x in (left, right) if x)}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def _undersample(text):
    try:
        parse_undersample(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


POSITIVE_INT = _number(int, lo=1)
COUNT = _number(int, lo=0)
POSITIVE = _number(float, lo=0, lo_open=True)
NON_NEGATIVE = _number(float, lo=0)
FRACTION = _number(float, lo=0, hi=1, lo_open=True, hi_open=True)  # (0, 1)
RATE = _number(float, lo=0, hi=1, hi_open=True)  # [0, 1)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--model", choices=sorted(MODELS), default="hw3_cnn")
    p.add_argument("--data", help="FER-2013: its folder, a zip/tar of it, or its CSV "
                                  "(default: $FER2013_DATA, ./data/fer2013, ./data/fer2013.csv)")
    p.add_argument("--out", default="runs/fer2013", help="folder for checkpoints, history and metrics")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a non-empty --out, removing the previous run's checkpoints and history")
    p.add_argument("--epochs", type=POSITIVE_INT, default=60, help="epochs to train (with --resume: in all)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "rmsprop"], default="adam")
    p.add_argument("--lr", type=POSITIVE, default=1e-3)
    p.add_argument("--momentum", type=RATE, default=None, help="SGD/RMSprop momentum, in [0, 1)")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0)
    p.add_argument("--schedule", choices=["none", "step", "exponential", "cosine", "plateau"], default="plateau")
    p.add_argument("--step-size", type=POSITIVE_INT, default=20, help="step schedule: epochs between decays")
    p.add_argument("--gamma", type=_number(float, lo=0, hi=1, lo_open=True), default=0.5,
                   help="step/exponential decay factor, in (0, 1]")
    p.add_argument("--warmup-epochs", type=COUNT, default=0, help="cosine schedule warm-up")
    p.add_argument("--plateau-patience", type=COUNT, default=5, help="plateau: epochs without better val loss")
    p.add_argument("--plateau-factor", type=FRACTION, default=0.5, help="plateau: decay factor, in (0, 1)")
    p.add_argument("--min-lr", type=NON_NEGATIVE, default=1e-6)
    p.add_argument("--early-stopping", type=POSITIVE_INT, default=None, metavar="EPOCHS",
                   help="stop after this many epochs without a better validation accuracy")
    p.add_argument("--loss", choices=["ce", "mse"], default="ce")
    p.add_argument("--label-smoothing", type=RATE, default=0.0, help="in [0, 1)")
    p.add_argument("--clip-norm", type=POSITIVE, default=None, help="clip the global gradient norm (> 0)")
    p.add_argument("--augment", choices=sorted(AUGMENT_PRESETS), default="hw3",
                   help="augmentation preset (the flags below override its values): "
                        + "; ".join(f"{k}: {v}" for k, v in AUGMENT_PRESETS.items()))
    p.add_argument("--no-augment", action="store_true", help="same as --augment none")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips")
    p.add_argument("--rotation", type=_number(float, lo=0, hi=180), default=None, help="max rotation, degrees (0-180)")
    p.add_argument("--shift", type=RATE, default=None, help="max shift, fraction of the size, in [0, 1)")
    p.add_argument("--zoom", type=_number(float, lo=0, hi=10, lo_open=True), nargs=2, default=None,
                   metavar=("LO", "HI"), help="zoom range, 0 < LO <= HI")
    p.add_argument("--crop-padding", type=_number(int, lo=0, hi=23), default=None,
                   help="random crop after padding by this many pixels (0-23)")
    p.add_argument("--erase-prob", type=_number(float, lo=0, hi=1), default=None,
                   help="random erasing: probability per image of blanking one rectangle of 2-33 %% of its area "
                        "(to the mean pixel), in [0, 1]")
    p.add_argument("--classes", type=int, choices=[6, 7], default=7, help="6 merges disgust into angry")
    p.add_argument("--undersample", type=_undersample, default=None, metavar="CLASS:KEEP",
                   help="keep only KEEP images (or a fraction) of CLASS, e.g. happy:4215 cuts 3,000 of 7,215")
    p.add_argument("--val-fraction", type=FRACTION, default=0.1, help="in (0, 1)")
    p.add_argument("--normalize", choices=["per_pixel", "mean_std"], default="per_pixel")
    p.add_argument("--limit", type=POSITIVE_INT, default=None,
                   help="train on N training images, chosen by content (smoke tests)")
    p.add_argument("--seed", type=_number(int, lo=0, hi=2**32 - 1, hi_open=True), default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (from OUT/last.npz) with its own arguments")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from these weights (and their normalisation) with a fresh optimiser, schedule and "
                        "epoch count: a second, fine-tuning phase with another recipe, written to a new --out")
    p.add_argument("--log-every", type=POSITIVE_INT, default=20, help="steps between progress updates")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-test", action="store_true", help="skip the final PublicTest evaluation")
    p.add_argument("--sync-bn", action="store_true",
                   help="under mpirun: BatchNorm statistics over the global batch (default: each rank's own shard)")
    p.add_argument("--conv-algorithm", choices=list(CONV_ALGORITHMS), default="auto",
                   help="how stride-1 convolutions compute: im2col (auto: the faster on the CPU) or 'shifted' "
                        "(row shifts, for those of 8 or more input channels: about 2.4x less memory kept for "
                        "backward, slower); the same numbers either way")
    p.add_argument("--precise-bn", type=COUNT, default=0, metavar="N",
                   help="after each epoch, recalibrate BatchNorm's running statistics on N clean Training images "
                        "(no augmentation, no dropout) before validating and saving: validation and the best "
                        "epoch then see the statistics evaluation needs; training is unchanged. 0 (default): off")
    p.add_argument("--cuda-graph", action="store_true",
                   help="with --backend cupy: capture the training step as a CUDA graph and replay it for every "
                        "full batch (one launch a step; the same numbers as without)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.zoom is not None and args.zoom[0] > args.zoom[1]:
        p.error(f"argument --zoom: LO must not exceed HI, got {args.zoom[0]} {args.zoom[1]}")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.init_from and args.resume:
        p.error("--init-from starts a new run and --resume continues one: give one of them")
    if args.precise_bn == 1:
        p.error("argument --precise-bn: BatchNorm statistics need at least 2 images, got 1 (0 turns it off)")
    return args


def given_options(argv=None) -> dict:
    """The options given on the command line (not defaulted), with their parsed values."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


# Options a resumed run may change: where things are, how long it trains, where it computes (the run's own
# value when not given) and how this invocation reports (this invocation's value, given or default).
RESUME_MAY_CHANGE = {"out", "data", "resume", "overwrite", "epochs", "backend", "cuda_graph", "conv_algorithm"}
PER_INVOCATION = {"log_every", "no_progress", "no_test"}


def resumed_args(args, argv, out: Path):
    """With --resume: the interrupted run's arguments (from its last.npz), updated by those it may change.

    Returns ``(args, last.npz's meta)``; RunError names any other option given with another value.
    """
    last = out / "last.npz"
    if not last.is_file():
        raise RunError(f"--resume: {last} does not exist, so there is no run to resume in {out} "
                       "(start one without --resume)")
    _, _, _, meta = open_checkpoint(last)
    saved = meta.get("args")
    if not isinstance(saved, dict):
        raise RunError(f"--resume: {last} records no train.py arguments, so it cannot be resumed by train.py")
    given = given_options(argv)
    conflicts = []
    for key, value in given.items():
        if key in RESUME_MAY_CHANGE | PER_INVOCATION:
            continue
        old = saved.get(key, build_parser().get_default(key))
        if _canonical(old) != _canonical(value):
            conflicts.append(f"--{key.replace('_', '-')} {_show(value)} here, {_show(old)} in the run")
    if conflicts:
        raise RunError(f"--resume: {last} was started with other arguments ({'; '.join(conflicts)}); a resumed run "
                       "keeps its own (give only --out, and --data or --epochs if needed), or start a new run "
                       "(another --out, or --init-from for a new phase)")
    merged = {**vars(parse_args([])), **{k: v for k, v in saved.items() if k in vars(args)}}
    merged.update({k: v for k, v in given.items() if k in RESUME_MAY_CHANGE})
    merged.update({k: getattr(args, k) for k in PER_INVOCATION})
    merged.update(resume=True, out=args.out, overwrite=False)
    if "data" not in given:
        merged["data"] = saved.get("data") or args.data
    if "epochs" not in given:
        merged["epochs"] = saved.get("epochs", args.epochs)
    return argparse.Namespace(**merged), meta


def _canonical(value):
    return list(value) if isinstance(value, tuple) else value


def _show(value):
    if isinstance(value, bool) or value is None:
        return {True: "(given)", False: "(not given)", None: "(not given)"}[value]
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


OUT_FILES = RUN_FILES + ("test_metrics.json",)  # what a run writes in --out


def check_out(out: Path, args):
    """A new run's folder: refuse a non-empty one unless --overwrite (nothing is removed yet)."""
    clean_orphaned_tmp(out, OUT_FILES)
    if not out.exists():
        return
    if not out.is_dir():
        raise RunError(f"--out {out}: exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not args.overwrite:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise RunError(f"--out {out}: the folder is not empty ({shown}); a new run would overwrite it. "
                       "Pass --resume to continue the run there, --overwrite to replace it, or another --out")


def clear_out(out: Path):
    """--overwrite: remove the previous run's files, once everything else has been checked."""
    removed = [name for name in OUT_FILES if (out / name).exists()]
    for name in removed:
        (out / name).unlink()
    if removed:
        print(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}")


# The options that decide which images land in the validation split: a second phase must keep them, or its
# validation set would hold images the initial weights were trained on.
SPLIT_OPTIONS = ("seed", "val_fraction", "classes", "undersample", "limit")


def load_initial_weights(path, args, class_names, train_ds, val_ds, data_path):
    """Weights, normaliser and provenance of a checkpoint to start a new run from (``--init-from``)."""
    try:
        model, norm, saved_classes, meta = open_checkpoint(path)
    except (OSError, minicnn.CheckpointError) as exc:
        raise RunError(f"--init-from: {exc}") from None
    saved_model = (meta.get("model") or {}).get("name")
    if saved_model != args.model:
        raise RunError(f"--init-from {path} holds a {saved_model!r} network, this run trains {args.model!r} (--model)")
    if saved_classes != class_names:
        raise RunError(f"--init-from {path} was trained on classes {saved_classes}, this run has {class_names}")
    saved_args = meta.get("args", {})
    changed = [f"--{k.replace('_', '-')} {saved_args[k]!r} there, {getattr(args, k)!r} here"
               for k in SPLIT_OPTIONS if k in saved_args and saved_args[k] != getattr(args, k)]
    if changed:
        raise RunError(f"--init-from {path} used another train/validation split ({'; '.join(changed)}): "
                       "its weights have seen images of this run's validation set")
    for split, ds in (("train", train_ds), ("val", val_ds)):
        try:
            check_fingerprint(meta.get("data_fingerprint"), split, ds, data_path, path)
        except DataError as exc:
            raise RunError(f"--init-from: {exc}") from None
    provenance = {"checkpoint": str(path), "epoch": meta.get("epoch"), "epochs_before": full_history(meta)}
    return {"model": model, "norm": norm, "provenance": provenance}


def split_method_of(checkpoint_meta) -> str:
    """The split method of the run a checkpoint comes from ("order" before data fingerprints existed)."""
    return ((checkpoint_meta or {}).get("data_fingerprint") or {}).get("split_method", "order")


def main(argv=None):
    """Run train.py; every expected failure prints ``error: <thing>: <problem>`` and returns its exit code."""
    try:
        return run(argv)
    except (RunError, DataError, minicnn.CheckpointError, BackendUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable --out, a full disk, a file removed under us
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside training (which handles its own): nothing was written
        print("\ninterrupted before training started: nothing was written", file=sys.stderr)
        return 130


def run(argv=None):
    args = parse_args(argv)
    comm = world()  # one process, or every rank of an mpirun job
    if comm.rank:  # rank 0 speaks for the job; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
        args.no_progress = True
    out = Path(args.out)
    resumed_meta = None
    if args.resume:
        args, resumed_meta = resumed_args(args, argv, out)
    else:
        check_out(out, args)
    comm.barrier()  # every rank has looked at --out before rank 0 writes there
    if getattr(args, "cuda_graph", False) and (args.backend != "cupy" or comm.size > 1):
        raise RunError("--cuda-graph needs --backend cupy and a single process: a CUDA graph replays GPU work, "
                       "and a data-parallel step's allreduce is an MPI call from the host")
    minicnn.set_backend(args.backend)
    if comm.size > 1 and args.backend == "cupy":
        comm.use_local_gpu()  # one rank per GPU of each machine
    minicnn.backend.use_heap_allocator()  # fewer page faults per step on the CPU (see its docstring)
    minicnn.seed(args.seed)

    # A resumed --init-from run keeps its arguments (init_from among them) but starts from its own last.npz:
    # the provenance and normalisation come from there, so the initial file may be gone.
    init_from = None if args.resume else args.init_from
    init_meta = None
    if init_from:
        try:  # read first: the split method of the weights' run decides this run's split
            init_meta = open_checkpoint(init_from)[3]
        except (OSError, minicnn.CheckpointError) as exc:
            raise RunError(f"--init-from: {exc}") from None
    # New runs split by content; a run continued from older weights keeps their (legacy) split.
    method = split_method_of(resumed_meta or init_meta) if (resumed_meta or init_meta) else "content"

    data_path = resolve_data_path(args.data)
    t0 = time.perf_counter()
    full = load_fer2013(data_path, progress=not args.no_progress)
    print(f"data: {data_path} ({len(full)} images, {time.perf_counter() - t0:.1f}s)")
    ignored = {u: int((full.usage == u).sum()) for u in ("PrivateTest",) if (full.usage == u).any()}
    for usage, n in ignored.items():
        print(f"ignored: {n} {usage} images (not used for training or selection; "
              f"score them with evaluate.py --split {usage.lower()})")
    # Class selection applies everywhere; undersampling only to the training pool (never to the test set).
    targs = {"classes": args.classes, "undersample": args.undersample, "val_fraction": args.val_fraction,
             "seed": args.seed, "limit": args.limit, "split_method": method}
    train_ds, val_ds = make_splits(full, targs)
    test = select_classes(full.split("PublicTest"), args.classes, None, args.seed)
    if len(train_ds) == 0:
        raise DataError(f"{data_path}: holds no Training images to train on")
    if len(val_ds) == 0:
        raise DataError(f"{data_path}: the validation split is empty (--val-fraction {args.val_fraction} of "
                        f"{len(train_ds)} Training images); give a larger --val-fraction or more data")
    if args.limit and args.limit > len(train_ds):
        print(f"--limit {args.limit}: the training split has only {len(train_ds)} images, all used")
    fingerprint = data_fingerprint(train_ds, val_ds, method)
    if resumed_meta is not None:
        for split, ds in (("train", train_ds), ("val", val_ds)):
            try:
                check_fingerprint(resumed_meta.get("data_fingerprint"), split, ds, data_path, out / "last.npz")
            except DataError as exc:
                raise RunError(f"--resume: {exc}") from None
    class_names = list(train_ds.class_names)
    init = load_initial_weights(init_from, args, class_names, train_ds, val_ds, data_path) if init_from else None
    if init is not None:
        norm = init["norm"]  # the initial weights were learnt on inputs normalised this way
    elif resumed_meta is not None:
        norm = open_checkpoint(out / "last.npz")[1]  # as the interrupted run normalised
    else:
        norm = Normalizer(args.normalize).fit(train_ds.images)  # statistics from the training split only
    x_train, x_val = to_model_input(norm, train_ds.images), to_model_input(norm, val_ds.images)
    print(f"train {len(train_ds)}, validation {len(val_ds)}, test {len(test)}, classes {class_names}")
    if comm.size > 1:
        threads = comm.limit_blas_threads()
        print(f"data-parallel on {comm.size} MPI ranks, global batch {args.batch_size}"
              + (f", {threads} BLAS thread(s) per rank" if threads else "")
              + (", synchronised BatchNorm" if args.sync_bn else ""))

    model = build_model(args.model, num_classes=len(class_names))
    conv_algorithm = getattr(args, "conv_algorithm", "auto")
    set_conv_algorithm(model, conv_algorithm)
    has_batchnorm = bool(batchnorm_layers(model))
    if has_batchnorm and (args.batch_size == 1 or len(train_ds) % args.batch_size == 1):
        raise RunError(f"--batch-size {args.batch_size}: {len(train_ds)} training images leave a last batch of one "
                       f"image, which {args.model}'s BatchNorm cannot normalise; choose another --batch-size")
    precise_bn = args.precise_bn  # (a run resumed from before the option gets its default, 0)
    if precise_bn and not has_batchnorm:
        raise RunError(f"--precise-bn {precise_bn}: {args.model} has no BatchNorm layer, so there are no "
                       "statistics to recalibrate; leave --precise-bn out")
    if init is not None:
        model.load_state_arrays(init["model"].state_arrays(), source=init_from)
        print(f"initialised from {init_from} (epoch {init['provenance']['epoch']} of its run)")
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
    # A resumed run's optimiser and schedule get their state from last.npz in Trainer.fit, which prints it.
    state = (f"{type(optimizer).__name__} and {type(schedule).__name__}, state from last.npz" if args.resume
             else f"{optimizer!r}; {schedule!r}")
    print(f"model {args.model}: {trained:,} trainable parameters; backend {args.backend}; "
          + (f"stride-1 convolutions by {conv_algorithm}; " if conv_algorithm != "auto" else "") + state)
    print(f"augmentation: {augmenter!r}"
          + (f"; precise BN after each epoch on {min(precise_bn, len(train_ds))} clean Training images"
             if precise_bn else ""))
    provenance = init["provenance"] if init else (resumed_meta or {}).get("init")
    # A run from another run's weights draws fresh shuffles, dropout masks and augmented views: its
    # epochs take the random streams that follow the epochs those weights were trained for.
    stream_offset = len(provenance["epochs_before"]) if provenance else 0
    trainer_cls, parallel = ((DistributedTrainer, {"comm": comm, "sync_batchnorm": args.sync_bn}) if comm.size > 1
                             else (Trainer, {}))
    trainer = trainer_cls(
        model, optimizer, loss_fn, schedule, augmenter, batch_size=args.batch_size, seed=args.seed, out_dir=out,
        early_stopping=args.early_stopping, clip_norm=args.clip_norm, log_every=args.log_every,
        progress=not args.no_progress, stream_offset=stream_offset, precise_bn=precise_bn,
        **({"cuda_graph": True} if getattr(args, "cuda_graph", False) else {}),
        extra_meta={"class_names": class_names, "args": vars(args) | {"data": str(data_path)},
                    "data_fingerprint": fingerprint, "backend": args.backend,
                    **({"init": provenance} if provenance else {})},
        extra_arrays=norm.to_arrays(prefix="data/norm/"), **parallel,
    )
    if args.overwrite and comm.rank == 0:
        clear_out(out)  # only now: a run refused for its data or arguments leaves the previous one intact
    trainer.fit(x_train, train_ds.labels, x_val, val_ds.labels, epochs=args.epochs, resume=args.resume)
    if trainer.graphed_step is not None:
        g = trainer.graphed_step
        if g.capture_error is not None:
            print(f"CUDA graph: the capture failed ({g.capture_error}); the steps ran eagerly")
        else:
            print(f"CUDA graph: captured {g.captures} time(s), replayed for {g.replays} steps "
                  f"({g.eager_steps} warm-up steps and any last, smaller batch ran eagerly)")
    if trainer.interrupted:
        return 130
    if comm.rank:
        return 0  # rank 0 evaluates and writes the metrics

    if args.no_test or not (out / "best.npz").exists():
        return 0
    best_model, best_norm, class_names, meta = open_checkpoint(out / "best.npz")
    if len(test) == 0:
        print("no PublicTest images in the data: skipping the test evaluation")
        return 0
    logits = best_model.predict_logits(to_model_input(best_norm, test.images))
    report = classification_report(test.labels, minicnn.to_host(logits.argmax(axis=1)), class_names)
    total_seconds = sum(h["seconds"] for h in trainer.history)
    summary = {"model": args.model, "trainable_params": trained, "best_epoch": meta["epoch"],
               "epochs_run": trainer.epoch, "train_seconds": round(total_seconds, 1), "backend": args.backend,
               "split": "PublicTest", **report}
    write_json(out / "test_metrics.json", summary)
    print(f"PublicTest accuracy of the best epoch ({meta['epoch']}): {report['accuracy']:.4f} "
          f"({report['num_examples']} images) -> {out / 'test_metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
