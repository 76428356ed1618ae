"""The CUDA kernels run on the CPU (tests/cuda_on_cpu.py): the emulator itself, and every kernel of minicnn.

Three things are proved here:

* the emulator means what CUDA means: every (block, thread) runs once, barriers
  hold every thread of a block until all arrive, ``__shared__`` memory is the
  block's, and the faults a GPU would hide (a race, a barrier some threads
  skip, a write or read outside an array) show up;
* every kernel of :mod:`minicnn.kernels`, float and double, has its CUDA source
  run on the CPU against its NumPy transliteration through the stand-in's
  ``both`` mode (the mode CI runs the whole GPU-marked suite in);
* that comparison fails when a kernel's CUDA source is wrong: each mutation
  below (an index off by one, a missing barrier, a dropped bounds check, a
  formula changed) is caught.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minicnn import kernels
from minicnn.layers import MaxPool2D

import cuda_on_cpu
import fakecupy

try:
    cuda_on_cpu.compiler()
except cuda_on_cpu.CudaOnCpuUnavailable as exc:  # CI sets MINICNN_STANDIN_KERNELS=both, which then fails instead
    pytest.skip(f"{exc}: the CUDA sources are not run on the CPU here", allow_module_level=True)

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _kernel(body: str, params: str, name: str = "k"):
    src = f'extern "C" __global__ void {name}({params}) {{\n{body}\n}}\n'
    return cuda_on_cpu.CpuKernel(src, name)


# -- the emulator ---------------------------------------------------------------------------------
@given(grid=st.integers(1, 9), block=st.integers(1, 70), seed=st.integers(0, 3))
@settings(max_examples=25, deadline=None)
def test_every_thread_of_every_block_runs_once_with_its_indices(grid, block, seed):
    k = _kernel("""
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  out[t] = out[t] + 1000 * blockIdx.x + threadIdx.x + 1000000 * (gridDim.x == G) + 10000000 * (blockDim.x == B);
""", "int* out, const int G, const int B")
    out = np.zeros(grid * block, dtype=np.int32)
    k((grid,), (block,), [out, np.int32(grid), np.int32(block)], seed=seed)
    b, t = np.divmod(np.arange(grid * block), block)
    np.testing.assert_array_equal(out, 1000 * b + t + 11000000)


_BLOCK_SUM = """
  __shared__ double buf[256];
  double acc = 0.0;
  for (int j = threadIdx.x; j < n; j += blockDim.x) acc += x[blockIdx.x * n + j];
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) buf[threadIdx.x] += buf[threadIdx.x + k];
    LOOP_BARRIER
  }
  if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
"""


@given(rows=st.integers(1, 6), n=st.integers(1, 700), seed=st.integers(0, 3))
@settings(max_examples=20, deadline=None)
def test_a_block_reduction_with_barriers_and_shared_memory_sums_each_row(rows, n, seed):
    k = _kernel(_BLOCK_SUM.replace("LOOP_BARRIER", "__syncthreads();"), "const double* x, double* out, const int n")
    assert k.uses_barriers
    x = np.random.default_rng(n).standard_normal((rows, n))
    out = np.full(rows, np.nan)
    k((rows,), (256,), [x, out, np.int32(n)], seed=seed)
    np.testing.assert_allclose(out, x.sum(axis=1), rtol=1e-12, atol=1e-12)


def test_a_missing_barrier_gives_a_wrong_sum():
    """Threads of a block really interleave at barriers: without the loop's barrier the tree reads stale sums."""
    k = _kernel(_BLOCK_SUM.replace("LOOP_BARRIER", ""), "const double* x, double* out, const int n")
    x = np.random.default_rng(0).standard_normal((3, 500))
    results = []
    for seed in (0, 1):
        out = np.zeros(3)
        k((3,), (256,), [x, out, np.int32(500)], seed=seed)
        results.append(out)
    assert any(not np.allclose(r, x.sum(axis=1)) for r in results)


def test_a_race_between_blocks_shows_as_a_difference_between_launch_orders():
    k = _kernel("if (threadIdx.x == 0) out[0] = blockIdx.x;", "int* out")
    seen = set()
    for seed in range(6):
        out = np.zeros(1, dtype=np.int32)
        k((50,), (32,), [out], seed=seed)
        seen.add(int(out[0]))
    assert len(seen) > 1, "the blocks ran in one order for every seed: a race would go unseen"


