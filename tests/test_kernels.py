"""minicnn.kernels: every CUDA source compiles (NVRTC, no GPU), and every fused path equals the generic code.

The fused-vs-generic tests take the ``cupy`` fixture: on a GPU they run the CUDA
kernels against the generic array code on the same device arrays; without one they
run through the strict stand-in (tests/fakecupy.py), which checks every launch's
arguments and runs the kernel's CUDA source compiled for the CPU, checked against
its NumPy transliteration (``MINICNN_STANDIN_KERNELS``, tests/cuda_on_cpu.py).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minicnn
from minicnn import kernels
from minicnn.layers import activations, conv, normalization

import nvrtc

ROOT = Path(__file__).resolve().parent.parent
# The cupy fixture is the same module for every example: sharing it across examples is what we want.
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- compiling: every CUDA source, with CuPy's options, without a GPU ---------------------------
@pytest.fixture(scope="module")
def nvrtc_lib():
    try:
        return nvrtc.load()
    except nvrtc.NVRTCUnavailable as exc:
        if os.environ.get("MINICNN_REQUIRE_NVRTC") == "1":  # CI: a missing compiler is a failure
            pytest.fail(f"MINICNN_REQUIRE_NVRTC=1 but {exc}")
        pytest.skip(f"{exc}: the CUDA sources are not compile-checked here")


@pytest.mark.parametrize("name,source", kernels.compile_units(), ids=[n for n, _ in kernels.compile_units()])
def test_every_cuda_source_compiles_with_nvrtc(nvrtc_lib, name, source):
    ok, log, size = nvrtc.compile_source(nvrtc_lib, source, re.sub(r"\W", "_", name), kernels.NVRTC_OPTIONS)
    assert ok, f"{name} does not compile with NVRTC {nvrtc.version(nvrtc_lib)}:\n{log}\n--- source ---\n{source}"
    assert size > 0
    assert "warning" not in log.lower(), log


def test_the_compile_check_catches_an_error(nvrtc_lib):
    name, source = kernels.compile_units()[0]
    ok, log, _ = nvrtc.compile_source(nvrtc_lib, source.replace("y = x + (T)1;", "y = x + undeclared;"), "bad",
                                      kernels.NVRTC_OPTIONS)
    assert not ok and "undeclared" in log


def test_all_cuda_code_lives_in_kernels_py():
    """One place for CUDA: no other module of minicnn builds kernels."""
    offenders = []
    for path in (ROOT / "minicnn").rglob("*.py"):
        if path.name == "kernels.py":
            continue
        text = path.read_text()
        for marker in ("ElementwiseKernel", "RawKernel", "RawModule", "__global__", "cupy.fuse", "ReductionKernel"):
            if marker in text:
                offenders.append(f"{path.relative_to(ROOT)}: {marker}")
    assert not offenders


def test_every_kernel_has_a_transliteration_and_is_compile_checked():
    units = {name.split("<")[0] for name, _ in kernels.compile_units()}
    for name in kernels.KERNELS:
        assert name in kernels.TRANSLITERATIONS
        assert name in units or any(name.startswith(u) for u in units), name


# -- fused == generic, on the device ------------------------------------------------------------
def _rand(cupy, shape, seed=0, dtype=np.float32):
    return cupy.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _close(cupy, a, b, rtol=1e-5, atol=1e-6, msg=""):
    np.testing.assert_allclose(cupy.asnumpy(a), cupy.asnumpy(b), rtol=rtol, atol=atol, err_msg=msg)


geometry = st.tuples(
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7),  # n, c, h, w
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2),  # kh, kw, sh, sw
    st.integers(0, 1), st.integers(0, 1),  # ph, pw
).filter(lambda g: g[2] + 2 * g[8] >= g[4] and g[3] + 2 * g[9] >= g[5])


@pytest.mark.gpu
@FAST
@given(g=geometry, dtype=st.sampled_from([np.float32, np.float64]))
def test_im2col_and_col2im_kernels_equal_the_generic_code(cupy, g, dtype):
    n, c, h, w, kh, kw, sh, sw, ph, pw = g
    x = _rand(cupy, (n, c, h, w), dtype=dtype)
    cols = conv.im2col(x, kh, kw, (sh, sw), (ph, pw))
    _close(cupy, cols, conv.im2col.generic(x, kh, kw, (sh, sw), (ph, pw)), rtol=0, atol=0)
    y = _rand(cupy, cols.shape, seed=1, dtype=dtype)
    dx = conv.col2im(y, x.shape, kh, kw, (sh, sw), (ph, pw))
    assert dx.shape == x.shape
    _close(cupy, dx, conv.col2im.generic(y, x.shape, kh, kw, (sh, sw), (ph, pw)))


pools = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
                  st.integers(0, 1), st.integers(0, 1), st.integers(4, 9), st.integers(4, 9))


@pytest.mark.gpu
@FAST
@given(p=pools)
def test_maxpool_kernels_equal_the_generic_code(cupy, p):
    kh, kw, sh, sw, ph, pw, h, w = p
    ph, pw = min(ph, kh // 2), min(pw, kw // 2)
    from conftest import distinct_values  # noqa: PLC0415

    x = cupy.asarray(distinct_values(np.random.default_rng(h * w), (2, 3, h, w)).astype(np.float32))
    layer = minicnn.MaxPool2D((kh, kw), (sh, sw), (ph, pw))
    out = layer.forward(x)
    dout = _rand(cupy, out.shape, seed=2)
    dx = layer.backward(dout)
    ref = minicnn.MaxPool2D((kh, kw), (sh, sw), (ph, pw))
    _close(cupy, out, type(ref).forward.generic(ref, x), rtol=0, atol=0)
    _close(cupy, dx, type(ref)._backward.generic(ref, dout), rtol=0, atol=0)


@pytest.mark.gpu
def test_maxpool_kernel_keeps_the_first_maximum_on_ties(cupy):
    x = cupy.asarray(np.ones((1, 1, 4, 4), dtype=np.float32))
    layer = minicnn.MaxPool2D(2)
    layer.forward(x)
    dx = cupy.asnumpy(layer.backward(cupy.asarray(np.ones((1, 1, 2, 2), dtype=np.float32))))
    np.testing.assert_array_equal(dx[0, 0], [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 5), (6, 3, 4, 5), (2, 4, 1, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_kernels_equal_the_generic_code(cupy, shape, dtype):
    bn = minicnn.BatchNorm1D if len(shape) == 2 else minicnn.BatchNorm2D
    x = _rand(cupy, shape, dtype=dtype) * 3 + 1
    c = shape[1]
    gamma, beta = _rand(cupy, (c,), 1, dtype), _rand(cupy, (c,), 2, dtype)
    axes, spec = bn.axes, bn.sum_of_products
    stats = [(_rand(cupy, (c,), 3, dtype), cupy.abs(_rand(cupy, (c,), 4, dtype)) + 0.5) for _ in range(2)]
    dout = _rand(cupy, shape, 5, dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    fused = normalization._train_forward(x, gamma, beta, *stats[0], 1e-5, 0.1, axes, spec)
    generic = normalization._train_forward.generic(x, gamma, beta, *stats[1], 1e-5, 0.1, axes, spec)
    for a, b, what in zip(fused[:2], generic[:2], ("out", "xhat")):
        _close(cupy, a, b, msg=what, **tol)
    for a, b in zip(stats[0], stats[1]):
        _close(cupy, a, b, msg="running statistics", **tol)
    for batch_stats in (True, False):
        fb = normalization._backward(dout, fused[1], fused[2], gamma, batch_stats, axes, spec)
        gb = normalization._backward.generic(dout, generic[1], generic[2], gamma, batch_stats, axes, spec)
        for a, b, what in zip(fb, gb, ("dx", "dgamma", "dbeta")):
            _close(cupy, a, b, msg=f"{what} (batch statistics {batch_stats})", **tol)
    fe = normalization._eval_forward(x, gamma, beta, *stats[0], 1e-5)
    ge = normalization._eval_forward.generic(x, gamma, beta, *stats[0], 1e-5)
    _close(cupy, fe[0], ge[0], **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("slope", [0.0, 0.01, 0.3])
def test_activation_kernels_equal_the_generic_code(cupy, slope):
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    x[:, :, 0] = 0.0  # at exactly 0 the derivative is the slope's (x > 0 is false), as in the generic code
    x, dout = cupy.asarray(x), _rand(cupy, (4, 3, 5, 5), 1)
    out, cache = activations._leaky_relu_forward(x, slope)
    g_out, g_cache = activations._leaky_relu_forward.generic(x, slope)
    _close(cupy, out, g_out, rtol=0, atol=0)
    _close(cupy, activations._leaky_relu_backward(dout, cache, slope),
           activations._leaky_relu_backward.generic(dout, g_cache, slope), rtol=0, atol=0)


@pytest.mark.gpu
def test_dropout_kernel_draws_float32_and_masks_consistently(cupy):
    x, dout = _rand(cupy, (64, 300)), _rand(cupy, (64, 300), 1)
    p = 0.3
    out, draws = activations._dropout_forward(x, p, minicnn.backend.random_state(cupy))
    assert draws.dtype == np.float32 and draws.shape == x.shape  # half the traffic of float64 draws
    keep = cupy.asnumpy(draws) >= p
    scale = np.float32(1 / (1 - p))
    np.testing.assert_allclose(cupy.asnumpy(out), np.where(keep, cupy.asnumpy(x) * scale, 0), rtol=1e-6)
    np.testing.assert_allclose(cupy.asnumpy(activations._dropout_backward(dout, draws, p)),
                               np.where(keep, cupy.asnumpy(dout) * scale, 0), rtol=1e-6)
    assert abs(keep.mean() - (1 - p)) < 0.01


def test_use_fused_switches_the_path(fake_cupy):
    x = _rand(fake_cupy, (2, 3, 6, 6))
    with fake_cupy.counting() as fused:
        conv.im2col(x, 3, 3, 1, 1)
    with kernels.use_fused(False), fake_cupy.counting() as generic:
        conv.im2col(x, 3, 3, 1, 1)
    assert [name for name, _ in fused.launches] == ["RawKernel minicnn_im2col_float"]
    assert "RawKernel minicnn_im2col_float" not in {name for name, _ in generic.launches}
    assert kernels.fused_enabled()


# -- what the kernels buy: launches per hw3_cnn training step -----------------------------------
def _launches_per_step(cupy, fused):
    from minicnn.optim import Adam  # noqa: PLC0415

    minicnn.set_backend("cupy")
    model = minicnn.build_model("hw3_cnn")
    opt, loss = Adam(model), minicnn.SoftmaxCrossEntropy()
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((32, 1, 48, 48)).astype(np.float32))
    y = cupy.asarray(rng.integers(0, 7, 32))

    def step():
        loss.forward(model.forward(x, True), y)
        model.backward(loss.backward())
        opt.step()

    with kernels.use_fused(fused):
        step()
        with cupy.counting() as ledger:
            step()
    return ledger


def test_fused_kernels_cut_the_launches_of_a_training_step_to_under_a_third(fake_cupy):
    generic, fused = _launches_per_step(fake_cupy, False), _launches_per_step(fake_cupy, True)
    assert generic.n_launches > 700  # 809 measured: the figure the kernels are judged against
    assert fused.n_launches <= generic.n_launches / 3, (fused.n_launches, generic.n_launches)
    by_op = fused.by_operation()
    assert by_op["ElementwiseKernel minicnn_adam"] == len(minicnn.build_model("hw3_cnn").params)  # one per parameter
    assert "einsum" not in by_op  # CuPy's einsum copies both operands
    assert not fused.syncs and not fused.copies


@pytest.mark.gpu
@FAST
@given(n=st.integers(1, 4), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_affine_warp_kernel_equals_the_generic_code(cupy, n, c, h, w, seed, dtype):
    from minicnn.data import augment  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    x = cupy.asarray(rng.standard_normal((n, c, h, w)).astype(dtype))
    m = cupy.asarray(rng.uniform(-1.5, 1.5, (n, 2, 3)))  # any map: rotations, zooms, shears, far shifts
    out = augment.affine_warp(x, m)
    assert out.dtype == x.dtype and out.shape == x.shape
    tol = 1e-5 if dtype == np.float32 else 1e-12
    _close(cupy, out, augment.affine_warp.generic(x, m), rtol=tol, atol=tol)
