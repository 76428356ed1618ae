import os

import numpy as np
import pytest

import minicnn


@pytest.fixture(autouse=True)
def _fresh_backend_state():
    """Every test starts on NumPy, float32, seed 0, whatever the previous test did."""
    minicnn.set_backend("numpy")
    minicnn.set_default_dtype("float32")
    minicnn.seed(0)
    yield
    minicnn.set_default_dtype("float32")


@pytest.fixture
def float64():
    """Build parameters in float64 (gradient checks)."""
    minicnn.set_default_dtype("float64")
    yield
    minicnn.set_default_dtype("float32")


@pytest.fixture
def fer2013_path():
    """Path of the real FER-2013 image folders, or skip (CI sets FER2013_DATA)."""
    path = os.environ.get("FER2013_DATA")
    if not path or not os.path.isdir(path):
        pytest.skip("FER2013_DATA is not set to the FER-2013 folder (train/<class>/*.jpg, test/<class>/*.jpg)")
    return path


def distinct_values(rng, shape):
    """Random values with no ties (a random permutation, scaled): max-pool gradients are defined."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) / np.prod(shape) - 0.5) * 4.0
