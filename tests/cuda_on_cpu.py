"""Run minicnn's CUDA kernels on the CPU: the same CUDA source, compiled as C++ by the host compiler.

The NVRTC check (tests/nvrtc.py) proves that every kernel compiles; the NumPy
transliterations prove that the *intended* computation matches the generic code.
Neither proves that the CUDA source computes what its transliteration computes:
an index off by one, a wrong stride, a missing ``__syncthreads()`` or a thread
that skips its output would only show on a GPU. This module closes most of that
gap without one. It compiles the kernel's own source text, unchanged, with
``g++`` and a small header that gives the CUDA built-ins a CPU meaning, and
launches it over the grid the caller asked for:

* ``blockIdx``, ``threadIdx``, ``blockDim`` and ``gridDim`` are set for every
  (block, thread) of the launch; the blocks run in a shuffled order and the
  threads of a block in reverse order when ``seed`` is not 0, so a result that
  depends on the order of blocks or threads (a race) shows up as a difference;
* a kernel that calls ``__syncthreads()`` runs each thread of a block as a
  fiber (its own stack, started with ``ucontext``, switched with
  ``_setjmp``/``_longjmp``): every thread runs up to the barrier before any
  goes past it, as on a GPU, and ``__shared__`` arrays are shared by the
  block's threads. A barrier that some threads of a block never reach (undefined on a
  GPU) is reported as an error;
* every array is copied into a buffer with guard zones on both sides: a write
  outside the array is reported (the guards are checked after the launch), and
  a read outside it returns NaN (float) or a huge integer, which spoils the
  result instead of passing unnoticed.

An element-wise body (CuPy ``ElementwiseKernel``) is wrapped by
:func:`minicnn.kernels.elementwise_source`, the same harness that the NVRTC
check compiles.

What it still cannot show: GPU rounding (``-ftz``, fused multiply-adds, the
device's ``sqrt``), warp-level behaviour (none of minicnn's kernels relies on
it), memory coherence between blocks of one launch, speed. Used by the strict
CuPy stand-in (tests/fakecupy.py, ``MINICNN_STANDIN_KERNELS``) and by
tests/test_cuda_on_cpu.py.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

__all__ = ["CudaOnCpuUnavailable", "KernelFault", "compiler", "CpuKernel", "raw_signature"]

_CTYPES = {"float": ctypes.c_float, "double": ctypes.c_double, "int": ctypes.c_int32,
           "long long": ctypes.c_int64, "unsigned int": ctypes.c_uint32, "unsigned char": ctypes.c_uint8}
_DTYPES = {"float": np.float32, "double": np.float64, "int": np.int32, "long long": np.int64,
           "unsigned int": np.uint32, "unsigned char": np.uint8}
GUARD = 64  # elements of guard zone on each side of every array


class CudaOnCpuUnavailable(RuntimeError):
    """No C++ compiler to build the kernels for the CPU."""


class KernelFault(AssertionError):
    """The kernel wrote outside an array, or diverged at a barrier."""


def compiler() -> str:
    """The C++ compiler (``$CXX``, else g++), or CudaOnCpuUnavailable saying how to get one."""
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise CudaOnCpuUnavailable(f"no C++ compiler {cxx!r} on PATH (apt-get install g++, or set CXX)")
    return path


# The CUDA built-ins, given a CPU meaning. The kernel's own source follows this text unchanged.
_HEADER = r"""
#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <ucontext.h>
#include <algorithm>
using std::min;
using std::max;
struct minicnn_dim3 { volatile unsigned int x, y, z; };
// volatile: a fiber re-reads threadIdx after every __syncthreads(), when the scheduler has set it for that thread
static minicnn_dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static   /* blocks run one after another, so one static array serves each block in turn */

/* Fibers: each thread of a block has its own stack; a switch is a _setjmp/_longjmp pair (no system call). */
static jmp_buf minicnn_scheduler;
static jmp_buf* minicnn_fiber_jump = 0;
static int* minicnn_state = 0;        /* 0 runnable, 1 waiting at a barrier, 2 finished the block */
static unsigned minicnn_current = 0;

static void __syncthreads() {
  minicnn_state[minicnn_current] = 1;
  if (!_setjmp(minicnn_fiber_jump[minicnn_current])) _longjmp(minicnn_scheduler, 1);
}
"""

_LAUNCHER = r"""
static void** minicnn_args;
static void minicnn_body() { {CALL}; }

/* A fiber runs the kernel for its thread of every block in turn, yielding at each barrier and block end. */
static void minicnn_fiber_entry() {
  for (;;) {
    minicnn_body();
    minicnn_state[minicnn_current] = 2;
    if (!_setjmp(minicnn_fiber_jump[minicnn_current])) _longjmp(minicnn_scheduler, 1);
  }
}

static uint64_t minicnn_next(uint64_t* s) { *s = *s * 6364136223846793005ULL + 1442695040888963407ULL; return *s >> 33; }

