"""recalibrate_batchnorm ("precise BN"): running statistics = those of the given inputs, dropout off."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minicnn
from minicnn import (BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, LeakyReLU, ResidualBlock, Sequential,
                     recalibrate_batchnorm)


def batch_split(n, batch_size, seed=0):
    """The batches recalibrate_batchnorm cuts (same seeded shuffle), for computing the expected statistics."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(b) for b in np.array_split(order, max(1, n // batch_size))]


def expected_stats(features, batches):
    """Size-weighted mean of per-batch means and unbiased variances, per feature (axis 1)."""
    axes = (0,) + tuple(range(2, features.ndim))
    n = sum(len(b) for b in batches)
    mean = sum(len(b) * features[b].mean(axis=axes) for b in batches) / n
    var = sum(len(b) * features[b].var(axis=axes, ddof=1) for b in batches) / n
    return mean, var


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), batch_size=st.integers(2, 16), seed=st.integers(0, 3), d=st.integers(1, 5))
def test_single_batchnorm_gets_the_size_weighted_batch_statistics(n, batch_size, seed, d):
    minicnn.set_default_dtype("float64")
    x = np.random.default_rng(seed).standard_normal((n, d)) * 3 + 5
    bn = BatchNorm1D(d, momentum=0.1)
    model = Sequential([bn], input_shape=(d,))
    info = recalibrate_batchnorm(model, x, batch_size=batch_size, seed=seed)
    batches = batch_split(n, batch_size, seed)
    assert info == {"batchnorm_layers": 1, "images": n, "batches": len(batches)}
    assert min(len(b) for b in batches) >= min(n, batch_size)  # no tiny tail batch
    mean, var = expected_stats(x, batches)
    np.testing.assert_allclose(bn.buffers["running_mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(bn.buffers["running_var"], var, rtol=1e-10)
    # The running mean is the exact mean over all inputs, whatever the batches.
    np.testing.assert_allclose(bn.buffers["running_mean"], x.mean(axis=0), rtol=1e-10)
    assert bn.momentum == 0.1  # restored


def test_one_batch_gives_the_unbiased_statistics_of_all_inputs(float64):
    x = np.random.default_rng(1).standard_normal((12, 3, 4, 4)) + np.arange(3)[None, :, None, None]
    bn = BatchNorm2D(3)
    recalibrate_batchnorm(Sequential([bn], input_shape=(3, 4, 4)), x, batch_size=64)
    np.testing.assert_allclose(bn.buffers["running_mean"], x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], x.var(axis=(0, 2, 3), ddof=1), rtol=1e-12)
    # Evaluated on the same inputs, the layer now outputs zero-mean features (beta = 0).
    out = bn.forward(x, training=False)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)


def test_dropout_is_off_and_deeper_layers_see_recalibrated_inputs(float64):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 6))
    dense1, bn1, drop, dense2, bn2 = Dense(6, 8), BatchNorm1D(8), Dropout(0.5), Dense(8, 5), BatchNorm1D(5)
    model = Sequential([dense1, bn1, LeakyReLU(), drop, dense2, bn2], input_shape=(6,))
    for bn in (bn1, bn2):  # stale statistics, as after training on other inputs
        bn.buffers["running_mean"][...] = 7.0
        bn.buffers["running_var"][...] = 9.0
    recalibrate_batchnorm(model, x, batch_size=16, seed=3)
    batches = batch_split(64, 16, seed=3)

    h1 = dense1.forward(x, training=False)
    np.testing.assert_allclose(bn1.buffers["running_mean"], expected_stats(h1, batches)[0], rtol=1e-10)
    # bn2's inputs: each batch normalised by bn1 with *its own* batch statistics, then no dropout.
    h2 = np.empty((64, 5))
    for b in batches:
        mu, var = h1[b].mean(axis=0), h1[b].var(axis=0)
        z = (h1[b] - mu) / np.sqrt(var + bn1.eps) * bn1.params["gamma"] + bn1.params["beta"]
        h2[b] = dense2.forward(np.where(z > 0, z, 0.01 * z), training=False)
    mean, var = expected_stats(h2, batches)
    np.testing.assert_allclose(bn2.buffers["running_mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(bn2.buffers["running_var"], var, rtol=1e-10)
    assert drop.p == 0.5  # restored
    out = model.forward(x, training=True)  # dropout works again afterwards
    assert (drop.mask == 0).any()
    assert out.shape == (64, 5)


def test_parameters_are_untouched_and_nested_blocks_are_found(float64):
    model = Sequential([Conv2D(2, 4, 3, padding=1), ResidualBlock(4, 4), Flatten(), Dense(4 * 5 * 5, 3)],
                       input_shape=(2, 5, 5))
    params = {k: v.copy() for k, v in model.params.items()}
    x = np.random.default_rng(4).standard_normal((20, 2, 5, 5))
    info = recalibrate_batchnorm(model, x, batch_size=8)
    assert info["batchnorm_layers"] == 2  # bn1 and bn2 inside the residual block
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, params[k])
    block = model.layers[1]
    assert not np.allclose(block.bn1.buffers["running_mean"], 0.0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        recalibrate_batchnorm(Sequential([Dense(3, 2)], input_shape=(3,), name="tiny"), np.zeros((4, 3)))
    model = Sequential([BatchNorm1D(3)], input_shape=(3,))
    with pytest.raises(ValueError, match="at least 2 inputs.*got 1"):
        recalibrate_batchnorm(model, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="batch_size must be at least 2, got 1"):
        recalibrate_batchnorm(model, np.zeros((4, 3)), batch_size=1)


def test_it_fixes_the_variance_shift_of_dropout():
    """The reason to recalibrate: after training with dropout, a BatchNorm that follows it was
    normalising with the variance of dropped-out inputs; on clean inputs the recalibrated layer
    outputs unit-variance features, the stale one does not."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((512, 16)).astype(np.float32) + 1.0
    drop, bn = Dropout(0.5), BatchNorm1D(16, momentum=0.5)
    model = Sequential([drop, bn], input_shape=(16,))
    for _ in range(30):  # "training": running statistics of dropped-out inputs
        model.forward(x[rng.permutation(512)[:128]], training=True)
    stale = bn.forward(x, training=False).std(axis=0)
    recalibrate_batchnorm(model, x, batch_size=128)
    fresh = bn.forward(x, training=False).std(axis=0)
    assert np.all(stale < 0.85)  # dropout doubled the variance the layer learned (x -> 2x or 0)
    np.testing.assert_allclose(fresh, 1.0, atol=0.02)
