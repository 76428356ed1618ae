"""Every custom CUDA kernel of minicnn, in one place, each beside the generic code it replaces.

Why: on a GPU every array operation is a kernel launch, and a training step of
``hw3_cnn`` written with plain array operations issues hundreds of them
(Adam alone 13 per parameter), so the step is bound by launch overhead. The
kernels here do in one launch what the generic code does in several.

One code path: the layers and optimisers call plain functions (``im2col``,
``_adam_update``, ...), written with NumPy operations that run on either
backend, the teaching reference. Those functions carry the decorator
:func:`gpu_fast_path`, which runs the fused version here instead when an
argument is a CuPy array (and :func:`use_fused` has not switched it off).
On NumPy nothing changes: the decorated function *is* the generic code, and
``f.generic`` / ``f.fused`` give both versions to the tests that prove them
equal.

Each kernel is declared once (:class:`Elementwise` or :class:`Raw`) with

* its CUDA source, self-contained (no CuPy header): raw kernels are
  ``extern "C" __global__`` functions; element-wise bodies are CuPy
  ``ElementwiseKernel`` operations, and :func:`compile_units` wraps them in
  a minimal harness so that ``tests/test_kernels.py`` compiles every source
  with NVRTC on a machine without a GPU;
* a NumPy transliteration of what the kernel computes
  (:data:`TRANSLITERATIONS`), the readable statement of what the kernel must
  do.

Without a GPU, the test stand-in for CuPy (``tests/fakecupy.py``) compiles
each CUDA source for the CPU (``tests/cuda_on_cpu.py``: the grid and block the
caller asked for, barriers and shared memory honoured, writes outside an array
caught) and checks every launch against the transliteration, so CI checks the
arguments, shapes, indexing and numbers of every fused path. What only a GPU
can prove (``benchmarks/gpu_suite.sh``): the GPU's rounding, and how fast it is.
"""
from __future__ import annotations

import contextlib
import functools
import math

import numpy as np

from .backend import get_array_module

__all__ = ["gpu_fast_path", "use_fused", "fused_enabled", "TRANSLITERATIONS", "KERNELS", "compile_units",
           "elementwise_source", "parse_elementwise_params", "NVRTC_OPTIONS"]

_state = {"fused": True}
TRANSLITERATIONS: dict = {}  # kernel name -> NumPy function with the kernel's calling convention
KERNELS: dict = {}  # kernel name -> Elementwise | Raw declaration
# What CuPy passes to NVRTC for a RawKernel (cupy/cuda/compiler.py), with the H100/H200 architecture.
NVRTC_OPTIONS = ("-ftz=true", "-arch=sm_90", "--device-as-default-execution-space", "--std=c++17")
_BLOCK = 256
# Gather kernels index with 32-bit integers (several times fewer instructions for a division than 64-bit)
# when every index, plus one grid stride, fits; with 64-bit ones otherwise.
NARROW_INDEX_LIMIT = 2**31 - 1
_INDEX_WIDTH = r"""
// Whether every index up to the larger of the two array sizes, plus one grid stride, fits in an int.
__device__ inline bool fits_int(const long long size_a, const long long size_b) {
  const long long largest = size_a > size_b ? size_a : size_b;
  return largest + (long long)blockDim.x * gridDim.x <= {LIMIT};
}"""
_DTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


# -- dispatch ---------------------------------------------------------------------------------
def fused_enabled() -> bool:
    return _state["fused"]


@contextlib.contextmanager
def use_fused(enabled: bool):
    """Within the block, CuPy arrays take the fused kernels (True) or the generic code (False).

    For benchmarks and tests (``benchmarks/count_launches.py`` counts both);
    switch only between training steps, since a layer's backward must take
    the path its forward took.
    """
    saved = _state["fused"]
    _state["fused"] = bool(enabled)
    try:
        yield
    finally:
        _state["fused"] = saved


def gpu_fast_path(fused):
    """Decorator: call ``fused`` instead of the decorated generic function when an argument is a CuPy array.

    ``fused`` takes the same arguments and returns the same results (up to
    float rounding; the cache a layer keeps between forward and backward
    may differ, since both are produced and consumed by the same path).
    """
    def decorate(generic):
        @functools.wraps(generic)
        def dispatch(*args, **kwargs):
            if _state["fused"] and get_array_module(*args) is not np:
                return fused(*args, **kwargs)
            return generic(*args, **kwargs)

        dispatch.generic, dispatch.fused = generic, fused
        return dispatch

    return decorate


def _cache(xp, key, build):
    """One compiled kernel object per array module and key (CuPy compiles on first call and caches)."""
    store = _compiled.setdefault(id(xp), {})
    if key not in store:
        store[key] = build()
    return store[key]


_compiled: dict = {}


def _grid(total: int) -> tuple:
    return (max(1, min(math.ceil(total / _BLOCK), 65535 * 4)),)


# -- declarations -----------------------------------------------------------------------------
class Elementwise:
    """A CuPy ``ElementwiseKernel``: ``T`` parameters are arrays (``raw`` ones indexed freely), others scalars."""

    def __init__(self, name, in_params, out_params, operation, transliteration, arrays=()):
        self.name, self.in_params, self.out_params, self.operation = name, in_params, out_params, operation
        self.arrays = set(arrays)  # parameters of a concrete type that are arrays (the rest are scalars)
        KERNELS[name] = self
        TRANSLITERATIONS[name] = transliteration

    def __call__(self, xp, *args):
        kernel = _cache(xp, self.name, lambda: xp.ElementwiseKernel(
            self.in_params, self.out_params, self.operation, self.name))
        return kernel(*args)

    def with_device_scalars(self, names):
        """The same kernel reading the ``float64`` scalars ``names`` from a device array ``hyper``.

        Why: a CUDA graph (:mod:`minicnn.graphs`) replays its kernels with the
        arguments they were captured with, so a learning rate passed by value
        would stay the one of the step that was captured. This variant takes
        ``hyper`` (``raw float64``, after the other inputs), whose element ``j``
        is ``names[j]``; the step writes the new values into it before each
        replay. The body is this kernel's own, after one line per name
        (``const double lr = hyper[0];``), so both compute the same numbers.
        """
        params = parse_elementwise_params(self.in_params)
        missing = [n for n in names if (False, "float64", n) not in params]
        if missing:
            raise ValueError(f"{self.name}: {missing} are not float64 scalar parameters of {self.in_params!r}")
        kept = [p for p in params if p[2] not in names]
        in_params = ", ".join(f"{'raw ' if raw else ''}{typ} {pname}" for raw, typ, pname in kept)
        in_params += ", raw float64 hyper"
        prologue = "".join(f"const double {n} = hyper[{j}];\n    " for j, n in enumerate(names))
        original = TRANSLITERATIONS[self.name]
        n_kept = len(kept)

        def transliteration(*args):
            ins, hyper, outs = args[:n_kept], args[n_kept], args[n_kept + 1:]
            values, given = dict(zip((p[2] for p in kept), ins)), {n: float(hyper[j]) for j, n in enumerate(names)}
            return original(*[given[p[2]] if p[2] in given else values[p[2]] for p in params], *outs)

        return Elementwise(f"{self.name}_device_scalars", in_params, self.out_params,
                           prologue + self.operation.strip(), transliteration, self.arrays)


