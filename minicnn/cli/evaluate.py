"""Evaluate a FER-2013 checkpoint: metrics as JSON on stdout, and optionally figures.

    python examples/fer2013/evaluate.py --data data/fer2013                 # the shipped hw3_cnn weights
    python examples/fer2013/evaluate.py --checkpoint runs/fer2013/best.npz --split val --plots figures/
    python examples/fer2013/evaluate.py --tta --backend cupy                # 10-crop test-time augmentation
    python examples/fer2013/evaluate.py --tta --tta-padding 2 --split val   # try one crop shift on val
    python -m minicnn evaluate --split val --tta --choose-tta-padding 2 3 4 --checkpoint run/best.npz
                                                                            # choose it on val, record it

Everything needed comes from the checkpoint written by train.py: the network,
the normalisation statistics, the class names and the training arguments.

Splits: ``test`` is FER-2013 PublicTest; ``privatetest`` is PrivateTest
(Usage=PrivateTest rows of Kaggle's fer2013.csv, PrivateTest_* files, or a
privatetest/ or val/ folder; an error when the data holds none); ``val`` is the
validation split train.py carved out of Training (rebuilt from the
checkpoint's --classes, --undersample, --val-fraction, --seed and --limit, so
it holds the very same images, and checked against the fingerprint the
checkpoint records: other images are refused); ``train`` is the rest of
Training (limited as in training). A 6-class checkpoint is evaluated with
disgust merged into angry. Checkpoints older than data fingerprints get their
legacy split by row position rebuilt, which is right only for data in the same
row order as in training (the JSON says ``"split_verified": false``); the
shipped hw3_cnn.npz records the fingerprints of that legacy split of the
image folders it was trained on.

Test-time augmentation (--tta) averages 10 views: the image and its flip, each
also shifted by P pixels towards the four corners. P is --tta-padding when
given, else the padding recorded in the checkpoint (``meta["tta"]``, written by
--choose-tta-padding), else 4; the JSON says which (``tta_padding`` and
``tta_padding_source``). ``--split val --tta --choose-tta-padding 2 3 4``
evaluates each candidate on the validation split, keeps the most accurate (the
smallest padding among ties) and records it in the checkpoint, rewritten
atomically (weights untouched). Choosing on test or privatetest is refused:
the test sets report, they do not select.

The epochs of a checkpoint: a run started with --init-from continues the
training of another; ``epochs_total`` counts every epoch behind the weights
(all phases), ``phase_epoch`` the epochs of the last phase (the run that wrote
the file; "epoch" in its metadata), ``phases`` how many runs there were.

stdout holds only the JSON document (accuracy, per-class precision / recall /
F1, confusion matrix in counts and row-normalised, checkpoint information).
stderr gets the progress (a bar while predicting) and a per-class table
(precision, recall, F1, support, accuracy, macro average); --quiet leaves out
both. Exit codes: 0 ok, 2 unusable checkpoint, data, backend, --plots folder
or a checkpoint that cannot be rewritten (the message names the file and the
problem).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

import minicnn
from .common import (PRETRAINED, SPLIT_USAGE, full_history, load_split, open_checkpoint,
                    resolve_data_path, to_model_input, training_args)
from minicnn.backend import BackendUnavailableError
from minicnn.checkpoint import finite_json, load_npz, save_npz, write_text
from minicnn.data import DataError
from minicnn.inference import predict_proba, predict_tta
from minicnn.metrics import classification_report, log_loss

SPLITS = ("test", "privatetest", "val", "train")
SALIENCY_IMAGES = 7  # one per class
ACTIVATION_IMAGES = 400  # images searched for the top activations (a seeded random subset)
DEFAULT_TTA_PADDING = 4  # when neither --tta-padding nor the checkpoint says


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(PRETRAINED),
                   help=f"checkpoint written by train.py (default {PRETRAINED})")
    p.add_argument("--data", help="FER-2013: its folder, a zip/tar of it, or its CSV "
                                  "(default: $FER2013_DATA, ./data/fer2013, ./data/fer2013.csv)")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="test = PublicTest (default); privatetest = PrivateTest; "
                        "val / train = Training as train.py split it")
    p.add_argument("--plots", metavar="DIR", help="write figures (PNG) and metrics.json to this folder")
    p.add_argument("--tta", action="store_true", help="average the softmax over 10 crops / flips of each image")
    p.add_argument("--tta-padding", type=int, default=None, metavar="PX",
                   help="with --tta, how far (pixels) the four corner crops shift the image (default: the padding "
                        f"recorded in the checkpoint by --choose-tta-padding, else {DEFAULT_TTA_PADDING})")
    p.add_argument("--choose-tta-padding", type=int, nargs="+", default=None, metavar="PX",
                   help="with --split val --tta: evaluate each padding on the validation split and record the most "
                        "accurate in the checkpoint (rewritten atomically), so that --tta uses it by default")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-class table on stderr")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    for pad in ([args.tta_padding] if args.tta_padding is not None else []) + (args.choose_tta_padding or []):
        if not 0 <= pad < 24:
            p.error(f"--tta-padding must be between 0 and 23 pixels (images are 48x48), got {pad}")
    if args.choose_tta_padding is not None:
        if args.split != "val":
            p.error(f"--choose-tta-padding chooses on the validation split (--split val), not on {args.split}: "
                    "choosing on a test set would make its accuracy an optimistic estimate")
        if not args.tta:
            p.error("--choose-tta-padding needs --tta (it chooses the padding of test-time augmentation)")
        if args.tta_padding is not None:
            p.error("give either --tta-padding or --choose-tta-padding, not both")
        if args.plots:
            p.error("--choose-tta-padding does not draw --plots: evaluate again with the chosen padding for those")
    return args


def log(msg: str) -> None:
    """Progress messages go to stderr: stdout is reserved for the JSON document."""
    print(msg, file=sys.stderr, flush=True)


def dumps(obj) -> str:
    """Indented JSON with every list of numbers on one line (a 7x7 matrix would otherwise take 63 lines)."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s+([-0-9.eE+,\s]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def epochs_of(meta: dict) -> dict:
    """How long the weights were trained: ``epochs_total``, ``phases``, ``phase_epoch``.

    ``phase_epoch`` is the epoch of the run that wrote the checkpoint (its
    metadata's bare ``epoch``: the best epoch for best.npz); ``epochs_total``
    adds the epochs of every run it was started from with ``--init-from``
    (:func:`~minicnn.cli.common.full_history`), ``phases`` counts the runs.
    The shipped hw3_cnn.npz: 83 epochs in 4 phases, the last phase's epoch 2.
    """
    before = full_history({"init": meta.get("init")})  # the earlier phases only
    phase_epoch = meta.get("epoch")
    return {"epochs_total": len(before) + (phase_epoch or 0),
            "phases": (before[-1]["phase"] + 2) if before else 1,
            "phase_epoch": phase_epoch}


