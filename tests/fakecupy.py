"""A strict, NumPy-backed stand-in for CuPy, for the tests only.

CI has no GPU, so the CuPy path of minicnn would otherwise never run before
it meets a real one. This module imitates the part of CuPy's API that minicnn
uses, and is *stricter* than a plain NumPy alias in the ways that matter:

* its arrays are a distinct type (``fakecupy.ndarray``, whose ``__module__``
  is ``"cupy"`` so :func:`minicnn.backend.get_array_module` sees a device
  array); ``numpy.asarray(a)``, ``float(a)`` of a non-scalar, and any mixing
  with NumPy arrays (``a + np_array``, ``np.concatenate([a])``, a NumPy
  index or value) raise ``TypeError``, as CuPy does;
* it records every **host sync** (``float``, ``int``, ``bool``, ``.item()``,
  ``.get()``, ``asnumpy``, ``repr``, boolean-mask indexing, ``randint`` over a
  range that is not a power of two, which CuPy samples by rejection with a
  read-back) and every **host-device copy**, each with the line of project
  code that caused it;
* it counts **launches**: one per array operation that CuPy would run as a
  kernel (element-wise operations, reductions, copies, random draws,
  ``ElementwiseKernel`` / ``RawKernel`` calls); views (reshape of contiguous
  data, transposes, basic slices) and ``empty`` allocations are free;
* ``ElementwiseKernel`` and ``RawKernel`` check their arguments against the
  declared parameters (count, array or scalar, dtypes, shapes; for a raw
  kernel the C signature parsed from the source), count one launch, and run
  the kernel as ``MINICNN_STANDIN_KERNELS`` says:

  - ``cuda``: the kernel's own CUDA source, compiled for the CPU by
    tests/cuda_on_cpu.py (blocks shuffled, barriers honoured, writes outside
    an array caught);
  - ``transliteration``: the NumPy transliteration registered for that
    kernel name (``EMULATIONS``, filled from
    :data:`minicnn.kernels.TRANSLITERATIONS`);
  - ``both`` (the default where a C++ compiler is found, and what CI runs):
    the CUDA source on the CPU, checked after every launch against the
    transliteration run on copies of the arguments; a difference raises
    :class:`KernelMismatch` naming the kernel and the argument;
* ``empty`` and ``empty_like`` return poisoned memory (NaN, or the largest
  integer), as CuPy's return whatever the memory held: code that reads an
  element it never wrote gets a NaN instead of a lucky zero;
* ``cuda.Stream.begin_capture`` / ``end_capture`` imitate CUDA stream capture
  (for ``minicnn.graphs``): the operations issued meanwhile are recorded, not
  run (memory from before keeps its contents, memory allocated meanwhile is
  poisoned afterwards), and the graph's ``launch()`` reruns them on the same
  memory with the same Python scalars and the random numbers drawn at capture;
  a host sync, a host-device copy, an operation on another stream or an
  allocation outside a private pool (``cuda.using_allocator``) is refused while
  capturing (:class:`StreamCaptureError`).

What it cannot prove: floating-point behaviour of the GPU (``-ftz``, fused
multiply-adds), the real number of kernels CuPy launches for a routine
(``einsum`` is counted as 3: two layout copies and a product), timings,
memory limits, asynchronous races between launches, or what a real capture
also refuses inside CuPy's and cuBLAS's own routines. Those need
``benchmarks/gpu_suite.sh`` on a real GPU.

Use: ``install()`` puts this module in ``sys.modules["cupy"]`` (the test
fixtures do it with ``monkeypatch``); ``ledger`` holds the records.
"""
from __future__ import annotations

import builtins
import collections
import contextlib
import math
import operator
import os
import sys
import types
import weakref

import numpy as _np

__version__ = "0.0-fakecupy"
_HERE = os.path.abspath(__file__)

# Names that are this stand-in's own test tools, not part of CuPy's API.
TEST_ONLY = {"ledger", "Ledger", "install", "EMULATIONS", "TEST_ONLY", "counting", "is_fake", "DEVICE_COUNT",
             "kernel_mode", "KernelMismatch", "KERNEL_MODES", "poison", "StreamCaptureError", "MemoryPool"}

DEVICE_COUNT = 1  # what cuda.runtime.getDeviceCount() answers (tests set 0 to imitate "no GPU")


# -- the ledger ---------------------------------------------------------------------------------
def _where() -> str:
    """``file:line`` of the first caller outside this module (the project line responsible)."""
    f = sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename) == _HERE:
        f = f.f_back
    if f is None:  # pragma: no cover
        return "?"
    return f"{os.path.relpath(f.f_code.co_filename)}:{f.f_lineno}"