def test_a_barrier_that_some_threads_skip_is_reported():
    k = _kernel("if (threadIdx.x < 10) __syncthreads(); out[threadIdx.x] = 1;", "int* out")
    with pytest.raises(cuda_on_cpu.KernelFault, match="waited at __syncthreads"):
        k((1,), (32,), [np.zeros(32, dtype=np.int32)])


def test_a_write_outside_an_array_is_reported_by_name():
    k = _kernel("const int t = threadIdx.x; if (t < n) out[t + 1] = x[t];", "const float* x, float* out, const int n")
    x = np.ones(8, dtype=np.float32)
    with pytest.raises(cuda_on_cpu.KernelFault, match=r"wrote outside its argument 'out' \(8 elements\), after it"):
        k((1,), (32,), [x, np.zeros(8, dtype=np.float32), np.int32(8)])


def test_a_read_outside_an_array_spoils_the_result():
    k = _kernel("const int t = threadIdx.x; if (t < n) out[t] = x[t + 1];", "const float* x, float* out, const int n")
    out = np.zeros(8, dtype=np.float32)
    k((1,), (32,), [np.ones(8, dtype=np.float32), out, np.int32(8)])
    assert np.isnan(out[-1]) and np.all(out[:-1] == 1)


def test_arguments_are_checked_against_the_signature():
    k = _kernel("out[0] = 1;", "float* out")
    with pytest.raises(TypeError, match="float\\*, got a float64 array"):
        k((1,), (1,), [np.zeros(1)])
    with pytest.raises(TypeError, match="C-contiguous"):
        k((1,), (1,), [np.zeros((4, 4), dtype=np.float32)[:, 1]])
    with pytest.raises(TypeError, match="takes 1 arguments, got 2"):
        k((1,), (1,), [np.zeros(1, dtype=np.float32), np.float32(1)])


def test_a_source_that_does_not_compile_says_so_with_the_compiler_output():
    with pytest.raises(RuntimeError, match="does not compile for the CPU(.|\n)*undeclared_name"):
        _kernel("out[0] = undeclared_name;", "float* out", name="broken")


def test_the_stand_in_poisons_empty_memory(fake_cupy):
    assert np.isnan(fake_cupy.empty((3,), dtype=np.float32).get()).all()
    assert (fake_cupy.empty_like(fake_cupy.zeros((2,), dtype=np.int32)).get() == np.iinfo(np.int32).max).all()


# -- every kernel of minicnn, through the stand-in's "both" mode ----------------------------------
@pytest.fixture
def both(fake_cupy, monkeypatch):
    """The stand-in running every kernel's CUDA source on the CPU, checked against its transliteration."""
    monkeypatch.setenv("MINICNN_STANDIN_KERNELS", "both")
    compared = []
    real = fakecupy._compare

    def recording(kernel, names, got, want):
        real(kernel, names, got, want)
        compared.append(kernel)

    monkeypatch.setattr(fakecupy, "_compare", recording)
    fake_cupy.compared = compared
    return fake_cupy


