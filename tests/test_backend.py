"""Backend selection, device moves, seeding, dtypes and initialisers."""
import subprocess
import sys

import numpy as np
import pytest

import minicnn
from minicnn import backend, initializers, kernels


def test_numpy_is_the_default_and_import_never_needs_cupy():
    import subprocess
    import sys

    assert minicnn.get_backend() == "numpy" and minicnn.get_xp() is np
    # In a fresh interpreter: other tests here may have imported CuPy (or its stand-in) on purpose.
    code = "import sys, minicnn; minicnn.build_model('hw3_cnn'); assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_backend_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="'numpy', 'cupy'"):
        minicnn.set_backend("jax")


def test_asking_for_missing_cupy_says_how_to_install_it_from_the_checkout(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cupy", None)  # "not installed", whatever this machine has
    with pytest.raises(backend.BackendUnavailableError, match="not installed") as info:
        minicnn.set_backend("cupy")
    message = str(info.value)
    assert "pip install -e '.[gpu]'" in message and "cupy-cuda12x[ctk]" in message
    assert "minicnn[" not in message  # another, unrelated package is called minicnn on PyPI
    assert minicnn.get_backend() == "numpy"  # a failed switch changes nothing
    assert not backend.cupy_available()


def test_cupy_without_a_usable_gpu_fails_at_set_backend_saying_so(fake_cupy, monkeypatch):
    monkeypatch.setattr(fake_cupy, "DEVICE_COUNT", 0)
    with pytest.raises(backend.BackendUnavailableError, match="no CUDA device is usable.*nvidia-smi"):
        minicnn.set_backend("cupy")
    assert minicnn.get_backend() == "numpy" and not backend.cupy_available()


@pytest.mark.parametrize("broken,library", [("matmul", "cuBLAS"), ("random", "cuRAND"), ("kernel", "NVRTC")])
def test_cupy_without_its_cuda_libraries_fails_at_set_backend_naming_the_library(fake_cupy, monkeypatch, broken,
                                                                                  library):
    """A plain cupy-cuda12x wheel on a machine without a CUDA toolkit: the probe fails, not mid-training."""
    def missing(*args, **kwargs):
        raise RuntimeError("libXXX.so.12: cannot open shared object file")

    monkeypatch.setattr(backend, "_probed", set())
    monkeypatch.setattr(kernels, "_compiled", {})  # no kernel compiled by an earlier test
    if broken == "matmul":
        monkeypatch.setattr(fake_cupy.ndarray, "__matmul__", missing)
    elif broken == "random":
        monkeypatch.setattr(fake_cupy.random, "RandomState", missing)
    else:
        monkeypatch.setattr(fake_cupy, "ElementwiseKernel", missing)
    with pytest.raises(backend.BackendUnavailableError, match=f"{library}.*cannot open.*cupy-cuda12x\\[ctk\\]"):
        minicnn.set_backend("cupy")
    assert minicnn.get_backend() == "numpy"


def test_the_stand_in_passes_the_probe_and_becomes_the_backend(fake_cupy):
    assert minicnn.set_backend("cupy") is fake_cupy and backend.cupy_available()
    assert isinstance(minicnn.build_model("hw3_dnn").params["1.W"], fake_cupy.ndarray)


@pytest.mark.skipif(not backend.cupy_importable(), reason="CuPy is not installed here")
@pytest.mark.skipif(backend.cupy_available(), reason="CuPy sees a usable GPU here")
def test_real_cupy_without_a_gpu_is_refused_with_the_reason():
    with pytest.raises(backend.BackendUnavailableError, match="no CUDA device"):
        minicnn.set_backend("cupy")


def test_to_device_and_to_host_round_trip():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    d = minicnn.to_device(a, dtype=np.float32)
    assert d.dtype == np.float32
    np.testing.assert_array_equal(minicnn.to_host(d), a)
    assert minicnn.get_array_module(d) is np


def test_default_dtype_controls_new_parameters():
    minicnn.set_default_dtype("float64")
    assert minicnn.Conv2D(1, 2, 3).params["W"].dtype == np.float64
    minicnn.set_default_dtype(np.float32)
    assert minicnn.Dense(3, 2).params["W"].dtype == np.float32
    with pytest.raises(ValueError, match="float32 or float64"):
        minicnn.set_default_dtype("float16")


def test_seed_makes_initialisation_and_dropout_reproducible():
    minicnn.seed(11)
    a = minicnn.build_model("hw3_dnn")
    minicnn.seed(11)
    b = minicnn.build_model("hw3_dnn")
    minicnn.seed(12)
    c = minicnn.build_model("hw3_dnn")
    np.testing.assert_array_equal(a.params["0.W"] if "0.W" in a.params else a.params["1.W"],
                                  b.params["0.W"] if "0.W" in b.params else b.params["1.W"])
    assert not np.array_equal(a.params["1.W"], c.params["1.W"])


@pytest.mark.parametrize("name,std", [
    ("he_normal", lambda fi, fo: np.sqrt(2 / fi)),
    ("he_uniform", lambda fi, fo: np.sqrt(6 / fi) / np.sqrt(3)),
    ("glorot_normal", lambda fi, fo: np.sqrt(2 / (fi + fo))),
    ("glorot_uniform", lambda fi, fo: np.sqrt(6 / (fi + fo)) / np.sqrt(3)),
])
def test_initialisers_have_the_documented_scale(name, std):
    w = initializers.get_initializer(name)((400, 300), 400, 300)
    assert abs(float(w.mean())) < 0.01 * std(400, 300) * 10
    assert float(w.std()) == pytest.approx(std(400, 300), rel=0.02)
    if "uniform" in name:
        assert float(np.abs(w).max()) <= np.sqrt(3) * std(400, 300) + 1e-7


def test_conv_initialiser_uses_fan_in_of_the_receptive_field():
    w = minicnn.Conv2D(16, 64, 3).params["W"]
    assert float(w.std()) == pytest.approx(np.sqrt(2 / (16 * 9)), rel=0.05)


def test_unknown_initialiser_is_rejected():
    with pytest.raises(ValueError, match="he_normal"):
        minicnn.Dense(2, 2, init="orthogonal")


FAULTS_AFTER_FREE = """
import resource, sys
import numpy as np
import minicnn
if sys.argv[1] == "heap":
    assert minicnn.backend.use_heap_allocator()
def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
size = int(sys.argv[2])  # float32 elements
a = np.ones(size, np.float32)
del a
counts = []
for _ in range(4):
    before = minor_faults()
    a = np.ones(size, np.float32)
    del a
    counts.append(minor_faults() - before)
print(max(counts))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="use_heap_allocator tunes glibc's malloc (Linux)")
def test_heap_allocator_reuses_freed_large_arrays_without_page_faults():
    # A fresh process each: the setting is process-wide and cannot be undone.
    def worst(mode, size):
        out = subprocess.run([sys.executable, "-c", FAULTS_AFTER_FREE, mode, str(size)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    # 64 MB: above glibc's largest mmap threshold (32 MB); glibc maps each array fresh, at least one fault per
    # 2 MB huge page
    assert worst("default", 16_000_000) >= 50
    assert worst("heap", 16_000_000) <= 5  # the freed block is reused, its pages already mapped
    # 1.2 GB freed at once, as a deep network's step frees its activations: kept too, not trimmed off the
    # top of the heap and faulted in again (a trim threshold of 1 GiB did that, every vgg_fer_slim step)
    assert worst("heap", 300_000_000) <= 5


class _RecordingLibc:
    """glibc as use_heap_allocator sees it: records each mallopt(param, value) and accepts it."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


@pytest.mark.parametrize("threshold, expected", [(None, -1), (2**30, 2**30), (0, 0)])
def test_heap_allocator_turns_mmap_off_and_sets_the_trim_threshold(monkeypatch, threshold, expected):
    import ctypes  # noqa: PLC0415

    libc = _RecordingLibc()
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    assert minicnn.backend.use_heap_allocator(trim_threshold=threshold)
    # glibc's M_MMAP_MAX (-4) = 0: no mmap; M_TRIM_THRESHOLD (-1) = -1: never trim (glibc's documented value)
    assert libc.calls == [(-4, 0), (-1, expected)]


@pytest.mark.parametrize("bad", [-1, 2**31, 1.5, True, "1G"])
def test_heap_allocator_refuses_a_trim_threshold_that_is_not_bytes(bad):
    with pytest.raises(ValueError, match=r"trim_threshold is None \(never trim\) or a number of bytes"):
        minicnn.backend.use_heap_allocator(trim_threshold=bad)


def test_heap_allocator_does_nothing_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert minicnn.backend.use_heap_allocator() is False