class Ledger:
    """What the device was asked to do: launches, host syncs and host-device copies."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.launches: collections.Counter = collections.Counter()  # (operation, where) -> count
        self.syncs: list[tuple[str, str]] = []  # (kind, where)
        self.copies: list[tuple[str, int, str]] = []  # ("H2D" | "D2H", bytes, where)

    @property
    def n_launches(self) -> int:
        return builtins.sum(self.launches.values())

    def launch(self, name: str, n: int = 1) -> None:
        self.launches[(name, _where())] += n

    def sync(self, kind: str) -> None:
        _refuse_while_capturing(f"a host sync ({kind})")
        self.syncs.append((kind, _where()))

    def copy(self, direction: str, nbytes: int) -> None:
        _refuse_while_capturing(f"a {direction} copy")
        self.copies.append((direction, int(nbytes), _where()))

    def by_operation(self) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for (name, _), n in self.launches.items():
            out[name] += n
        return out

    def summary(self) -> str:
        syncs = collections.Counter(w for _, w in self.syncs)
        return (f"{self.n_launches} launches, {len(self.syncs)} syncs {dict(syncs)}, "
                f"{len(self.copies)} copies")


ledger = Ledger()


@contextlib.contextmanager
def counting():
    """A fresh ledger for the ``with`` block (the global one is restored afterwards)."""
    global ledger
    saved, ledger = ledger, Ledger()
    try:
        yield ledger
    finally:
        ledger = saved


def _refuse(what: str):
    raise TypeError(f"fakecupy: {what}: CuPy refuses implicit conversion between host (NumPy) and device "
                    f"arrays; use cupy.asarray(...) to copy to the device or .get() / cupy.asnumpy(...) to copy back "
                    f"(at {_where()})")


# -- arrays -------------------------------------------------------------------------------------
def _unwrap(v, what="operand"):
    if type(v) is ndarray:
        return v._a
    if isinstance(v, _np.ndarray):
        _refuse(f"{what} is a numpy.ndarray")
    if isinstance(v, list):
        return [_unwrap(i, what) for i in v]
    if isinstance(v, tuple):
        return tuple(_unwrap(i, what) for i in v)
    return v


def _wrap(r):
    if isinstance(r, _np.ndarray):
        return ndarray(r)
    if isinstance(r, _np.generic):
        return ndarray(_np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(i) for i in r)
    if isinstance(r, list):
        return [_wrap(i) for i in r]
    return r


def _binary(name, fn, reflected=False):
    def method(self, other):
        if isinstance(other, _np.ndarray):
            _refuse(f"'{name}' with a numpy.ndarray operand")
        o = _unwrap(other)
        return _op(name, (lambda a, b: fn(b, a)) if reflected else fn, self._a, o)
    method.__name__ = f"__{name}__"
    return method


def _inplace(name, fn):
    def method(self, other):
        if isinstance(other, _np.ndarray):
            _refuse(f"'{name}' with a numpy.ndarray operand")
        _op(name, fn, self._a, _unwrap(other))
        return self
    method.__name__ = f"__{name}__"
    return method


def _flat(r) -> list:
    """The arrays of an operation's result, in order (a NumPy scalar counts as a 0-d array)."""
    if type(r) is ndarray:
        return [r._a]
    if isinstance(r, _np.ndarray):
        return [r]
    if isinstance(r, _np.generic):
        return [_np.asarray(r)]
    if isinstance(r, (tuple, list)):
        return [a for item in r for a in _flat(item)]
    return []


def _op(name, fn, *args, launches=1, **kwargs):
    """One device operation: ``fn`` on the NumPy arrays behind the operands, counted as ``launches`` launches.

    While a stream captures (:meth:`_Stream.begin_capture`), it is also recorded as the graph will
    replay it: ``fn`` again on the *same* memory (the arrays are held, so a replay reads what they
    hold then) with the *same* Python scalars (a learning rate passed by value stays the captured
    one, as in a CUDA graph), its result written into the memory the capture returned.
    """
    _check_capture_stream(name)
    ledger.launch(name, launches)
    # during a capture the operands may be garbage (memory allocated by the capture): no warnings about it
    with _np.errstate(all="ignore") if _capture is not None else contextlib.nullcontext():
        out = _wrap(fn(*args, **kwargs))
    if _capture is not None:
        targets = _flat(out)

        def replay():
            for target, value in zip(targets, _flat(fn(*args, **kwargs))):
                if value is not target:
                    _np.copyto(target, value)

        _capture.ops.append((name, replay))
    return out


def _is_view(base: _np.ndarray, result: _np.ndarray) -> bool:
    return result.base is not None and _np.shares_memory(base, result)


