"""Every layer's backward against central differences in float64, over random shapes (hypothesis)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minicnn
from minicnn import col2im, conv2d_naive, im2col
from minicnn.gradcheck import numerical_gradient, relative_error
from minicnn.layers.conv import conv_output_size
from tests.conftest import distinct_values

TOL = 1e-6
SETTINGS = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def conv_case(draw):
    """A convolution geometry whose output has at least one pixel."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 8))
    w = draw(st.integers(max(1, kw - 2 * pw), 8))
    n, c, f = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(n=n, c=c, f=f, h=h, w=w, k=(kh, kw), s=(sh, sw), p=(ph, pw), seed=seed)


@given(case=conv_case())
@settings(**SETTINGS)
def test_im2col_convolution_equals_naive_loops(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    layer = minicnn.Conv2D(case["c"], case["f"], case["k"], stride=case["s"], padding=case["p"])
    layer.astype(np.float64)
    layer.params["b"][...] = rng.standard_normal(case["f"])
    fast = layer.forward(x)
    slow = conv2d_naive(x, layer.params["W"], layer.params["b"], case["s"], case["p"])
    assert fast.shape == slow.shape
    np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-12)


@given(case=conv_case())
@settings(**SETTINGS)
def test_col2im_is_the_adjoint_of_im2col(case):
    """<im2col(x), y> == <x, col2im(y)> for random x, y: col2im is exactly im2col's transpose."""
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    cols = im2col(x, *case["k"], case["s"], case["p"])
    y = rng.standard_normal(cols.shape)
    lhs = float((cols * y).sum())
    rhs = float((x * col2im(y, x.shape, *case["k"], case["s"], case["p"])).sum())
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)


def test_im2col_layout_is_documented_one():
    x = np.arange(2 * 1 * 3 * 3, dtype=float).reshape(2, 1, 3, 3)
    cols = im2col(x, 2, 2)
    # row (c, u, v) = (0, 0, 1), column (n, i, j) = (1, 1, 0): x[1, 0, 1 + 0, 0 + 1]
    assert cols[1, 1 * 4 + 1 * 2 + 0] == x[1, 0, 1, 1]


@given(case=conv_case())
@settings(**SETTINGS)
def test_conv2d_gradients(case, float64):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    layer = minicnn.Conv2D(case["c"], case["f"], case["k"], stride=case["s"], padding=case["p"])
    report = minicnn.gradcheck(layer, x, seed=case["seed"])
    assert report.ok, str(report)


def test_conv2d_without_bias_has_no_bias_gradient(float64):
    layer = minicnn.Conv2D(2, 3, 3, bias=False)
    report = minicnn.gradcheck(layer, np.random.default_rng(1).standard_normal((2, 2, 5, 5)))
    assert set(report.errors) == {"x", "W"} and report.ok, str(report)