class Raw:
    """A CuPy ``RawKernel`` per float dtype: ``source`` has ``{T}`` where the C type goes."""

    def __init__(self, name, source, transliteration):
        self.name, self.source = name, source
        for ctype in _DTYPES.values():
            KERNELS[self.kernel_name(ctype)] = self
            TRANSLITERATIONS[self.kernel_name(ctype)] = transliteration

    def kernel_name(self, ctype):
        return f"{self.name}_{ctype}"

    def code(self, ctype):
        """The source for ``ctype``; ``{INDEX_WIDTH}`` becomes :data:`_INDEX_WIDTH`, whose ``fits_int`` tells a
        gather kernel whether to take its 32-bit path (up to :data:`NARROW_INDEX_LIMIT`; the tests set 0 to
        run the 64-bit path on small arrays)."""
        helper = _INDEX_WIDTH.replace("{LIMIT}", f"{int(NARROW_INDEX_LIMIT)}LL")
        return (self.source.replace("{INDEX_WIDTH}", helper).replace("{T}", ctype)
                .replace("{NAME}", self.kernel_name(ctype)))

    def __call__(self, xp, dtype, grid, args):
        ctype = _DTYPES[np.dtype(dtype)]
        kernel = _cache(xp, (self.name, ctype), lambda: xp.RawKernel(
            self.code(ctype), self.kernel_name(ctype)))  # CuPy adds its own options
        kernel(grid, (_BLOCK,), args)


_HARNESS_TYPES = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long"}


def parse_elementwise_params(spec: str) -> list[tuple[bool, str, str]]:
    """``"T x, raw T mean, float64 eps"`` -> ``[(raw, type, name), ...]`` as CuPy reads an ElementwiseKernel's."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        words = part.split()
        if len(words) not in (2, 3) or (len(words) == 3 and words[0] != "raw"):
            raise ValueError(f"cannot parse element-wise kernel parameter {part!r} (expected '[raw] TYPE NAME')")
        out.append((len(words) == 3, words[-2], words[-1]))
    return out


def elementwise_source(name: str, in_params: str, out_params: str, operation: str, ctype: str,
                       arrays=()) -> tuple[str, list[tuple[str, bool, str]]]:
    """An element-wise body as a self-contained ``__global__`` function, wrapped the way CuPy wraps it.

    ``T`` is a typedef of ``ctype``; a non-raw parameter of type ``T``, or one
    named in ``arrays`` (a concrete type given an array), is a reference to
    its element ``i`` of a contiguous array of ``n`` elements (the operation
    may omit its last ``;``, as CuPy adds one); a ``raw``
    parameter is a pointer indexed freely; the others are scalars by value.
    Returns ``(source, [(C type, is pointer, parameter name), ...])``, the
    signature in order (``n`` last), for the NVRTC compile check and for
    ``tests/cuda_on_cpu.py``, which runs the same source on the CPU.
    """
    params, signature, refs = [], [], []
    for spec, is_out in ((in_params, False), (out_params, True)):
        for raw, typ, pname in parse_elementwise_params(spec):
            c = ctype if typ == "T" else _HARNESS_TYPES[typ]
            if raw:
                params.append(f"{'' if is_out else 'const '}{c}* __restrict__ {pname}")
                signature.append((c, True, pname))
            elif typ == "T" or pname in arrays:
                params.append(f"{c}* __restrict__ {pname}_array")
                signature.append((c, True, f"{pname}_array"))
                refs.append(f"{'' if is_out else 'const '}{c}& {pname} = {pname}_array[i];")
            else:
                params.append(f"const {c} {pname}")
                signature.append((c, False, pname))
    signature.append(("long long", False, "n"))
    src = (f"typedef {ctype} T;\n"
           f"extern \"C\" __global__ void {name}({', '.join(params)}, const long long n) {{\n"
           f"  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;"
           f" i += (long long)blockDim.x * gridDim.x) {{\n    " + "\n    ".join(refs)
           + f"\n    {operation.strip()};\n  }}\n}}\n")  # CuPy too ends the operation with a ';'
    return src, signature


def compile_units() -> list[tuple[str, str]]:
    """``(name, CUDA source)`` of every kernel, self-contained, for an NVRTC compile check.

    Raw kernels are compiled as they are, for float and double; element-wise
    bodies through :func:`elementwise_source`, for float and double.
    """
    units, seen = [], set()
    for name, k in KERNELS.items():
        if isinstance(k, Raw):
            if k.name in seen:
                continue
            seen.add(k.name)
            units += [(k.kernel_name(c), k.code(c)) for c in _DTYPES.values()]
            continue
        for ctype in _DTYPES.values():
            src, _ = elementwise_source(name, k.in_params, k.out_params, k.operation, ctype, k.arrays)
            units.append((f"{name}<{ctype}>", src))
    return units


# -- the backend's probe of NVRTC (minicnn.backend.set_backend("cupy")) --------------------------
def _probe_numpy(x, y):
    y[...] = x + x.dtype.type(1)


_probe = Elementwise("minicnn_probe", "T x", "T y", "y = x + (T)1;", _probe_numpy)


def probe(xp):
    """Compile and run one tiny kernel: fails where NVRTC is missing. Returns the result (ones)."""
    x = xp.zeros((4,), dtype=np.float32)
    y = xp.empty_like(x)
    _probe(xp, x, y)
    return y


# -- optimisers: one launch per parameter -----------------------------------------------------
def _adam_numpy(g, step_size, bias2_sqrt, beta1, beta2, eps, l2, decay, p, m, v):
    dt = p.dtype.type
    gg = g + dt(l2) * p if l2 != 0.0 else g
    if decay != 1.0:
        p *= dt(decay)
    m[...] = m * dt(beta1) + dt(1.0 - beta1) * gg
    v[...] = v * dt(beta2) + dt(1.0 - beta2) * (gg * gg)
    p -= dt(step_size) * (m / (np.sqrt(v) / dt(bias2_sqrt) + dt(eps)))


_adam = Elementwise(
    "minicnn_adam",
    "T g, float64 step_size, float64 bias2_sqrt, float64 beta1, float64 beta2, float64 eps, float64 l2, "
    "float64 decay",
    "T p, T m, T v",
    """
    T gg = g;
    if (l2 != 0.0) gg = gg + (T)l2 * p;
    if (decay != 1.0) p = p * (T)decay;
    m = m * (T)beta1 + (T)(1.0 - beta1) * gg;
    v = v * (T)beta2 + (T)(1.0 - beta2) * (gg * gg);
    p = p - (T)step_size * (m / (sqrt(v) / (T)bias2_sqrt + (T)eps));
    """,
    _adam_numpy,
)


_adam_device = _adam.with_device_scalars(("step_size", "bias2_sqrt", "decay"))


def adam_scalars(t, lr, betas, weight_decay, decoupled):
    """``(step_size, bias2_sqrt, decay)`` of Adam's step number ``t``: what changes from step to step."""
    beta1, beta2 = betas
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    return lr / (1.0 - beta1 ** t), math.sqrt(1.0 - beta2 ** t), decay


