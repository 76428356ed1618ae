"""int8 weights: ``quantize_int8`` / ``dequantize_int8`` and ``minicnn export --dtype int8``."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minicnn
from minicnn.checkpoint import SCALE_PREFIX, CheckpointError, dequantize_int8, load_npz, quantize_int8, save_npz
from minicnn.optim import Adam
from minicnn.training import export_for_inference, load_checkpoint, save_checkpoint


def small_net():
    return minicnn.Sequential([
        minicnn.Conv2D(1, 6, 3, padding=1), minicnn.BatchNorm2D(6), minicnn.ReLU(), minicnn.MaxPool2D(2),
        minicnn.Flatten(), minicnn.Dense(6 * 6 * 6, 16), minicnn.BatchNorm1D(16), minicnn.ReLU(),
        minicnn.Dense(16, 3),
    ], input_shape=(1, 12, 12), name="small")


def trained_checkpoint(path, seed=0):
    """A checkpoint of ``small_net`` after a few Adam steps (weights no longer at their initial values)."""
    minicnn.seed(seed)
    model = small_net()
    optimizer = Adam(model, lr=0.01)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        x = rng.standard_normal((8, 1, 12, 12)).astype(np.float32)
        out = model.forward(x, training=True)
        model.backward(rng.standard_normal(out.shape).astype(np.float32))
        optimizer.step()
    save_checkpoint(path, model, optimizer, epoch=1)
    return model


@settings(max_examples=60, deadline=None)
@given(shape=st.sampled_from([(5, 3), (1, 7), (9, 1), (4, 2, 3, 3), (1, 1, 1, 1), (3, 5, 1, 2)]),
       seed=st.integers(0, 2**31 - 1), magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
def test_each_weight_is_within_half_a_step_of_its_int8_value(shape, seed, magnitude):
    w = (np.random.default_rng(seed).standard_normal(shape) * magnitude).astype(np.float32)
    q, scale = quantize_int8(w)
    axis = 1 if w.ndim == 2 else 0
    assert q.dtype == np.int8 and q.shape == w.shape and scale.dtype == np.float32
    assert scale.shape == tuple(n if a == axis else 1 for a, n in enumerate(w.shape))
    assert np.abs(q.astype(int)).max() <= 127
    # every output unit uses the whole range: its largest weight maps to +-127
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    assert (np.abs(q.astype(int)).max(axis=reduce) == 127).all()
    error = np.abs(w.astype(np.float64) - q.astype(np.float64) * scale)
    assert (error <= scale.astype(np.float64) * (0.5 + 1e-5)).all()


def test_the_scale_is_per_output_unit_so_a_small_unit_keeps_its_precision():
    # Dense weights are (in, out): column 0 holds tiny weights, column 1 large ones. One scale for the
    # whole matrix (or one per input row) would round column 0 to zero; per output column it keeps 8 bits.
    w = np.array([[1e-3, 10.0], [-2e-3, -5.0], [5e-4, 1.0]], dtype=np.float32)
    q, scale = quantize_int8(w)
    assert scale.shape == (1, 2) and q[:, 0].all()
    assert np.abs(q[:, 0].astype(np.float32) * scale[0, 0] - w[:, 0]).max() <= 2e-3 / 254 * 1.001
    kernel = np.ascontiguousarray(w.T).reshape(2, 1, 1, 3)  # a convolution: (out 2, in 1, 1, 3)
    qk, sk = quantize_int8(kernel)
    assert sk.shape == (2, 1, 1, 1) and qk[0].all()
    np.testing.assert_array_equal(qk.reshape(2, 3), q.T)


def test_an_all_zero_unit_gets_scale_one_and_zeros():
    w = np.zeros((3, 2), dtype=np.float32)
    w[:, 1] = [1.0, -2.0, 0.5]
    q, scale = quantize_int8(w)
    assert scale[0, 0] == 1.0 and not q[:, 0].any()
    assert np.isfinite(dequantize_int8({"param/W": q, SCALE_PREFIX + "param/W": scale})["param/W"]).all()


def test_quantize_refuses_a_vector():
    with pytest.raises(ValueError, match=r"2 or more axes.*\(4,\)"):
        quantize_int8(np.ones(4, dtype=np.float32))


def test_an_int8_export_quarters_the_weights_and_loads_as_their_dequantized_values(tmp_path):
    model = trained_checkpoint(tmp_path / "ckpt.npz")
    f32 = export_for_inference(tmp_path / "ckpt.npz", tmp_path / "f32.npz")
    i8 = export_for_inference(tmp_path / "ckpt.npz", tmp_path / "i8.npz", dtype="int8")
    arrays, meta = load_npz(i8)
    assert meta["exported_dtype"] == "int8"
    matrices = [k for k, v in model.state_arrays().items() if k.startswith("param/") and v.ndim >= 2]
    assert matrices == ["param/0.W", "param/5.W", "param/8.W"]
    for key, value in model.state_arrays().items():
        if key in matrices:
            assert arrays[key].dtype == np.int8 and arrays[SCALE_PREFIX + key].dtype == np.float32
        else:  # biases, BatchNorm's gamma and beta and its running statistics: float32, bit for bit
            assert arrays[key].dtype == np.float32 and SCALE_PREFIX + key not in arrays
            np.testing.assert_array_equal(arrays[key], value)
    f32_arrays, _ = load_npz(f32)
    assert sum(arrays[k].nbytes for k in matrices) * 4 == sum(f32_arrays[k].nbytes for k in matrices)

    loaded, _, _ = load_checkpoint(i8, small_net())  # (not a zoo network: the model is given)
    for key in matrices:
        want = arrays[key].astype(np.float32) * arrays[SCALE_PREFIX + key]
        np.testing.assert_array_equal(loaded.state_arrays()[key], want)
        step = arrays[SCALE_PREFIX + key]
        assert (np.abs(loaded.state_arrays()[key] - model.state_arrays()[key]) <= step * 0.5001).all()
    x = np.random.default_rng(1).standard_normal((16, 1, 12, 12)).astype(np.float32)
    expected, got = model(x), loaded(x)
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    assert not np.array_equal(got, expected)  # (it is a rounding: equal outputs would mean nothing was rounded)

    again = export_for_inference(i8, tmp_path / "again.npz")  # an int8 file exports again, to float32 here
    again_arrays, _ = load_npz(again)
    assert not any(k.startswith(SCALE_PREFIX) for k in again_arrays)
    for key in matrices:
        np.testing.assert_array_equal(again_arrays[key], loaded.state_arrays()[key])


def test_sequential_load_reads_an_int8_file(tmp_path):
    model = trained_checkpoint(tmp_path / "ckpt.npz")
    export_for_inference(tmp_path / "ckpt.npz", tmp_path / "i8.npz", dtype="int8")
    other = small_net()
    other.load(tmp_path / "i8.npz")
    loaded, _, _ = load_checkpoint(tmp_path / "i8.npz", small_net())
    for key, value in loaded.state_arrays().items():
        np.testing.assert_array_equal(other.state_arrays()[key], value)
        assert value.dtype == model.state_arrays()[key].dtype == np.float32


@pytest.mark.parametrize("damage, message", [
    (lambda a: a.pop(SCALE_PREFIX + "param/5.W"), r"\['param/5.W'\] are int8 weights without their scale/<name>"),
    (lambda a: a.pop("param/5.W"),  # load_checkpoint's header check finds it first, Sequential.load the scale
     r"missing arrays \['param/5.W'\]|'scale/param/5.W' scales an array 'param/5.W' that the file does not hold"),
    (lambda a: a.__setitem__(SCALE_PREFIX + "param/5.W", np.ones((216, 1), np.float32)),
     r"'scale/param/5.W' has shape \(216, 1\), expected \(1, 16\)"),
    (lambda a: a.__setitem__(SCALE_PREFIX + "param/0.W", -np.ones((6, 1, 1, 1), np.float32)),
     r"'scale/param/0.W' must hold finite, positive"),
    (lambda a: a.__setitem__(SCALE_PREFIX + "param/5.b", np.ones(16, np.float32)),
     r"'param/5.b' has a scale \('scale/param/5.b'\) but dtype float32, expected int8"),
])
def test_a_damaged_int8_file_is_refused_naming_the_array(tmp_path, damage, message):
    trained_checkpoint(tmp_path / "ckpt.npz")
    export_for_inference(tmp_path / "ckpt.npz", tmp_path / "i8.npz", dtype="int8")
    arrays, meta = load_npz(tmp_path / "i8.npz")
    damage(arrays)
    save_npz(tmp_path / "bad.npz", arrays, meta)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "bad.npz", small_net())
    with pytest.raises(CheckpointError, match=message):
        small_net().load(tmp_path / "bad.npz")
