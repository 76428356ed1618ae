"""Learning-rate schedules, stepped once per epoch.

A schedule wraps an optimiser, remembers its learning rate at construction
as ``base_lr`` and, on every :meth:`Schedule.step` (call it *after* each
epoch), writes the learning rate of the next epoch to ``optimizer.lr``::

    opt = SGD(model, lr=0.1, momentum=0.9)
    sched = CosineLR(opt, total_epochs=30, warmup_epochs=3)
    for epoch in range(30):
        train_one_epoch(model, opt)          # uses opt.lr
        sched.step(metric=val_loss)          # metric only matters for plateau

``epoch`` counts the :meth:`~Schedule.step` calls; the learning rate used in
epoch ``e`` (0-based) is ``lr_at(e)``, set for ``e = 0`` by the constructor.
This is torch's convention (``scheduler.step()`` after the epoch, the
constructor sets the first learning rate), and :class:`StepLR`,
:class:`ExponentialLR` and :class:`ReduceLROnPlateau` give the learning
rates of their ``torch.optim.lr_scheduler`` namesakes.

``state_dict()`` returns plain Python numbers (``numpy.savez`` stores them as
0-d arrays) and ``load_state_dict`` accepts either, so a resumed run
continues with exactly the same learning rates.
"""
from __future__ import annotations

import math

from .optimizers import _build

__all__ = [
    "Schedule",
    "ConstantLR",
    "StepLR",
    "ExponentialLR",
    "CosineLR",
    "ReduceLROnPlateau",
    "make_schedule",
]


def _number(value, kind=float):
    # accepts Python numbers and 0-d arrays read back from an .npz
    return kind(value.item() if hasattr(value, "item") else value)