def adam_update(p, g, m, v, *, t, lr, betas, eps, weight_decay, decoupled, device_scalars=None):
    """Fused Adam / AdamW step of one parameter (the generic formula is in minicnn.optim.optimizers).

    ``device_scalars``: None, or a device array holding :func:`adam_scalars` (then ``t`` and ``lr``
    are not read: the values come from the array when the kernel runs, as a CUDA graph needs).
    """
    beta1, beta2 = betas
    l2 = 0.0 if decoupled else weight_decay
    xp = get_array_module(p)
    if device_scalars is not None:
        _adam_device(xp, g, beta1, beta2, eps, l2, device_scalars, p, m, v)
        return
    step_size, bias2_sqrt, decay = adam_scalars(t, lr, betas, weight_decay, decoupled)
    _adam(xp, g, step_size, bias2_sqrt, beta1, beta2, eps, l2, decay, p, m, v)


def _sgd_numpy(g, lr, l2, p):
    dt = p.dtype.type
    gg = g + dt(l2) * p if l2 != 0.0 else g
    p -= dt(lr) * gg


def _sgd_momentum_numpy(g, lr, l2, momentum, dampening, first, nesterov, p, buf):
    dt = p.dtype.type
    gg = g + dt(l2) * p if l2 != 0.0 else g
    buf[...] = gg if first else buf * dt(momentum) + dt(1.0 - dampening) * gg
    step = gg + dt(momentum) * buf if nesterov else buf
    p -= dt(lr) * step


_sgd = Elementwise(
    "minicnn_sgd", "T g, float64 lr, float64 l2", "T p",
    """
    T gg = g;
    if (l2 != 0.0) gg = gg + (T)l2 * p;
    p = p - (T)lr * gg;
    """,
    _sgd_numpy,
)
_sgd_momentum = Elementwise(
    "minicnn_sgd_momentum",
    "T g, float64 lr, float64 l2, float64 momentum, float64 dampening, int32 first, int32 nesterov",
    "T p, T buf",
    """
    T gg = g;
    if (l2 != 0.0) gg = gg + (T)l2 * p;
    buf = first ? gg : buf * (T)momentum + (T)(1.0 - dampening) * gg;
    p = p - (T)lr * (nesterov ? gg + (T)momentum * buf : buf);
    """,
    _sgd_momentum_numpy,
)


_sgd_device = _sgd.with_device_scalars(("lr",))
_sgd_momentum_device = _sgd_momentum.with_device_scalars(("lr",))


def sgd_update(p, g, buf, *, first, lr, momentum, nesterov, weight_decay, dampening, device_scalars=None):
    """Fused SGD step of one parameter (``buf`` None without momentum).

    ``device_scalars``: None, or a device array ``[lr]`` read when the kernel runs (for a CUDA graph).
    """
    xp = get_array_module(p)
    if buf is None:
        if device_scalars is not None:
            _sgd_device(xp, g, weight_decay, device_scalars, p)
        else:
            _sgd(xp, g, lr, weight_decay, p)
    elif device_scalars is not None:
        _sgd_momentum_device(xp, g, weight_decay, momentum, dampening, int(first), int(nesterov), device_scalars,
                             p, buf)
    else:
        _sgd_momentum(xp, g, lr, weight_decay, momentum, dampening, int(first), int(nesterov), p, buf)


def _rmsprop_numpy(g, lr, alpha, eps, l2, momentum, p, s, a, b):
    dt = p.dtype.type
    gg = g + dt(l2) * p if l2 != 0.0 else g
    s[...] = s * dt(alpha) + dt(1.0 - alpha) * (gg * gg)
    if a is not None:
        a[...] = a * dt(alpha) + dt(1.0 - alpha) * gg
        d = np.sqrt(s - a * a) + dt(eps)
    else:
        d = np.sqrt(s) + dt(eps)
    if b is not None:
        b[...] = b * dt(momentum) + gg / d
        p -= dt(lr) * b
    else:
        p -= dt(lr) * (gg / d)


def _rmsprop_variant(centered, with_momentum):
    outs = "T p, T s" + (", T a" if centered else "") + (", T b" if with_momentum else "")
    body = ["T gg = g;", "if (l2 != 0.0) gg = gg + (T)l2 * p;", "s = s * (T)alpha + (T)(1.0 - alpha) * (gg * gg);"]
    if centered:
        body += ["a = a * (T)alpha + (T)(1.0 - alpha) * gg;", "T d = sqrt(s - a * a) + (T)eps;"]
    else:
        body += ["T d = sqrt(s) + (T)eps;"]
    body += (["b = b * (T)momentum + gg / d;", "p = p - (T)lr * b;"] if with_momentum
             else ["p = p - (T)lr * (gg / d);"])

    def numpy_version(g, lr, alpha, eps, l2, momentum, p, s, *rest):
        rest = list(rest)
        a = rest.pop(0) if centered else None
        b = rest.pop(0) if with_momentum else None
        _rmsprop_numpy(g, lr, alpha, eps, l2, momentum, p, s, a, b)

    name = f"minicnn_rmsprop{'_centered' if centered else ''}{'_momentum' if with_momentum else ''}"
    return Elementwise(name, "T g, float64 lr, float64 alpha, float64 eps, float64 l2, float64 momentum", outs,
                       "\n".join(body), numpy_version)


_rmsprop = {(c, mo): _rmsprop_variant(c, mo) for c in (False, True) for mo in (False, True)}
_rmsprop_device = {key: kernel.with_device_scalars(("lr",)) for key, kernel in _rmsprop.items()}