def describe_epochs(meta: dict) -> str:
    """``"83 epochs in all (4 phases; epoch 2 of the last phase)"`` or ``"epoch 3"``."""
    e = epochs_of(meta)
    if e["phases"] == 1:
        return f"epoch {e['phase_epoch']}"
    return f"{e['epochs_total']} epochs in all ({e['phases']} phases; epoch {e['phase_epoch']} of the last phase)"


def checkpoint_info(path, model, meta: dict, class_names) -> dict:
    """What the JSON says about the checkpoint: model, epochs (see :func:`epochs_of`), history, training data."""
    history = meta.get("history") or []
    val_accs = [h["val_acc"] for h in history if h.get("val_acc") is not None]
    init = meta.get("init") or {}
    return {
        "path": str(path),
        "model": model.name,
        "config": model.config,
        **epochs_of(meta),
        "init_from": init.get("checkpoint"),
        "batchnorm_recalibration": meta.get("batchnorm_recalibration"),  # precise_bn.py's record, if any
        "history_length": len(history),
        "best_val_acc": max(val_accs) if val_accs else None,
        "class_names": list(class_names),
        "trained_on": (meta.get("args") or {}).get("data"),
        "backend": meta.get("backend"),
        "tta": meta.get("tta"),  # the padding chosen on validation by --choose-tta-padding, if any
    }


def resolve_tta_padding(given, meta: dict) -> tuple[int, str]:
    """(padding, where it came from): --tta-padding, else the checkpoint's recorded choice, else 4."""
    if given is not None:
        return int(given), "--tta-padding"
    recorded = (meta.get("tta") or {}).get("padding")
    if recorded is not None:
        return int(recorded), f"checkpoint (chosen on {(meta.get('tta') or {}).get('chosen_on', 'val')})"
    return DEFAULT_TTA_PADDING, "default"


def best_padding(accuracies: dict) -> int:
    """The padding of highest validation accuracy in ``{padding: accuracy}``; the smallest among ties."""
    return max(accuracies, key=lambda q: (accuracies[q], -q))


