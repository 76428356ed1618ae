"""forward_only: the output of forward with no cache left behind, so evaluation memory peaks at one layer.

A plain forward keeps on every layer what its backward needs; evaluation that used it held all of
a network's caches at once (ece662_resnet: 11.2 GiB for 256 images, about twice that for the 512 of
the old evaluation batch, which killed a training run at its first validation). These tests check that every layer names its caches (nothing the size of the
batch stays on it after forward_only), that the outputs are the same, and that the peak memory of a
whole network's evaluation falls as it should.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minicnn
from minicnn.benchmarking import traced_peak_bytes as traced_peak  # peak bytes NumPy allocated in a call
from minicnn.losses import SoftmaxCrossEntropy
from minicnn.optim import Adam
from minicnn.training import Trainer


def held_arrays(layer, path="layer"):
    """(path, shape) of every array a layer (and its sub-layers) holds outside params, grads and buffers."""
    found = []

    def visit(value, where):
        if isinstance(value, np.ndarray):
            found.append((where, value.shape))
        elif isinstance(value, minicnn.Layer) and value not in dict(layer.children()).values():
            found.extend(held_arrays(value, where))  # a sub-layer kept as a plain attribute (ResidualBlock's ReLUs)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                visit(v, f"{where}[{i}]")

    for name, value in vars(layer).items():
        if name in ("params", "grads", "buffers", "_children"):
            continue
        visit(value, f"{path}.{name}")
    for cname, child in layer.children():
        found += held_arrays(child, f"{path}.{cname}")
    return found


def every_layer_kind():
    """(layer, input shape): one of each public layer, with the shapes that take each code path."""
    return [
        (minicnn.Conv2D(2, 3, 3, padding=1), (4, 2, 6, 6)),
        (minicnn.Conv2D(3, 2, 3, stride=2), (4, 3, 7, 7)),
        (minicnn.BatchNorm2D(3), (4, 3, 5, 5)),
        (minicnn.BatchNorm1D(5), (4, 5)),
        (minicnn.ReLU(), (4, 3, 5, 5)),
        (minicnn.LeakyReLU(0.1), (4, 3, 5, 5)),
        (minicnn.Dropout(0.5), (4, 6)),
        (minicnn.MaxPool2D(2), (4, 2, 6, 6)),
        (minicnn.MaxPool2D(3, stride=2, padding=1), (4, 2, 7, 7)),
        (minicnn.AvgPool2D(2), (4, 2, 6, 6)),
        (minicnn.GlobalAvgPool2D(), (4, 2, 6, 6)),
        (minicnn.Dense(6, 3), (4, 6)),
        (minicnn.Flatten(), (4, 2, 3, 3)),
        (minicnn.ResidualBlock(2, 2), (4, 2, 6, 6)),
        (minicnn.ResidualBlock(2, 4, stride=2), (4, 2, 6, 6)),
    ]


@pytest.mark.parametrize("layer, shape", every_layer_kind(), ids=lambda v: repr(v) if not isinstance(v, tuple) else "")
def test_forward_only_gives_forwards_output_and_leaves_no_array_behind(layer, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for training in (False, True):
        minicnn.seed(1)
        expected = layer.forward(x, training)
        minicnn.seed(1)  # Dropout draws the same mask
        out = layer.forward_only(x, training)
        np.testing.assert_array_equal(out, expected)
        leftover = [(where, s) for where, s in held_arrays(layer) if s and s[0] == shape[0]]
        assert not leftover, f"{layer!r} keeps batch-sized arrays after forward_only: {leftover}"


def saved(layer):
    """The non-empty cache attributes of a layer and its sub-layers."""
    own = [f"{layer!r}.{a}" for a in layer.cache_attrs if getattr(layer, a, None) is not None]
    return own + [s for _, child in layer.children() for s in saved(child)]


@pytest.mark.parametrize("layer, shape", every_layer_kind(), ids=lambda v: repr(v) if not isinstance(v, tuple) else "")
def test_a_training_forward_keeps_a_cache_that_release_cache_drops(layer, shape):
    """The other half: the attributes a layer names are the ones that hold its cache."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = layer.forward(x, training=True)
    assert saved(layer), f"{layer!r}: none of {layer.cache_attrs} is set by forward"
    layer.release_cache()
    assert saved(layer) == [] and not [h for h in held_arrays(layer) if h[1] and h[1][0] == shape[0]]
    with pytest.raises(RuntimeError, match=r"backward: nothing saved by a forward pass.*call forward"):
        layer.backward(np.ones(out.shape, np.float32))