def _every_fused_path(cp, dtype, rng):
    """Call every fused function of minicnn.kernels once, on device arrays of ``dtype``."""
    def r(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(dtype))

    p, g = r(5, 7), r(5, 7)
    kernels.adam_update(p, g, cp.zeros_like(p), cp.zeros_like(p), t=3, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=1e-3, decoupled=False)
    kernels.sgd_update(p, g, None, first=True, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0)
    kernels.sgd_update(p, g, cp.zeros_like(p), first=False, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                       dampening=0.0)
    for centered in (False, True):
        for momentum in (0.0, 0.9):
            kernels.rmsprop_update(p, g, cp.ones_like(p), cp.zeros_like(p) if centered else None,
                                   cp.zeros_like(p) if momentum else None, lr=1e-3, alpha=0.99, eps=1e-8,
                                   weight_decay=0.0, momentum=momentum)
    # the variants a CUDA graph replays: the per-step values read from a device array
    lr = cp.asarray(np.array([0.1]))
    kernels.adam_update(p, g, r(5, 7) ** 2, r(5, 7) ** 2, t=None, lr=None, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=0.01, decoupled=True,
                        device_scalars=cp.asarray(np.array(kernels.adam_scalars(4, 1e-2, (0.9, 0.999), 0.01, True))))
    kernels.sgd_update(p, g, None, first=False, lr=None, momentum=0.0, nesterov=False, weight_decay=1e-4,
                       dampening=0.0, device_scalars=lr)
    kernels.sgd_update(p, g, r(5, 7), first=False, lr=None, momentum=0.9, nesterov=False, weight_decay=0.0,
                       dampening=0.1, device_scalars=lr)
    for centered in (False, True):
        for momentum in (0.0, 0.9):
            kernels.rmsprop_update(p, g, cp.ones_like(p), cp.zeros_like(p) if centered else None,
                                   r(5, 7) if momentum else None, lr=None, alpha=0.9, eps=1e-8,
                                   weight_decay=1e-3, momentum=momentum, device_scalars=lr * 0.01)
    x = r(3, 4, 9, 9)
    y, cache = kernels.leaky_relu_forward(x, 0.1)
    kernels.leaky_relu_backward(r(3, 4, 9, 9), cache, 0.1)
    y, u = kernels.dropout_forward(x, 0.3, cp.random.RandomState(1))
    kernels.dropout_backward(r(3, 4, 9, 9), u, 0.3)
    gamma, beta = r(4), r(4)
    out, xhat, inv_std = kernels.batchnorm_train_forward(x, gamma, beta, cp.zeros(4, dtype=dtype),
                                                         cp.ones(4, dtype=dtype), 1e-5, 0.1, (0, 2, 3), False)
    kernels.batchnorm_backward(r(3, 4, 9, 9), xhat, inv_std, gamma, True, (0, 2, 3), False)
    out, xhat, inv_std = kernels.batchnorm_eval_forward(x, gamma, beta, cp.zeros(4, dtype=dtype),
                                                        cp.ones(4, dtype=dtype), 1e-5)
    kernels.batchnorm_backward(r(3, 4, 9, 9), xhat, inv_std, gamma, False, (0, 2, 3), False)
    for image in (x, r(2, 3, 10, 10)):  # 10 rows: the last is read by no window, and col2im must skip it
        cols = kernels.im2col(image, 3, 3, 2, 1)
        kernels.col2im(cols, image.shape, 3, 3, 2, 1)
    pool = MaxPool2D(3, stride=2, padding=1)
    ties = cp.asarray(np.round(rng.standard_normal((3, 4, 9, 9))).astype(dtype))  # the first maximum wins
    pooled = kernels.maxpool2d_forward(pool, ties)
    kernels.maxpool2d_backward(pool, r(*pooled.shape))
    m = np.tile(np.array([0.9, 0.1, 0.5, -0.1, 0.9, -0.3]), (3, 1))
    kernels.affine_warp(x, cp.asarray(m))
    logits, labels = r(9, 7) * 3, cp.asarray(rng.integers(0, 7, 9))
    for weights, smoothing in ((None, 0.0), (cp.asarray(rng.uniform(0.5, 2.0, 7).astype(dtype)), 0.1)):
        loss, cache = kernels.softmax_cross_entropy(logits, labels, weights, smoothing)
        kernels.softmax_cross_entropy_backward(*cache)
    kernels.softmax_cross_entropy(logits, labels.astype(np.int32), None, 0.2)


def test_every_kernel_runs_its_cuda_source_on_the_cpu_against_its_transliteration(both):
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        _every_fused_path(both, dtype, rng)
    kernels.probe(both)
    ran = set(both.compared)
    # an element-wise kernel keeps its name for both float types; a raw one is named per type
    expected = {name for name, k in kernels.KERNELS.items()}
    assert expected - ran == set(), f"kernels whose CUDA source never ran here: {sorted(expected - ran)}"


