"""The benchmarks' PyTorch twins compute what the zoo networks compute (so the timings compare like with like)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import minicnn

torch = pytest.importorskip("torch")
# Loaded under its own name: examples/fer2013 has a module called common too.
_spec = importlib.util.spec_from_file_location(
    "minicnn_benchmarks_common", Path(__file__).resolve().parent.parent / "benchmarks" / "common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
torch_twin = _common.torch_twin


@pytest.mark.parametrize("name", sorted(minicnn.MODELS))
def test_every_zoo_network_has_a_torch_twin_with_the_same_outputs(name):
    model = minicnn.build_model(name)
    rng = np.random.default_rng(0)
    for p in model.params.values():  # biases start at 0 and gammas at 1: make every copy count
        p += (0.1 * rng.standard_normal(p.shape)).astype(p.dtype)
    # Train a little so that BatchNorm's running statistics are not the defaults.
    x = rng.standard_normal((8, *model.input_shape)).astype(np.float32)
    model.forward(x, training=True)
    twin = torch_twin(model, torch).eval()
    with torch.no_grad():
        theirs = twin(torch.from_numpy(x)).numpy()
    ours = model.forward(x, training=False)
    np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-4 * float(np.abs(theirs).max()))