class Schedule:
    """Base class of the epoch-wise schedules.

    Subclasses with a closed form implement :meth:`lr_at`; the base
    ``step`` then sets ``optimizer.lr = lr_at(epoch)`` after counting the
    epoch.

    Attributes:
        optimizer: the wrapped optimiser (anything with a settable ``lr``).
        base_lr: ``optimizer.lr`` when the schedule was built.
        epoch: number of :meth:`step` calls so far.
    """

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr)
        self.epoch = 0
        self.optimizer.lr = self.lr_at(0)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of (0-based) epoch ``epoch``."""
        raise NotImplementedError

    @property
    def lr(self) -> float:
        """The learning rate currently set on the optimiser."""
        return self.optimizer.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.lr = float(value)

    def step(self, metric=None) -> None:
        """Call once after each epoch; ``metric`` is ignored except by plateau schedules."""
        self.epoch += 1
        self.optimizer.lr = self.lr_at(self.epoch)

    # -- checkpoints ---------------------------------------------------------
    _state_keys: tuple[tuple[str, type], ...] = (("epoch", int), ("base_lr", float))

    def state_dict(self) -> dict:
        """Plain numbers: everything needed to continue the schedule exactly."""
        return {key: kind(getattr(self, key)) for key, kind in self._state_keys}

    def load_state_dict(self, d) -> None:
        """Restore :meth:`state_dict` and set the optimiser's learning rate accordingly.

        Raises ``ValueError`` naming any missing key.
        """
        missing = [key for key, _ in self._state_keys if key not in d]
        if missing:
            raise ValueError(f"invalid {type(self).__name__} state dict: missing keys {missing}")
        for key, kind in self._state_keys:
            setattr(self, key, _number(d[key], kind))
        self._restore_lr()

    def _restore_lr(self) -> None:
        self.optimizer.lr = self.lr_at(self.epoch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epoch={self.epoch}, lr={self.optimizer.lr:g})"


class ConstantLR(Schedule):
    """No schedule: the learning rate stays at ``base_lr`` (``make_schedule("none")``).

    (Not torch's ``ConstantLR``, which multiplies by a factor for a few epochs.)
    """

    def lr_at(self, epoch):
        return self.base_lr


class StepLR(Schedule):
    """Decay by ``gamma`` every ``step_size`` epochs, as ``torch.optim.lr_scheduler.StepLR``.

    ``lr(e) = base_lr * gamma ** (e // step_size)``
    """

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1) -> None:
        if int(step_size) < 1:
            raise ValueError(f"step_size must be a positive integer, got {step_size}")
        self.step_size = int(step_size)
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(Schedule):
    """Decay by ``gamma`` every epoch, as ``torch.optim.lr_scheduler.ExponentialLR``.

    ``lr(e) = base_lr * gamma ** e``
    """

    def __init__(self, optimizer, gamma: float) -> None:
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** epoch


class CosineLR(Schedule):
    """Linear warm-up, then half a cosine from ``base_lr`` down to ``min_lr``.

    With ``W = warmup_epochs`` and ``T = total_epochs``, the learning rate
    of (0-based) epoch ``e`` is::

        e <  W:  lr = base_lr * (e + 1) / (W + 1)
        e >= W:  lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * s)) / 2,
                 s = min(1, (e - W) / max(1, T - W))

    so warm-up climbs ``base/(W+1), 2*base/(W+1), ..., W*base/(W+1)``, epoch
    ``W`` trains with ``base_lr`` and ``lr(T) = min_lr`` (the value after the
    last epoch; it stays there if training goes on). Without warm-up this is
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=T, eta_min=min_lr)``
    over epochs ``0..T``.
    """

    def __init__(self, optimizer, total_epochs: int, warmup_epochs: int = 0, min_lr: float = 0.0) -> None:
        if int(total_epochs) < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        if not 0 <= int(warmup_epochs) <= int(total_epochs):
            raise ValueError(f"warmup_epochs must be in [0, total_epochs={total_epochs}], got {warmup_epochs}")
        if min_lr < 0:
            raise ValueError(f"min_lr must be >= 0, got {min_lr}")
        self.total_epochs = int(total_epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.min_lr = float(min_lr)
        super().__init__(optimizer)

    def lr_at(self, epoch):
        w, t = self.warmup_epochs, self.total_epochs
        if epoch < w:
            return self.base_lr * (epoch + 1) / (w + 1)
        s = min(1.0, (epoch - w) / max(1, t - w))
        return self.min_lr + (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * s)) / 2.0


class ReduceLROnPlateau(Schedule):
    """Divide the learning rate when a metric stops improving, as torch's ``ReduceLROnPlateau``.

    After each epoch, ``step(metric)``:

    * the metric *improves* when ``metric < best * (1 - threshold)`` (mode
      ``"min"``, ``threshold_mode="rel"``), ``metric < best - threshold``
      (``"abs"``), or ``metric > best * (1 + threshold)`` /
      ``metric > best + threshold`` in mode ``"max"``; ``best`` starts at
      +inf (min) or -inf (max). Improvement resets the bad-epoch count,
      anything else increments it;
    * during ``cooldown`` epochs after a reduction bad epochs are not counted;
    * when more than ``patience`` bad epochs accumulate,
      ``lr = max(lr * factor, min_lr)`` (skipped if that changes lr by less
      than 1e-8), the count resets and the cooldown starts.

    The current ``optimizer.lr`` is what gets multiplied, so the state of a
    run is its ``lr``; it is part of :meth:`state_dict`.
    """

    _state_keys = (("epoch", int), ("base_lr", float), ("lr", float), ("best", float),
                   ("num_bad_epochs", int), ("cooldown_counter", int))

    def __init__(self, optimizer, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float = 0.0, eps: float = 1e-8) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        if not factor < 1.0:
            raise ValueError(f"factor must be < 1.0, got {factor}")
        self.mode = mode
        self.factor = float(factor)
        self.patience = int(patience)
        self.threshold = float(threshold)
        self.threshold_mode = threshold_mode
        self.cooldown = int(cooldown)
        self.min_lr = float(min_lr)
        self.eps = float(eps)
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        super().__init__(optimizer)

    def lr_at(self, epoch):  # the initial learning rate; later ones depend on the metrics
        return self.base_lr

    def _is_better(self, a: float) -> bool:
        if self.mode == "min":
            return a < (self.best * (1.0 - self.threshold) if self.threshold_mode == "rel"
                        else self.best - self.threshold)
        return a > (self.best * (1.0 + self.threshold) if self.threshold_mode == "rel"
                    else self.best + self.threshold)

    def step(self, metric=None) -> None:
        if metric is None:
            raise ValueError("ReduceLROnPlateau.step needs the metric of the epoch")
        current = float(metric)  # one host sync per epoch for a device scalar
        self.epoch += 1
        if self._is_better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            old = float(self.optimizer.lr)
            new = max(old * self.factor, self.min_lr)
            if old - new > self.eps:
                self.optimizer.lr = new
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0

    def _restore_lr(self) -> None:
        pass  # ``lr`` was restored with the rest of the state


_SCHEDULES = {
    "none": ConstantLR,
    "constant": ConstantLR,
    "step": StepLR,
    "exponential": ExponentialLR,
    "cosine": CosineLR,
    "plateau": ReduceLROnPlateau,
}


def make_schedule(name, optimizer, **kw) -> Schedule:
    """Build a schedule by name: ``"step"``, ``"exponential"``, ``"cosine"``,
    ``"plateau"`` or ``"none"`` (also ``None``/``"constant"``: keep the learning rate).

    Keyword arguments go to the class (e.g. ``step_size=10, gamma=0.5``);
    those whose value is ``None`` are dropped so that unset command-line
    options fall back to the defaults. Unknown names or arguments raise
    ``ValueError``.
    """
    key = "none" if name is None else str(name).lower()
    if key not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: expected one of {sorted(_SCHEDULES)}")
    return _build(_SCHEDULES[key], key, optimizer, kw)