def test_gather_kernels_take_the_int_path_exactly_when_every_index_fits():
    """fits_int: the larger array size plus one grid stride (here 2 blocks of 4 threads) at most 2**31 - 1."""
    helper = kernels._INDEX_WIDTH.replace("{LIMIT}", f"{kernels.NARROW_INDEX_LIMIT}LL")
    src = helper + '\nextern "C" __global__ void k(const long long* a, const long long* b, int* out) {\n' \
        "  const int t = blockIdx.x * blockDim.x + threadIdx.x;\n  out[t] = fits_int(a[t], b[t]);\n}\n"
    limit = 2**31 - 1 - 8
    a = np.array([10, limit, limit + 1, 5, 5, 0, limit, 2**40], dtype=np.int64)
    b = np.array([20, 3, 3, limit, limit + 1, 0, limit, 1], dtype=np.int64)
    out = np.zeros(8, dtype=np.int32)
    cuda_on_cpu.CpuKernel(src, "k")((2,), (4,), [a, b, out])
    assert out.tolist() == [1, 1, 0, 1, 0, 1, 1, 0]


def test_the_gather_kernels_64_bit_index_path_runs_too(both, monkeypatch):
    """im2col, col2im and max-pool index with int where every index fits, with long long beyond; arrays of
    2**31 elements are out of reach here, so the limit is set to 0 and every launch takes the 64-bit path."""
    monkeypatch.setattr(kernels, "NARROW_INDEX_LIMIT", 0)
    monkeypatch.setattr(kernels, "_compiled", {})  # the kernels are built again from the changed sources
    narrow = [k for k in kernels.KERNELS.values() if isinstance(k, kernels.Raw) and "{INDEX_WIDTH}" in k.source]
    assert {k.name for k in narrow} == {"minicnn_im2col", "minicnn_col2im", "minicnn_maxpool_forward",
                                        "minicnn_maxpool_backward"}
    assert all("0LL" in k.code("float") and "2147483647LL" not in k.code("float") for k in narrow)
    _every_fused_path(both, np.float32, np.random.default_rng(1))
    ran = set(both.compared)
    assert {k.kernel_name("float") for k in narrow} <= ran


# -- the comparison catches a wrong CUDA source ----------------------------------------------------
MUTATIONS = [
    ("minicnn_im2col", "const int y = i * sh - ph + u,", "const int y = i * sh - ph + u + 1,"),
    ("minicnn_im2col", "xx >= 0 && xx < w", "xx >= 0 && xx <= w"),
    ("minicnn_col2im", "yy / sh >= oh", "yy / sh > oh"),
    ("minicnn_col2im", "(yy / sh) * ow + xv / sw", "(yy / sh) * ow + xv"),
    ("minicnn_maxpool_forward", "val > best", "val >= best"),
    ("minicnn_maxpool_backward", "if (arg[o] == u * kw + v)", "if (arg[o] == v * kh + u)"),
    ("minicnn_bn_stats", "    if (threadIdx.x < k) buf[threadIdx.x] += buf[threadIdx.x + k];\n    __syncthreads();",
     "    if (threadIdx.x < k) buf[threadIdx.x] += buf[threadIdx.x + k];"),
    ("minicnn_bn_stats", "(double)m / (double)(m - 1) * var", "var"),
    ("minicnn_bn_grad_sums", "acc += (double)dy[k] * (double)xhat[k];", "acc += (double)dy[k];"),
    ("minicnn_affine_warp", "const int r1 = min(r0 + 1, h - 1)", "const int r1 = min(r0, h - 1)"),
    ("minicnn_adam", "sqrt(v) / (T)bias2_sqrt", "v / (T)bias2_sqrt"),
    ("minicnn_bn_apply", "const int ch = (int)((i / hw) % c);", "const int ch = (int)(i % c);"),
    ("minicnn_dropout", "u >= (float)p", "u > (float)p + 0.01f"),
    ("minicnn_softmax_xent_rows", "(c == yi ? 1.0 - smoothing : 0.0)", "(c == yi ? 1.0 : 0.0)"),
    ("minicnn_softmax_xent_rows", "s += exp((double)zi[c] - m);", "s += exp((double)zi[c]);"),
    ("minicnn_softmax_xent_backward", "dz = (p * s - a[i]) / t;", "dz = (p * s - a[row * k]) / t;"),
]


