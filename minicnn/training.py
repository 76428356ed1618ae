"""The training loop: minibatches, augmentation, validation, checkpoints, resume.

:class:`Trainer` runs the same code on NumPy and CuPy. The training set is
moved to the device once; per step, the only work is the network's (no host
round trip: the running loss and accuracy stay on the device and are read back
every ``log_every`` steps and at the end of each epoch).

Reproducibility and resume: at the start of epoch ``e`` every random stream
(shuffling, dropout, augmentation) is re-seeded from ``(seed, e)``. A run
resumed from the checkpoint written after epoch ``e - 1`` therefore draws
exactly the numbers the uninterrupted run would have drawn, and ends with the
same weights (same backend, same seed). A run that continues training weights
from another run (a second phase, fine-tuning) passes ``stream_offset`` = the
epochs those weights were already trained for, so that its epochs draw the
streams of epochs ``stream_offset, stream_offset + 1, ...``: new shuffles, new
dropout masks, new augmented views, instead of replaying those the weights
have already been trained on.

Checkpoints are ``.npz`` files written atomically (see :mod:`minicnn.checkpoint`):
``last.npz`` after every epoch (and before the first), ``best.npz`` whenever the
validation accuracy improves. Each holds the weights, the optimiser state, the
schedule state, the history and whatever ``extra_meta`` / ``extra_arrays`` the
caller adds (the FER-2013 example stores class names and normalisation
statistics there), so evaluation needs nothing but the file.

Precise BatchNorm (``precise_bn=N``): BatchNorm's running statistics are a
moving average of the *augmented*, dropped-out training batches, while
validation sees clean images without dropout; under heavy augmentation the two
differ enough to cost many points of validation accuracy, and so to mislead the
choice of the best epoch. With ``precise_bn`` the trainer recalibrates them
(:func:`minicnn.layers.recalibrate_batchnorm`) on N clean training images,
drawn afresh each epoch from their own seeded stream, after the epoch's last step and
before validation; validation, the schedule, ``best.npz`` and ``last.npz`` then
use the recalibrated statistics. Training itself is unchanged, draw for draw:
training-mode BatchNorm normalises with batch statistics and never reads the
running ones, and the recalibration draws nothing from the training streams, so
the weights after every epoch are those of the same run without it. The moving
averages of the next epoch start from the recalibrated statistics and forget them
at BatchNorm's momentum (0.9 a step: within a few dozen steps). The history also
keeps the validation loss and accuracy with the moving averages
(``val_loss_without_precise_bn``, ``val_acc_without_precise_bn``), the number of
images and the seconds the recalibration took.

Faults: Ctrl-C and SIGTERM stop training cleanly (``interrupted``), and the
message names the epoch ``last.npz`` really holds; temporary files a kill -9
left in ``out_dir`` are removed when ``fit`` starts; a NaN or infinite
training or validation loss, weight or BatchNorm statistic raises
:class:`TrainingDiverged` before anything is saved (no checkpoint with
non-finite arrays is ever written, nor loaded); labels are checked once (integer,
one per input, within the network's outputs) before training starts.
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import io
import math
import numbers
import signal
import threading
import time
from pathlib import Path

import numpy as np

from . import backend
from .checkpoint import (SCALE_PREFIX, CheckpointError, clean_orphaned_tmp, dequantize_int8, load_npz, quantize_int8,
                         save_npz, write_json, write_text)
from .graphs import GraphedStep
from .layers.normalization import batchnorm_layers, recalibrate_batchnorm
from .losses import SoftmaxCrossEntropy
from .optim import clip_grad_norm

__all__ = ["Trainer", "TrainingDiverged", "save_checkpoint", "load_checkpoint", "export_for_inference",
           "inference_arrays", "average_checkpoints", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "minicnn.checkpoint/1"


class TrainingDiverged(RuntimeError):
    """The loss, a weight or a running statistic became NaN or infinite; the last good checkpoint is left untouched."""


# Files the Trainer writes in out_dir (their orphaned temporary files are removed at the next fit).
RUN_FILES = ("last.npz", "best.npz", "history.json", "history.csv")


def non_finite_arrays(arrays: dict) -> list[str]:
    """Names of the floating-point arrays of ``arrays`` holding a NaN or an infinity.

    The test runs where each array lives; one small read-back per device answers for all its
    arrays (not one per array: on a GPU each read-back is a synchronisation).
    """
    by_module: dict = {}
    for name, value in arrays.items():
        if getattr(value, "dtype", np.dtype(object)).kind in "fc":
            by_module.setdefault(backend.get_array_module(value), []).append((name, value))
    bad = set()
    for xp, items in by_module.items():
        finite = backend.to_host(xp.stack([xp.isfinite(v).all() for _, v in items]))
        bad.update(name for (name, _), ok in zip(items, finite) if not ok)
    return [name for name in arrays if name in bad]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)) or type(obj).__module__.startswith("cupy"):
        value = backend.to_host(obj)
        return value.tolist() if getattr(value, "ndim", 0) else value.item()
    return obj


def save_checkpoint(path, model, optimizer=None, schedule=None, epoch=0, history=(), extra_meta=None, extra_arrays=None):
    """Write a resumable training checkpoint (atomic, no pickle).

    Refuses (:class:`CheckpointError`, nothing written) weights, buffers or
    optimiser state holding a NaN or an infinity: a checkpoint is always one
    that training can resume from and evaluation can trust.
    """
    arrays = dict(model.state_arrays())
    if optimizer is not None:
        arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    arrays.update(extra_arrays or {})
    bad = non_finite_arrays(arrays)
    if bad:
        raise CheckpointError(f"{path}: not written: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
                              "hold NaN or infinite values")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "model": {"name": model.name, "config": model.config, "input_shape": list(model.input_shape or ())},
        "epoch": int(epoch),
        "history": list(history),
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "schedule": schedule.state_dict() if schedule is not None else None,
    }
    meta.update(extra_meta or {})
    return save_npz(path, arrays, _jsonable(meta))


def load_checkpoint(path, model=None, optimizer=None, schedule=None):
    """Read a checkpoint; rebuild the zoo model when ``model`` is None.

    Returns ``(model, arrays, meta)``, where ``arrays`` are the file's arrays
    (NumPy) so that callers can pick up what they stored (e.g. ``data/...``).
    Every part is validated before anything is changed.
    """
    built = {}

    def check(meta, headers):
        # Runs on the headers alone, before any array is decompressed.
        if meta.get("format") not in (CHECKPOINT_FORMAT, "minicnn.model/1"):
            raise CheckpointError(f"{path}: not a minicnn checkpoint (format {meta.get('format')!r})")
        target = model if model is not None else _rebuild_model(path, meta)
        expected = target.state_arrays()
        problems = [f"{k!r} has shape {headers[k][1]}, expected {tuple(v.shape)}"
                    for k, v in expected.items() if k in headers and headers[k][1] != tuple(v.shape)]
        missing = sorted(set(expected) - set(headers))
        extra = sorted(k for k in headers if k.startswith(("param/", "buffer/")) and k not in expected)
        if missing:
            problems.append(f"missing arrays {missing}")
        if extra:
            problems.append(f"unexpected arrays {extra}")
        if problems:
            raise CheckpointError(f"{path} does not fit model {target.name!r}: " + "; ".join(problems))
        built["model"] = target

    arrays, meta = load_npz(path, check=check)
    arrays = dequantize_int8(arrays, source=path)  # int8 weights of ``minicnn export --dtype int8``
    model = built["model"]
    model_arrays = {k: v for k, v in arrays.items() if k.startswith(("param/", "buffer/"))}
    optim_arrays = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    bad = non_finite_arrays({k: v for k, v in arrays.items() if k.startswith(("param/", "buffer/", "optim/"))})
    if bad:  # save_checkpoint never writes these: the file was damaged or crafted
        raise CheckpointError(f"{path}: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} hold NaN or infinite "
                              "values; predictions from it would be meaningless")
    if optimizer is not None and not optim_arrays:
        raise CheckpointError(f"{path}: holds no optimiser state, so training cannot resume from it")
    backup = {k: v.copy() for k, v in model.state_arrays().items()}
    model.load_state_arrays(model_arrays, source=str(path))
    try:
        if optimizer is not None:
            optimizer.load_state_dict(optim_arrays)
        if schedule is not None and meta.get("schedule") is not None:
            schedule.load_state_dict(meta["schedule"])
    except (ValueError, KeyError, TypeError) as exc:
        model.load_state_arrays(backup)  # leave the model as it was
        raise CheckpointError(f"{path}: optimiser or schedule state does not fit: {exc}") from None
    return model, arrays, meta


def _rebuild_model(path, meta):
    """The zoo model a checkpoint's meta names, after checking its configuration is one a zoo builder accepts."""
    from .models import MODELS, build_model  # noqa: PLC0415  (models import training lazily)

    info = meta.get("model") or {"name": meta.get("name"), "config": meta.get("config", {})}
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: its model record {info!r} is not an object")
    name, config = info.get("name"), info.get("config") or {}
    if name not in MODELS:
        raise CheckpointError(f"{path}: unknown model {name!r}: the zoo has {sorted(MODELS)}")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: model configuration {config!r} is not an object")
    accepted = inspect.signature(MODELS[name]).parameters
    for key, value in config.items():
        if key not in accepted:
            raise CheckpointError(f"{path}: model {name!r} has no option {key!r} (it takes {sorted(accepted)})")
        problem = _config_value_problem(value)
        if problem:
            raise CheckpointError(f"{path}: model option {key}={value!r} {problem}")
    try:
        return build_model(name, **config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild its model {info!r}: {exc}") from None


# A bound on every size in a model configuration, so that a crafted checkpoint cannot make
# build_model allocate gigabytes before its arrays are compared with the model's.
_MAX_CONFIG_INT = 4096


def _config_value_problem(value):
    """Why ``value`` cannot be a zoo model option, or None: small positive ints, fractions, short lists of ints."""
    if isinstance(value, bool):
        return "is a boolean, expected a number"
    if isinstance(value, numbers.Integral):
        return None if 1 <= value <= _MAX_CONFIG_INT else f"is outside 1..{_MAX_CONFIG_INT}"
    if isinstance(value, float):
        return None if math.isfinite(value) and 0.0 <= value < 1.0 else "is not a fraction in [0, 1)"
    if isinstance(value, (list, tuple)):
        if not 1 <= len(value) <= 16:
            return "must list 1 to 16 sizes"
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, numbers.Integral)
               or not 1 <= v <= _MAX_CONFIG_INT]
        return f"lists {bad[0]!r}, expected integers in 1..{_MAX_CONFIG_INT}" if bad else None
    return f"has type {type(value).__name__}, expected a number or a list of integers"