def rmsprop_update(p, g, s, a, b, *, lr, alpha, eps, weight_decay, momentum, device_scalars=None):
    """Fused RMSprop step of one parameter (``a`` None unless centred, ``b`` None without momentum).

    ``device_scalars``: None, or a device array ``[lr]`` read when the kernel runs (for a CUDA graph).
    """
    key = (a is not None, b is not None)
    extra = [arr for arr in (a, b) if arr is not None]
    if device_scalars is not None:
        _rmsprop_device[key](get_array_module(p), g, alpha, eps, weight_decay, momentum, device_scalars, p, s,
                             *extra)
    else:
        _rmsprop[key](get_array_module(p), g, lr, alpha, eps, weight_decay, momentum, p, s, *extra)


# -- activations and dropout: one launch forward, one backward --------------------------------
def _leaky_forward_numpy(x, slope, y):
    y[...] = np.where(x > 0, x, x * x.dtype.type(slope))


def _leaky_backward_numpy(x, dy, slope, dx):
    dx[...] = np.where(x > 0, dy, dy * dy.dtype.type(slope))


_leaky_forward = Elementwise("minicnn_leaky_relu_forward", "T x, float64 slope", "T y",
                             "y = x > (T)0 ? x : x * (T)slope;", _leaky_forward_numpy)
_leaky_backward = Elementwise("minicnn_leaky_relu_backward", "T x, T dy, float64 slope", "T dx",
                              "dx = x > (T)0 ? dy : dy * (T)slope;", _leaky_backward_numpy)


def leaky_relu_forward(x, slope):
    """``(out, cache)``: out = x if x > 0 else slope * x; the cache is ``x`` itself."""
    xp = get_array_module(x)
    out = xp.empty_like(x)
    _leaky_forward(xp, x, float(slope), out)
    return out, x


def leaky_relu_backward(dout, x, slope):
    """dx = dout if x > 0 else slope * dout."""
    xp = get_array_module(dout)
    dx = xp.empty_like(dout)
    _leaky_backward(xp, x, dout, float(slope), dx)
    return dx


def _dropout_numpy(x, u, p, scale, y):
    y[...] = np.where(u >= np.float32(p), x * x.dtype.type(scale), x.dtype.type(0))


_dropout = Elementwise("minicnn_dropout", "T x, float32 u, float64 p, float64 scale", "T y",
                       "y = u >= (float)p ? x * (T)scale : (T)0;", _dropout_numpy, arrays=("u",))


def dropout_forward(x, p, rng):
    """``(out, cache)``: one float32 draw per unit into a buffer, then one launch; the cache is the draws."""
    xp = get_array_module(x)
    u = rng.random_sample(x.shape, dtype=np.float32)
    out = xp.empty_like(x)
    _dropout(xp, x, u, float(p), 1.0 / (1.0 - p), out)
    return out, u


def dropout_backward(dout, u, p):
    xp = get_array_module(dout)
    dx = xp.empty_like(dout)
    _dropout(xp, dout, u, float(p), 1.0 / (1.0 - p), dx)
    return dx


# -- batch normalisation: statistics in one launch, normalisation in one ----------------------
def _channel_view(a, c, hw):
    """(N, C, HW) view of an (N, C, H, W) or (N, C) array (HW = 1)."""
    return a.reshape(-1, c, hw)


def _bn_stats_numpy(grid, block, x, mean, inv_std, run_mean, run_var, n, c, hw, eps, momentum):
    xs = _channel_view(x, int(c), int(hw)).astype(np.float64)
    m = int(n) * int(hw)
    mu = xs.mean(axis=(0, 2))
    var = ((xs - mu[None, :, None]) ** 2).sum(axis=(0, 2)) / m
    mean[...] = mu
    inv_std[...] = 1.0 / np.sqrt(var + float(eps))
    mom = float(momentum)
    run_mean[...] = (1.0 - mom) * run_mean.astype(np.float64) + mom * mu
    run_var[...] = (1.0 - mom) * run_var.astype(np.float64) + mom * m / (m - 1) * var


_SUM_BLOCK = r"""
  // tree reduction of one value per thread over the block (blockDim.x == 256)
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) buf[threadIdx.x] += buf[threadIdx.x + k];
    __syncthreads();
  }
"""

_bn_stats = Raw("minicnn_bn_stats", r"""
// One block per channel: batch mean and biased variance (two passes, double accumulators),
// 1 / sqrt(var + eps), and the running statistics updated as PyTorch does.
extern "C" __global__ void {NAME}(const {T}* x, {T}* mean, {T}* inv_std, {T}* run_mean, {T}* run_var,
                                  const int n, const int c, const int hw, const double eps, const double momentum) {
  __shared__ double buf[256];
  const int ch = blockIdx.x;
  const long long m = (long long)n * hw;
  double acc = 0.0;
  for (long long j = threadIdx.x; j < m; j += blockDim.x)
    acc += (double)x[((j / hw) * c + ch) * hw + j % hw];
""" + _SUM_BLOCK + r"""
  const double mu = buf[0] / (double)m;
  __syncthreads();
  acc = 0.0;
  for (long long j = threadIdx.x; j < m; j += blockDim.x) {
    const double d = (double)x[((j / hw) * c + ch) * hw + j % hw] - mu;
    acc += d * d;
  }
""" + _SUM_BLOCK + r"""
  if (threadIdx.x == 0) {
    const double var = buf[0] / (double)m;
    mean[ch] = ({T})mu;
    inv_std[ch] = ({T})(1.0 / sqrt(var + eps));
    run_mean[ch] = ({T})((1.0 - momentum) * (double)run_mean[ch] + momentum * mu);
    run_var[ch] = ({T})((1.0 - momentum) * (double)run_var[ch] + momentum * (double)m / (double)(m - 1) * var);
  }
}
""", _bn_stats_numpy)


def _bn_apply_numpy(x, mean, inv_std, gamma, beta, c, hw, xhat, y):
    xs = _channel_view(x, int(c), int(hw))
    sl = (None, slice(None), None)
    xh = (xs - mean[sl]) * inv_std[sl]
    _channel_view(xhat, int(c), int(hw))[...] = xh
    _channel_view(y, int(c), int(hw))[...] = xh * gamma[sl] + beta[sl]


_bn_apply = Elementwise(
    "minicnn_bn_apply", "T x, raw T mean, raw T inv_std, raw T gamma, raw T beta, int32 c, int32 hw", "T xhat, T y",
    """
    const int ch = (int)((i / hw) % c);
    xhat = (x - mean[ch]) * inv_std[ch];
    y = xhat * gamma[ch] + beta[ch];
    """,
    _bn_apply_numpy,
)