class ndarray:
    """A device array: a NumPy array behind a wall."""

    __slots__ = ("_a",)
    __array_ufunc__ = None  # NumPy binary operators defer to ours, which refuse NumPy operands

    def __init__(self, a):
        if type(a) is not _np.ndarray:
            raise TypeError("fakecupy.ndarray wraps a numpy.ndarray; use cupy.asarray to make one")
        self._a = a
        _register(a)

    # NumPy must not see inside
    def __array__(self, *args, **kwargs):
        _refuse("numpy.asarray / numpy.array of a device array")

    def __array_function__(self, func, types_, args, kwargs):
        _refuse(f"numpy.{func.__name__} called with a device array")

    # metadata lives on the host: no sync
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):  # CuPy yields device sub-arrays
        for i in range(len(self._a)):
            yield ndarray(self._a[i : i + 1].reshape(self._a.shape[1:]))

    # host syncs
    def _scalar(self, kind):
        if self._a.size != 1:
            raise TypeError(f"fakecupy: {kind}() of a device array of shape {self._a.shape}: "
                            f"only size-1 arrays can be converted to Python scalars (at {_where()})")
        ledger.sync(kind)
        ledger.copy("D2H", self._a.itemsize)
        return self._a.reshape(()).item()

    def __float__(self):
        return float(self._scalar("float"))

    def __int__(self):
        return int(self._scalar("int"))

    def __bool__(self):
        return bool(self._scalar("bool"))

    def __complex__(self):
        return complex(self._scalar("complex"))

    def item(self):
        return self._scalar("item")

    def tolist(self):
        ledger.sync("tolist")
        ledger.copy("D2H", self._a.nbytes)
        return self._a.tolist()

    def get(self, stream=None, order="C", out=None, blocking=True):
        ledger.sync("get")
        ledger.copy("D2H", self._a.nbytes)
        return _np.array(self._a, copy=True)

    def __repr__(self):
        ledger.sync("repr")
        return "fakecupy." + repr(self._a)

    __str__ = __repr__

    def __format__(self, spec):
        if self._a.size == 1:
            return format(self._scalar("format"), spec)
        return format(repr(self), spec)

    # indexing
    def _key(self, key):
        key = key if isinstance(key, tuple) else (key,)
        out, advanced = [], False
        for k in key:
            if isinstance(k, _np.ndarray):
                _refuse("indexing a device array with a numpy.ndarray")
            if type(k) is ndarray:
                if k._a.dtype == _np.bool_:
                    ledger.sync("boolean-mask indexing")  # the result's size depends on the data
                advanced = True
                out.append(k._a)
            elif isinstance(k, list):
                advanced = True
                ledger.copy("H2D", 8 * len(k))
                out.append(k)
            else:
                out.append(k)
        return tuple(out), advanced

    def __getitem__(self, key):
        k, advanced = self._key(key)
        r = self._a[k]
        if advanced or not _is_view(self._a, r):
            return _op("getitem (gather)", lambda a, k: _np.array(a[k]), self._a, k)
        return _wrap(r)

    def __setitem__(self, key, value):
        if isinstance(value, _np.ndarray):
            _refuse("assigning a numpy.ndarray into a device array")
        k, _ = self._key(key)
        _op("setitem", operator.setitem, self._a, k, _unwrap(value))

    # views and copies
    def reshape(self, *shape, order="C"):
        r = self._a.reshape(*shape, order=order)
        if not _is_view(self._a, r):
            return _op("reshape (copy)", lambda a: a.reshape(*shape, order=order), self._a)
        return ndarray(r)

    def ravel(self, order="C"):
        return self.reshape(-1, order=order)

    def transpose(self, *axes):
        return ndarray(self._a.transpose(*axes))

    def swapaxes(self, a, b):
        return ndarray(self._a.swapaxes(a, b))

    def view(self, dtype=None):
        return ndarray(self._a.view(dtype))

    def copy(self, order="C"):
        return _op("copy", lambda a: a.copy(order=order), self._a)

    def flatten(self, order="C"):
        return _op("copy", lambda a: a.flatten(order=order), self._a)

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and _np.dtype(dtype) == self._a.dtype:
            return self
        return _op("astype", lambda a: a.astype(dtype, order=order, copy=True), self._a)

    def fill(self, value):
        _op("fill", _np.ndarray.fill, self._a, value)

    def set(self, arr, stream=None):
        """Copy the host array ``arr`` into this one (CuPy asks for the same shape and dtype)."""
        if not isinstance(arr, _np.ndarray):
            raise TypeError(f"fakecupy: ndarray.set takes a numpy.ndarray, got {type(arr).__name__}")
        if arr.shape != self._a.shape or arr.dtype != self._a.dtype:
            raise ValueError(f"fakecupy: ndarray.set: shape/dtype mismatch: this array is {self._a.shape} "
                             f"{self._a.dtype}, the host one {arr.shape} {arr.dtype}")
        ledger.copy("H2D", arr.nbytes)
        self._a[...] = arr

    def dot(self, b, out=None):
        return _op("dot", lambda a, b, out: a.dot(b, out=out), self._a, _unwrap(b), _unwrap(out))

    def __dlpack__(self, *a, **k):  # pragma: no cover - not used by minicnn
        raise NotImplementedError("fakecupy has no DLPack")


def _reduction(name):
    def method(self, *args, **kwargs):
        kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
        return _op(name, getattr(_np.ndarray, name), self._a, *args, **kwargs)
    method.__name__ = name
    return method


for _name in ("sum", "mean", "max", "min", "argmax", "argmin", "var", "std", "prod", "any", "all", "cumsum",
              "clip", "round"):
    setattr(ndarray, _name, _reduction(_name))

_OPS = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow, "matmul": operator.matmul,
    "and": operator.and_, "or": operator.or_, "xor": operator.xor,
}
for _name, _fn in _OPS.items():
    setattr(ndarray, f"__{_name}__", _binary(_name, _fn))
    setattr(ndarray, f"__r{_name}__", _binary(_name, _fn, reflected=True))
for _name, _fn in {"add": operator.iadd, "sub": operator.isub, "mul": operator.imul, "truediv": operator.itruediv,
                   "floordiv": operator.ifloordiv, "mod": operator.imod, "pow": operator.ipow,
                   "and": operator.iand, "or": operator.ior, "xor": operator.ixor}.items():
    setattr(ndarray, f"__i{_name}__", _inplace(_name, _fn))
