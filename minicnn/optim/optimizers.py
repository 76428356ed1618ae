"""First-order optimisers with exactly the update rules of ``torch.optim``.

An optimiser holds a *model*: any object with two dicts, ``params`` and
``grads``, that map a parameter name to an array (a :class:`~minicnn.layers.
base.Layer` or ``Container``). Every :meth:`Optimizer.step` re-reads both
dicts (a container rebuilds them on each access), updates each parameter
**in place** and keeps its per-parameter state (momentum, moment estimates)
under the parameter's name. A parameter without an entry in ``grads`` is
skipped, its state untouched (as torch skips a parameter whose ``.grad`` is
``None``).

The code is backend-generic: the array module comes from
:func:`~minicnn.backend.get_array_module` of each parameter, all scalars
(learning rate, bias corrections) are Python floats, and nothing is copied
to the host during a step, so one training step on CuPy never synchronises
with the GPU because of the optimiser.

    >>> opt = Adam(model, lr=1e-3)
    >>> loss = ...; model.backward(dloss)      # fills model.grads
    >>> clip_grad_norm(model.grads, 5.0)       # optional
    >>> opt.step()

:meth:`Optimizer.state_dict` returns a flat ``dict[str, numpy.ndarray]``
(``"lr"``, ``"step"`` and ``"<slot>/<parameter name>"``) that
``numpy.savez`` stores without pickling; :meth:`Optimizer.load_state_dict`
puts it back on the parameters' device.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

from .. import kernels
from ..backend import get_array_module, to_host

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "clip_grad_norm", "make_optimizer"]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


class Optimizer:
    """Base class: walks ``model.params``/``model.grads`` and calls :meth:`_update`.

    Subclasses name their per-parameter state arrays in ``slots`` (created
    lazily, at a parameter's first update) and implement
    ``_update(name, p, g, xp)``, which must change ``p`` in place and must not
    modify ``g``.

    Attributes:
        lr: learning rate, a plain float; schedules overwrite it between epochs.
        steps: number of :meth:`step` calls so far.
    """

    #: names of the per-parameter state arrays, in the order they are created
    slots: tuple[str, ...] = ()

    def __init__(self, model, lr: float) -> None:
        _check(lr >= 0.0, f"{type(self).__name__}: lr (the learning rate) must be >= 0, got {lr}")
        self.model = model
        self.lr = float(lr)
        self.steps = 0
        # None (eager), or a device array of the values that change between steps (step_scalars()),
        # which the fused kernels then read when they run: what a CUDA graph (minicnn.graphs) replays.
        self.device_scalars = None
        # state[slot][param name] -> array on the parameter's device
        self.state: dict[str, dict] = {s: {} for s in self.active_slots()}
        # per-parameter update counts (torch keeps one per parameter too)
        self.param_steps: dict[str, int] = {}

    # -- what subclasses provide ---------------------------------------------
    def active_slots(self) -> tuple[str, ...]:
        """The slots this configuration uses (e.g. no momentum buffer when momentum == 0)."""
        return self.slots

    def _update(self, name: str, p, g, xp) -> None:
        raise NotImplementedError

    def step_scalars(self, t: int) -> tuple[float, ...]:
        """The per-step values of update number ``t`` (1 for a parameter's first): ``(lr,)`` here.

        Everything else an update reads (momentum, betas, eps, weight decay) is fixed when the
        optimiser is built. A CUDA graph writes these values into :attr:`device_scalars` before
        each replay (see :mod:`minicnn.graphs`).
        """
        return (self.lr,)

    def _device_kw(self) -> dict:
        # only when set: the generic update rules take host scalars alone (a graph needs the fused kernels)
        return {} if self.device_scalars is None else {"device_scalars": self.device_scalars}

    # -- the public interface ------------------------------------------------
    def step(self) -> None:
        """Update every parameter that has a gradient, in place."""
        params, grads = self.model.params, self.model.grads
        for name, p in params.items():
            g = grads.get(name)
            if g is None:
                continue
            if g.shape != p.shape:
                raise ValueError(
                    f"gradient of {name!r} has shape {tuple(g.shape)}, parameter has {tuple(p.shape)}"
                )
            xp = get_array_module(p)
            for slot in self.active_slots():
                if name not in self.state[slot]:
                    self.state[slot][name] = xp.zeros_like(p)
            self.param_steps[name] = self.param_steps.get(name, 0) + 1
            self._update(name, p, g, xp)
        self.steps += 1

    def state_dict(self) -> dict[str, np.ndarray]:
        """A flat dict of host arrays: ``lr``, ``step``, ``t/<name>`` and ``<slot>/<name>``.

        ``t/<name>`` is the number of updates parameter ``name`` received
        (Adam's bias corrections depend on it). The arrays are copies.
        """
        d = {"lr": np.asarray(self.lr, dtype=np.float64), "step": np.asarray(self.steps, dtype=np.int64)}
        for name, t in self.param_steps.items():
            d[f"t/{name}"] = np.asarray(t, dtype=np.int64)
        for slot, arrays in self.state.items():
            for name, a in arrays.items():
                d[f"{slot}/{name}"] = np.array(to_host(a), copy=True)
        return d

    def load_state_dict(self, d) -> None:
        """Restore a :meth:`state_dict` (or the same keys read back from an ``.npz``).

        State arrays are copied onto the device and dtype of the matching
        parameter. Raises ``ValueError`` naming the offending keys for missing
        ``lr``/``step``, keys of unknown parameters or slots, state of the
        wrong shape, or a parameter with only some of its state; nothing is
        changed in that case.
        """
        params = self.model.params
        slots = self.active_slots()
        problems: list[str] = []
        for key in ("lr", "step"):
            if key not in d:
                problems.append(f"missing key {key!r}")
        per_param: dict[str, set] = {}
        for key in d:
            if key in ("lr", "step"):
                continue
            slot, sep, name = key.partition("/")
            if not sep or (slot != "t" and slot not in slots):
                problems.append(f"unexpected key {key!r} (this {type(self).__name__} keeps {list(slots)})")
                continue
            if name not in params:
                problems.append(f"key {key!r} names no parameter of the model")
                continue
            shape = () if slot == "t" else tuple(params[name].shape)
            got = tuple(np.shape(d[key]))
            if got != shape:
                problems.append(f"key {key!r} has shape {got}, expected {shape}")
            per_param.setdefault(name, set()).add(slot)
        for name, have in per_param.items():
            for slot in ("t", *slots):
                if slot not in have:
                    problems.append(f"missing key '{slot}/{name}'")
        if problems:
            raise ValueError(f"invalid {type(self).__name__} state dict: " + "; ".join(problems))

        self.lr = float(np.asarray(d["lr"]))
        self.steps = int(np.asarray(d["step"]))
        self.param_steps = {name: int(np.asarray(d[f"t/{name}"])) for name in per_param}
        self.state = {s: {} for s in slots}
        for name in per_param:
            p = params[name]
            xp = get_array_module(p)
            for slot in slots:
                self.state[slot][name] = xp.array(to_host(d[f"{slot}/{name}"]), dtype=p.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr:g})"


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, as ``torch.optim.SGD``.

    With gradient ``g``, parameter ``w``, learning rate ``lr``, momentum
    ``mu``, dampening ``d`` and weight decay ``wd``::

        g = g + wd * w                       # L2 penalty, added to the gradient
        if mu == 0:
            w -= lr * g                      # vanilla SGD
        else:
            b = g              (first step)
            b = mu * b + (1 - d) * g         (later steps)
            w -= lr * (g + mu * b)           # nesterov=True
            w -= lr * b                      # nesterov=False

    (CS231n writes momentum as ``v = mu * v - lr * g; w += v``, which is the
    same sequence of parameters when ``lr`` is constant and ``d == 0``.)
    Nesterov needs ``momentum > 0`` and ``dampening == 0``.
    """

    def __init__(self, model, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0) -> None:
        _check(momentum >= 0.0, f"{type(self).__name__}: momentum must be >= 0, got {momentum}")
        _check(weight_decay >= 0.0, f"{type(self).__name__}: weight_decay must be >= 0, got {weight_decay}")
        _check(not nesterov or (momentum > 0 and dampening == 0),
               f"{type(self).__name__}: Nesterov momentum needs momentum > 0 and dampening == 0, got momentum={momentum}, "
               f"dampening={dampening}")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.dampening = float(dampening)
        super().__init__(model, lr)

    def active_slots(self):
        return ("momentum",) if self.momentum != 0 else ()

    def _update(self, name, p, g, xp):
        buf = self.state["momentum"][name] if self.momentum != 0 else None
        _sgd_update(p, g, buf, first=self.param_steps[name] == 1, lr=self.lr, momentum=self.momentum,
                    nesterov=self.nesterov, weight_decay=self.weight_decay, dampening=self.dampening,
                    **self._device_kw())

    def __repr__(self):
        return (f"SGD(lr={self.lr:g}, momentum={self.momentum:g}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay:g}, dampening={self.dampening:g})")


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015), as ``torch.optim.Adam`` (``amsgrad=False``).

    With step count ``t`` (1 on the first update of the parameter)::

        g  = g + wd * w                      # L2 penalty (weight_decay)
        m  = beta1 * m + (1 - beta1) * g     # first moment
        v  = beta2 * v + (1 - beta2) * g**2  # second moment
        mt = m / (1 - beta1**t)              # bias corrections
        vt = v / (1 - beta2**t)
        w -= lr * mt / (sqrt(vt) + eps)

    Computed as torch does: ``w -= (lr / (1 - beta1**t)) * m /
    (sqrt(v) / sqrt(1 - beta2**t) + eps)``.
    """

    slots = ("m", "v")
    decoupled = False

    def __init__(self, model, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        beta1, beta2 = betas
        _check(0.0 <= beta1 < 1.0, f"{type(self).__name__}: betas[0] must be in [0, 1), got {beta1}")
        _check(0.0 <= beta2 < 1.0, f"{type(self).__name__}: betas[1] must be in [0, 1), got {beta2}")
        _check(eps >= 0.0, f"{type(self).__name__}: eps must be >= 0, got {eps}")
        _check(weight_decay >= 0.0, f"{type(self).__name__}: weight_decay must be >= 0, got {weight_decay}")
        self.betas = (float(beta1), float(beta2))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        super().__init__(model, lr)

    def _update(self, name, p, g, xp):
        _adam_update(p, g, self.state["m"][name], self.state["v"][name], t=self.param_steps[name], lr=self.lr,
                     betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, decoupled=self.decoupled,
                     **self._device_kw())

    def step_scalars(self, t):
        """``(lr / (1 - beta1**t), sqrt(1 - beta2**t), 1 - lr * wd or 1)``: the step size, the second
        moment's bias correction and AdamW's decay factor (see :func:`minicnn.kernels.adam_scalars`)."""
        return kernels.adam_scalars(t, self.lr, self.betas, self.weight_decay, self.decoupled)

    def __repr__(self):
        return (f"{type(self).__name__}(lr={self.lr:g}, betas={self.betas}, eps={self.eps:g}, "
                f"weight_decay={self.weight_decay:g})")


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as ``torch.optim.AdamW``.

    The decay shrinks the weights directly instead of entering the moments::

        w  = w * (1 - lr * wd)
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g**2
        w -= lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)
    """

    decoupled = True

    def __init__(self, model, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class RMSprop(Optimizer):
    r"""RMSprop (Hinton, lecture 6e), as ``torch.optim.RMSprop``.

    ::

        g  = g + wd * w                          # L2 penalty (weight_decay)
        s  = alpha * s + (1 - alpha) * g**2      # running mean of squares
        if centered:
            a = alpha * a + (1 - alpha) * g      # running mean of gradients
            d = sqrt(s - a**2) + eps
        else:
            d = sqrt(s) + eps
        if momentum > 0:
            b  = momentum * b + g / d            # b starts at 0
            w -= lr * b
        else:
            w -= lr * g / d

    Note that ``eps`` is added *outside* the square root (torch's choice;
    CS231n writes ``w -= lr * g / (sqrt(s) + eps)``, the same thing).
    """

    def __init__(self, model, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 momentum: float = 0.0, weight_decay: float = 0.0, centered: bool = False) -> None:
        _check(alpha >= 0.0, f"{type(self).__name__}: alpha must be >= 0, got {alpha}")
        _check(eps >= 0.0, f"{type(self).__name__}: eps must be >= 0, got {eps}")
        _check(momentum >= 0.0, f"{type(self).__name__}: momentum must be >= 0, got {momentum}")
        _check(weight_decay >= 0.0, f"{type(self).__name__}: weight_decay must be >= 0, got {weight_decay}")
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.centered = bool(centered)
        super().__init__(model, lr)

    def active_slots(self):
        return (("square_avg",) + (("grad_avg",) if self.centered else ())
                + (("momentum",) if self.momentum > 0 else ()))

    def _update(self, name, p, g, xp):
        _rmsprop_update(p, g, self.state["square_avg"][name], self.state["grad_avg"].get(name) if self.centered else None,
                        self.state["momentum"][name] if self.momentum > 0 else None, lr=self.lr, alpha=self.alpha,
                        eps=self.eps, weight_decay=self.weight_decay, momentum=self.momentum,
                        **self._device_kw())

    def __repr__(self):
        return (f"RMSprop(lr={self.lr:g}, alpha={self.alpha:g}, eps={self.eps:g}, "
                f"momentum={self.momentum:g}, weight_decay={self.weight_decay:g}, "
                f"centered={self.centered})")


# -- the update rules, one parameter at a time ---------------------------------------------------
# Written with array operations: the reference, and what runs on NumPy. On CuPy the decorator runs the
# fused kernel of minicnn/kernels.py instead: one launch per parameter instead of 4 to 13.
def _host_scalars_only(device_scalars):
    if device_scalars is not None:
        raise ValueError("optimizer.device_scalars is set, but the generic update rules take the learning rate "
                         "from the host; device-resident step values need the fused kernels (CuPy arrays, "
                         "minicnn.kernels.use_fused(True))")


@kernels.gpu_fast_path(kernels.sgd_update)
def _sgd_update(p, g, buf, *, first, lr, momentum, nesterov, weight_decay, dampening, device_scalars=None):
    _host_scalars_only(device_scalars)
    xp = get_array_module(p)
    if weight_decay != 0:
        g = g + weight_decay * p  # a new array: the caller's gradient is left alone
    if buf is not None:
        if first:
            buf[...] = g
        else:
            xp.multiply(buf, momentum, out=buf)
            buf += (1.0 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    p -= lr * g


@kernels.gpu_fast_path(kernels.adam_update)
def _adam_update(p, g, m, v, *, t, lr, betas, eps, weight_decay, decoupled, device_scalars=None):
    _host_scalars_only(device_scalars)
    xp = get_array_module(p)
    beta1, beta2 = betas
    if weight_decay != 0:
        if decoupled:
            xp.multiply(p, 1.0 - lr * weight_decay, out=p)
        else:
            g = g + weight_decay * p
    xp.multiply(m, beta1, out=m)
    m += (1.0 - beta1) * g
    xp.multiply(v, beta2, out=v)
    v += (1.0 - beta2) * (g * g)
    step_size = lr / (1.0 - beta1 ** t)
    # one temporary, updated in place (``out=`` also keeps 0-d arrays arrays)
    tmp = xp.sqrt(v, out=xp.empty_like(v))
    tmp /= math.sqrt(1.0 - beta2 ** t)
    tmp += eps                            # tmp = sqrt(v / (1 - beta2**t)) + eps
    xp.divide(m, tmp, out=tmp)
    tmp *= step_size
    p -= tmp


@kernels.gpu_fast_path(kernels.rmsprop_update)
def _rmsprop_update(p, g, s, a, b, *, lr, alpha, eps, weight_decay, momentum, device_scalars=None):
    _host_scalars_only(device_scalars)
    xp = get_array_module(p)
    if weight_decay != 0:
        g = g + weight_decay * p
    xp.multiply(s, alpha, out=s)
    s += (1.0 - alpha) * (g * g)
    d = xp.empty_like(s)  # the one temporary (``out=`` also keeps 0-d arrays arrays)
    if a is not None:
        xp.multiply(a, alpha, out=a)
        a += (1.0 - alpha) * g
        xp.multiply(a, a, out=d)
        xp.subtract(s, d, out=d)
        xp.sqrt(d, out=d)
    else:
        xp.sqrt(s, out=d)
    d += eps
    xp.divide(g, d, out=d)  # d now holds g / (sqrt(...) + eps)
    if b is not None:
        xp.multiply(b, momentum, out=b)
        b += d
        p -= lr * b
    else:
        d *= lr
        p -= d


def clip_grad_norm(grads, max_norm: float):
    """Scale all gradients in place so that their global L2 norm is at most ``max_norm``.

    Same rule as ``torch.nn.utils.clip_grad_norm_``::

        total = sqrt(sum over arrays of ||g||**2)
        g *= min(1, max_norm / (total + 1e-6))       # for every g

    The multiplication always happens (by exactly 1 when the norm is small),
    so there is no data-dependent branch and no host synchronisation.

    Args:
        grads: a dict name -> gradient array (e.g. ``model.grads``), or any
            iterable of arrays.
        max_norm: the largest allowed norm.

    Returns:
        The total norm *before* clipping, as a 0-d array of the gradients'
        backend (call ``float()`` on it when you need the number on the host).
        A non-finite norm turns the gradients into NaNs, as in torch.
    """
    arrays = list(grads.values()) if hasattr(grads, "values") else list(grads)
    xp = get_array_module(*arrays)
    if not arrays:
        return xp.asarray(0.0, dtype=np.float32)
    norms = xp.stack([xp.linalg.norm(g.ravel()) for g in arrays])
    total = xp.asarray(xp.linalg.norm(norms))
    coef = xp.minimum(float(max_norm) / (total + 1e-6), 1.0)
    for g in arrays:
        g *= coef
    return total


_OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def make_optimizer(name: str, model, **kw) -> Optimizer:
    """Build an optimiser by name: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"rmsprop"``.

    Keyword arguments go to the class (``lr=0.1, momentum=0.9``); those whose
    value is ``None`` are dropped so that unset command-line options fall back
    to the defaults (SGD has no default ``lr``). Unknown names or arguments
    raise ``ValueError``.
    """
    key = str(name).lower()
    if key not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: expected one of {sorted(_OPTIMIZERS)}")
    return _build(_OPTIMIZERS[key], key, model, kw)


def _build(cls, key, target, kw):
    """``cls(target, **kw)`` without the ``None`` values, with ValueErrors that name the problem."""
    kw = {k: v for k, v in kw.items() if v is not None}
    accepted = list(inspect.signature(cls.__init__).parameters)[2:]  # after self and the target
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ValueError(f"{key!r} ({cls.__name__}) does not take {unknown}; it accepts {accepted}")
    try:
        return cls(target, **kw)
    except TypeError as exc:  # e.g. a required argument is missing
        raise ValueError(f"{key!r} ({cls.__name__}): {exc}") from exc