@pytest.mark.parametrize("layer, shape", every_layer_kind(), ids=lambda v: repr(v) if not isinstance(v, tuple) else "")
def test_a_dout_of_another_shape_than_the_output_is_refused_naming_both(layer, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = layer.forward(x, training=True)
    for bad in [(out.shape[0] + 1,) + out.shape[1:], out.shape[:-1] + (out.shape[-1] + 2,), out.shape + (1,)]:
        with pytest.raises(ValueError, match=r"backward: expected dout of shape \(.*\) \(the shape of the last forward "
                                             r"pass's output\), got \(" + ", ".join(map(str, bad))):
            layer.backward(np.ones(bad, np.float32))
    layer.backward(np.ones(out.shape, np.float32))  # the cache is still there: the right shape goes through


def test_dropout_passes_the_gradient_through_after_an_evaluation_pass_only():
    drop = minicnn.Dropout(0.5)
    g = np.full((4, 6), 7.0, np.float32)
    with pytest.raises(RuntimeError, match="nothing saved by a forward pass"):
        drop.backward(g)  # no forward yet
    drop.forward(np.ones((4, 6), np.float32), training=False)
    assert drop.backward(g) is g  # evaluation: the identity
    drop.release_cache()
    with pytest.raises(RuntimeError, match="nothing saved by a forward pass"):
        drop.backward(g)
    drop.forward(np.ones((4, 6), np.float32), training=True)
    assert not np.array_equal(drop.backward(g), g)  # a mask again, not the identity of the earlier pass


@pytest.mark.parametrize("loss", [minicnn.losses.SoftmaxCrossEntropy(), minicnn.losses.MSELoss()],
                         ids=["cross-entropy", "mse"])
def test_a_loss_backward_before_its_forward_says_so(loss):
    with pytest.raises(RuntimeError, match=rf"{type(loss).__name__}.backward: nothing saved by a forward pass"):
        loss.backward()


@pytest.mark.parametrize("name", sorted(minicnn.MODELS))
def test_every_zoo_network_evaluates_identically_without_caches(name):
    model = minicnn.build_model(name)
    x = np.random.default_rng(0).standard_normal((3, 1, 48, 48)).astype(np.float32)
    expected = model.forward(x, training=False)
    assert held_arrays(model)  # a plain forward keeps the caches backward needs
    np.testing.assert_array_equal(model.forward_only(x), expected)
    assert held_arrays(model) == []
    np.testing.assert_array_equal(model.predict_logits(x), expected)


def test_evaluation_memory_peaks_at_one_layer_not_the_whole_network():
    """ece662_resnet's largest layer is a 64 -> 64 convolution at 48 x 48, whose im2col matrix is
    N * 576 * 2304 floats; evaluation needs about one and a half of those, a forward keeping every
    cache more than seven."""
    minicnn.seed(0)
    model = minicnn.build_model("ece662_resnet")
    n = 8
    x = np.random.default_rng(0).standard_normal((n, 1, 48, 48)).astype(np.float32)
    one_im2col = n * 576 * 48 * 48 * 4
    keeping = traced_peak(lambda: model.forward(x, training=False))
    model.release_cache()
    trainer = Trainer(model, Adam(model), SoftmaxCrossEntropy(), progress=False)
    evaluating = traced_peak(lambda: trainer.evaluate(x, np.zeros(n, np.int64), batch_size=n))
    # Measured: 7.6 and 1.4 such matrices.
    assert keeping > 5 * one_im2col, keeping / one_im2col  # what evaluation used to cost
    assert evaluating < 2 * one_im2col, evaluating / one_im2col
    assert held_arrays(model) == []  # and nothing stays for the next epoch's training step to sit beside


def test_a_convolution_slices_its_batch_to_its_im2col_budget(monkeypatch):
    """With a budget of one image, no whole-batch im2col matrix is ever built (the equality test above
    cannot tell slicing from none)."""
    layer = minicnn.Conv2D(64, 64, 3, padding=1, bias=False)
    n = 8
    x = np.random.default_rng(0).standard_normal((n, 64, 48, 48)).astype(np.float32)
    one_im2col = n * 576 * 48 * 48 * 4
    whole = traced_peak(lambda: layer.forward_only(x))
    monkeypatch.setattr(minicnn.Conv2D, "forward_only_cols_bytes", one_im2col // n)
    sliced = traced_peak(lambda: layer.forward_only(x))
    assert whole > one_im2col  # 8 images fit the default 64 MB: one matrix
    assert sliced < 0.5 * one_im2col, sliced / one_im2col  # the output (1/9 of it) and one image's matrix


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), c=st.integers(1, 3), f=st.integers(1, 4), size=st.integers(3, 8),
       k=st.sampled_from([1, 3]), stride=st.integers(1, 2), padding=st.integers(0, 1),
       budget_images=st.integers(1, 4))
def test_a_convolution_evaluated_in_slices_of_the_batch_equals_one_forward(n, c, f, size, k, stride, padding,
                                                                          budget_images):
    """forward_only cuts the batch so that each slice's im2col matrix fits its byte budget."""
    layer = minicnn.Conv2D(c, f, k, stride=stride, padding=padding)
    x = np.random.default_rng(n * 10 + size).standard_normal((n, c, size, size)).astype(np.float32)
    oh, ow = layer.output_shape(size, size)
    layer.forward_only_cols_bytes = budget_images * c * k * k * oh * ow * 4  # slices of budget_images images
    expected = layer.forward(x, training=False)
    out = layer.forward_only(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert layer.cache is None
