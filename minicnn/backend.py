"""Array backend: one code path for NumPy (CPU) and CuPy (GPU).

Every layer finds the array module of its input with :func:`get_array_module`
(Chainer's ``xp`` idiom), so the same ``forward``/``backward`` runs on either
device; nothing in the layers ever asks "am I on the GPU?".

The *active* backend only matters where arrays are created from nothing:
parameter initialisation, data batches moved to the device and the random
streams used by dropout and augmentation.

    >>> import minicnn
    >>> minicnn.set_backend("numpy")       # or "cupy"
    >>> minicnn.seed(0)                    # seeds NumPy, and CuPy when active
    >>> minicnn.set_default_dtype("float64")  # for gradient checks

``import minicnn`` never imports CuPy; asking for it where it is missing
raises :class:`BackendUnavailableError` with the install command.
"""
from __future__ import annotations

import contextlib

import numpy as np

__all__ = [
    "BackendUnavailableError",
    "set_backend",
    "get_backend",
    "get_xp",
    "get_array_module",
    "to_device",
    "to_host",
    "to_array_module",
    "module_of",
    "seed",
    "get_seed",
    "random_state",
    "using_random_state",
    "set_default_dtype",
    "get_default_dtype",
    "cupy_available",
    "cupy_importable",
    "use_heap_allocator",
]

_BACKENDS = ("numpy", "cupy")
_state = {"name": "numpy", "xp": np, "dtype": np.dtype(np.float32), "seed": 0}
_random_states: dict = {}


class BackendUnavailableError(RuntimeError):
    """Raised when the CuPy backend is requested but CuPy or a GPU is missing."""


INSTALL_HINT = ("from the minicnn checkout, pip install -e '.[gpu]' (CuPy for CUDA 12 with its CUDA libraries: "
                "cupy-cuda12x[ctk]); for CUDA 13, pip install 'cupy-cuda13x[ctk]'")
_probed: set = set()


def _import_cupy():
    try:
        import cupy  # noqa: PLC0415  (imported lazily on purpose)
    except ImportError as exc:  # depends on the machine
        raise BackendUnavailableError(f"the 'cupy' backend needs CuPy, which is not installed: {INSTALL_HINT}") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # depends on the machine
        raise BackendUnavailableError(
            f"CuPy is installed but no CUDA device is usable ({type(exc).__name__}: {exc}); the 'cupy' backend "
            "needs an NVIDIA GPU and its driver (nvidia-smi should list the GPU)") from exc
    if count == 0:
        raise BackendUnavailableError("CuPy is installed but no CUDA device was found (nvidia-smi should list one)")
    if id(cupy) not in _probed:
        _probe_libraries(cupy)
        _probed.add(id(cupy))
    return cupy


def _probe_libraries(cupy) -> None:
    """Fail now, not mid-training, when a CUDA library CuPy loads on first use is missing.

    A plain ``cupy-cuda12x`` wheel brings none of cuBLAS, cuRAND and NVRTC:
    without a CUDA toolkit it imports, sees the GPU, and fails at the first
    matrix product. One tiny use of each library, then a sync so errors surface.
    """
    from . import kernels  # noqa: PLC0415  (the probe kernel's source lives with the other kernels)

    checks = [
        ("cuBLAS (matrix products)", lambda: cupy.ones((2, 2), dtype=np.float32) @ cupy.ones((2, 2), dtype=np.float32)),
        ("cuRAND (random draws)", lambda: cupy.random.RandomState(0).random_sample((4,), dtype=np.float32)),
        ("NVRTC (run-time compilation of minicnn's kernels)", lambda: kernels.probe(cupy)),
    ]
    for what, check in checks:
        try:
            float(check().sum())
        except Exception as exc:  # noqa: BLE001 - any failure means the backend is unusable
            raise BackendUnavailableError(
                f"CuPy {getattr(cupy, '__version__', '?')} sees a GPU, but {what} failed "
                f"({type(exc).__name__}: {exc}); install CuPy with its CUDA libraries: {INSTALL_HINT}") from exc