def record_tta_choice(path, choice: dict) -> None:
    """Write ``choice`` as ``meta["tta"]`` into the checkpoint ``path``: atomically, every array unchanged."""
    arrays, meta = load_npz(path)
    meta["tta"] = choice
    save_npz(path, arrays, meta)


def format_report(report: dict, title: str = "") -> str:
    """The per-class table of a :func:`classification_report` (as sklearn prints it), for the terminal."""
    names = list(report["per_class"])
    w = max(len("macro avg"), *(len(n) for n in names))
    lines = [title] if title else []
    lines.append(f"{'':<{w}}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}")
    for n in names:
        r = report["per_class"][n]
        lines.append(f"{n:<{w}}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}  {r['support']:>7d}")
    lines.append("")
    total = report["num_examples"]
    lines.append(f"{'accuracy':<{w}}  {'':>9}  {'':>6}  {report['accuracy']:>6.4f}  {total:>7d}")
    m = report["macro_avg"]
    lines.append(f"{'macro avg':<{w}}  {m['precision']:>9.4f}  {m['recall']:>6.4f}  {m['f1']:>6.4f}  {total:>7d}")
    if "loss" in report:
        lines.append(f"{'loss':<{w}}  {'':>9}  {'':>6}  {report['loss']:>6.4f}")
    return "\n".join(lines)


def evaluate(model, norm, ds, class_names, tta=False, batch_size=256, tta_padding=4, progress=None):
    """(report, softmax probabilities (N, K)) of ``model`` on ``ds``.

    The report is :func:`minicnn.metrics.classification_report` plus ``loss``:
    the mean cross-entropy -log p(true class) (of the averaged probabilities
    with TTA), the same quantity as train.py's ``val_loss``. ``progress``: a
    progress bar description (see :func:`minicnn.inference.progress_bar`).
    """
    x = to_model_input(norm, ds.images)
    if tta:
        probs = predict_tta(model, x, batch_size, padding=tta_padding, progress=progress)
    else:
        probs = predict_proba(model, x, batch_size, progress=progress)
    report = classification_report(ds.labels, probs.argmax(axis=1), class_names)
    report = {"loss": log_loss(probs, ds.labels), **report}
    return report, probs