def _bn_grad_sums_numpy(grid, block, dy, xhat, dgamma, dbeta, n, c, hw):
    d = _channel_view(dy, int(c), int(hw)).astype(np.float64)
    dbeta[...] = d.sum(axis=(0, 2))
    dgamma[...] = (d * _channel_view(xhat, int(c), int(hw))).sum(axis=(0, 2))


_bn_grad_sums = Raw("minicnn_bn_grad_sums", r"""
// One block per channel: dbeta = sum dy, dgamma = sum dy * xhat (double accumulators).
extern "C" __global__ void {NAME}(const {T}* dy, const {T}* xhat, {T}* dgamma, {T}* dbeta,
                                  const int n, const int c, const int hw) {
  __shared__ double buf[256];
  const int ch = blockIdx.x;
  const long long m = (long long)n * hw;
  double acc = 0.0;
  for (long long j = threadIdx.x; j < m; j += blockDim.x) acc += (double)dy[((j / hw) * c + ch) * hw + j % hw];
""" + _SUM_BLOCK + r"""
  if (threadIdx.x == 0) dbeta[ch] = ({T})buf[0];
  __syncthreads();
  acc = 0.0;
  for (long long j = threadIdx.x; j < m; j += blockDim.x) {
    const long long k = ((j / hw) * c + ch) * hw + j % hw;
    acc += (double)dy[k] * (double)xhat[k];
  }
""" + _SUM_BLOCK + r"""
  if (threadIdx.x == 0) dgamma[ch] = ({T})buf[0];
}
""", _bn_grad_sums_numpy)


def _bn_dx_numpy(dy, xhat, gamma, inv_std, dgamma, dbeta, c, hw, inv_m, batch_stats, dx):
    sl = (None, slice(None), None)
    d, xh = _channel_view(dy, int(c), int(hw)), _channel_view(xhat, int(c), int(hw))
    g = (gamma * inv_std)[sl]
    t = dy.dtype.type(inv_m)
    out = g * (d - t * dbeta[sl] - xh * (t * dgamma[sl])) if batch_stats else d * g
    _channel_view(dx, int(c), int(hw))[...] = out


_bn_dx = Elementwise(
    "minicnn_bn_dx",
    "T dy, T xhat, raw T gamma, raw T inv_std, raw T dgamma, raw T dbeta, int32 c, int32 hw, float64 inv_m, "
    "int32 batch_stats",
    "T dx",
    """
    const int ch = (int)((i / hw) % c);
    const T g = gamma[ch] * inv_std[ch];
    dx = batch_stats ? g * (dy - (T)inv_m * dbeta[ch] - xhat * ((T)inv_m * dgamma[ch])) : dy * g;
    """,
    _bn_dx_numpy,
)


def _nc_hw(x):
    c = x.shape[1]
    return c, x.size // (x.shape[0] * c)


def batchnorm_train_forward(x, gamma, beta, running_mean, running_var, eps, momentum, axes, sum_of_products):
    """Fused training-mode BatchNorm: ``(out, xhat, inv_std)``, running statistics updated in place."""
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    c, hw = _nc_hw(x)
    mean, inv_std = xp.empty((c,), dtype=x.dtype), xp.empty((c,), dtype=x.dtype)
    _bn_stats(xp, x.dtype, (c,), (x, mean, inv_std, running_mean, running_var, np.int32(x.shape[0]),
                                  np.int32(c), np.int32(hw), np.float64(eps), np.float64(momentum)))
    xhat, out = xp.empty_like(x), xp.empty_like(x)
    _bn_apply(xp, x, mean, inv_std, gamma, beta, c, hw, xhat, out)
    return out, xhat, inv_std


def batchnorm_eval_forward(x, gamma, beta, running_mean, running_var, eps):
    """Fused evaluation-mode BatchNorm: ``(out, xhat, inv_std)`` with the running statistics."""
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    c, hw = _nc_hw(x)
    inv_std = (1.0 / xp.sqrt(running_var + eps)).astype(x.dtype, copy=False)
    xhat, out = xp.empty_like(x), xp.empty_like(x)
    _bn_apply(xp, x, running_mean, inv_std, gamma, beta, c, hw, xhat, out)
    return out, xhat, inv_std


def batchnorm_backward(dout, xhat, inv_std, gamma, batch_stats, axes, sum_of_products):
    """Fused BatchNorm backward: ``(dx, dgamma, dbeta)`` (sums in one launch, dx in one)."""
    xp = get_array_module(dout)
    dout = xp.ascontiguousarray(dout)
    c, hw = _nc_hw(dout)
    dgamma, dbeta = xp.empty((c,), dtype=dout.dtype), xp.empty((c,), dtype=dout.dtype)
    _bn_grad_sums(xp, dout.dtype, (c,), (dout, xhat, dgamma, dbeta, np.int32(dout.shape[0]), np.int32(c),
                                         np.int32(hw)))
    dx = xp.empty_like(dout)
    m = dout.size // c
    _bn_dx(xp, dout, xhat, gamma, inv_std.reshape(-1), dgamma, dbeta, c, hw, 1.0 / m, int(batch_stats), dx)
    return dx, dgamma, dbeta