/* Returns 0, or 1 when the threads of a block disagreed about a barrier. */
extern "C" int minicnn_launch(unsigned gx, unsigned bx, unsigned long long seed, void** args) {
  minicnn_args = args;
  gridDim.x = gx; gridDim.y = 1; gridDim.z = 1;
  blockDim.x = bx; blockDim.y = 1; blockDim.z = 1;
  blockIdx.y = blockIdx.z = threadIdx.y = threadIdx.z = 0;
  unsigned* order = (unsigned*)malloc(sizeof(unsigned) * gx);
  for (unsigned b = 0; b < gx; ++b) order[b] = b;
  uint64_t s = seed;
  if (seed) for (unsigned b = gx; b > 1; --b) { unsigned k = (unsigned)(minicnn_next(&s) % b); std::swap(order[b - 1], order[k]); }
  int status = 0;
  if (!{USES_BARRIERS}) {
    for (unsigned q = 0; q < gx; ++q) {
      blockIdx.x = order[q];
      for (unsigned t = 0; t < bx; ++t) { threadIdx.x = seed ? bx - 1 - t : t; minicnn_body(); }
    }
    free(order);
    return 0;
  }
  /* The fibers' memory is kept from one launch to the next: touching fresh stacks costs page faults. */
  const size_t stack_size = 1 << 16;
  static unsigned capacity = 0;
  static ucontext_t* start = 0;
  static char* stacks = 0;
  static int* started = 0;
  if (bx > capacity) {
    free(start); free(stacks); free(started); free(minicnn_fiber_jump); free(minicnn_state);
    start = (ucontext_t*)malloc(sizeof(ucontext_t) * bx);
    stacks = (char*)malloc(stack_size * bx);
    started = (int*)malloc(sizeof(int) * bx);
    minicnn_fiber_jump = (jmp_buf*)malloc(sizeof(jmp_buf) * bx);
    minicnn_state = (int*)malloc(sizeof(int) * bx);
    capacity = bx;
  }
  for (unsigned t = 0; t < bx; ++t) started[t] = 0;
  for (unsigned t = 0; t < bx; ++t) {
    getcontext(&start[t]);
    start[t].uc_stack.ss_sp = stacks + (size_t)t * stack_size;
    start[t].uc_stack.ss_size = stack_size;
    start[t].uc_link = 0;   /* a fiber never returns: it is abandoned after the last block */
    makecontext(&start[t], minicnn_fiber_entry, 0);
  }
  for (unsigned q = 0; q < gx && !status; ++q) {
    blockIdx.x = order[q];
    for (unsigned t = 0; t < bx; ++t) minicnn_state[t] = 0;
    for (;;) {  /* one phase: every thread runs to its next barrier or to the end of the block */
      for (unsigned k = 0; k < bx; ++k) {
        unsigned t = seed ? bx - 1 - k : k;
        if (minicnn_state[t] == 2) continue;
        minicnn_state[t] = 0;
        minicnn_current = t;
        threadIdx.x = t;
        if (!_setjmp(minicnn_scheduler)) {
          if (!started[t]) { started[t] = 1; setcontext(&start[t]); }
          _longjmp(minicnn_fiber_jump[t], 1);
        }
      }
      unsigned done = 0;
      for (unsigned t = 0; t < bx; ++t) done += minicnn_state[t] == 2;
      if (done == bx) break;
      if (done) { status = 1; break; }  /* some threads finished while others wait at a barrier */
    }
  }
  free(order);
  return status;
}
"""

_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(([^)]*)\)', re.S)


def raw_signature(source: str, name: str) -> list[tuple[str, bool, str]]:
    """``[(C type, is pointer, name), ...]`` of the ``extern "C" __global__`` function ``name`` in ``source``."""
    for m in _SIGNATURE.finditer(source):
        if m.group(1) == name:
            out = []
            for part in filter(None, (p.strip() for p in m.group(2).split(","))):
                words = part.replace("*", " * ").replace("__restrict__", " ").split()
                pointer = "*" in words
                words = [w for w in words if w not in ("*", "const")]
                out.append((" ".join(words[:-1]), pointer, words[-1]))
            return out
    raise ValueError(f'no extern "C" __global__ function {name!r} in the kernel source')


def _cache_dir() -> Path:
    root = os.environ.get("MINICNN_CUDA_ON_CPU_CACHE")
    path = Path(root) if root else Path(tempfile.gettempdir()) / f"minicnn-cuda-on-cpu-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


_LOADED: dict = {}
# A launch runs with the GIL released (ctypes), and each library's fibers live in its static memory: one at a time.
_LAUNCH_LOCK = threading.Lock()


def _build(unit: str) -> ctypes.CDLL:
    """Compile one translation unit into a shared library (cached on disk by the hash of its text)."""
    cxx = compiler()
    digest = hashlib.sha256((cxx + "\0" + unit).encode()).hexdigest()[:24]
    if digest in _LOADED:
        return _LOADED[digest]
    lib_path = _cache_dir() / f"k{digest}.so"
    if not lib_path.exists():
        # per-process names until the atomic rename: test processes running side by side may build the same unit
        src = lib_path.with_suffix(f".{os.getpid()}.cpp")
        src.write_text(unit)
        tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
        # -O1: quick to build; -ffp-contract=off: no fused multiply-add the source did not ask for
        cmd = [cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-w", "-o", str(tmp), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the CUDA source does not compile for the CPU ({' '.join(cmd)}):\n{proc.stderr}\n"
                               f"--- unit ---\n{unit}")
        os.replace(tmp, lib_path)  # atomic: a parallel build of the same unit never sees half a file
        src.unlink()
    lib = ctypes.CDLL(str(lib_path))
    lib.minicnn_launch.restype = ctypes.c_int
    lib.minicnn_launch.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_void_p]
    _LOADED[digest] = lib
    return lib


def _guard_value(dtype):
    if dtype.kind == "f":
        return dtype.type(np.nan)
    return np.iinfo(dtype).max if dtype.kind in "iu" else 0


class CpuKernel:
    """One CUDA kernel (``source`` with ``extern "C" __global__ void name(...)``), runnable on the CPU.

    ``kernel(grid, block, args)`` launches it as ``cupy.RawKernel`` would:
    ``args`` are NumPy arrays (C-contiguous, passed as pointers to their data)
    and NumPy scalars of the parameters' C types. Arrays are updated in place.
    Raises :class:`KernelFault` when the kernel wrote outside an array or its
    threads disagreed about a barrier.
    """

    def __init__(self, source: str, name: str, signature=None):
        self.name = name
        self.signature = signature or raw_signature(source, name)
        call_args = []
        for k, (ctype, pointer, _) in enumerate(self.signature):
            call_args.append(f"*({ctype}**)minicnn_args[{k}]" if pointer else f"*({ctype}*)minicnn_args[{k}]")
        self.uses_barriers = "__syncthreads" in source
        launcher = (_LAUNCHER.replace("{CALL}", f"{name}({', '.join(call_args)})")
                    .replace("{USES_BARRIERS}", "1" if self.uses_barriers else "0"))
        self._lib = _build(_HEADER + "\n#line 1 \"kernel.cu\"\n" + source + "\n" + launcher)

    def __call__(self, grid, block, args, seed: int = 0):
        grid, block = tuple(int(g) for g in grid), tuple(int(b) for b in block)
        if len(grid) != 1 or len(block) != 1:
            raise NotImplementedError(f"{self.name}: only 1-D grids and blocks are emulated (got {grid}, {block})")
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name} takes {len(self.signature)} arguments, got {len(args)}")
        holders, guarded = [], []
        for (ctype, pointer, pname), a in zip(self.signature, args):
            if pointer:
                if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
                    raise TypeError(f"{self.name}: argument {pname!r} ({ctype}*) must be a C-contiguous NumPy array")
                if ctype in _DTYPES and a.dtype != _DTYPES[ctype]:
                    raise TypeError(f"{self.name}: argument {pname!r} is {ctype}*, got a {a.dtype} array")
                buf = np.full(a.size + 2 * GUARD, _guard_value(a.dtype), dtype=a.dtype)
                buf[GUARD:GUARD + a.size] = a.reshape(-1)
                guarded.append((pname, a, buf))
                holders.append(ctypes.c_void_p(buf.ctypes.data + GUARD * a.itemsize))
            else:
                holders.append(_CTYPES[ctype](a.item() if isinstance(a, np.generic) else a))
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        with _LAUNCH_LOCK:
            status = self._lib.minicnn_launch(grid[0], block[0], int(seed), argv)
        for pname, a, buf in guarded:
            for side, zone in (("before", buf[:GUARD]), ("after", buf[GUARD + a.size:])):
                fresh = np.full(GUARD, _guard_value(a.dtype), dtype=a.dtype)
                if not np.array_equal(zone, fresh, equal_nan=a.dtype.kind == "f"):
                    raise KernelFault(f"{self.name} (grid {grid}, block {block}) wrote outside its argument "
                                      f"{pname!r} ({a.size} elements), {side} it")
            inside = buf[GUARD:GUARD + a.size]
            if a.flags.writeable:
                a.reshape(-1)[...] = inside
            elif not np.array_equal(inside, a.reshape(-1), equal_nan=a.dtype.kind == "f"):
                raise KernelFault(f"{self.name} (grid {grid}, block {block}) wrote into its read-only argument "
                                  f"{pname!r}")
        if status:
            raise KernelFault(f"{self.name} (grid {grid}, block {block}): some threads of a block finished "
                              f"while others waited at __syncthreads()")