def make_plots(out_dir, model, norm, ds, probs, class_names, meta, seed=0):
    """Write every figure to ``out_dir``; returns ({name: path}, {name: reason it was skipped})."""
    from minicnn import visualize as viz  # noqa: PLC0415  (matplotlib only when plots are asked for)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = {}, {}
    y_pred = probs.argmax(axis=1)

    history = full_history(meta)  # every phase of training, when the run was started with --init-from
    if history:
        written["history"] = viz.plot_history(history, out_dir / "history.png")
    else:
        skipped["history"] = "the checkpoint holds no training history"

    report = classification_report(ds.labels, y_pred, class_names)
    written["confusion_matrix"] = viz.plot_confusion_matrix(report["confusion_matrix"], class_names,
                                                            out_dir / "confusion_matrix.png")
    written["misclassified"] = viz.plot_misclassified(ds.images, ds.labels, y_pred, class_names,
                                                      out_dir / "misclassified.png", per_class=3,
                                                      confidence=probs.max(axis=1))

    # Saliency of the first image of each class, for the class the model predicts.
    idx = [int(np.flatnonzero(ds.labels == c)[0]) for c in range(len(class_names)) if (ds.labels == c).any()]
    idx = idx[:SALIENCY_IMAGES]
    sal = viz.saliency_maps(model, to_model_input(norm, ds.images[idx]))
    titles = [f"true {class_names[ds.labels[i]]} / pred {class_names[y_pred[i]]} ({probs[i].max():.2f})" for i in idx]
    written["saliency"] = viz.plot_saliency(ds.images[idx], sal, out_dir / "saliency.png", titles=titles)

    if any(isinstance(layer, minicnn.Conv2D) for layer in model.layers):
        written["filters"] = viz.plot_filters(model, out_dir / "filters.png")
    else:
        skipped["filters"] = f"model {model.name!r} has no Conv2D layer"

    if viz.conv_layer_indices(model):
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.permutation(len(ds))[:ACTIVATION_IMAGES])
        act = viz.top_activations(model, to_model_input(norm, ds.images[pick]), top_k=6, keep_maps=1)
        written["activations"] = viz.plot_activations(ds.images[pick], act, out_dir / "activations.png")
    else:
        skipped["activations"] = f"model {model.name!r} has no convolutional layer"
    return {k: str(v) for k, v in written.items()}, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = Path(args.checkpoint)
    try:
        minicnn.set_backend(args.backend)
        minicnn.backend.use_heap_allocator()  # CPU: reuse freed activations, no fresh page faults per batch
        if not ckpt.is_file():
            hint = (" (the shipped weights are not there: train a model with train.py and pass --checkpoint "
                    "runs/fer2013/best.npz)") if ckpt.resolve() == PRETRAINED.resolve() else ""
            raise minicnn.CheckpointError(f"{ckpt}: no such checkpoint file{hint}")
        model, norm, class_names, meta = open_checkpoint(ckpt)
        targs = training_args(meta, class_names)
        data_path = resolve_data_path(args.data)
        log(f"loading {args.split} split of {data_path}")
        record = meta.get("data_fingerprint")
        ds = load_split(data_path, args.split, targs, class_names, fingerprint=record, checkpoint=ckpt)
        verified = bool((record or {}).get(args.split)) if args.split in ("val", "train") else None
        if verified is False:
            log(f"warning: {ckpt} records no fingerprint of its {args.split} images: rebuilt its legacy split by "
                "row position, which holds the right images only if the data is in the order it was trained on")
        padding, source = resolve_tta_padding(args.tta_padding, meta)
        log(f"evaluating {model.name} ({describe_epochs(meta)}) on {len(ds)} images"
            + (f" with test-time augmentation (padding {padding}: {source})" if args.tta and not args.choose_tta_padding
               else " with test-time augmentation" if args.tta else ""))
        choice = None
        if args.choose_tta_padding:
            tried = {}
            for pad in dict.fromkeys(args.choose_tta_padding):  # in the order given, without repeats
                rep_, probs_ = evaluate(model, norm, ds, class_names, True, args.batch_size, pad,
                                        progress=None if args.quiet else f"TTA padding {pad}")
                tried[pad] = (rep_, probs_)
                log(f"  padding {pad}: val accuracy {rep_['accuracy']:.4f}, loss {rep_['loss']:.4f}")
            padding = best_padding({q: r[0]["accuracy"] for q, r in tried.items()})
            report, probs = tried[padding]
            source = "chosen on val (--choose-tta-padding)"
            choice = {"padding": padding, "chosen_on": "val", "val_accuracy": report["accuracy"],
                      "val_images": len(ds), "val_fingerprint": ds.fingerprint(),
                      "candidates": {str(q): tried[q][0]["accuracy"] for q in tried}}
            try:
                record_tta_choice(ckpt, choice)
            except OSError as exc:
                raise minicnn.CheckpointError(f"{ckpt}: cannot record the chosen TTA padding "
                                              f"({exc.strerror or exc})") from None
            meta["tta"] = choice
            log(f"chose TTA padding {padding} (val accuracy {report['accuracy']:.4f}); recorded in {ckpt}")
        else:
            progress = None if args.quiet else ("predicting (TTA, 10 views)" if args.tta else "predicting")
            report, probs = evaluate(model, norm, ds, class_names, args.tta, args.batch_size, padding,
                                     progress=progress)
    except (minicnn.CheckpointError, DataError, BackendUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"checkpoint": checkpoint_info(ckpt, model, meta, class_names), "data": str(data_path),
              "split": args.split, "usage": SPLIT_USAGE[args.split],
              **({"split_method": targs["split_method"], "split_verified": verified} if verified is not None else {}),
              "tta": args.tta,
              **({"tta_padding": padding, "tta_padding_source": source} if args.tta else {}),
              **({"tta_choice": choice} if choice else {}), **report}
    if args.plots:
        log(f"writing figures to {args.plots}")
        try:
            result["plots"], result["plots_skipped"] = make_plots(args.plots, model, norm, ds, probs, class_names,
                                                                  meta, seed=int(targs["seed"]))
            write_text(Path(args.plots) / "metrics.json", dumps(finite_json(result)) + "\n")
        except OSError as exc:  # an unwritable folder, a full disk
            print(f"error: --plots {args.plots}: {exc.strerror or exc}"
                  + (f" ({exc.filename})" if exc.filename else ""), file=sys.stderr)
            return 2
    print(dumps(finite_json(result)), flush=True)
    if not args.quiet:
        tta = f", TTA padding {padding} ({source})" if args.tta else ""
        log(format_report(report, f"{model.name}, {describe_epochs(meta)}: {args.split} split "
                                  f"({SPLIT_USAGE[args.split]}){tta}"))
    log(f"{args.split} accuracy {report['accuracy']:.4f} on {report['num_examples']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