# -- im2col / col2im: gathers, one thread per output element, no atomics (as Chainer) ----------
def _im2col_numpy(grid, block, x, cols, n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow):
    n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow = map(int, (n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow))
    xpad = np.pad(x.reshape(n, c, h, w), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = cols.reshape(c, kh, kw, n, oh, ow)
    for u in range(kh):
        for v in range(kw):
            out[:, u, v] = xpad[:, :, u : u + sh * oh : sh, v : v + sw * ow : sw].transpose(1, 0, 2, 3)


_im2col = Raw("minicnn_im2col", r"""
{INDEX_WIDTH}
// cols[(ch, u, v), (b, i, j)] = x[b, ch, i*sh - ph + u, j*sw - pw + v], or 0 in the padding.
// I, the index type: int where every index fits (32-bit division is several times cheaper than 64-bit).
template <typename I>
__device__ void im2col_body(const {T}* x, {T}* cols, const int n, const int c, const int h, const int w,
                            const int kh, const int kw, const int sh, const int sw, const int ph, const int pw,
                            const int oh, const int ow, const I total) {
  for (I t = blockIdx.x * (I)blockDim.x + threadIdx.x; t < total; t += (I)blockDim.x * gridDim.x) {
    I r = t;
    const int j = r % ow; r /= ow;
    const int i = r % oh; r /= oh;
    const int b = r % n;  r /= n;
    const int v = r % kw; r /= kw;
    const int u = r % kh;
    const int ch = r / kh;
    const int y = i * sh - ph + u, xx = j * sw - pw + v;
    cols[t] = (y >= 0 && y < h && xx >= 0 && xx < w) ? x[(((I)b * c + ch) * h + y) * w + xx] : ({T})0;
  }
}

extern "C" __global__ void {NAME}(const {T}* x, {T}* cols, const int n, const int c, const int h, const int w,
                                  const int kh, const int kw, const int sh, const int sw, const int ph, const int pw,
                                  const int oh, const int ow) {
  const long long total = (long long)c * kh * kw * n * oh * ow;
  if (fits_int(total, (long long)n * c * h * w))
    im2col_body<int>(x, cols, n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, (int)total);
  else
    im2col_body<long long>(x, cols, n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, total);
}
""", _im2col_numpy)


def _col2im_numpy(grid, block, cols, dx, n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow):
    n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow = map(int, (n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow))
    cols6 = cols.reshape(c, kh, kw, n, oh, ow)
    dxpad = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for u in range(kh):
        for v in range(kw):
            dxpad[:, :, u : u + sh * oh : sh, v : v + sw * ow : sw] += cols6[:, u, v].transpose(1, 0, 2, 3)
    dx.reshape(n, c, h, w)[...] = dxpad[:, :, ph : ph + h, pw : pw + w]


_col2im = Raw("minicnn_col2im", r"""
{INDEX_WIDTH}
// One thread per input pixel: the sum of the column entries that were read from it (I: as in im2col).
template <typename I>
__device__ void col2im_body(const {T}* cols, {T}* dx, const int n, const int c, const int h, const int w,
                            const int kh, const int kw, const int sh, const int sw, const int ph, const int pw,
                            const int oh, const int ow, const I total) {
  for (I t = blockIdx.x * (I)blockDim.x + threadIdx.x; t < total; t += (I)blockDim.x * gridDim.x) {
    I r = t;
    const int xx = r % w; r /= w;
    const int y = r % h;  r /= h;
    const int ch = r % c;
    const int b = r / c;
    {T} acc = 0;
    for (int u = 0; u < kh; ++u) {
      const int yy = y + ph - u;
      if (yy < 0 || yy % sh != 0 || yy / sh >= oh) continue;
      for (int v = 0; v < kw; ++v) {
        const int xv = xx + pw - v;
        if (xv < 0 || xv % sw != 0 || xv / sw >= ow) continue;
        acc += cols[((((I)ch * kh + u) * kw + v) * n + b) * oh * ow + (I)(yy / sh) * ow + xv / sw];
      }
    }
    dx[t] = acc;
  }
}

extern "C" __global__ void {NAME}(const {T}* cols, {T}* dx, const int n, const int c, const int h, const int w,
                                  const int kh, const int kw, const int sh, const int sw, const int ph, const int pw,
                                  const int oh, const int ow) {
  const long long total = (long long)n * c * h * w;
  if (fits_int(total, (long long)c * kh * kw * n * oh * ow))
    col2im_body<int>(cols, dx, n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, (int)total);
  else
    col2im_body<long long>(cols, dx, n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, total);
}
""", _col2im_numpy)


def _conv_geometry(shape, kh, kw, stride, padding):
    from .layers.conv import conv_output_size, pair  # noqa: PLC0415  (layers import this module)

    (sh, sw), (ph, pw) = pair(stride, "stride"), pair(padding, "padding")
    n, c, h, w = shape
    return n, c, h, w, sh, sw, ph, pw, conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)


def im2col(x, kh, kw, stride=1, padding=0):
    """Fused :func:`minicnn.layers.conv.im2col`: one gather launch, padding read as zeros (no padded copy)."""
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    n, c, h, w, sh, sw, ph, pw, oh, ow = _conv_geometry(x.shape, kh, kw, stride, padding)
    cols = xp.empty((c * kh * kw, n * oh * ow), dtype=x.dtype)
    i32 = np.int32
    _im2col(xp, x.dtype, _grid(cols.size), (x, cols, *map(i32, (n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow))))
    return cols


def col2im(cols, x_shape, kh, kw, stride=1, padding=0):
    """Fused :func:`minicnn.layers.conv.col2im`: one launch, each input pixel sums its entries (no atomics)."""
    xp = get_array_module(cols)
    cols = xp.ascontiguousarray(cols)
    n, c, h, w, sh, sw, ph, pw, oh, ow = _conv_geometry(tuple(x_shape), kh, kw, stride, padding)
    dx = xp.empty((n, c, h, w), dtype=cols.dtype)
    i32 = np.int32
    _col2im(xp, cols.dtype, _grid(dx.size), (cols, dx, *map(i32, (n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow))))
    return dx


# -- max pooling: one thread per output (forward) or input (backward) element -----------------
def _maxpool_forward_numpy(grid, block, x, out, arg, n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow):
    n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow = map(int, (n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow))
    xpad = np.pad(x.reshape(n, c, h, w), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    o, a = out.reshape(n, c, oh, ow), arg.reshape(n, c, oh, ow)
    for k in range(kh * kw):
        u, v = divmod(k, kw)
        view = xpad[:, :, u : u + sh * oh : sh, v : v + sw * ow : sw]
        if k == 0:
            o[...], a[...] = view, 0
        else:
            better = view > o
            a[better] = k
            np.maximum(o, view, out=o)


_maxpool_forward = Raw("minicnn_maxpool_forward", r"""
{INDEX_WIDTH}
// One thread per output: the window's maximum (padding is -inf) and which offset u*kw+v won (the first on ties).
// I, the index type: int where every index fits (as in im2col).
template <typename I>
__device__ void maxpool_forward_body(const {T}* x, {T}* out, int* arg, const int h, const int w, const int kh,
                                     const int kw, const int sh, const int sw, const int ph, const int pw,
                                     const int oh, const int ow, const I total) {
  for (I t = blockIdx.x * (I)blockDim.x + threadIdx.x; t < total; t += (I)blockDim.x * gridDim.x) {
    I r = t;
    const int j = r % ow; r /= ow;
    const int i = r % oh; r /= oh;          // r = b * c + ch
    const {T}* plane = x + r * h * w;
    {T} best = 0;
    int best_k = -1;
    for (int u = 0; u < kh; ++u) {
      const int y = i * sh - ph + u;
      for (int v = 0; v < kw; ++v) {
        const int xx = j * sw - pw + v;
        if (y < 0 || y >= h || xx < 0 || xx >= w) continue;   // -inf never beats a real value
        const {T} val = plane[y * w + xx];
        if (best_k < 0 || val > best) { best = val; best_k = u * kw + v; }
      }
    }
    out[t] = best;
    arg[t] = best_k;
  }
}

extern "C" __global__ void {NAME}(const {T}* x, {T}* out, int* arg, const int n, const int c, const int h,
                                  const int w, const int kh, const int kw, const int sh, const int sw, const int ph,
                                  const int pw, const int oh, const int ow) {
  const long long total = (long long)n * c * oh * ow;
  if (fits_int(total, (long long)n * c * h * w))
    maxpool_forward_body<int>(x, out, arg, h, w, kh, kw, sh, sw, ph, pw, oh, ow, (int)total);
  else
    maxpool_forward_body<long long>(x, out, arg, h, w, kh, kw, sh, sw, ph, pw, oh, ow, total);
}
""", _maxpool_forward_numpy)


def _maxpool_backward_numpy(grid, block, dout, arg, dx, n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow):
    n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow = map(int, (n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow))
    d, a = dout.reshape(n, c, oh, ow), arg.reshape(n, c, oh, ow)
    dxpad = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dout.dtype)
    for k in range(kh * kw):
        u, v = divmod(k, kw)
        dxpad[:, :, u : u + sh * oh : sh, v : v + sw * ow : sw] += np.where(a == k, d, 0)
    dx.reshape(n, c, h, w)[...] = dxpad[:, :, ph : ph + h, pw : pw + w]