@st.composite
def pool_case(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h, w = draw(st.integers(max(1, kh - 2 * ph), 7)), draw(st.integers(max(1, kw - 2 * pw), 7))
    return dict(k=(kh, kw), s=stride, p=(ph, pw), n=draw(st.integers(1, 3)), c=draw(st.integers(1, 3)),
                h=h, w=w, seed=draw(st.integers(0, 2**31 - 1)))


@given(case=pool_case())
@settings(**SETTINGS)
def test_maxpool_gradients_without_ties(case, float64):
    rng = np.random.default_rng(case["seed"])
    x = distinct_values(rng, (case["n"], case["c"], case["h"], case["w"]))
    report = minicnn.gradcheck(minicnn.MaxPool2D(case["k"], case["s"], case["p"]), x, seed=case["seed"], h=1e-7)
    assert report.ok, str(report)


@given(case=pool_case())
@settings(**SETTINGS)
def test_avgpool_gradients(case, float64):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    report = minicnn.gradcheck(minicnn.AvgPool2D(case["k"], case["s"], case["p"]), x, seed=case["seed"])
    assert report.ok, str(report)


def test_pool_output_size_matches_formula():
    layer = minicnn.MaxPool2D(3, 2, 1)
    out = layer.forward(np.random.default_rng(0).standard_normal((1, 1, 9, 8)))
    assert out.shape == (1, 1, conv_output_size(9, 3, 2, 1), conv_output_size(8, 3, 2, 1))


def test_maxpool_routes_gradient_to_first_maximum_on_ties():
    x = np.zeros((1, 1, 2, 2))
    layer = minicnn.MaxPool2D(2)
    layer.forward(x)
    dx = layer.backward(np.ones((1, 1, 1, 1)))
    np.testing.assert_array_equal(dx, [[[[1.0, 0.0], [0.0, 0.0]]]])


@given(c=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_global_avgpool_gradients(c, h, w, seed, float64):
    x = np.random.default_rng(seed).standard_normal((2, c, h, w))
    report = minicnn.gradcheck(minicnn.GlobalAvgPool2D(), x, seed=seed)
    assert report.ok, str(report)


# n >= 3: with two values per feature BatchNorm outputs +-1 whatever x is, so dx ~ 0 and
# a relative error says nothing.
@given(n=st.integers(3, 6), d=st.integers(1, 5), training=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_batchnorm1d_gradients(n, d, training, seed, float64):
    rng = np.random.default_rng(seed)
    layer = minicnn.BatchNorm1D(d)
    layer.params["gamma"][...] = rng.uniform(0.5, 1.5, d)
    layer.params["beta"][...] = rng.standard_normal(d)
    layer.buffers["running_mean"][...] = rng.standard_normal(d)
    layer.buffers["running_var"][...] = rng.uniform(0.5, 2.0, d)
    x = rng.standard_normal((n, d)) * 2 + 1
    report = minicnn.gradcheck(layer, x, training=training, seed=seed)
    assert report.ok, str(report)


@given(n=st.integers(1, 3), c=st.integers(1, 4), hw=st.integers(1, 4), training=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_batchnorm2d_gradients(n, c, hw, training, seed, float64):
    rng = np.random.default_rng(seed)
    if n * hw * hw < 3:  # see test_batchnorm1d_gradients
        hw = 2
    layer = minicnn.BatchNorm2D(c)
    layer.params["gamma"][...] = rng.uniform(0.5, 1.5, c)
    layer.params["beta"][...] = rng.standard_normal(c)
    x = rng.standard_normal((n, c, hw, hw)) * 3 - 1
    report = minicnn.gradcheck(layer, x, training=training, seed=seed)
    assert report.ok, str(report)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), slope=st.sampled_from([None, 0.01, 0.2]),
       seed=st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_activation_gradients_away_from_the_kink(shape, slope, seed, float64):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    layer = minicnn.ReLU() if slope is None else minicnn.LeakyReLU(slope)
    report = minicnn.gradcheck(layer, x, seed=seed)
    assert report.ok, str(report)


@given(n=st.integers(1, 4), d_in=st.integers(1, 6), d_out=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_dense_gradients(n, d_in, d_out, seed, float64):
    x = np.random.default_rng(seed).standard_normal((n, d_in))
    report = minicnn.gradcheck(minicnn.Dense(d_in, d_out), x, seed=seed)
    assert report.ok, str(report)


def test_flatten_gradient(float64):
    report = minicnn.gradcheck(minicnn.Flatten(), np.random.default_rng(0).standard_normal((2, 3, 2, 2)))
    assert report.ok


@pytest.mark.parametrize("c_in,c_out,stride", [(3, 3, 1), (2, 4, 1), (2, 3, 2)])
def test_residual_block_gradients(c_in, c_out, stride, float64):
    x = np.random.default_rng(stride + c_out).standard_normal((2, c_in, 5, 5))
    block = minicnn.ResidualBlock(c_in, c_out, stride)
    assert block.projection == (stride != 1 or c_in != c_out)
    report = minicnn.gradcheck(block, x)
    assert report.ok, str(report)


def test_dropout_backward_uses_the_forward_mask(float64):
    layer = minicnn.Dropout(0.3)
    x = np.random.default_rng(0).standard_normal((50, 40))
    out = layer.forward(x, training=True)
    dout = np.random.default_rng(1).standard_normal(x.shape)
    dx = layer.backward(dout)
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / 0.7)
    np.testing.assert_allclose(dx, np.where(kept, dout / 0.7, 0.0))
    # the gradient is exactly the numerical one for this (fixed) mask
    mask = layer.mask
    num = numerical_gradient(lambda: float((x * mask * dout).sum()), x)
    assert relative_error(dx, num) < TOL


@given(n=st.integers(1, 8), k=st.integers(2, 9), smoothing=st.sampled_from([0.0, 0.1, 0.3]),
       weighted=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_cross_entropy_gradient(n, k, smoothing, weighted, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, k)) * 3
    labels = rng.integers(0, k, n)
    loss = minicnn.SoftmaxCrossEntropy(rng.uniform(0.5, 2.0, k) if weighted else None, smoothing)
    loss.forward(logits, labels)
    analytic = loss.backward()
    numeric = numerical_gradient(lambda: loss.forward(logits, labels), logits)
    assert relative_error(analytic, numeric) < TOL


@given(n=st.integers(1, 8), k=st.integers(2, 9), seed=st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_mse_gradient(n, k, seed):
    rng = np.random.default_rng(seed)
    logits, labels = rng.standard_normal((n, k)), rng.integers(0, k, n)
    loss = minicnn.MSELoss()
    loss.forward(logits, labels)
    analytic = loss.backward()
    numeric = numerical_gradient(lambda: loss.forward(logits, labels), logits)
    assert relative_error(analytic, numeric) < TOL


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]], dtype=np.float32)
    loss = minicnn.SoftmaxCrossEntropy()
    assert np.isfinite(loss.forward(logits, np.array([2])))
    assert np.all(np.isfinite(loss.backward()))


def test_gradcheck_catches_a_wrong_backward(float64):
    """The checker itself must fail on a broken layer, or every test above proves nothing."""

    class WrongDense(minicnn.Dense):
        def backward(self, dout):
            dx = super().backward(dout)
            self.grads["W"] = self.grads["W"] * 1.01
            return dx

    report = minicnn.gradcheck(WrongDense(3, 2), np.random.default_rng(0).standard_normal((4, 3)))
    assert not report.ok and report.errors["W"] > 1e-3 and report.errors["x"] < TOL


@given(k=st.tuples(st.integers(1, 3), st.integers(1, 3)), n=st.integers(1, 3), h=st.integers(3, 9),
       w=st.integers(3, 9), seed=st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_separable_maxpool_equals_the_general_path_even_with_ties(k, n, h, w, seed):
    """Non-overlapping max-pool runs a faster two-stage path; it must route gradients like the general one."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (n, 2, h, w)).astype(np.float64)  # few values: many ties
    if h < k[0] or w < k[1]:
        return
    fast, slow = minicnn.MaxPool2D(k), minicnn.MaxPool2D(k)
    out_fast = fast.forward(x)
    out_slow = slow._forward_general(x, slow._offsets(x, -np.inf))
    assert fast.cache[0] == "separable"
    np.testing.assert_array_equal(out_fast, out_slow)
    dout = rng.standard_normal(out_fast.shape)
    np.testing.assert_array_equal(fast.backward(dout), slow._backward_general(dout))