def cupy_importable() -> bool:
    """True when a package named ``cupy`` can be imported (says nothing about a GPU; never raises)."""
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if "cupy" in sys.modules:
        return sys.modules["cupy"] is not None
    return importlib.util.find_spec("cupy") is not None


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU (never raises)."""
    try:
        _import_cupy()
    except BackendUnavailableError:
        return False
    return True


def set_backend(name: str):
    """Make ``"numpy"`` or ``"cupy"`` the active backend and return its module.

    Parameters:
        name: ``"numpy"`` (CPU) or ``"cupy"`` (GPU; raises :class:`BackendUnavailableError`
            with the install command when CuPy or a GPU is missing).
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {_BACKENDS}")
    xp = np if name == "numpy" else _import_cupy()
    _state["name"], _state["xp"] = name, xp
    return xp


def get_backend() -> str:
    """Name of the active backend: ``"numpy"`` or ``"cupy"``."""
    return _state["name"]


def get_xp():
    """The array module of the active backend (``numpy`` or ``cupy``)."""
    return _state["xp"]


def get_array_module(*arrays):
    """The array module (``numpy`` or ``cupy``) that owns ``arrays``.

    Parameters:
        arrays: any arrays or scalars; the first CuPy array decides.

    Falls back to NumPy for host arrays and Python scalars, and never imports
    CuPy unless one of the arrays already is a CuPy array.
    """
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy  # noqa: PLC0415

            return cupy
    return np


def to_device(x, dtype=None):
    """Copy ``x`` to the active backend (no copy when it is already there).

    Shapes: x (any) -> the same shape, on the active backend's device.

    Parameters:
        x: a NumPy or CuPy array (or anything ``asarray`` takes).
        dtype: cast to this dtype on the way (None: keep x's).
    """
    xp = get_xp()
    if xp is np:
        x = to_host(x)
        return x if dtype is None else x.astype(dtype, copy=False)
    return xp.asarray(x, dtype=dtype)


def to_array_module(x, xp, dtype=None):
    """``x`` as an array of the module ``xp`` (``numpy`` or ``cupy``), copied only where needed.

    Use this rather than :func:`to_device` where the destination is a model's
    own device (``xp = module_of(model)``), not the active backend: a NumPy
    model keeps working while the CuPy backend is active, and vice versa.
    """
    if xp is np:
        x = to_host(x)
        return x if dtype is None else x.astype(dtype, copy=False)
    return xp.asarray(x, dtype=dtype)


def module_of(model):
    """The array module of a layer's or model's parameters (NumPy for a model without any)."""
    arrays = list(model.params.values()) + list(model.buffers.values())
    return get_array_module(*arrays)


def to_host(x):
    """Return ``x`` as a NumPy array (copying from the GPU if needed).

    Shapes: x (any) -> the same shape, in host memory.

    Parameters:
        x: a NumPy or CuPy array.
    """
    if get_array_module(x) is not np:
        return x.get()
    return np.asarray(x)