_maxpool_backward = Raw("minicnn_maxpool_backward", r"""
{INDEX_WIDTH}
// One thread per input pixel: the sum of dout over the windows whose maximum it was (I: as in im2col).
template <typename I>
__device__ void maxpool_backward_body(const {T}* dout, const int* arg, {T}* dx, const int h, const int w,
                                      const int kh, const int kw, const int sh, const int sw, const int ph,
                                      const int pw, const int oh, const int ow, const I total) {
  for (I t = blockIdx.x * (I)blockDim.x + threadIdx.x; t < total; t += (I)blockDim.x * gridDim.x) {
    I r = t;
    const int xx = r % w; r /= w;
    const int y = r % h;  r /= h;           // r = b * c + ch
    {T} acc = 0;
    for (int u = 0; u < kh; ++u) {
      const int yy = y + ph - u;
      if (yy < 0 || yy % sh != 0 || yy / sh >= oh) continue;
      for (int v = 0; v < kw; ++v) {
        const int xv = xx + pw - v;
        if (xv < 0 || xv % sw != 0 || xv / sw >= ow) continue;
        const I o = (r * oh + yy / sh) * ow + xv / sw;
        if (arg[o] == u * kw + v) acc += dout[o];
      }
    }
    dx[t] = acc;
  }
}

extern "C" __global__ void {NAME}(const {T}* dout, const int* arg, {T}* dx, const int n, const int c, const int h,
                                  const int w, const int kh, const int kw, const int sh, const int sw, const int ph,
                                  const int pw, const int oh, const int ow) {
  const long long total = (long long)n * c * h * w;
  if (fits_int(total, (long long)n * c * oh * ow))
    maxpool_backward_body<int>(dout, arg, dx, h, w, kh, kw, sh, sw, ph, pw, oh, ow, (int)total);
  else
    maxpool_backward_body<long long>(dout, arg, dx, h, w, kh, kw, sh, sw, ph, pw, oh, ow, total);
}
""", _maxpool_backward_numpy)


def maxpool2d_forward(layer, x, training=True):
    """Fused :meth:`minicnn.MaxPool2D.forward`: one launch; keeps the winning offsets (int32) for backward."""
    xp = get_array_module(x)
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    if x.ndim != 4:
        raise layer._bad_input("(N, C, H, W)", x)
    if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
        layer._offsets(x, -np.inf)  # raises the layer's own error (kernel larger than the padded input)
    x = xp.ascontiguousarray(x)
    n, c, h, w = x.shape
    oh, ow = layer.output_shape(h, w)
    out = xp.empty((n, c, oh, ow), dtype=x.dtype)
    arg = xp.empty((n, c, oh, ow), dtype=np.int32)
    i32 = np.int32
    _maxpool_forward(xp, x.dtype, _grid(out.size),
                     (x, out, arg, *map(i32, (n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow))))
    layer.cache = ("fused", x.shape, arg)
    return out


def maxpool2d_backward(layer, dout):
    """Fused ``minicnn.MaxPool2D._backward`` (backward after its shape check): one launch, each input pixel
    gathers its windows' gradients."""
    xp = get_array_module(dout)
    _, x_shape, arg = layer._saved()
    dout = xp.ascontiguousarray(dout)
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    n, c, h, w = x_shape
    oh, ow = dout.shape[2], dout.shape[3]
    dx = xp.empty(x_shape, dtype=dout.dtype)
    i32 = np.int32
    _maxpool_backward(xp, dout.dtype, _grid(dx.size),
                      (dout, arg, dx, *map(i32, (n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow))))
    layer.cache = None
    return dx


# -- augmentation: the bilinear affine warp in one launch -------------------------------------
def _affine_warp_numpy(grid, block, x, m, out, n, c, h, w):
    n, c, h, w = map(int, (n, c, h, w))
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    u = (np.arange(h, dtype=np.float64) - cy)[None, :, None]
    v = (np.arange(w, dtype=np.float64) - cx)[None, None, :]
    mm = m.reshape(n, 6)[:, :, None, None]
    sr = np.clip(mm[:, 0] * u + mm[:, 1] * v + mm[:, 2] + cy, 0.0, h - 1.0)
    sc = np.clip(mm[:, 3] * u + mm[:, 4] * v + mm[:, 5] + cx, 0.0, w - 1.0)
    r0, c0 = np.floor(sr).astype(np.int64), np.floor(sc).astype(np.int64)
    wr, wc = (sr - r0).astype(x.dtype)[:, None], (sc - c0).astype(x.dtype)[:, None]
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    planes = x.reshape(n, c, h * w)

    def at(r, col):
        return np.take_along_axis(planes, (r * w + col).reshape(n, 1, h * w), axis=2).reshape(n, c, h, w)

    one = x.dtype.type(1)
    top = at(r0, c0) * (one - wc) + at(r0, c1) * wc
    bottom = at(r1, c0) * (one - wc) + at(r1, c1) * wc
    out.reshape(n, c, h, w)[...] = top * (one - wr) + bottom * wr