@pytest.mark.parametrize("name,before,after", MUTATIONS, ids=[f"{m[0]}-{i}" for i, m in enumerate(MUTATIONS)])
def test_a_wrong_cuda_source_is_caught(both, monkeypatch, name, before, after):
    rng = np.random.default_rng(1)
    if name in kernels.KERNELS:  # element-wise: one declaration for both float types
        decl = kernels.KERNELS[name]
        assert before in decl.operation, f"mutation does not apply to {name}"
        monkeypatch.setattr(decl, "operation", decl.operation.replace(before, after))
    else:
        decl = kernels.KERNELS[f"{name}_float"]
        assert before in decl.source, f"mutation does not apply to {name}"
        monkeypatch.setattr(decl, "source", decl.source.replace(before, after))
    monkeypatch.setattr(kernels, "_compiled", {})  # build the mutated kernel, not the cached one
    with pytest.raises((fakecupy.KernelMismatch, cuda_on_cpu.KernelFault)):
        _every_fused_path(both, np.float32, rng)


# -- hypothesis over the geometry of the gather kernels -------------------------------------------
@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2), dtype=st.sampled_from([np.float32, np.float64]))
@FAST
def test_the_convolution_and_pooling_kernels_agree_with_their_transliterations(both, n, c, h, w, k, s, p, dtype):
    if h + 2 * p < k or w + 2 * p < k:
        return
    x = both.asarray(np.random.default_rng(h * w).standard_normal((n, c, h, w)).astype(dtype))
    cols = kernels.im2col(x, k, k, s, p)
    kernels.col2im(cols, x.shape, k, k, s, p)
    if p <= k // 2:
        pool = MaxPool2D(k, stride=s, padding=p)
        out = kernels.maxpool2d_forward(pool, x)
        kernels.maxpool2d_backward(pool, out)
    assert {"minicnn_im2col_float", "minicnn_im2col_double"} & set(both.compared)


@given(n=st.integers(1, 40), c=st.integers(1, 5), hw=st.integers(1, 30))
@FAST
def test_the_batchnorm_kernels_agree_for_any_batch_and_plane_size(both, n, c, hw):
    if n * hw < 2:
        return
    rng = np.random.default_rng(n * c * hw)
    x = both.asarray(rng.standard_normal((n, c, hw, 1)).astype(np.float32) * 3 + 1)
    gamma, beta = both.asarray(rng.random(c).astype(np.float32)), both.zeros(c, dtype=np.float32)
    out, xhat, inv_std = kernels.batchnorm_train_forward(x, gamma, beta, both.zeros(c, dtype=np.float32),
                                                         both.ones(c, dtype=np.float32), 1e-5, 0.1, (0, 2, 3), False)
    kernels.batchnorm_backward(out, xhat, inv_std, gamma, True, (0, 2, 3), False)
    assert "minicnn_bn_stats_float" in both.compared and "minicnn_bn_grad_sums_float" in both.compared


def test_the_default_mode_runs_the_cuda_sources_where_a_compiler_is_found(monkeypatch):
    monkeypatch.delenv("MINICNN_STANDIN_KERNELS", raising=False)
    assert fakecupy.kernel_mode() == "both"
    monkeypatch.setenv("MINICNN_STANDIN_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="must be one of both, cuda, transliteration"):
        fakecupy.kernel_mode()



def test_a_mismatch_names_the_kernel_the_argument_and_the_first_differing_element():
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = want.copy()
    got[1, 2] += 0.5
    with pytest.raises(fakecupy.KernelMismatch, match=r"'k'.*argument 'out' \(1 of 12 elements; first at \(1, 2\): "
                                                       r"CUDA 6\.5, transliteration 6\.0\)"):
        fakecupy._compare("k", ["x", "out"], [want, got], [want, want])
    with pytest.raises(fakecupy.KernelMismatch, match="argument 'total'"):
        fakecupy._compare("k", ["total"], [np.array(1.0)], [np.array(2.0)])
    fakecupy._compare("k", ["out", "n"], [want + 1e-6, 3], [want, 3])  # float32 rounding passes
    with pytest.raises(fakecupy.KernelMismatch, match="argument 'arg'"):
        fakecupy._compare("k", ["arg"], [np.array([1, 2], dtype=np.int32)], [np.array([1, 3], dtype=np.int32)])


def test_readme_quotes_the_number_of_mutations_caught():
    from pathlib import Path  # noqa: PLC0415

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"catches {len(MUTATIONS)} mutations" in " ".join(readme.split())