for _name, _fn in {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
                   "eq": operator.eq, "ne": operator.ne}.items():
    setattr(ndarray, f"__{_name}__", _binary(_name, _fn))
for _name, _fn in {"neg": operator.neg, "pos": operator.pos, "abs": operator.abs, "invert": operator.invert}.items():
    def _unary(self, _fn=_fn, _name=_name):
        return _op(_name, _fn, self._a)
    setattr(ndarray, f"__{_name}__", _unary)
ndarray.__hash__ = None
ndarray.__module__ = "cupy"  # get_array_module() recognises device arrays by their module


def is_fake(a) -> bool:
    return type(a) is ndarray


# -- module functions ---------------------------------------------------------------------------
def _function(name, fn, launches=1, view=False):
    def f(*args, **kwargs):
        args = _unwrap(args, f"argument of cupy.{name}")
        kwargs = {k: _unwrap(v, f"argument {k}= of cupy.{name}") for k, v in kwargs.items()}
        if launches:
            return _op(name, fn, *args, launches=launches, **kwargs)
        return _wrap(fn(*args, **kwargs))
    f.__name__ = f.__qualname__ = name
    return f


_ELEMENTWISE = ("add", "subtract", "multiply", "divide", "true_divide", "floor_divide", "power", "sqrt", "square",
                "exp", "log", "log1p", "expm1", "abs", "absolute", "negative", "sign", "maximum", "minimum", "where",
                "clip", "floor", "ceil", "cos", "sin", "tanh", "deg2rad", "isfinite", "isnan", "greater", "less",
                "equal", "logical_and", "logical_or", "logical_not", "mod")
_REDUCTIONS = ("sum", "mean", "max", "min", "argmax", "argmin", "prod", "count_nonzero", "cumsum", "bincount", "var",
               "std", "any", "all", "sort", "argsort", "dot", "matmul", "tensordot", "stack", "concatenate",
               "take", "pad", "full_like", "zeros_like", "ones_like", "zeros", "ones", "full", "arange", "eye",
               "linspace", "flip", "array_equal", "isclose", "allclose", "outer", "tile", "repeat", "rot90",
               "unique", "nonzero")
_VIEWS = ("transpose", "swapaxes", "moveaxis", "expand_dims", "squeeze", "broadcast_to", "reshape", "ravel")
for _name in _ELEMENTWISE + _REDUCTIONS:
    globals()[_name] = _function(_name, getattr(_np, _name))
for _name in _VIEWS:
    globals()[_name] = _function(_name, getattr(_np, _name), launches=0)
einsum = _function("einsum", _np.einsum, launches=3)  # CuPy copies both operands to a transposed layout, then a GEMM


def poison(a: _np.ndarray) -> _np.ndarray:
    """Fill ``a`` with what uninitialised memory may hold: NaN, or the largest integer (False for bool)."""
    if a.dtype.kind in "fc":
        a.fill(_np.nan)
    elif a.dtype.kind in "iu":
        a.fill(_np.iinfo(a.dtype).max)
    else:
        a.fill(0)
    return a


def empty(shape, dtype=float, order="C"):
    return ndarray(poison(_np.empty(shape, dtype=dtype, order=order)))


def empty_like(prototype, dtype=None, order="K", subok=None, shape=None):
    return ndarray(poison(_np.empty_like(_unwrap(prototype), dtype=dtype, order=order, shape=shape)))


def ascontiguousarray(a, dtype=None):
    src = _unwrap(a, "argument of cupy.ascontiguousarray")
    if src.flags.c_contiguous and (dtype is None or _np.dtype(dtype) == src.dtype):
        return a
    return _op("ascontiguousarray", lambda a: _np.ascontiguousarray(a, dtype=dtype), src)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, blocking=False):
    if type(obj) is ndarray:
        if not copy and (dtype is None or _np.dtype(dtype) == obj.dtype):
            return obj
        return _op("copy", lambda a: _np.array(a, dtype=dtype, copy=True, order=order, ndmin=ndmin), obj._a)
    if isinstance(obj, (list, tuple)) and builtins.any(type(i) is ndarray for i in obj):
        _refuse("cupy.array of a list holding device arrays (use cupy.stack)")
    host = _np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    ledger.copy("H2D", host.nbytes)
    return ndarray(host)


def asarray(a, dtype=None, order=None, blocking=False):
    if type(a) is ndarray:
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    return array(a, dtype=dtype, copy=True, order=order or "K")


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if type(a) is ndarray:
        return a.get()
    return _np.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if builtins.any(type(a) is ndarray for a in args) else _np


# dtypes and constants are NumPy's (CuPy uses them too)
float16, float32, float64 = _np.float16, _np.float32, _np.float64
int8, int16, int32, int64 = _np.int8, _np.int16, _np.int32, _np.int64
uint8, uint32, uint64 = _np.uint8, _np.uint32, _np.uint64
bool_, dtype, newaxis = _np.bool_, _np.dtype, _np.newaxis
pi, inf, nan, e = _np.pi, _np.inf, _np.nan, _np.e

linalg = types.SimpleNamespace(norm=_function("linalg.norm", _np.linalg.norm))


