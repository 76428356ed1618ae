"""Backend selection, device moves, seeding, dtypes and initialisers."""
import numpy as np
import pytest

import minicnn
from minicnn import backend, initializers


def test_numpy_is_the_default_and_import_never_needs_cupy():
    import sys

    assert minicnn.get_backend() == "numpy" and minicnn.get_xp() is np
    assert "cupy" not in sys.modules or backend.cupy_available()


def test_unknown_backend_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="'numpy', 'cupy'"):
        minicnn.set_backend("jax")


@pytest.mark.skipif(backend.cupy_available(), reason="CuPy and a GPU are present here")
def test_asking_for_missing_cupy_says_how_to_install_it():
    with pytest.raises(backend.BackendUnavailableError, match="pip install"):
        minicnn.set_backend("cupy")
    assert minicnn.get_backend() == "numpy"  # a failed switch changes nothing


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
