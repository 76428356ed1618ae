"""Compile CUDA sources with NVRTC through ctypes: no GPU, no CUDA toolkit, no CuPy needed.

NVRTC is the run-time compiler CuPy uses for ``ElementwiseKernel`` and
``RawKernel``; it is a plain shared library that works on a CPU-only machine
(``pip install nvidia-cuda-nvrtc-cu12``). A source that compiles here with
CuPy's options compiles on the GPU machine too (same compiler, same flags);
whether it computes the right numbers is a question for the GPU.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys


class NVRTCUnavailable(RuntimeError):
    pass


def _candidates():
    for entry in sys.path:
        yield from sorted(glob.glob(os.path.join(entry, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
        yield from sorted(glob.glob(os.path.join(entry, "nvidia", "cu13", "lib", "libnvrtc.so*")))
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            yield from sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        yield found


def load():
    """The NVRTC library (ctypes), or NVRTCUnavailable saying how to get it."""
    tried = []
    for path in _candidates():
        if "alt" in os.path.basename(path) or "builtins" in os.path.basename(path):
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            tried.append(f"{path}: {exc}")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib
    raise NVRTCUnavailable("NVRTC not found (pip install nvidia-cuda-nvrtc-cu12)" + (f"; tried {tried}" if tried else ""))


def version(lib) -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_source(lib, source: str, name: str, options) -> tuple[bool, str, int]:
    """(ok, compiler log, size of the cubin/PTX produced)."""
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None)
    if rc:
        raise RuntimeError(f"nvrtcCreateProgram: {lib.nvrtcGetErrorString(rc).decode()}")
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        out = 0
        if rc == 0:
            n = ctypes.c_size_t()
            get = lib.nvrtcGetCUBINSize if any(o.startswith("-arch=sm_") for o in options) else lib.nvrtcGetPTXSize
            get(prog, ctypes.byref(n))
            out = n.value
        return rc == 0, log, out
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