def _as_strided(x, shape=None, strides=None):
    return ndarray(_np.lib.stride_tricks.as_strided(_unwrap(x), shape=shape, strides=strides))


lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(as_strided=_as_strided))


# -- random -------------------------------------------------------------------------------------
class _RandomState:
    """CuPy's ``RandomState`` methods, drawing from NumPy's (other numbers than CuPy's cuRAND)."""

    def __init__(self, seed=None, method=None):
        self._rs = _np.random.RandomState(seed)

    def seed(self, seed=None):
        self._rs.seed(seed)

    def _draw(self, name, values, launches=1):
        # Captured in a graph, a draw is replayed with the numbers drawn at capture (as cuRAND's offset,
        # advanced on the host, is baked into the captured kernel): the same numbers at every replay.
        values = _np.asarray(values)
        baked = values.copy()
        return _op(f"random.{name}", lambda: baked.copy(), launches=launches)

    def rand(self, *size, dtype=float):
        return self._draw("rand", self._rs.random_sample(size).astype(dtype))

    def randn(self, *size, dtype=float):
        return self._draw("randn", self._rs.standard_normal(size).astype(dtype))

    def random_sample(self, size=None, dtype=float):
        return self._draw("random_sample", _np.asarray(self._rs.random_sample(size)).astype(dtype))

    def uniform(self, low=0.0, high=1.0, size=None, dtype=float):
        # CuPy draws random_sample, then scales and shifts it: three launches
        return self._draw("uniform", _np.asarray(self._rs.uniform(low, high, size)).astype(dtype), launches=3)

    def normal(self, loc=0.0, scale=1.0, size=None, dtype=float):
        return self._draw("normal", _np.asarray(self._rs.normal(loc, scale, size)).astype(dtype))

    def standard_normal(self, size=None, dtype=float):
        return self._draw("standard_normal", _np.asarray(self._rs.standard_normal(size)).astype(dtype))

    def randint(self, low, high=None, size=None, dtype=int):
        lo, hi = (0, low) if high is None else (low, high)
        span = int(hi) - int(lo)
        if span & (span - 1):  # CuPy samples such a range by rejection and reads the count back every call
            ledger.sync(f"randint over {span} values (not a power of two)")
        return self._draw("randint", _np.asarray(self._rs.randint(lo, hi, size)).astype(dtype))

    def permutation(self, a):
        if not isinstance(a, int):
            raise TypeError("fakecupy: RandomState.permutation takes an int here")
        return self._draw("permutation", self._rs.permutation(a))


random = types.SimpleNamespace(RandomState=_RandomState)


# -- cuda ---------------------------------------------------------------------------------------
class _Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    compute_capability = "90"

    def synchronize(self):
        ledger.sync("Device.synchronize")


class CUDARuntimeError(RuntimeError):
    pass


def _get_device_count():
    if DEVICE_COUNT == 0:
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected (fakecupy)")
    return DEVICE_COUNT


# -- streams, private memory pools and graph capture -------------------------------------------
# What CUDA stream capture means, imitated: between begin_capture() and end_capture() the operations
# issued on the capturing stream are recorded, not executed (memory that existed before the capture
# is left as it was, and memory allocated during it holds garbage afterwards); the graph's launch()
# replays them on the same memory with the same scalar arguments. A host sync or a host-device copy
# during a capture is refused (CUDA invalidates the capture), as is an operation issued on another
# stream (it would run at once instead of entering the graph) and an allocation from the default
# memory pool (after the capture, the pool would hand the graph's memory to other arrays).
class StreamCaptureError(CUDARuntimeError):
    """What CUDA answers to an operation that a stream capture does not permit."""


_live: dict = {}  # id(root array) -> weakref: every NumPy buffer behind a device array
_capture = None  # the _Capture in progress, if any
_allocator = None  # the allocator cuda.using_allocator() made current (None: the default pool)


def _root(a: _np.ndarray) -> _np.ndarray:
    while isinstance(a.base, _np.ndarray):
        a = a.base
    return a


def _register(a: _np.ndarray) -> None:
    root = _root(a)
    key = id(root)
    if key in _live:
        return
    if _capture is not None:
        if _allocator is None:
            raise StreamCaptureError(
                f"fakecupy: an array of {root.nbytes} bytes allocated from the default memory pool while a stream "
                f"captures (at {_where()}): after the capture that pool would give the graph's memory to other "
                "arrays; allocate from a private pool (cupy.cuda.using_allocator(pool.malloc))")
        pool = getattr(_allocator, "__self__", None)
        if isinstance(pool, MemoryPool):
            pool._used += root.nbytes
    _live[key] = weakref.ref(root, lambda _, key=key: _live.pop(key, None))


def _refuse_while_capturing(what: str) -> None:
    if _capture is not None:
        raise StreamCaptureError(f"fakecupy: {what} while a stream captures (at {_where()}): "
                                 "cudaErrorStreamCaptureUnsupported; the capture is invalidated")


def _check_capture_stream(name: str) -> None:
    if _capture is not None and _current[-1] is not _capture.stream:
        raise StreamCaptureError(f"fakecupy: {name!r} issued on another stream while a stream captures "
                                 f"(at {_where()}): it would run now instead of entering the graph")


