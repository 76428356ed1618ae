"""CUDA graphs: a whole training step captured once, then replayed with one launch.

Why: on a GPU a training step of ``hw3_cnn`` is about 150 kernel launches (see
``benchmarks/count_launches.py``), and with CuPy each one costs some microseconds
of Python and driver time on the host. When the network is small, the GPU finishes
a kernel before the host has issued the next, and the step is bound by the host.
CUDA stream capture records every launch of one step into a graph, and
``graph.launch()`` replays all of them with a single call.

A replay runs the captured kernels on the captured memory with the captured
arguments; no Python runs. Four things of an ordinary step would therefore be
frozen at their captured values, and :class:`GraphedStep` gives each a fixed
place in device memory that it refills before every replay:

* the batch: copied into the graph's input arrays (``static_x``, ``static_y``);
* the random draws (the dropout masks): during the capture the backend's random
  stream (:func:`minicnn.backend.random_state`) is replaced by
  :class:`RecordedDraws`, which hands each draw a fixed buffer; before each
  replay the buffers are filled from the real stream, in the order an eager
  step would draw, so a graphed run draws exactly the numbers of an eager one;
* the optimiser's per-step values (the learning rate, which a schedule changes,
  and Adam's bias corrections, which change every step):
  :meth:`~minicnn.optim.Optimizer.step_scalars` of the next step is written into
  ``optimizer.device_scalars``, which the fused update kernels read when they run
  (:meth:`minicnn.kernels.Elementwise.with_device_scalars`);
* the optimiser's step counters (host integers): advanced after each replay.

Memory: everything the step allocates during the capture comes from a private
``cupy.cuda.MemoryPool`` on a stream of its own. The graph's intermediate arrays
keep their addresses for as long as it lives, and no other array can be given
that memory afterwards. The arrays the step returns (loss, logits) are the graph's
own, overwritten by the next replay, as ``torch.cuda.graphs``' static outputs are.

What a graphed step needs: the CuPy backend and the fused kernels
(:func:`minicnn.kernels.use_fused`); a step with no host synchronisation (the
loop of :class:`~minicnn.training.Trainer` has none); inputs of one shape (a
last, smaller batch runs eagerly); and two eager warm-up steps first, which
create the optimiser's state and compile and load every kernel the capture
will record (the warm-up steps already use the optimiser's device-scalar
kernels). When the arrays the graph was captured with are replaced (loading a checkpoint rebinds the optimiser's
state), the next call captures again. A capture that fails (an operation the
GPU's stream capture refuses) does not stop training: with ``fallback=True``
(the default) the error is kept in ``capture_error``, a warning says it, and
the step runs eagerly from then on, with the same numbers.

Without a GPU, the CuPy stand-in of the tests (``tests/fakecupy.py``) imitates stream
capture (nothing runs during it, memory from before is left alone, replays use
the captured memory and scalars, host syncs and allocations from the default pool
are refused). ``tests/test_graphs.py`` checks there that graphed training gives
the same weights as eager training, step for step.
"""
from __future__ import annotations

import warnings

import numpy as np

from . import backend, kernels

__all__ = ["GraphedStep", "RecordedDraws"]


class RecordedDraws:
    """The random stream during a capture: each draw is a fixed buffer, filled by :meth:`refill` before each replay.

    It offers the draws minicnn's layers make inside a training step
    (``random_sample``, ``standard_normal``); any other draw raises, naming it,
    since its numbers would be frozen in the graph.
    """

    def __init__(self, xp):
        self.xp = xp
        self.draws: list = []  # (method, buffer, size, dtype), in the order the step drew them

    def _draw(self, method, size, dtype):
        buffer = self.xp.empty(() if size is None else size, dtype=dtype)
        self.draws.append((method, buffer, size, dtype))
        return buffer

    def random_sample(self, size=None, dtype=float):
        return self._draw("random_sample", size, dtype)

    def standard_normal(self, size=None, dtype=float):
        return self._draw("standard_normal", size, dtype)

    def __getattr__(self, name):
        raise AttributeError(f"a captured training step drew random numbers with {name}(); only random_sample() and "
                             "standard_normal() can be redrawn before each replay of a CUDA graph")

    def refill(self, rng) -> None:
        """Fill every buffer with a new draw from ``rng``, in capture order (as an eager step would draw)."""
        for method, buffer, size, dtype in self.draws:
            buffer[...] = getattr(rng, method)(size, dtype=dtype)


class _Captured:
    """One graph and everything it reads or writes that must outlive the capture."""

    def __init__(self, key, graph, pool, stream, static_x, static_y, outputs, draws, scalars, updated):
        self.key, self.graph, self.pool, self.stream = key, graph, pool, stream
        self.static_x, self.static_y, self.outputs = static_x, static_y, outputs
        self.draws, self.scalars, self.updated = draws, scalars, updated


