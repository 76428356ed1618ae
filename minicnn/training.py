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
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np

from . import backend
from .checkpoint import CheckpointError, load_npz, save_npz
from .losses import SoftmaxCrossEntropy
from .optim import clip_grad_norm

__all__ = ["Trainer", "TrainingDiverged", "save_checkpoint", "load_checkpoint", "export_for_inference",
           "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "minicnn.checkpoint/1"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


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
    """Write a resumable training checkpoint (atomic, no pickle)."""
    arrays = dict(model.state_arrays())
    if optimizer is not None:
        arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    arrays.update(extra_arrays or {})
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
    from .models import build_model  # noqa: PLC0415  (models import training lazily)

    arrays, meta = load_npz(path)
    if meta.get("format") not in (CHECKPOINT_FORMAT, "minicnn.model/1"):
        raise CheckpointError(f"{path}: not a minicnn checkpoint (format {meta.get('format')!r})")
    if model is None:
        info = meta.get("model") or {"name": meta.get("name"), "config": meta.get("config", {})}
        try:
            model = build_model(info["name"], **info.get("config", {}))
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: cannot rebuild its model {info!r}: {exc}") from None
    model_arrays = {k: v for k, v in arrays.items() if k.startswith(("param/", "buffer/"))}
    optim_arrays = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
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


def export_for_inference(src, dst, dtype=np.float32):
    """Copy checkpoint ``src`` to ``dst`` without its optimiser state (about a third of the size).

    Everything evaluation needs stays: weights, BatchNorm statistics, the model's
    name and configuration, the history and the caller's extras (class names,
    normalisation statistics). Floating-point weights are stored as ``dtype``.
    The result still loads with :func:`load_checkpoint`, but cannot resume training.
    """
    arrays, meta = load_npz(src)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{src}: not a minicnn training checkpoint (format {meta.get('format')!r})")
    kept = {k: (v.astype(dtype) if v.dtype.kind == "f" and k.startswith(("param/", "buffer/")) else v)
            for k, v in arrays.items() if not k.startswith("optim/")}
    meta = dict(meta, exported_from=str(src), schedule=None, optimizer=None)
    return save_npz(dst, kept, meta)


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
    """

    def __init__(self, model, optimizer, loss_fn=None, schedule=None, augmenter=None, *, batch_size=128, seed=0,
                 out_dir=None, early_stopping=None, clip_norm=None, log_every=20, progress=True,
                 extra_meta=None, extra_arrays=None, stream_offset=0):
        self.model, self.optimizer, self.schedule, self.augmenter = model, optimizer, schedule, augmenter
        self.loss_fn = loss_fn or SoftmaxCrossEntropy()
        self.batch_size, self.seed = int(batch_size), int(seed)
        if int(stream_offset) < 0:
            raise ValueError(f"Trainer: stream_offset counts epochs already trained and must be >= 0, got {stream_offset}")
        self.stream_offset = int(stream_offset)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.early_stopping, self.clip_norm = early_stopping, clip_norm
        self.log_every, self.progress = max(1, int(log_every)), progress
        self.extra_meta, self.extra_arrays = dict(extra_meta or {}), dict(extra_arrays or {})
        self.history: list[dict] = []
        self.epoch = 0  # epochs completed
        self.interrupted = False
        self.stopped_early = False

    # -- checkpoints ------------------------------------------------------------------
    def _save(self, name):
        if self.out_dir is None:
            return None
        return save_checkpoint(self.out_dir / name, self.model, self.optimizer, self.schedule, self.epoch,
                               self.history, {"trainer": {"seed": self.seed, "batch_size": self.batch_size,
                                                          "stream_offset": self.stream_offset},
                                              **self.extra_meta}, self.extra_arrays)

    def _write_history(self):
        if self.out_dir is None or not self.history:
            return
        (self.out_dir / "history.json").write_text(json.dumps(_jsonable(self.history), indent=1))
        with open(self.out_dir / "history.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(self.history[0]))
            writer.writeheader()
            writer.writerows(self.history)

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

    def evaluate(self, x, y, batch_size=512):
        """(mean loss, accuracy) in evaluation mode; x, y on host or device."""
        xp = backend.module_of(self.model)  # the model's device, whatever the active backend
        total_loss, correct, n = xp.zeros((), dtype=np.float64), xp.zeros((), dtype=np.int64), len(y)
        for start in range(0, n, batch_size):
            xb = backend.to_array_module(x[start : start + batch_size], xp, dtype=self.model.dtype)
            yb = backend.to_array_module(y[start : start + batch_size], xp)
            logits = self.model.forward(xb, training=False)
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
                        f"try a lower learning rate or --clip-norm. The last good checkpoint is "
                        f"{self.out_dir / 'last.npz' if self.out_dir else '(none: no out_dir)'}"
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
        if resume:
            self.resume()
            log(f"resumed from {self.out_dir / 'last.npz'} after epoch {self.epoch}")
        xp = backend.module_of(self.model)  # data go to the model's device, once (labels may already be there)
        x = backend.to_array_module(x_train, xp, dtype=self.model.dtype)
        y = backend.to_array_module(y_train, xp).astype(np.int64, copy=False)
        has_val = x_val is not None and len(x_val) > 0
        if has_val:
            x_val = backend.to_array_module(x_val, xp, dtype=self.model.dtype)
            y_val = backend.to_array_module(y_val, xp).astype(np.int64, copy=False)
        # The best validation accuracy so far and the first epoch that reached it.
        scored = [h for h in self.history if h.get("val_acc") is not None]
        best = max((h["val_acc"] for h in scored), default=-1.0)
        best_epoch = min((h["epoch"] for h in scored if h["val_acc"] == best), default=0)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                self._save("last.npz")  # a resumable state exists from the very start
        try:
            while self.epoch < epochs:
                e = self.epoch
                self._reseed(e)
                lr = float(self.optimizer.lr)
                train_loss, train_acc, seconds = self._epoch(x, y, e, epochs)
                val_loss, val_acc = self.evaluate(x_val, y_val) if has_val else (None, None)
                if self.schedule is not None:
                    self.schedule.step(val_loss if has_val else train_loss)
                self.epoch = e + 1
                row = {"epoch": self.epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
                       "val_loss": None if val_loss is None else round(val_loss, 6),
                       "val_acc": None if val_acc is None else round(val_acc, 6),
                       "lr": lr, "seconds": round(seconds, 3), "img_per_s": round(len(y) / seconds, 1)}
                self.history.append(row)
                improved = has_val and row["val_acc"] > best
                if improved:
                    best, best_epoch = row["val_acc"], self.epoch
                self._save("last.npz")
                if improved:
                    self._save("best.npz")
                self._write_history()
                log(f"epoch {self.epoch}/{epochs}: train loss {train_loss:.4f} acc {train_acc:.4f}"
                    + (f" | val loss {val_loss:.4f} acc {val_acc:.4f}{' *' if improved else ''}" if has_val else "")
                    + f" | lr {lr:.3g} | {seconds:.1f}s, {row['img_per_s']:.0f} img/s")
                if self.early_stopping and has_val:
                    since_best = self.epoch - best_epoch
                    if since_best >= self.early_stopping:
                        log(f"early stopping: no better validation accuracy for {since_best} epochs")
                        self.stopped_early = True
                        break
        except KeyboardInterrupt:
            self.interrupted = True
            where = self.out_dir / "last.npz" if self.out_dir else None
            log(f"\ninterrupted during epoch {self.epoch + 1}; {where or 'no checkpoint'} holds the state after "
                f"epoch {self.epoch}" + (": run again with --resume to continue" if where else ""))
        return self.history
