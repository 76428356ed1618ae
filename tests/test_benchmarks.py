"""The benchmarks compute what they claim to time: PyTorch twins of the zoo networks, the Winograd and input-gradient variants."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import minicnn

torch = pytest.importorskip("torch")


def _load_bench(name):
    """benchmarks/<name>.py as a module, under a name of its own (no clash with other modules called common)."""
    spec = importlib.util.spec_from_file_location(
        f"minicnn_bench_{name}", Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torch_twin = _load_bench("common").torch_twin


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


def test_the_distributed_benchmark_bounds_time_the_layers_they_name(monkeypatch):
    bench = _load_bench("bench_distributed")
    model = minicnn.build_model("hw3_cnn")
    x = np.random.default_rng(0).standard_normal((4, 1, 48, 48)).astype(np.float32)
    calls = []
    for layer in model.layers:
        for method in ("forward", "backward"):
            original = getattr(layer, method)
            monkeypatch.setattr(layer, method, lambda *a, _f=original, _n=type(layer).__name__, _m=method, **k:
                                (calls.append((_n, _m)), _f(*a, **k))[1])
    seconds = bench.layer_seconds(model, x, repeats=2, kinds=("Conv2D", "Dense"))
    assert seconds > 0
    backwards = [name for name, method in calls if method == "backward"]
    # one backward per Conv2D / Dense in each of the 2 warm-up and 2 timed runs: nothing else
    assert sorted(set(backwards)) == ["Conv2D", "Dense"]
    assert len(backwards) == 4 * (4 + 3)


@pytest.mark.parametrize("c, f, h, w", [(1, 2, 4, 4), (3, 5, 6, 8), (4, 3, 10, 2)])
def test_the_benchmarks_numpy_winograd_convolution_is_the_3x3_convolution(c, f, h, w):
    winograd_conv3x3 = _load_bench("bench_conv_algorithms").winograd_conv3x3
    rng = np.random.default_rng(c * 100 + h)
    x = rng.standard_normal((2, c, h, w))
    layer = minicnn.Conv2D(c, f, 3, padding=1, bias=False)
    layer.params["W"] = rng.standard_normal((f, c, 3, 3))
    np.testing.assert_allclose(winograd_conv3x3(x, layer.params["W"]), layer.forward(x), rtol=1e-10, atol=1e-10)


def test_the_convolution_benchmark_times_both_input_gradients_and_names_the_layers_choice(tmp_path):
    pytest.importorskip("threadpoolctl")
    bench = _load_bench("bench_conv_algorithms")
    out = tmp_path / "conv.json"
    assert bench.main(["--batch", "2", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["shape"] for r in rows] == ["1->32, 48x48", "32->64, 24x24", "64->128, 12x12", "128->256, 6x6", "all 4"]
    # the first layer (C_out = 32 C_in) scatters with col2im; the others (C_out = 2 C_in) convolve dout
    assert [r["dx_path"] for r in rows] == ["col2im", "convolution", "convolution", "convolution", ""]
    assert all(r["dx_col2im_ms"] > 0 and r["dx_convolution_ms"] > 0 for r in rows)


def test_the_evaluation_memory_benchmark_measures_three_ways_that_compute_the_same_outputs(tmp_path):
    bench = _load_bench("bench_eval_memory")
    out = tmp_path / "memory.json"
    assert bench.main(["--models", "ece662_resnet", "--batch-size", "16", "--images", "32", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    # The same network and inputs in the three processes: the same outputs, up to float rounding.
    np.testing.assert_allclose(row["forward_only_checksum"], row["forward_checksum"], rtol=1e-6)
    np.testing.assert_allclose(row["torch_checksum"], row["forward_checksum"], rtol=1e-3)
    # 16 images: one 64 -> 64 im2col matrix is 85 MB; a forward keeping caches holds several at once.
    assert row["forward_gib"] > 2 * row["forward_only_gib"] > 0
    assert row["ratio_vs_torch"] == round(row["forward_only_gib"] / row["torch_gib"], 2)