class GraphedStep:
    """``step(x, y)`` captured as a CUDA graph after ``warmup_steps`` eager calls, and replayed from then on.

    Parameters:
        step: the eager training step, ``step(x, y) -> outputs`` (a tuple of device arrays), e.g.
            forward, loss, backward and ``optimizer.step()``.
        model: the network the step trains (its parameters and buffers must stay the same arrays).
        optimizer: the :class:`~minicnn.optim.Optimizer` the step calls.
        warmup_steps: eager calls before the capture (at least 1: the optimiser's state and its
            first-step branch, and every kernel's compilation, must be behind it).
        fallback: when a capture fails, warn and run every later step eagerly (True), or raise (False).

    Counters: ``eager_steps`` (eager calls: the warm-up, and every call after a failed capture),
    ``captures`` and ``replays``; ``capture_error`` says why a capture failed (None: none did).
    """

    def __init__(self, step, model, optimizer, *, warmup_steps: int = 2, fallback: bool = True):
        if int(warmup_steps) < 1:
            raise ValueError(f"GraphedStep: warmup_steps must be at least 1, got {warmup_steps}")
        self.step, self.model, self.optimizer = step, model, optimizer
        self.warmup_steps, self.fallback = int(warmup_steps), bool(fallback)
        self.eager_steps = self.captures = self.replays = 0
        self.capture_error: str | None = None
        self._captured: _Captured | None = None

    def __call__(self, x, y):
        xp = backend.get_array_module(x)
        if xp is np:
            raise ValueError("GraphedStep: CUDA graphs need device arrays (the CuPy backend); got NumPy inputs")
        if not kernels.fused_enabled():
            raise ValueError("GraphedStep: a CUDA graph needs the fused kernels (minicnn.kernels.use_fused(True)), "
                             "which read the optimiser's step values from device memory")
        if self.capture_error is not None:
            self.eager_steps += 1
            return self.step(x, y)
        if self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            return self._warmup_step(xp, x, y)
        key = self._key(x, y)
        if self._captured is None or self._captured.key != key:
            try:
                self._capture(xp, x, y, key)
            except Exception as exc:  # noqa: BLE001  (any refusal of the capture: training goes on eagerly)
                if not self.fallback:
                    raise
                self._captured = None
                self.capture_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"GraphedStep: the CUDA graph capture failed ({self.capture_error}); every step runs "
                              "eagerly from now on, with the same numbers", RuntimeWarning, stacklevel=2)
                self.eager_steps += 1
                return self.step(x, y)
        return self._replay(xp, x, y)

    def _warmup_step(self, xp, x, y):
        """An eager step whose optimiser already reads its step values from the device.

        Why: the update kernels a graph replays are the device-scalar twins; run here first, they are
        compiled and loaded before the capture, where compiling or loading a module is best avoided.
        The same numbers as a plain eager step (the same kernel bodies, the same double values).
        """
        optimizer = self.optimizer
        counts = {optimizer.param_steps.get(name, 0) for name in self.model.params}
        if len(counts) != 1:  # parameters updated unequally often: no one set of step values fits them all
            return self.step(x, y)
        values = np.asarray(optimizer.step_scalars(counts.pop() + 1), dtype=np.float64)
        optimizer.device_scalars = xp.asarray(values)
        try:
            return self.step(x, y)
        finally:
            optimizer.device_scalars = None

    @property
    def memory_pool(self):
        """The private memory pool of the current graph (None before the capture)."""
        return None if self._captured is None else self._captured.pool

    # -- what a graph depends on ----------------------------------------------------------
    def _key(self, x, y):
        """Input shapes and dtypes, and the identity of every array the step reads across steps."""
        state = [a for slot in self.optimizer.state.values() for a in slot.values()]
        held = [*self.model.params.values(), *getattr(self.model, "buffers", {}).values(), *state]
        return (tuple(x.shape), str(x.dtype), tuple(y.shape), str(y.dtype), tuple(id(a) for a in held))

    def _capture(self, xp, x, y, key):
        self._captured = None  # the old graph and its memory go first
        optimizer = self.optimizer
        steps_before, counts_before = optimizer.steps, dict(optimizer.param_steps)
        static_x, static_y = x.copy(), y.copy()
        scalars = xp.asarray(np.zeros(len(optimizer.step_scalars(1)), dtype=np.float64))
        draws = RecordedDraws(xp)
        pool = xp.cuda.MemoryPool()
        stream = xp.cuda.Stream(non_blocking=True)
        optimizer.device_scalars = scalars
        try:
            with backend.using_random_state(xp, draws), xp.cuda.using_allocator(pool.malloc), stream:
                stream.begin_capture()
                try:
                    outputs = self.step(static_x, static_y)
                except BaseException:
                    try:
                        stream.end_capture()
                    except Exception:  # noqa: BLE001  (the step's own error is the one to report)
                        pass
                    raise
                graph = stream.end_capture()
            updated = [name for name, t in optimizer.param_steps.items() if t != counts_before.get(name, 0)]
        finally:
            optimizer.device_scalars = None
            # Nothing ran during the capture: the step it recorded is still to be taken.
            optimizer.steps, optimizer.param_steps = steps_before, counts_before
        fresh = [name for name in updated if counts_before.get(name, 0) == 0]
        if fresh:
            raise ValueError(f"GraphedStep: parameters {fresh[:4]} had never been updated before the capture; "
                             "their optimiser state and first-step rule would be frozen in the graph: warm up with "
                             "more eager steps")
        counts = {counts_before[name] for name in updated}
        if len(counts) > 1:
            raise ValueError(f"GraphedStep: the parameters have had different numbers of updates ({sorted(counts)}), "
                             "but a graph's optimiser reads one set of step values")
        self._captured = _Captured(key, graph, pool, stream, static_x, static_y, outputs, draws, scalars, updated)
        self.captures += 1

    def _replay(self, xp, x, y):
        c, optimizer = self._captured, self.optimizer
        c.static_x[...] = x
        c.static_y[...] = y
        c.draws.refill(backend.random_state(xp))
        t = optimizer.param_steps[c.updated[0]] + 1 if c.updated else 1
        # on the stream: staged at once, no wait for the device (set() without a stream would synchronise)
        c.scalars.set(np.asarray(optimizer.step_scalars(t), dtype=np.float64), stream=xp.cuda.get_current_stream())
        c.graph.launch()
        for name in c.updated:
            optimizer.param_steps[name] += 1
        optimizer.steps += 1
        self.replays += 1
        return c.outputs