class _Capture:
    def __init__(self, stream):
        self.stream, self.ops = stream, []
        # strong references: no buffer that existed before can die, and give its id to a new one, meanwhile
        self.before = {key: (root, root.copy()) for key, ref in list(_live.items()) if (root := ref()) is not None}


class _Graph:
    """``cupy.cuda.Graph``: what a capture recorded, replayed by :meth:`launch`."""

    def __init__(self, ops):
        self.ops = ops

    def launch(self, stream=None):
        _refuse_while_capturing("a graph launch")
        ledger.launch("graph launch")
        for _, replay in self.ops:
            replay()

    def upload(self, stream=None):
        pass


class _Stream:
    """``cupy.cuda.Stream``: ``with stream:`` makes it current; it can capture a graph."""

    _next_ptr = 2  # 0 is the legacy default stream (CuPy refuses to capture on it)

    def __init__(self, null=False, non_blocking=False, ptds=False):
        if null:
            self.ptr = 0
        else:
            self.ptr, _Stream._next_ptr = _Stream._next_ptr, _Stream._next_ptr + 1

    def __enter__(self):
        _current.append(self)
        return self

    def __exit__(self, *exc):
        _current.pop()
        return False

    def use(self):
        _current[-1] = self
        return self

    def synchronize(self):
        ledger.sync("Stream.synchronize")

    def begin_capture(self, mode=None):
        global _capture
        if self.ptr == 0:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if _capture is not None:
            raise StreamCaptureError("fakecupy: a stream is capturing already")
        _capture = _Capture(self)

    def is_capturing(self):
        return _capture is not None and _capture.stream is self

    def end_capture(self):
        global _capture
        if not self.is_capturing():
            raise StreamCaptureError("fakecupy: end_capture() on a stream that does not capture")
        capture, _capture = _capture, None
        for root, saved in capture.before.values():  # nothing ran: memory from before holds what it held
            _np.copyto(root, saved)
        for key, ref in list(_live.items()):  # memory from during it: whatever it happens to hold
            root = ref()
            if key not in capture.before and root is not None and root.flags.writeable:
                poison(root)
        return _Graph(capture.ops)


_Stream.null = _Stream(null=True)
_current = [_Stream.null]


def _get_current_stream():
    return _current[-1]


class MemoryPool:
    """``cupy.cuda.MemoryPool``: a private pool for ``using_allocator``; counts the bytes allocated from it."""

    def __init__(self, allocator=None):
        self._used = 0

    def malloc(self, size):
        raise NotImplementedError("fakecupy: arrays here are NumPy's; the pool only counts what is allocated "
                                  "while its malloc is the current allocator")

    def used_bytes(self):
        return self._used

    def total_bytes(self):
        return self._used

    def free_all_blocks(self, stream=None):
        pass


@contextlib.contextmanager
def _using_allocator(allocator=None):
    global _allocator
    saved, _allocator = _allocator, allocator
    try:
        yield
    finally:
        _allocator = saved


cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(
        getDeviceCount=lambda: _get_device_count(),
        getDeviceProperties=lambda device: {"name": b"fakecupy (NumPy stand-in, no GPU)", "major": 9, "minor": 0},
        CUDARuntimeError=CUDARuntimeError,
    ),
    Stream=_Stream,
    Device=_Device,
    MemoryPool=MemoryPool,
    using_allocator=_using_allocator,
    get_current_stream=_get_current_stream,
)


# -- user kernels -------------------------------------------------------------------------------
EMULATIONS: dict = {}  # kernel name -> NumPy transliteration (filled by install() from minicnn.kernels)
KERNEL_MODES = ("both", "cuda", "transliteration")

_CTYPES = {"float": _np.float32, "double": _np.float64, "int": _np.int32, "long long": _np.int64,
           "unsigned char": _np.uint8, "bool": _np.bool_, "float32": _np.float32, "float64": _np.float64,
           "int32": _np.int32, "int64": _np.int64, "uint8": _np.uint8}
_C_NAMES = {_np.dtype(_np.float32): "float", _np.dtype(_np.float64): "double"}


class KernelMismatch(AssertionError):
    """The CUDA source, run on the CPU, computed something else than the kernel's NumPy transliteration."""


