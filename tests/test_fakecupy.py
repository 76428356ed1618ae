"""The CuPy stand-in itself: it refuses what CuPy refuses, keeps an honest ledger, and matches CuPy's API."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import fakecupy as cp
from minicnn import backend


def test_device_arrays_refuse_implicit_conversion():
    a = cp.asarray(np.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError, match="implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="implicit conversion"):
        np.concatenate([a, a])
    with pytest.raises(TypeError, match="numpy.ndarray"):
        a + np.ones(3)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        np.ones(3) * a
    with pytest.raises(TypeError, match="numpy.ndarray"):
        a[np.array([0, 1])]
    with pytest.raises(TypeError, match="numpy.ndarray"):
        a[...] = np.zeros((2, 3))
    with pytest.raises(TypeError, match="only size-1"):
        float(a)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        cp.maximum(a, np.zeros((2, 3)))
    assert type(a + 1.0) is cp.ndarray and type(a * np.float32(2)) is cp.ndarray  # scalars are fine


def test_the_ledger_counts_syncs_copies_and_launches():
    with cp.counting() as ledger:
        a = cp.asarray(np.arange(8.0))  # a host-to-device copy
        b = a.reshape(2, 4).T  # views: free
        c = (b * 2.0).sum()  # two launches
        float(c), int(c), bool(c), c.item(), a.get(), cp.asnumpy(a), repr(a)
        a[a > 3.0]  # boolean-mask indexing: the result's size needs a read-back
        cp.random.RandomState(0).randint(0, 5, size=3)  # rejection sampling reads back
        cp.random.RandomState(0).randint(0, 8, size=3)  # a power of two: no sync
    kinds = [k for k, _ in ledger.syncs]
    assert kinds == ["float", "int", "bool", "item", "get", "get", "repr", "boolean-mask indexing",
                     "randint over 5 values (not a power of two)"]
    assert all(w.startswith("tests/test_fakecupy.py:") for _, w in ledger.syncs)
    assert [d for d, _, _ in ledger.copies].count("H2D") == 1
    assert ledger.by_operation()["mul"] == 1 and ledger.by_operation()["sum"] == 1
    assert "reshape (copy)" not in ledger.by_operation()


def test_kernels_check_their_arguments():
    k = cp.ElementwiseKernel("T x, float64 s", "T y", "y = x * s", "minicnn_test_scale")
    cp.EMULATIONS["minicnn_test_scale"] = lambda x, s, y: np.multiply(x, s, out=y)
    x = cp.asarray(np.ones(4, np.float32))
    y = cp.empty_like(x)
    assert k(x, 2.0, y) is y and cp.asnumpy(y).tolist() == [2.0] * 4
    with pytest.raises(TypeError, match="takes 3 arguments"):
        k(x, y)
    with pytest.raises(TypeError, match="type T is both"):
        k(x, 2.0, cp.empty((4,), dtype=np.float64))
    with pytest.raises(ValueError, match="broadcast"):
        k(x, 2.0, cp.empty((5,), dtype=np.float32))
    raw = cp.RawKernel('extern "C" __global__ void minicnn_test_raw(const float* x, float* y, int n) {}',
                       "minicnn_test_raw")
    cp.EMULATIONS["minicnn_test_raw"] = lambda grid, block, x, y, n: None
    raw((1,), (32,), (x, y, np.int32(4)))
    with pytest.raises(TypeError, match="wrong width"):
        raw((1,), (32,), (x, y, 4))  # a Python int would be passed as 8 bytes to an int parameter
    with pytest.raises(TypeError, match="float\\*, got a float64 array"):
        raw((1,), (32,), (x, cp.empty((4,), dtype=np.float64), np.int32(4)))
    with pytest.raises(NotImplementedError, match="no NumPy transliteration"):
        cp.ElementwiseKernel("T x", "T y", "y = x", "unregistered")(x, y)


def _real_cupy():
    import importlib  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if not backend.cupy_importable() or sys.modules.get("cupy") is cp:
        pytest.skip("the real CuPy is not installed here: the stand-in's API is checked where it is "
                    "(e.g. benchmarks/gpu_suite.sh on a GPU machine)")
    return importlib.import_module("cupy")


def _public(namespace):
    return {n for n in vars(namespace) if not n.startswith("_") and n not in cp.TEST_ONLY}


def test_the_stand_in_exposes_only_cupy_names_with_cupy_signatures():
    """Every name the stand-in offers exists in CuPy, and where both have Python signatures, every
    parameter the stand-in accepts is one CuPy accepts (so code that runs here does not call CuPy
    with an argument it lacks). Needs no GPU: importing CuPy is enough."""
    real = _real_cupy()
    skip = {"annotations", "builtins", "collections", "contextlib", "math", "operator", "os", "re", "sys", "types",
            "CUDARuntimeError", "Ledger"}
    missing, mismatched = [], []
    for name in sorted(_public(cp) - skip):
        obj = getattr(cp, name)
        if inspect.ismodule(obj):
            continue
        if not hasattr(real, name):
            missing.append(name)
            continue
        _compare(getattr(real, name), obj, name, mismatched)
    nested = {
        "random.RandomState": ["rand", "randn", "random_sample", "uniform", "normal", "standard_normal", "randint",
                               "permutation", "seed"],
        "linalg": ["norm"], "lib.stride_tricks": ["as_strided"],
        "cuda.runtime": ["getDeviceCount", "getDeviceProperties"],
        "cuda": ["Stream", "Device", "MemoryPool", "using_allocator", "get_current_stream"],
        "cuda.Stream": ["null", "begin_capture", "end_capture", "is_capturing", "synchronize", "use"],
        "cuda.MemoryPool": ["malloc", "used_bytes", "total_bytes", "free_all_blocks"],
    }
    for path, names in nested.items():
        r, f = real, cp
        for part in path.split("."):
            r, f = getattr(r, part), getattr(f, part)
        for n in names:
            if not hasattr(r, n):
                missing.append(f"{path}.{n}")
            elif callable(getattr(f, n)) and not inspect.isclass(getattr(f, n)):
                _compare(getattr(r, n), getattr(f, n), f"{path}.{n}", mismatched)
    for method in ("get", "item", "tolist", "astype", "reshape", "transpose", "copy", "sum", "mean", "max",
                   "argmax", "view", "fill", "ravel", "dot", "set", "T", "shape", "dtype", "strides", "flags"):
        if not hasattr(real.ndarray, method):
            missing.append(f"ndarray.{method}")
    assert not missing, f"the stand-in offers names CuPy does not have: {missing}"
    assert not mismatched, f"parameters the stand-in accepts but CuPy does not: {mismatched}"


def _compare(real_obj, fake_obj, name, mismatched):
    target = fake_obj.__init__ if inspect.isclass(fake_obj) else fake_obj
    real_target = real_obj.__init__ if inspect.isclass(real_obj) else real_obj
    try:
        fake_sig, real_sig = inspect.signature(target), inspect.signature(real_target)
    except (TypeError, ValueError):
        return  # a Cython function without a signature: the name is all that can be checked
    real_params = real_sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in real_params.values()):
        return
    real_order = [n for n, q in real_params.items() if q.kind is q.POSITIONAL_OR_KEYWORD]
    for i, (pname, p) in enumerate(fake_sig.parameters.items()):
        if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if pname not in real_params and not any(q.kind is q.VAR_POSITIONAL for q in real_params.values()):
            mismatched.append(f"{name}({pname}=)")
        elif p.kind is p.POSITIONAL_OR_KEYWORD and pname in real_order and real_order.index(pname) != i:
            mismatched.append(f"{name}: {pname!r} is positional argument {i} here, {real_order.index(pname)} in CuPy")
