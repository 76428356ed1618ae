import os
import sys
from pathlib import Path

import numpy as np
import pytest

import minicnn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the CuPy stand-in, tests/fakecupy.py
import fakecupy  # noqa: E402

# Which CuPy the GPU-marked tests use: "auto" (the real one where it sees a GPU, else the stand-in),
# "cupy" (the real one, or fail: benchmarks/gpu_suite.sh sets this) or "fake" (the stand-in).
DEVICE = os.environ.get("MINICNN_TEST_DEVICE", "auto")
if DEVICE not in ("auto", "cupy", "fake"):
    raise pytest.UsageError(f"MINICNN_TEST_DEVICE must be auto, cupy or fake, got {DEVICE!r}")


def _real_cupy():
    """The installed CuPy if it imports and sees a GPU, else None (never the stand-in)."""
    if sys.modules.get("cupy") is fakecupy:
        return None
    try:
        module = minicnn.backend._import_cupy()
    except minicnn.backend.BackendUnavailableError as exc:
        if DEVICE == "cupy":
            pytest.fail(f"MINICNN_TEST_DEVICE=cupy, but CuPy is not usable here: {exc}")
        return None
    if module is fakecupy:  # `import cupy` gave the stand-in (tests/standin on PYTHONPATH: gpu_suite.sh's dry run)
        if DEVICE == "cupy":
            pytest.fail("MINICNN_TEST_DEVICE=cupy, but `import cupy` gives the stand-in "
                        "(tests/standin is on PYTHONPATH)")
        return None
    return module


@pytest.fixture(autouse=True)
def _fresh_backend_state():
    """Every test starts on NumPy, float32, seed 0, whatever the previous test did."""
    minicnn.set_backend("numpy")
    minicnn.set_default_dtype("float32")
    minicnn.seed(0)
    yield
    minicnn.set_default_dtype("float32")


@pytest.fixture
def cupy(monkeypatch):
    """The device array module for GPU-marked tests: real CuPy on a GPU, else the strict stand-in."""
    real = None if DEVICE == "fake" else _real_cupy()
    if real is not None:
        yield real
        real.get_default_memory_pool().free_all_blocks()
        return
    fakecupy.ledger.reset()
    yield fakecupy.install(monkeypatch)


@pytest.fixture
def fake_cupy(monkeypatch):
    """Always the stand-in (tests that read its ledger of launches, syncs and copies)."""
    fakecupy.ledger.reset()
    return fakecupy.install(monkeypatch)


@pytest.fixture
def float64():
    """Build parameters in float64 (gradient checks)."""
    minicnn.set_default_dtype("float64")
    yield
    minicnn.set_default_dtype("float32")


@pytest.fixture
def fer2013_path():
    """Path of the real FER-2013 (its image folders, or a zip/tar of them), or skip (CI sets FER2013_DATA)."""
    path = os.environ.get("FER2013_DATA")
    if not path or not os.path.exists(path):
        if os.environ.get("MINICNN_REQUIRE_FER2013") == "1":  # benchmarks/gpu_suite.sh: a skip would pass unseen
            pytest.fail(f"MINICNN_REQUIRE_FER2013=1, but FER2013_DATA={path!r} does not exist")
        pytest.skip("FER2013_DATA is not set to FER-2013 (the folder with train/<class>/*.jpg and "
                    "test/<class>/*.jpg, or a zip/tar of it)")
    return path


def distinct_values(rng, shape):
    """Random values with no ties (a random permutation, scaled): max-pool gradients are defined."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) / np.prod(shape) - 0.5) * 4.0