def kernel_mode() -> str:
    """How user kernels run: ``$MINICNN_STANDIN_KERNELS``, else ``both`` where a C++ compiler is found."""
    mode = os.environ.get("MINICNN_STANDIN_KERNELS")
    if mode is None:
        import cuda_on_cpu  # noqa: PLC0415  (tests/ is on the path wherever this module is)

        try:
            cuda_on_cpu.compiler()
            return "both"
        except cuda_on_cpu.CudaOnCpuUnavailable:
            return "transliteration"
    if mode not in KERNEL_MODES:
        raise ValueError(f"MINICNN_STANDIN_KERNELS must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    return mode


_CPU_KERNELS: dict = {}
_LAUNCH_SEED = [0]


def _cpu_kernel(source, name, signature=None):
    import cuda_on_cpu  # noqa: PLC0415

    key = (source, name)
    if key not in _CPU_KERNELS:
        _CPU_KERNELS[key] = cuda_on_cpu.CpuKernel(source, name, signature)
    return _CPU_KERNELS[key]


def _copies(arrays):
    """Copies of the arguments for the transliteration; an array passed twice stays one array."""
    memo: dict = {}
    return [memo.setdefault(id(a), a.copy()) if isinstance(a, _np.ndarray) else a for a in arrays]


def _compare(kernel, names, cuda_values, reference_values):
    for pname, got, want in zip(names, cuda_values, reference_values):
        if not isinstance(got, _np.ndarray):
            continue
        got, want = _np.atleast_1d(got), _np.atleast_1d(want)  # argwhere of a 0-d array has no index to report
        if got.dtype.kind == "f":
            # float32 (float64) rounding of the same formula, summed in another order in the reductions
            rtol, atol = (1e-5, 1e-6) if got.dtype == _np.float32 else (1e-10, 1e-12)
            finite = _np.abs(want[_np.isfinite(want)])
            scale = builtins.max(float(finite.max()) if finite.size else 1.0, 1.0)
            bad = _np.argwhere(~_np.isclose(got, want, rtol=rtol, atol=atol * scale, equal_nan=True))
        else:
            bad = _np.argwhere(got != want)
        if bad.size:
            where = tuple(int(i) for i in bad[0])
            raise KernelMismatch(
                f"fakecupy: kernel {kernel!r}: its CUDA source, run on the CPU, and its NumPy transliteration "
                f"disagree on argument {pname!r} ({len(bad)} of {got.size} elements; first at {where}: "
                f"CUDA {got[where]}, transliteration {want[where]}) (at {_where()})")


def _run_user_kernel(name, names, arrays, run_cuda, launch=()):
    """Run a kernel per :func:`kernel_mode` on the unwrapped ``arrays`` (updated in place).

    ``launch``: what a raw kernel's transliteration takes before its arguments (grid, block).
    """
    mode = kernel_mode()
    if mode == "transliteration":
        _emulation(name)(*launch, *arrays)
        return
    reference = None
    if mode == "both":
        reference = _copies(arrays)
        _emulation(name)(*launch, *reference)
    _LAUNCH_SEED[0] += 1
    run_cuda(_LAUNCH_SEED[0])
    if reference is not None:
        _compare(name, names, arrays, reference)


def _parse_params(spec: str):
    """``[(raw, type, name), ...]``, read as minicnn's NVRTC harness reads them (one parser for both)."""
    from minicnn import kernels  # noqa: PLC0415

    try:
        return kernels.parse_elementwise_params(spec)
    except ValueError as exc:
        raise ValueError(f"fakecupy: {exc}") from None


def _emulation(name):
    if name not in EMULATIONS:
        raise NotImplementedError(f"fakecupy: kernel {name!r} has no NumPy transliteration registered "
                                  f"(minicnn.kernels.TRANSLITERATIONS)")
    return EMULATIONS[name]


class ElementwiseKernel:
    """``cupy.ElementwiseKernel``: checks the call against the parameters, then runs the kernel (see the module)."""

    def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True, preamble="",
                 no_return=False, return_tuple=False, loop_prep="", after_loop="", **kwargs):
        self.in_spec, self.out_spec = in_params, out_params
        self.in_params, self.out_params = _parse_params(in_params), _parse_params(out_params)
        self.operation, self.name, self.preamble = operation, name, preamble
        self.no_return, self.return_tuple = no_return, return_tuple

    def __call__(self, *args, size=None, block_size=None, stream=None):
        params = self.in_params + self.out_params
        if len(args) != len(params):
            raise TypeError(f"fakecupy: kernel {self.name!r} takes {len(params)} arguments "
                            f"({', '.join(p[2] for p in params)}) with its outputs, got {len(args)}")
        placeholders: dict = {}
        shapes = []
        for (raw, ctype, pname), a in zip(params, args):
            if isinstance(a, _np.ndarray):
                _refuse(f"kernel {self.name!r} argument {pname!r} is a numpy.ndarray")
            if type(a) is ndarray:
                if ctype in _CTYPES and a.dtype != _CTYPES[ctype]:
                    raise TypeError(f"fakecupy: kernel {self.name!r} argument {pname!r} must be {ctype}, got {a.dtype}")
                if ctype not in _CTYPES:
                    if placeholders.setdefault(ctype, a.dtype) != a.dtype:
                        raise TypeError(f"fakecupy: kernel {self.name!r}: type {ctype} is both "
                                        f"{placeholders[ctype]} and {a.dtype} (argument {pname!r})")
                if not raw:
                    shapes.append(a.shape)
            elif (raw, ctype, pname) in self.out_params:
                raise TypeError(f"fakecupy: kernel {self.name!r} output {pname!r} must be a device array")
        shape = ()
        if shapes:
            try:
                shape = _np.broadcast_shapes(*shapes)
            except ValueError:
                raise ValueError(f"fakecupy: kernel {self.name!r}: argument shapes {shapes} do not broadcast") from None
            out_shapes = [a.shape for (raw, _, _), a in zip(self.out_params, args[len(self.in_params):])
                          if type(a) is ndarray and not raw]
            if builtins.any(s != shape for s in out_shapes):
                raise ValueError(f"fakecupy: kernel {self.name!r}: outputs {out_shapes} are not of the broadcast "
                                 f"shape {shape}")
        arrays = [_unwrap(a) for a in args]
        names = [p[2] for p in params]
        _op(f"ElementwiseKernel {self.name}", lambda: _run_user_kernel(
            self.name, names, arrays, lambda seed: self._run_cuda(arrays, placeholders, shape, seed)))
        outs = args[len(self.in_params):]
        if self.no_return:
            return None
        return outs[0] if len(outs) == 1 and not self.return_tuple else tuple(outs)

    def _run_cuda(self, arrays, placeholders, shape, seed):
        """The body in CuPy's harness (minicnn.kernels.elementwise_source), compiled and run on the CPU."""
        from minicnn import kernels  # noqa: PLC0415

        ctype = _C_NAMES.get(_np.dtype(placeholders.get("T", _np.float32)), "float")
        params = self.in_params + self.out_params
        as_arrays = {pname for (raw, typ, pname), a in zip(params, arrays)
                     if not raw and typ != "T" and isinstance(a, _np.ndarray)}
        source, signature = kernels.elementwise_source(self.name, self.in_spec, self.out_spec, self.operation,
                                                       ctype, as_arrays)
        passed, write_back = [], []
        for k, ((raw, typ, pname), a) in enumerate(zip(params, arrays)):
            is_out = k >= len(self.in_params)
            if not isinstance(a, _np.ndarray):
                passed.append(a)
                continue
            # CuPy indexes each non-raw array at i of the broadcast shape, and a raw one by its C-order index
            view = a if raw or is_out or a.shape == shape else _np.broadcast_to(a, shape)
            flat = _np.ascontiguousarray(view)
            if is_out and not _np.shares_memory(flat, a):
                write_back.append((a, flat))
            passed.append(flat)
        n = math.prod(shape)
        if n:
            block = 128
            _cpu_kernel(source, self.name, signature)(((n + block - 1) // block,), (block,),
                                                      [*passed, _np.int64(n)], seed=seed)
        for a, flat in write_back:
            a[...] = flat.reshape(a.shape)


def _c_params(code: str, name: str):
    """``[(C type, is pointer, name), ...]`` of the kernel's C signature (parsed as tests/cuda_on_cpu.py does)."""
    import cuda_on_cpu  # noqa: PLC0415

    try:
        return cuda_on_cpu.raw_signature(code, name)
    except ValueError as exc:
        raise ValueError(f"fakecupy: {exc}") from None


class RawKernel:
    """``cupy.RawKernel``: checks the arguments against the C signature, then runs the kernel (see the module)."""

    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, jitify=False):
        self.code, self.name, self.options = code, name, tuple(options)
        self.params = _c_params(code, name)

    def __call__(self, grid, block, args, *, shared_mem=0):
        if len(args) != len(self.params):
            raise TypeError(f"fakecupy: raw kernel {self.name!r} takes {len(self.params)} arguments, got {len(args)}")
        for (ctype, pointer, pname), a in zip(self.params, args):
            want = _CTYPES.get(ctype)
            if pointer:
                if type(a) is not ndarray:
                    raise TypeError(f"fakecupy: raw kernel {self.name!r} argument {pname!r} ({ctype}*) "
                                    f"must be a device array, got {type(a).__name__}")
                if want is not None and a.dtype != want:
                    raise TypeError(f"fakecupy: raw kernel {self.name!r} argument {pname!r} is {ctype}*, "
                                    f"got a {a.dtype} array")
                if not a.flags.c_contiguous:
                    raise ValueError(f"fakecupy: raw kernel {self.name!r} argument {pname!r} must be C-contiguous")
            else:
                if not isinstance(a, _np.generic) or (want is not None and a.dtype != want):
                    raise TypeError(f"fakecupy: raw kernel {self.name!r} scalar {pname!r} is {ctype}: pass "
                                    f"numpy.{_np.dtype(want).name}(...) (got {type(a).__name__}); a Python "
                                    f"number would be passed with the wrong width")
        if builtins.any(int(g) < 1 for g in grid) or builtins.any(int(b) < 1 for b in block) or math.prod(block) > 1024:
            raise ValueError(f"fakecupy: raw kernel {self.name!r}: bad launch grid {grid} block {block}")
        grid, block = tuple(int(g) for g in grid), tuple(int(b) for b in block)
        arrays = [_unwrap(a) for a in args]
        names = [p[2] for p in self.params]
        _op(f"RawKernel {self.name}", lambda: _run_user_kernel(
            self.name, names, arrays, lambda seed: self._run_cuda(grid, block, arrays, seed), launch=(grid, block)))
        return None

    def _run_cuda(self, grid, block, arrays, seed):
        _cpu_kernel(self.code, self.name)(grid, block, arrays, seed=seed)


def fuse(*args, **kwargs):  # pragma: no cover - minicnn does not use cupy.fuse
    raise NotImplementedError("fakecupy: cupy.fuse is not emulated (minicnn uses ElementwiseKernel / RawKernel)")


# -- installation -------------------------------------------------------------------------------
def install(monkeypatch=None):
    """Make ``import cupy`` return this module (with ``monkeypatch``: for one test only)."""
    from minicnn import kernels  # noqa: PLC0415

    EMULATIONS.update(kernels.TRANSLITERATIONS)
    module = sys.modules[__name__]
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, "cupy", module)
    else:
        sys.modules["cupy"] = module
    return module