def export_for_inference(src, dst, dtype=np.float32):
    """Copy checkpoint ``src`` to ``dst`` without its optimiser state (about a third of the size).

    Everything evaluation needs stays: weights, BatchNorm statistics, the model's
    name and configuration, the history and the caller's extras (class names,
    normalisation statistics). Floating-point weights and buffers are stored as
    ``dtype`` (``float16`` halves the file again; loading casts them back to the
    model's dtype, so only the rounding of the stored values differs: 11 significant
    bits, an error of at most about 2**-11 of an array's largest value). A value
    beyond ``dtype``'s range is refused, naming the array, rather than stored as an
    infinity. ``int8`` quarters the file: weight matrices and kernels are stored as
    int8 with one float32 scale per output unit (:func:`minicnn.checkpoint.quantize_int8`:
    an error of at most half a step, 1/254 of the unit's largest weight), everything
    else as float32; loading multiplies them back. The result still loads with
    :func:`load_checkpoint`, but cannot resume training.
    """
    arrays, meta = load_npz(src)
    return save_npz(dst, *inference_arrays(arrays, meta, dtype, source=src))


def inference_arrays(arrays: dict, meta: dict, dtype=np.float32, source="checkpoint") -> tuple[dict, dict]:
    """The ``(arrays, meta)`` :func:`export_for_inference` writes, from a loaded checkpoint (``source`` names it)."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f" and dtype != np.int8:
        raise ValueError(f"export_for_inference: dtype must be a floating-point type or int8, got {dtype}")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source}: not a minicnn training checkpoint (format {meta.get('format')!r})")
    arrays = dequantize_int8(arrays, source=source)  # an exported int8 file can be exported again
    kept = {}
    for key, value in arrays.items():
        if key.startswith("optim/"):
            continue
        if dtype == np.int8 and value.dtype.kind == "f" and key.startswith(("param/", "buffer/")):
            # int8 for the weight matrices and kernels (nearly all the bytes); biases, BatchNorm's
            # scales and statistics stay float32: they are small, and the statistics span wide ranges.
            if key.startswith("param/") and value.ndim >= 2:
                kept[key], kept[SCALE_PREFIX + key] = quantize_int8(value)
            else:
                kept[key] = value.astype(np.float32)
            continue
        if value.dtype.kind == "f" and key.startswith(("param/", "buffer/")):
            with np.errstate(over="ignore"):  # an overflow is reported below, naming the array
                cast = value.astype(dtype)
            if not np.isfinite(cast).all() and np.isfinite(value).all():
                raise CheckpointError(f"{source}: {key} holds values up to {float(np.abs(value).max()):.4g}, beyond "
                                      f"{dtype}'s largest {float(np.finfo(dtype).max):.4g}; export it as float32")
            value = cast
        kept[key] = value
    return kept, dict(meta, exported_from=str(source), schedule=None, optimizer=None, exported_dtype=str(dtype))


# What a checkpoint's meta says about its weights alone: an average of weights has none of it.
_WEIGHT_SPECIFIC_META = ("tta", "batchnorm_recalibration", "exported_from", "exported_dtype", "weight_average")


def average_checkpoints(paths, weights=None, check=None) -> tuple[dict, dict]:
    """The weighted average of the weights of several checkpoints of one network: ``(arrays, meta)``.

    Stochastic weight averaging (Izmailov et al., 2018) after the fact: checkpoints taken along one
    run, or at the ends of phases that each started from the previous one, lie in one basin of the
    loss, and the average of their weights often generalises better than any of them. For every
    weight and BatchNorm statistic ``w``::

        w_avg = sum_i a_i * w_i,   a_i = weights[i] / sum(weights)   (equal by default)

    computed in float64 and stored in the first checkpoint's dtype (int8 exports are dequantised
    first). The averaged BatchNorm statistics are not the statistics of the averaged network's
    activations: recalibrate them (``minicnn precise-bn``) before evaluating it.

    Refused (:class:`CheckpointError`, naming the file and what differs): fewer than two files,
    a file that is not a training checkpoint, another network or configuration, other weight names
    or shapes, other class names, other normalisation or other ``data/`` arrays, another recorded
    train/validation split (``data_fingerprint``), non-finite values, and weights that are not
    finite and positive; and whatever ``check(path, meta, first_path, first_meta)`` refuses (it is
    called for each checkpoint after the first; ``minicnn average`` checks train.py's split arguments).

    The meta is the first checkpoint's, without its optimiser and schedule (the average cannot resume
    training), without what described its weights alone (a recorded TTA shift, a BatchNorm
    recalibration, export details), and with ``weight_average``: the sources (path, epoch, weight).
    """
    paths = [str(p) for p in paths]
    if len(paths) < 2:
        raise CheckpointError(f"average_checkpoints: needs at least two checkpoints, got {len(paths)}: {paths}")
    if weights is None:
        weights = [1.0] * len(paths)
    weights = [float(w) for w in weights]
    if len(weights) != len(paths):
        raise CheckpointError(f"average_checkpoints: {len(weights)} weights for {len(paths)} checkpoints")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise CheckpointError(f"average_checkpoints: weights must be finite and positive, got {weights}")
    total = math.fsum(weights)

    first_path, acc, base_arrays, base_meta = paths[0], None, None, None
    sources = []
    for path, weight in zip(paths, weights):
        arrays, meta = load_npz(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a minicnn training checkpoint (format {meta.get('format')!r})")
        arrays = dequantize_int8(arrays, source=path)
        arrays = {k: v for k, v in arrays.items() if not k.startswith("optim/")}
        bad = non_finite_arrays({k: v for k, v in arrays.items() if k.startswith(("param/", "buffer/"))})
        if bad:
            raise CheckpointError(f"{path}: {', '.join(bad[:4])} hold NaN or infinite values")
        if base_meta is None:
            base_arrays, base_meta = arrays, meta
            acc = {k: np.zeros(v.shape, np.float64) for k, v in arrays.items()
                   if k.startswith(("param/", "buffer/")) and v.dtype.kind == "f"}
        else:
            _check_averageable(first_path, base_arrays, base_meta, path, arrays, meta)
            if check is not None:
                check(path, meta, first_path, base_meta)
        for key in acc:
            acc[key] += (weight / total) * arrays[key].astype(np.float64)
        sources.append({"path": path, "epoch": meta.get("epoch"), "weight": weight})

    averaged = dict(base_arrays)
    for key, value in acc.items():
        averaged[key] = value.astype(base_arrays[key].dtype)
    meta = {k: v for k, v in base_meta.items() if k not in _WEIGHT_SPECIFIC_META}
    meta.update(optimizer=None, schedule=None, weight_average={
        "sources": sources,
        "note": "weights and BatchNorm statistics averaged; recalibrate the statistics (minicnn precise-bn)"})
    return averaged, meta


def _check_averageable(first, first_arrays, first_meta, path, arrays, meta):
    """CheckpointError unless ``path`` holds the same network, classes, data arrays and split as ``first``."""
    def differ(what, here, there):
        raise CheckpointError(f"{path}: cannot be averaged with {first}: {what} {here!r} here, {there!r} there")

    for key in ("model", "class_names", "data_fingerprint"):
        if meta.get(key) != first_meta.get(key):
            differ({"model": "network", "class_names": "classes",
                    "data_fingerprint": "train/validation split"}[key], meta.get(key), first_meta.get(key))
    names, first_names = set(arrays), set(first_arrays)
    if names != first_names:
        differ("arrays", sorted(names - first_names), sorted(first_names - names))
    for key, value in arrays.items():
        other = first_arrays[key]
        if value.shape != other.shape:
            differ(f"{key} of shape", tuple(value.shape), tuple(other.shape))
        weight = key.startswith(("param/", "buffer/")) and other.dtype.kind == "f"
        if not weight and not np.array_equal(value, other):  # normalisation statistics and other data
            if value.size <= 4:
                differ(key, value.tolist(), other.tolist())
            raise CheckpointError(f"{path}: cannot be averaged with {first}: the values of {key} differ")


class Trainer:
    """Minibatch training with validation, checkpoints and resume.

    Parameters
    ----------
    model, optimizer: a :class:`~minicnn.models.Sequential` and an optimiser built on it.
    loss_fn: defaults to :class:`~minicnn.losses.SoftmaxCrossEntropy`.
    schedule: an epoch-wise schedule (``step(val_loss)`` is called after each epoch).
    augmenter: a callable ``(x, training) -> x`` with ``reseed(seed)`` (see ``minicnn.data.Augmenter``).
    out_dir: where ``last.npz``, ``best.npz``, ``history.csv`` and ``history.json`` go (None: nowhere).
    early_stopping: stop after this many epochs without a better validation accuracy.
    clip_norm: clip the global gradient norm to this value.
    log_every: read the running metrics back to the host every this many steps.
    stream_offset: epoch ``e`` draws the random streams of epoch ``stream_offset + e`` (see the module
        docstring); saved in the checkpoints, and a resumed run must use the same.
    cuda_graph: on CuPy, capture the training step as a CUDA graph and replay it for every full batch
        (:class:`minicnn.graphs.GraphedStep`: one launch a step instead of about 150; the same numbers as
        the eager step, the same random draws). The first two full batches of each ``fit`` run eagerly,
        as does a last, smaller batch. ``graphed_step`` holds its counters after ``fit``.
    precise_bn: after each epoch, recalibrate every BatchNorm's running statistics on this many clean
        training images (all of them if fewer) before validating and saving (see the module docstring);
        0 (the default) keeps the moving averages. Needs a network with BatchNorm, and at least 2.

    On a Linux CPU, a script that trains with it runs faster after
    :func:`minicnn.backend.use_heap_allocator` (train.py calls it): each step then reuses the memory the
    last one freed instead of faulting fresh pages in (1.2-1.3x for ``vgg_fer_slim``, README "Freed memory,
    reused"). The Trainer does not call it itself, since the setting is the whole process's.
    """

    def __init__(self, model, optimizer, loss_fn=None, schedule=None, augmenter=None, *, batch_size=128, seed=0,
                 out_dir=None, early_stopping=None, clip_norm=None, log_every=20, progress=True,
                 extra_meta=None, extra_arrays=None, stream_offset=0, cuda_graph=False, precise_bn=0):
        self.model, self.optimizer, self.schedule, self.augmenter = model, optimizer, schedule, augmenter
        self.loss_fn = loss_fn or SoftmaxCrossEntropy()
        self.batch_size, self.seed = int(batch_size), int(seed)
        if int(stream_offset) < 0:
            raise ValueError(f"Trainer: stream_offset counts epochs already trained and must be >= 0, got {stream_offset}")
        self.stream_offset = int(stream_offset)
        self.cuda_graph = bool(cuda_graph)
        if isinstance(precise_bn, bool) or not isinstance(precise_bn, numbers.Integral) or precise_bn < 0 \
                or precise_bn == 1:
            raise ValueError(f"Trainer: precise_bn is the number of training images to recalibrate BatchNorm on, "
                             f"0 (off) or at least 2, got {precise_bn!r}")
        self.precise_bn = int(precise_bn)
        if self.precise_bn and not batchnorm_layers(model):
            raise ValueError(f"Trainer: precise_bn={self.precise_bn} recalibrates BatchNorm statistics, but "
                             f"{getattr(model, 'name', None) or type(model).__name__} has no BatchNorm layer")
        self.graphed_step = None  # the GraphedStep of the last fit with cuda_graph=True
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.early_stopping, self.clip_norm = early_stopping, clip_norm
        self.log_every, self.progress = max(1, int(log_every)), progress
        self.extra_meta, self.extra_arrays = dict(extra_meta or {}), dict(extra_arrays or {})
        self.history: list[dict] = []
        self.epoch = 0  # epochs completed
        self.saved_epoch = None  # the epoch out_dir/last.npz holds (None: not written by this Trainer)
        self.best_saved_epoch = None  # the epoch out_dir/best.npz holds
        self.interrupted = False
        self.stopped_early = False

    # -- checkpoints ------------------------------------------------------------------
    def _clean_orphaned_files(self, log):
        """Remove the temporary files a killed write into ``out_dir`` left behind (see :func:`clean_orphaned_tmp`).

        Only the process that writes the run's files may do this: another one could remove a temporary
        file while the writer is filling it (:class:`~minicnn.distributed.DistributedTrainer` restricts it
        to rank 0).
        """
        if self.out_dir is None:
            return
        removed = clean_orphaned_tmp(self.out_dir, RUN_FILES)
        if removed:
            log(f"removed {len(removed)} temporary file(s) left by an interrupted write: "
                + ", ".join(p.name for p in removed))

    def _save(self, name):
        if self.out_dir is None:
            return None
        return save_checkpoint(self.out_dir / name, self.model, self.optimizer, self.schedule, self.epoch,
                               self.history, {"trainer": {"seed": self.seed, "batch_size": self.batch_size,
                                                          "stream_offset": self.stream_offset,
                                                          "precise_bn": self.precise_bn},
                                              **self.extra_meta}, self.extra_arrays)

    def _write_history(self):
        # Atomic like the checkpoints (a kill never leaves half a file); NaN is written as null / empty.
        if self.out_dir is None or not self.history:
            return
        write_json(self.out_dir / "history.json", _jsonable(self.history))
        buf = io.StringIO(newline="")
        # Every key of every row, in order of appearance (a resumed run may add one, e.g. precise BN's).
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for h in self.history for k in h)))
        writer.writeheader()
        writer.writerows([{k: (v if not (isinstance(v, float) and not math.isfinite(v)) else "") for k, v in h.items()}
                          for h in self.history])
        write_text(self.out_dir / "history.csv", buf.getvalue())

    def _check_finite(self, epoch, val_loss):
        """Raise TrainingDiverged (before anything is saved) on a non-finite validation loss, weight or statistic."""
        problems = []
        if val_loss is not None and not math.isfinite(val_loss):
            problems.append(f"the validation loss is {val_loss}")
        bad = non_finite_arrays(self.model.state_arrays())
        if bad:
            problems.append(f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} hold NaN or infinite values")
        if problems:
            raise TrainingDiverged(f"training diverged in epoch {epoch}: {'; '.join(problems)}; "
                                   f"try a lower learning rate or --clip-norm. {self.last_good()}")

    def last_good(self) -> str:
        """Which files hold the last state written (the truth, whatever happened since)."""
        if self.out_dir is None:
            return "No checkpoint was written (no out_dir)."
        if self.saved_epoch is None:
            return f"No checkpoint was written to {self.out_dir}."
        text = f"The last good checkpoint is {self.out_dir / 'last.npz'} (after epoch {self.saved_epoch})"
        if self.best_saved_epoch is not None:
            text += f"; the best is {self.out_dir / 'best.npz'} (epoch {self.best_saved_epoch})"
        return text + "."

    def resume(self, path=None):
        """Continue from ``path`` (default ``out_dir/last.npz``): weights, optimiser, schedule, history, epoch."""
        path = Path(path) if path is not None else self.out_dir / "last.npz"
        _, _, meta = load_checkpoint(path, self.model, self.optimizer, self.schedule)
        saved_seed = meta.get("trainer", {}).get("seed", self.seed)
        if saved_seed != self.seed:
            raise CheckpointError(f"{path}: was trained with seed {saved_seed}, this run has seed {self.seed}")
        saved_offset = meta.get("trainer", {}).get("stream_offset", 0)
        if saved_offset != self.stream_offset:
            raise CheckpointError(f"{path}: was trained with stream_offset {saved_offset}, "
                                  f"this run has stream_offset {self.stream_offset}")
        self.epoch = int(meta["epoch"])
        self.history = list(meta.get("history", []))
        self.saved_epoch = self.epoch
        return meta

    # -- the loop -----------------------------------------------------------------------
    def _epoch_seed(self, epoch):
        return (self.seed * 1_000_003 + self.stream_offset + epoch) % (2**32 - 1)

    def _reseed(self, epoch):
        epoch_seed = self._epoch_seed(epoch)
        backend.seed(epoch_seed)
        if self.augmenter is not None and hasattr(self.augmenter, "reseed"):
            self.augmenter.reseed(epoch_seed + 1)

    # -- what a data-parallel trainer changes (minicnn.distributed.DistributedTrainer) ---
    def _shuffle(self, xp, n, epoch):
        """The order in which epoch ``epoch`` visits the ``n`` training images."""
        return backend.random_state(xp).permutation(n)

    def _local_part(self, idx):
        """The part of a global batch (indices ``idx``) that this process trains on: all of it."""
        return idx

    def _train_step(self, xb, yb, global_batch):
        """One step on one batch, as a CUDA graph's replay where there is one for its shape (see ``cuda_graph``)."""
        if self.graphed_step is not None and len(yb) == self.batch_size:
            return self.graphed_step(xb, yb)
        return self._eager_step(xb, yb)

    def _eager_step(self, xb, yb):
        """Forward, loss, backward, clipping and update on one batch; returns (loss, logits) on the device."""
        logits = self.model.forward(xb, training=True)
        loss = self.loss_fn.forward(logits, yb)
        self.model.backward(self.loss_fn.backward())
        if self.clip_norm:
            clip_grad_norm(self.model.grads, self.clip_norm)
        self.optimizer.step()
        return loss, logits

    def _sum_across_processes(self, *values):
        """Totals of per-process counters over all processes: here, the values themselves."""
        return values

    def _recalibrate_batchnorm(self, x, epoch):
        """Precise BN after epoch ``epoch``: running statistics from ``precise_bn`` clean images of ``x``.

        The images are drawn without replacement by a generator of their own, seeded from the epoch's seed
        (never the training streams, whose draws stay those of a run without precise BN), and cut into
        batches of ``batch_size``, the size whose statistics the network trained with. Every process of a
        data-parallel run draws the same images and computes the same statistics. Returns the seconds taken.
        """
        start = time.perf_counter()
        n = len(x)
        k = min(self.precise_bn, n)
        chosen = np.sort(np.random.default_rng(self._epoch_seed(epoch) + 2).choice(n, size=k, replace=False))
        images = x[backend.get_array_module(x).asarray(chosen)]
        recalibrate_batchnorm(self.model, images, batch_size=min(self.batch_size, k), seed=self._epoch_seed(epoch))
        return time.perf_counter() - start

    def evaluate(self, x, y, batch_size=256):
        """(mean loss, accuracy) in evaluation mode; x, y on host or device."""
        xp = backend.module_of(self.model)  # the model's device, whatever the active backend
        total_loss, correct, n = xp.zeros((), dtype=np.float64), xp.zeros((), dtype=np.int64), len(y)
        for start in range(0, n, batch_size):
            xb = backend.to_array_module(x[start : start + batch_size], xp, dtype=self.model.dtype)
            yb = backend.to_array_module(y[start : start + batch_size], xp)
            logits = self.model.forward_only(xb)  # no backward follows: no layer keeps its cache
            total_loss += self.loss_fn.forward(logits, yb) * len(yb)
            correct += (logits.argmax(axis=1) == yb).sum()
        return float(total_loss) / max(n, 1), float(correct) / max(n, 1)

    def _epoch(self, x, y, epoch, epochs):
        xp = backend.module_of(self.model)
        n = len(y)
        order = self._shuffle(xp, n, epoch)
        steps = math.ceil(n / self.batch_size)
        loss_sum, correct = xp.zeros((), dtype=np.float64), xp.zeros((), dtype=np.int64)
        bar = None
        if self.progress:
            try:
                from tqdm.auto import tqdm  # noqa: PLC0415

                bar = tqdm(total=n, desc=f"epoch {epoch + 1}/{epochs}", unit="img", leave=True, dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                bar = None
        start_time, seen = time.perf_counter(), 0
        for step in range(steps):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            global_batch = len(idx)
            idx = self._local_part(idx)
            xb, yb = x[idx], y[idx]
            if self.augmenter is not None:
                xb = self.augmenter(xb, training=True)
            loss, logits = self._train_step(xb, yb, global_batch)
            loss_sum += loss * len(idx)
            correct += (logits.argmax(axis=1) == yb).sum()
            seen += len(idx)
            if (step + 1) % self.log_every == 0 or step + 1 == steps:
                # the only host sync of the loop (with several processes, one small allreduce too)
                loss_seen, correct_seen, seen_all = self._sum_across_processes(loss_sum, correct, seen)
                running = float(loss_seen) / seen_all
                if not math.isfinite(running):
                    raise TrainingDiverged(
                        f"the training loss became {running} in epoch {epoch + 1}, step {step + 1}; "
                        f"try a lower learning rate or --clip-norm. {self.last_good()}"
                    )
                if bar is not None:
                    bar.update(seen_all - bar.n)
                    bar.set_postfix(loss=f"{running:.4f}", acc=f"{float(correct_seen) / seen_all:.4f}",
                                    img_s=f"{seen_all / (time.perf_counter() - start_time):.0f}")
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start_time
        return float(loss_seen) / n, float(correct_seen) / n, elapsed

    def fit(self, x_train, y_train, x_val=None, y_val=None, epochs=10, resume=False, log=print):
        """Train until ``epochs`` epochs are completed (counting those of a resumed run).

        Returns the history: one dict per epoch with train/val loss and accuracy,
        learning rate, seconds and images per second.
        """
        given_y_train, given_y_val = y_train, y_val  # device labels stay where they are (no round trip)
        y_train = self._check_labels("y_train", x_train, y_train)
        has_val = x_val is not None and len(x_val) > 0
        if has_val:
            y_val = self._check_labels("y_val", x_val, y_val)
        elif y_val is not None and len(y_val) > 0:
            raise ValueError(f"Trainer.fit: y_val has {len(y_val)} labels but x_val holds no inputs")
        if len(y_train):
            # Labels beyond the network's outputs: checked once here, as the loss cannot on a device without a
            # host sync per step (one evaluation-mode forward of one input tells the number of classes).
            first = backend.to_array_module(x_train[:1], backend.module_of(self.model), dtype=self.model.dtype)
            k = self.model.forward_only(first).shape[-1]
            for name, labels in (("y_train", y_train), ("y_val", y_val if has_val else None)):
                if labels is not None and len(labels) and labels.max() >= k:
                    raise ValueError(f"Trainer.fit: {name} holds label {int(labels.max())} but the network has "
                                     f"{k} outputs (classes 0..{k - 1})")
        self._clean_orphaned_files(log)
        if resume:
            self.resume()
            # The schedule's state (epoch, rate) is known only now: say it here, as a header printed earlier cannot.
            log(f"resumed from {self.out_dir / 'last.npz'} after epoch {self.epoch}; lr {float(self.optimizer.lr):g}"
                + (f", {self.schedule!r}" if self.schedule is not None else ""))
        xp = backend.module_of(self.model)  # data go to the model's device, once
        if self.cuda_graph:
            if xp is np:
                raise ValueError("Trainer: cuda_graph=True needs the model on the CuPy backend (a GPU); "
                                 "this one is on NumPy")
            self.graphed_step = GraphedStep(self._eager_step, self.model, self.optimizer)
        x = backend.to_array_module(x_train, xp, dtype=self.model.dtype)
        y = backend.to_array_module(_same_or_checked(given_y_train, y_train, xp), xp).astype(np.int64, copy=False)
        if has_val:
            x_val = backend.to_array_module(x_val, xp, dtype=self.model.dtype)
            y_val = backend.to_array_module(_same_or_checked(given_y_val, y_val, xp), xp).astype(np.int64, copy=False)
        # The best validation accuracy so far and the first epoch that reached it.
        scored = [h for h in self.history if h.get("val_acc") is not None]
        best = max((h["val_acc"] for h in scored), default=-1.0)
        best_epoch = min((h["epoch"] for h in scored if h["val_acc"] == best), default=0)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        previous_sigterm = _catch_sigterm()
        try:
            if self.out_dir is not None and not resume:
                self._save("last.npz")  # a resumable state exists from the very start
                self.saved_epoch = self.epoch
            while self.epoch < epochs:
                e = self.epoch
                self._reseed(e)
                lr = float(self.optimizer.lr)
                train_loss, train_acc, seconds = self._epoch(x, y, e, epochs)
                before_pbn = None
                if self.precise_bn:
                    before_pbn = self.evaluate(x_val, y_val) if has_val else (None, None)
                    pbn_seconds = self._recalibrate_batchnorm(x, e)
                val_loss, val_acc = self.evaluate(x_val, y_val) if has_val else (None, None)
                if self.schedule is not None:
                    self.schedule.step(val_loss if has_val else train_loss)
                self.epoch = e + 1
                row = {"epoch": self.epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
                       "val_loss": None if val_loss is None else round(val_loss, 6),
                       "val_acc": None if val_acc is None else round(val_acc, 6),
                       "lr": lr, "seconds": round(seconds, 3), "img_per_s": round(len(y) / seconds, 1)}
                if before_pbn is not None:
                    row.update(val_loss_without_precise_bn=None if before_pbn[0] is None else round(before_pbn[0], 6),
                               val_acc_without_precise_bn=None if before_pbn[1] is None else round(before_pbn[1], 6),
                               precise_bn_images=min(self.precise_bn, len(y)),
                               precise_bn_seconds=round(pbn_seconds, 3))
                self._check_finite(self.epoch, val_loss)  # nothing non-finite is ever saved
                self.history.append(row)
                improved = has_val and row["val_acc"] > best
                if improved:
                    best, best_epoch = row["val_acc"], self.epoch
                # An epoch's files are written together: a Ctrl-C or SIGTERM that arrives meanwhile is held
                # until they are all written, so last.npz, best.npz and history.* agree. best.npz goes first:
                # a SIGKILL (which cannot be held) between the two then leaves last.npz at the epoch before,
                # whose resume trains this epoch again and rewrites best.npz; the other order would leave a
                # last.npz whose history names this epoch the best while best.npz holds an older one, for good.
                with _interrupts_deferred():
                    if improved:
                        self._save("best.npz")
                        self.best_saved_epoch = self.epoch
                    self._save("last.npz")
                    self.saved_epoch = self.epoch
                    self._write_history()
                    log(f"epoch {self.epoch}/{epochs}: train loss {train_loss:.4f} acc {train_acc:.4f}"
                        + (f" | val loss {val_loss:.4f} acc {val_acc:.4f}{' *' if improved else ''}" if has_val
                           else "")
                        + (f" (precise BN on {row['precise_bn_images']} images, {pbn_seconds:.1f}s"
                           + (f"; {row['val_acc_without_precise_bn']:.4f} without)" if has_val else ")")
                           if before_pbn is not None else "")
                        + f" | lr {lr:.3g} | {seconds:.1f}s, {row['img_per_s']:.0f} img/s")
                if self.early_stopping and has_val:
                    since_best = self.epoch - best_epoch
                    if since_best >= self.early_stopping:
                        log(f"early stopping: no better validation accuracy for {since_best} epochs")
                        self.stopped_early = True
                        break
        except KeyboardInterrupt:
            self.interrupted = True
            if self.out_dir is None:
                log(f"\ninterrupted in epoch {self.epoch + 1}; no checkpoint was written (no out_dir)")
            elif self.saved_epoch is None:
                log(f"\ninterrupted before {self.out_dir / 'last.npz'} was written: there is nothing to resume")
            else:
                # saved_epoch, not self.epoch: the interrupt may have come between an epoch's end and its save.
                when = (f"during epoch {self.epoch + 1}" if self.epoch == self.saved_epoch
                        else f"after epoch {self.epoch} but before it was saved")
                log(f"\ninterrupted {when}; {self.out_dir / 'last.npz'} holds the state after epoch "
                    f"{self.saved_epoch}: run again with --resume to continue")
        finally:
            _restore_sigterm(previous_sigterm)
        return self.history

    def _check_labels(self, name, x, y):
        """``y`` as host int64 after checking it is integer, one per input and not negative."""
        y_host = backend.to_host(y) if not isinstance(y, (list, tuple)) else np.asarray(y)
        y_host = np.asarray(y_host)
        if y_host.ndim != 1:
            raise ValueError(f"Trainer.fit: {name} must be a 1-D array of class indices, got shape {y_host.shape}")
        if len(y_host) != len(x):
            raise ValueError(f"Trainer.fit: {len(x)} inputs but {len(y_host)} labels in {name}: they must match")
        if len(y_host) and y_host.dtype.kind not in "iu":
            raise ValueError(f"Trainer.fit: {name} must hold integer class indices, got dtype {y_host.dtype}")
        y_host = y_host.astype(np.int64, copy=False)
        if len(y_host) and y_host.min() < 0:
            raise ValueError(f"Trainer.fit: {name} holds label {int(y_host.min())}: class indices start at 0")
        return y_host


def _same_or_checked(given, checked, xp):
    """The labels as given when they already live on the model's device (checked on a host copy), else the copy."""
    if hasattr(given, "dtype") and backend.get_array_module(given) is xp and xp is not np:
        return given
    return checked


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _catch_sigterm():
    """Make SIGTERM (what job schedulers send) stop training like Ctrl-C; returns what to restore.

    Only in the main thread (where Python runs signal handlers), and only when
    nobody installed a SIGTERM handler of their own.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold SIGINT and SIGTERM while the block runs; deliver the first that came to its own handler after it.

    Only in the main thread (where Python runs signal handlers). The held
    signal is raised again once the handlers are back, so it does what it
    would have done (train.py's: KeyboardInterrupt). An exception of the
    block's own goes on unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        # None: a handler not installed from Python, which cannot be put back; SIG_IGN: nothing to hold
        if handler is not None and handler is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        signal.raise_signal(received[0])


def _restore_sigterm(previous):
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