_affine_warp = Raw("minicnn_affine_warp", r"""
// One thread per output pixel: its source point under the image's affine map m (2 x 3, about the centre),
// clamped to the image (edge replication), sampled bilinearly.
extern "C" __global__ void {NAME}(const {T}* x, const double* m, {T}* out, const int n, const int c, const int h,
                                  const int w) {
  const long long total = (long long)n * c * h * w;
  const double cy = (h - 1) / 2.0, cx = (w - 1) / 2.0;
  for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
       t += (long long)blockDim.x * gridDim.x) {
    long long r = t;
    const int j = r % w; r /= w;
    const int i = r % h; r /= h;            // r = b * c + ch
    const double* mb = m + (r / c) * 6;
    const double u = i - cy, v = j - cx;
    const double sr = fmin(fmax(mb[0] * u + mb[1] * v + mb[2] + cy, 0.0), h - 1.0);
    const double sc = fmin(fmax(mb[3] * u + mb[4] * v + mb[5] + cx, 0.0), w - 1.0);
    const int r0 = (int)floor(sr), c0 = (int)floor(sc);
    const int r1 = min(r0 + 1, h - 1), c1 = min(c0 + 1, w - 1);
    const {T} wr = ({T})(sr - r0), wc = ({T})(sc - c0);
    const {T}* p = x + r * h * w;
    const {T} top = p[r0 * w + c0] * (({T})1 - wc) + p[r0 * w + c1] * wc;
    const {T} bottom = p[r1 * w + c0] * (({T})1 - wc) + p[r1 * w + c1] * wc;
    out[t] = top * (({T})1 - wr) + bottom * wr;
  }
}
""", _affine_warp_numpy)


def affine_warp(x, inv_matrices):
    """Fused :func:`minicnn.data.augment.affine_warp`: one launch for the whole batch."""
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    m = xp.ascontiguousarray(xp.asarray(inv_matrices, dtype=np.float64))
    n, c, h, w = x.shape
    out = xp.empty_like(x)
    _affine_warp(xp, x.dtype, _grid(out.size), (x, m, out, *map(np.int32, (n, c, h, w))))
    return out


# -- softmax cross-entropy: one thread per row forward, one launch backward ---------------------
def _xent_rows_numpy(grid, block, z, y, w, p, a, row_loss, row_weight, n, k, smoothing, has_weights):
    n, k, e = int(n), int(k), float(smoothing)
    zz = z.reshape(n, k).astype(np.float64)
    m = np.fmax.reduce(zz, axis=1, keepdims=True)  # fmax, as the kernel: a NaN score still makes the row NaN below
    logp = zz - m - np.log(np.exp(zz - m).sum(axis=1, keepdims=True))
    wk = w[:k].astype(np.float64) if has_weights else np.ones(k)
    q = np.full((n, k), e / k)
    q[np.arange(n), y] += 1.0 - e
    ak = wk * q
    p.reshape(n, k)[...] = np.exp(logp)
    a.reshape(n, k)[...] = ak
    row_loss[...] = -(ak * logp).sum(axis=1)
    row_weight[...] = wk[y] if has_weights else 1


_xent_rows = Raw("minicnn_softmax_xent_rows", r"""
// One thread per row i (in double): m = max_c z_ic, logp_ic = z_ic - m - log sum_c exp(z_ic - m),
// a_ic = w_c q_ic with q_ic = e / k + (1 - e) [c = y_i], row_loss_i = -sum_c a_ic logp_ic, row_weight_i = w_{y_i}.
extern "C" __global__ void {NAME}(const {T}* z, const long long* y, const {T}* w, {T}* p, {T}* a, {T}* row_loss,
                                  {T}* row_weight, const int n, const int k, const double smoothing,
                                  const int has_weights) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    const {T}* zi = z + i * k;
    double m = (double)zi[0];
    for (int c = 1; c < k; ++c) m = fmax(m, (double)zi[c]);
    double s = 0.0;
    for (int c = 0; c < k; ++c) s += exp((double)zi[c] - m);
    const double lse = log(s);
    const long long yi = y[i];
    double loss = 0.0;
    for (int c = 0; c < k; ++c) {
      const double logp = (double)zi[c] - m - lse;
      const double ac = (has_weights ? (double)w[c] : 1.0) * (smoothing / k + (c == yi ? 1.0 - smoothing : 0.0));
      loss -= ac * logp;
      p[i * k + c] = ({T})exp(logp);
      a[i * k + c] = ({T})ac;
    }
    row_loss[i] = ({T})loss;
    row_weight[i] = has_weights ? w[yi] : ({T})1;
  }
}
""", _xent_rows_numpy)


def _xent_backward_numpy(p, a, total_array, total, use_array, k, dz):
    k = int(k)
    s = a.reshape(-1, k).sum(axis=1, keepdims=True)
    t = total_array.reshape(-1)[0] if use_array else p.dtype.type(total)
    dz.reshape(-1, k)[...] = (p.reshape(-1, k) * s - a.reshape(-1, k)) / t


_xent_backward = Elementwise(
    "minicnn_softmax_xent_backward",
    "T p, raw T a, raw T total_array, float64 total, int32 use_array, int32 k", "T dz",
    """
    const long long row = i / k;
    T s = 0;
    for (int c = 0; c < k; ++c) s += a[row * k + c];
    const T t = use_array ? total_array[0] : (T)total;
    dz = (p * s - a[i]) / t;
    """,
    _xent_backward_numpy,
)


def softmax_cross_entropy(logits, labels, class_weights, label_smoothing):
    """Fused :func:`minicnn.losses.softmax_cross_entropy`: the rows in one launch (in double), then the batch sums.

    Returns the same ``(loss, (p, a, total))`` as the generic code; ``class_weights``
    is None or a device array of K weights.
    """
    xp = get_array_module(logits)
    z = xp.ascontiguousarray(logits)
    n, k = z.shape
    y = labels if labels.dtype == np.int64 else labels.astype(np.int64)
    y = xp.ascontiguousarray(y)
    w = z if class_weights is None else xp.ascontiguousarray(class_weights)  # z: never read without weights
    p, a = xp.empty_like(z), xp.empty_like(z)
    row_loss, row_weight = xp.empty((n,), dtype=z.dtype), xp.empty((n,), dtype=z.dtype)
    _xent_rows(xp, z.dtype, _grid(n), (z, y, w, p, a, row_loss, row_weight, np.int32(n), np.int32(k),
                                       np.float64(label_smoothing), np.int32(class_weights is not None)))
    total = n if class_weights is None else row_weight.sum()
    return row_loss.sum() / total, (p, a, total)


def softmax_cross_entropy_backward(p, a, total):
    """Fused :func:`minicnn.losses.softmax_cross_entropy_backward`: dz = (p * sum_k a_k - a) / W in one launch."""
    xp = get_array_module(p)
    dz = xp.empty_like(p)
    use_array = not isinstance(total, (int, float))
    _xent_backward(xp, p, a, total.reshape(1) if use_array else p, float(total) if not use_array else 0.0,
                   int(use_array), p.shape[1], dz)
    return dz