def set_default_dtype(dtype) -> None:
    """Dtype of new parameters: float32 (default) or float64 (for gradient checks).

    Parameters:
        dtype: ``"float32"`` / ``numpy.float32`` or ``"float64"`` / ``numpy.float64``.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"default dtype must be float32 or float64, got {dtype}")
    _state["dtype"] = dtype


def get_default_dtype() -> np.dtype:
    """The dtype new parameters are created with (see :func:`set_default_dtype`)."""
    return _state["dtype"]


def seed(value: int) -> None:
    """Seed the random streams of every backend (initialisation, dropout, augmentation).

    Parameters:
        value: the seed; the streams restart from it (:func:`random_state`).
    """
    _state["seed"] = int(value)
    _random_states.clear()


def get_seed() -> int:
    return _state["seed"]


def random_state(xp=None):
    """The seeded ``RandomState`` of backend ``xp`` (default: the active one).

    NumPy and CuPy both offer ``RandomState`` with the same methods
    (``rand``, ``randn``, ``randint``, ``uniform``, ``permutation``), so code
    that draws from it is backend-generic.
    """
    xp = get_xp() if xp is None else xp
    key = xp.__name__
    if key not in _random_states:
        _random_states[key] = xp.random.RandomState(_state["seed"])
    return _random_states[key]


@contextlib.contextmanager
def using_random_state(xp, rng):
    """Within the block, :func:`random_state` of backend ``xp`` returns ``rng``; afterwards the stream it replaced.

    For :class:`minicnn.graphs.GraphedStep`, whose capture hands the step's draws fixed buffers.
    """
    key = xp.__name__
    saved = _random_states.get(key)
    _random_states[key] = rng
    try:
        yield rng
    finally:
        if saved is None:
            _random_states.pop(key, None)
        else:
            _random_states[key] = saved


def use_heap_allocator(trim_threshold: int | None = None) -> bool:
    """Make glibc serve large arrays from its heap and keep freed memory for reuse.

    Why: by default glibc maps every allocation above 32 MB fresh from the
    kernel and hands it back when freed. A CNN training step allocates many
    activation arrays of that size (hw3_cnn at batch 128: 37 MB per 32-channel
    48x48 map), so each step pays tens of thousands of page faults just to
    touch new memory. With mmap off and trimming off, freed blocks are reused
    instead (on the 2-core development machines this made a NumPy hw3_cnn step
    about 10-15 % faster, a vgg_fer_slim step 1.2-1.3x, and evaluating dlcv_cnn
    on PublicTest 1.6-2.2x faster: the kernel's time fell from 17-24 s to 3-4 s;
    README's "Freed memory, reused" has the commands).

    Parameters:
        trim_threshold: None (the default) never gives freed memory back to the
            kernel. A number of bytes T gives the free top of the heap back
            whenever it exceeds T, glibc's own rule (its default T is 128 KiB).
            Before commit c0fbece minicnn used T = 1 GiB: a vgg_fer_slim step at
            batch 128 frees about 2 GiB of activations and im2col matrices at its
            end, so each step gave them back and faulted them in again (about
            2,400 page faults a step, 1.2-1.3x slower); ``minicnn bench
            --malloc-trim-threshold`` measures such a value.

    The costs: the process keeps the high-water mark of its heap until it exits,
    one-off peaks included (decoding the data, a larger evaluation batch), and a
    heap of mixed sizes can fragment above the peak of what is live at once. Swap
    can page it out, but the kernel cannot reclaim it. ``ctypes.CDLL("libc.so.6")
    .malloc_trim(0)`` gives the free part back on request. (Threads other than
    the main one keep their own arenas, which still map requests above 64 MB
    fresh.) The setting is process-wide (PyTorch in the same process profits
    too), so the library never calls it on import: the command-line tools
    (train, evaluate, predict, precise-bn) and the benchmarks do. Returns False
    where it does not apply (not Linux/glibc); does nothing on the GPU's memory,
    which CuPy pools already.
    """
    import ctypes  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if trim_threshold is not None and (isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int)
                                       or not 0 <= trim_threshold < 2**31):
        raise ValueError(f"use_heap_allocator: trim_threshold is None (never trim) or a number of bytes in "
                         f"[0, 2**31), got {trim_threshold!r}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # constants from glibc's malloc.h
    ok_mmap = libc.mallopt(M_MMAP_MAX, 0) == 1
    # mallopt takes an int; glibc documents -1 as "disable trimming completely" (it becomes the largest size_t)
    ok_trim = libc.mallopt(M_TRIM_THRESHOLD, -1 if trim_threshold is None else trim_threshold) == 1
    return ok_mmap and ok_trim
