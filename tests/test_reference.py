"""The fast layers, losses and optimisers equal the plain references of ``minicnn.reference``.

Two kinds of test: (1) fast == reference on random shapes (hypothesis), forward and
backward; (2) each reference backward equals the numerical gradient of its own
forward, so the oracle is itself proven and not only consistent with the fast code.
Everything is float64, so the tolerances are tight.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minicnn
from minicnn import optim, reference
from minicnn.gradcheck import numerical_gradient, relative_error
from tests.conftest import distinct_values

SETTINGS = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = dict(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RTOL, ATOL = 1e-10, 1e-12


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def seeds():
    return st.integers(0, 2**31 - 1)


@st.composite
def conv_case(draw):
    """Rectangular kernels, strides and paddings whose output has at least one pixel."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h, w = draw(st.integers(max(1, kh - 2 * ph), 8)), draw(st.integers(max(1, kw - 2 * pw), 8))
    return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 3)), f=draw(st.integers(1, 4)), h=h, w=w,
                k=(kh, kw), s=(sh, sw), p=(ph, pw), seed=draw(seeds()))


@st.composite
def pool_case(draw):
    """Any kernel, stride (None: = kernel; smaller: overlapping windows) and legal padding."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h, w = draw(st.integers(max(1, kh - 2 * ph), 8)), draw(st.integers(max(1, kw - 2 * pw), 8))
    return dict(k=(kh, kw), s=stride, p=(ph, pw), n=draw(st.integers(1, 3)), c=draw(st.integers(1, 3)),
                h=h, w=w, seed=draw(seeds()))


def numeric(f, x, dout):
    """Numerical gradient of sum(f() * dout) with respect to x (perturbed in place)."""
    return numerical_gradient(lambda: float((f() * dout).sum()), x)


# --------------------------------------------------------------------------- convolution


@given(case=conv_case())
@settings(**SETTINGS)
def test_im2col_equals_the_entry_by_entry_definition(case):
    x = np.random.default_rng(case["seed"]).standard_normal((case["n"], case["c"], case["h"], case["w"]))
    close(minicnn.im2col(x, *case["k"], case["s"], case["p"]), reference.im2col(x, *case["k"], case["s"], case["p"]))


@given(case=conv_case())
@settings(**SETTINGS)
def test_conv2d_forward_and_backward_equal_the_reference(case, float64):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    layer = minicnn.Conv2D(case["c"], case["f"], case["k"], stride=case["s"], padding=case["p"])
    layer.params["b"][...] = rng.standard_normal(case["f"])
    W, b = layer.params["W"], layer.params["b"]
    out = layer.forward(x)
    close(out, reference.conv2d_forward(x, W, b, case["s"], case["p"]))
    dout = rng.standard_normal(out.shape)
    dx = layer.backward(dout)
    ref_dx, ref_dW, ref_db = reference.conv2d_backward(dout, x, W, case["s"], case["p"])
    close(dx, ref_dx)
    close(layer.grads["W"], ref_dW)
    close(layer.grads["b"], ref_db)


@st.composite
def stride1_conv_case(draw):
    """Stride 1, any rectangular kernel, padding up to kernel - 1 (where dx is a convolution)."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))
    h, w = draw(st.integers(max(1, kh - 2 * ph), 8)), draw(st.integers(max(1, kw - 2 * pw), 8))
    return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 4)), f=draw(st.integers(1, 4)), h=h, w=w,
                k=(kh, kw), p=(ph, pw), seed=draw(seeds()))


@given(case=stride1_conv_case())
@settings(**SETTINGS)
def test_input_gradient_as_a_convolution_equals_col2im_and_the_reference(case):
    """dx = conv(dout, W turned by 180 degrees, channels swapped, padding K-1-p) = col2im(W_mat^T G)."""
    rng = np.random.default_rng(case["seed"])
    n, c, f, (kh, kw), p = case["n"], case["c"], case["f"], case["k"], case["p"]
    x = rng.standard_normal((n, c, case["h"], case["w"]))
    W = rng.standard_normal((f, c, kh, kw))
    dout = rng.standard_normal(reference.conv2d_forward(x, W, None, 1, p).shape)
    by_convolution = minicnn.layers.conv.conv_input_grad(dout, W, p)
    g = dout.transpose(1, 0, 2, 3).reshape(f, -1)
    by_col2im = minicnn.col2im(W.reshape(f, -1).T @ g, x.shape, kh, kw, 1, p)
    assert by_convolution.shape == x.shape and by_convolution.flags.c_contiguous
    close(by_convolution, by_col2im)
    close(by_convolution, reference.conv2d_backward(dout, x, W, 1, p)[0])


def test_input_gradient_as_a_convolution_refuses_a_padding_beyond_the_kernel():
    with pytest.raises(ValueError, match=r"padding \(3, 0\) must be at most kernel - 1 = \(2, 2\)"):
        minicnn.layers.conv.conv_input_grad(np.zeros((1, 1, 8, 2)), np.zeros((1, 1, 3, 3)), (3, 0))


@pytest.mark.parametrize(
    "c_in, c_out, stride, padding, kernel, expected",
    [
        (64, 64, 1, 1, 3, True),      # the ResNet / VGG case: a copy beats a scatter
        (32, 64, 1, 1, 3, True),      # C_out = 2 C_in, still the convolution
        (16, 33, 1, 1, 3, False),     # C_out > 2 C_in: im2col of dout would be too big
        (1, 64, 1, 1, 3, False),      # the first layer
        (64, 64, 2, 1, 3, False),     # stride 2: dx is not a plain convolution
        (64, 64, 1, 3, 3, False),     # padding beyond kernel - 1
        (64, 64, 1, 0, 1, True),      # 1x1, stride 1
    ],
)
def test_conv2d_backward_chooses_its_input_gradient_path_and_both_are_right(
    c_in, c_out, stride, padding, kernel, expected, float64
):
    layer = minicnn.Conv2D(c_in, c_out, kernel, stride=stride, padding=padding)
    assert layer._dx_by_convolution() is expected
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, c_in, 5, 5))
    dout = rng.standard_normal(layer.forward(x).shape)
    close(layer.backward(dout), reference.conv2d_backward(dout, x, layer.params["W"], stride, padding)[0])


def test_conv2d_is_a_cross_correlation_not_a_flipped_convolution():
    """A kernel with a single 1 at its top-left picks, at output (i, j), the input pixel (i, j)."""
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    W = np.zeros((1, 1, 3, 3))
    W[0, 0, 0, 0] = 1.0
    layer = minicnn.Conv2D(1, 1, 3, bias=False)
    layer.params["W"] = W
    close(layer.forward(x), x[:, :, :2, :2])  # a flipped kernel would give x[:, :, 2:, 2:]
    close(reference.conv2d_forward(x, W), x[:, :, :2, :2])


@given(case=conv_case())
@settings(**FEW)
def test_reference_conv2d_backward_is_the_numerical_gradient(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    W, b = rng.standard_normal((case["f"], case["c"], *case["k"])), rng.standard_normal(case["f"])
    fwd = lambda: reference.conv2d_forward(x, W, b, case["s"], case["p"])  # noqa: E731
    dout = rng.standard_normal(fwd().shape)
    dx, dW, db = reference.conv2d_backward(dout, x, W, case["s"], case["p"])
    for analytic, wrt in ((dx, x), (dW, W), (db, b)):
        assert relative_error(analytic, numeric(fwd, wrt, dout)) < 1e-7


# --------------------------------------------------------------------------- pooling


@given(case=pool_case(), ties=st.booleans())
@settings(**SETTINGS)
def test_maxpool_forward_and_backward_equal_the_reference(case, ties):
    """Overlapping windows and padding included; with ties, both send the gradient to the first maximum."""
    rng = np.random.default_rng(case["seed"])
    shape = (case["n"], case["c"], case["h"], case["w"])
    x = rng.integers(-2, 3, shape).astype(np.float64) if ties else distinct_values(rng, shape)
    layer = minicnn.MaxPool2D(case["k"], case["s"], case["p"])
    out = layer.forward(x)
    close(out, reference.maxpool2d_forward(x, case["k"], case["s"], case["p"]))
    dout = rng.standard_normal(out.shape)
    close(layer.backward(dout), reference.maxpool2d_backward(dout, x, case["k"], case["s"], case["p"]))


@given(k=st.tuples(st.integers(1, 3), st.integers(1, 3)), h=st.integers(1, 9), w=st.integers(1, 9),
       seed=seeds(), ties=st.booleans())
@settings(**SETTINGS)
def test_separable_maxpool_equals_the_reference(k, h, w, seed, ties):
    """Non-overlapping windows without padding take the fast separable path; it must equal the loops too."""
    if h < k[0] or w < k[1]:
        return
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (2, 2, h, w)).astype(np.float64) if ties else distinct_values(rng, (2, 2, h, w))
    layer = minicnn.MaxPool2D(k)
    out = layer.forward(x)
    assert layer.cache[0] == "separable"
    close(out, reference.maxpool2d_forward(x, k))
    dout = rng.standard_normal(out.shape)
    close(layer.backward(dout), reference.maxpool2d_backward(dout, x, k))


@given(case=pool_case())
@settings(**FEW)
def test_reference_maxpool_backward_is_the_numerical_gradient(case):
    rng = np.random.default_rng(case["seed"])
    x = distinct_values(rng, (case["n"], case["c"], case["h"], case["w"]))
    fwd = lambda: reference.maxpool2d_forward(x, case["k"], case["s"], case["p"])  # noqa: E731
    dout = rng.standard_normal(fwd().shape)
    dx = reference.maxpool2d_backward(dout, x, case["k"], case["s"], case["p"])
    assert relative_error(dx, numerical_gradient(lambda: float((fwd() * dout).sum()), x, h=1e-7)) < 1e-6


@given(case=pool_case())
@settings(**SETTINGS)
def test_avgpool_forward_and_backward_equal_the_reference(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    layer = minicnn.AvgPool2D(case["k"], case["s"], case["p"])
    out = layer.forward(x)
    close(out, reference.avgpool2d_forward(x, case["k"], case["s"], case["p"]))
    dout = rng.standard_normal(out.shape)
    close(layer.backward(dout), reference.avgpool2d_backward(dout, x.shape, case["k"], case["s"], case["p"]))
    fwd = lambda: reference.avgpool2d_forward(x, case["k"], case["s"], case["p"])  # noqa: E731
    ref_dx = reference.avgpool2d_backward(dout, x.shape, case["k"], case["s"], case["p"])
    assert relative_error(ref_dx, numeric(fwd, x, dout)) < 1e-7


@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5), seed=seeds())
@settings(**SETTINGS)
def test_global_avgpool_equals_the_reference(n, c, h, w, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    layer = minicnn.GlobalAvgPool2D()
    out = layer.forward(x)
    close(out, reference.global_avgpool2d_forward(x))
    dout = rng.standard_normal(out.shape)
    close(layer.backward(dout), reference.global_avgpool2d_backward(dout, x.shape))
    fwd = lambda: reference.global_avgpool2d_forward(x)  # noqa: E731
    assert relative_error(reference.global_avgpool2d_backward(dout, x.shape), numeric(fwd, x, dout)) < 1e-7


# --------------------------------------------------------------------------- batch normalisation


@st.composite
def bn_case(draw):
    """(N, D) or (N, C, H, W) with at least 3 values per feature (with 2, BN's output is +-1 whatever x is)."""
    if draw(st.booleans()):
        shape = (draw(st.integers(3, 8)), draw(st.integers(1, 5)))
    else:
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        if shape[0] * shape[2] * shape[3] < 3:
            shape = (shape[0], shape[1], 3, 2)
    return shape, draw(seeds())


def bn_layer(shape, rng):
    d = shape[1]
    layer = minicnn.BatchNorm1D(d, momentum=0.2) if len(shape) == 2 else minicnn.BatchNorm2D(d, momentum=0.2)
    layer.params["gamma"][...] = rng.uniform(0.5, 1.5, d)
    layer.params["beta"][...] = rng.standard_normal(d)
    layer.buffers["running_mean"][...] = rng.standard_normal(d)
    layer.buffers["running_var"][...] = rng.uniform(0.5, 2.0, d)
    return layer


@given(case=bn_case())
@settings(**SETTINGS)
def test_batchnorm_training_equals_both_reference_backwards(case, float64):
    shape, seed = case
    rng = np.random.default_rng(seed)
    layer = bn_layer(shape, rng)
    gamma, beta = layer.params["gamma"].copy(), layer.params["beta"].copy()
    rm, rv = layer.buffers["running_mean"].copy(), layer.buffers["running_var"].copy()
    x = rng.standard_normal(shape) * 2 + 1
    out = layer.forward(x, training=True)
    ref_out, cache = reference.batchnorm_forward(x, gamma, beta, layer.eps)
    close(out, ref_out)
    new_rm, new_rv = reference.batchnorm_running_stats(rm, rv, x, momentum=0.2)
    close(layer.buffers["running_mean"], new_rm)
    close(layer.buffers["running_var"], new_rv)
    dout = rng.standard_normal(shape)
    dx = layer.backward(dout)
    for backward in (reference.batchnorm_backward_steps, reference.batchnorm_backward_compact):
        ref_dx, ref_dgamma, ref_dbeta = backward(dout, cache)
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-8, atol=1e-10)
        close(layer.grads["gamma"], ref_dgamma)
        close(layer.grads["beta"], ref_dbeta)


@given(case=bn_case())
@settings(**SETTINGS)
def test_batchnorm_evaluation_equals_the_reference(case, float64):
    shape, seed = case
    rng = np.random.default_rng(seed)
    layer = bn_layer(shape, rng)
    p, b = layer.params, layer.buffers
    x = rng.standard_normal(shape) * 2 + 1
    out = layer.forward(x, training=False)
    ref_out = reference.batchnorm_eval_forward(x, p["gamma"], p["beta"], b["running_mean"], b["running_var"], layer.eps)
    close(out, ref_out)
    dout = rng.standard_normal(shape)
    dx = layer.backward(dout)
    ref_dx, ref_dgamma, ref_dbeta = reference.batchnorm_eval_backward(
        dout, x, p["gamma"], b["running_mean"], b["running_var"], layer.eps)
    close(dx, ref_dx)
    close(layer.grads["gamma"], ref_dgamma)
    close(layer.grads["beta"], ref_dbeta)


@given(case=bn_case())
@settings(**FEW)
def test_reference_batchnorm_backwards_are_the_numerical_gradient(case):
    shape, seed = case
    rng = np.random.default_rng(seed)
    d = shape[1]
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = rng.uniform(0.5, 1.5, d), rng.standard_normal(d)
    rm, rv = rng.standard_normal(d), rng.uniform(0.5, 2.0, d)
    dout = rng.standard_normal(shape)
    train = lambda: reference.batchnorm_forward(x, gamma, beta)[0]  # noqa: E731
    cache = reference.batchnorm_forward(x, gamma, beta)[1]
    for backward in (reference.batchnorm_backward_steps, reference.batchnorm_backward_compact):
        grads = backward(dout, cache)
        for analytic, wrt in zip(grads, (x, gamma, beta)):
            assert relative_error(analytic, numeric(train, wrt, dout)) < 1e-6
    evaluate = lambda: reference.batchnorm_eval_forward(x, gamma, beta, rm, rv)  # noqa: E731
    grads = reference.batchnorm_eval_backward(dout, x, gamma, rm, rv)
    for analytic, wrt in zip(grads, (x, gamma, beta)):
        assert relative_error(analytic, numeric(evaluate, wrt, dout)) < 1e-6


# --------------------------------------------------------------------------- dense, activations, dropout


@given(n=st.integers(1, 5), d_in=st.integers(1, 6), d_out=st.integers(1, 5), bias=st.booleans(), seed=seeds())
@settings(**SETTINGS)
def test_dense_equals_the_reference(n, d_in, d_out, bias, seed, float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in))
    layer = minicnn.Dense(d_in, d_out, bias=bias)
    b = None
    if bias:
        b = layer.params["b"]
        b[...] = rng.standard_normal(d_out)
    out = layer.forward(x)
    close(out, reference.dense_forward(x, layer.params["W"], b))
    dout = rng.standard_normal(out.shape)
    dx = layer.backward(dout)
    ref_dx, ref_dW, ref_db = reference.dense_backward(dout, x, layer.params["W"])
    close(dx, ref_dx)
    close(layer.grads["W"], ref_dW)
    if bias:
        close(layer.grads["b"], ref_db)
    W = layer.params["W"].copy()
    fwd = lambda: reference.dense_forward(x, W)  # noqa: E731
    for analytic, wrt in ((ref_dx, x), (ref_dW, W)):
        assert relative_error(analytic, numeric(fwd, wrt, dout)) < 1e-7


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), slope=st.sampled_from([None, 0.01, 0.2]),
       seed=seeds())
@settings(**SETTINGS)
def test_activations_equal_the_reference(shape, slope, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    x.flat[0] = 0.0  # the kink: both libraries take the derivative at 0 to be the slope for x <= 0
    dout = rng.standard_normal(shape)
    if slope is None:
        layer, fwd, bwd = minicnn.ReLU(), reference.relu_forward(x), reference.relu_backward(dout, x)
    else:
        layer = minicnn.LeakyReLU(slope)
        fwd, bwd = reference.leaky_relu_forward(x, slope), reference.leaky_relu_backward(dout, x, slope)
    close(layer.forward(x), fwd)
    close(layer.backward(dout), bwd)


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), p=st.sampled_from([0.1, 0.5, 0.8]), seed=seeds())
@settings(**SETTINGS)
def test_dropout_equals_the_reference_with_the_same_mask(shape, p, seed):
    """Seeded alike, minicnn.Dropout draws the reference's mask: p is the *drop* probability."""
    rng = np.random.default_rng(seed)
    x, dout = rng.standard_normal(shape), rng.standard_normal(shape)
    minicnn.seed(seed)
    keep = reference.dropout_keep_mask(x.shape, p, minicnn.backend.random_state(np))
    minicnn.seed(seed)
    layer = minicnn.Dropout(p)
    close(layer.forward(x, training=True), reference.dropout_forward(x, keep, p))
    close(layer.backward(dout), reference.dropout_backward(dout, keep, p))
    close(layer.forward(x, training=False), x)


def test_dropout_keep_mask_drops_a_fraction_p():
    keep = reference.dropout_keep_mask((200, 500), 0.3, np.random.RandomState(0))
    assert abs(1.0 - keep.mean() - 0.3) < 0.01


# --------------------------------------------------------------------------- losses


@given(n=st.integers(1, 8), k=st.integers(2, 9), smoothing=st.sampled_from([0.0, 0.1, 0.3]),
       weighted=st.booleans(), seed=seeds())
@settings(**SETTINGS)
def test_softmax_cross_entropy_equals_the_reference(n, k, smoothing, weighted, seed):
    rng = np.random.default_rng(seed)
    logits, labels = rng.standard_normal((n, k)) * 3, rng.integers(0, k, n)
    weights = rng.uniform(0.5, 2.0, k) if weighted else None
    loss = minicnn.SoftmaxCrossEntropy(weights, smoothing)
    ref_loss, ref_dz = reference.softmax_cross_entropy(logits, labels, weights, smoothing)
    assert float(loss.forward(logits, labels)) == pytest.approx(ref_loss, rel=1e-12)
    close(loss.backward(), ref_dz)
    close(minicnn.softmax(logits), reference.softmax(logits))
    # h = 1e-5, not the default 1e-6: a confident row has gradients near 5e-4, where a 1e-6 step's rounding
    # error (about eps * |logits| / h) alone is 1e-7 of them (n=1, k=2, seed 202: 1.005e-7; with 1e-5: 9.7e-9)
    num = numerical_gradient(lambda: reference.softmax_cross_entropy(logits, labels, weights, smoothing)[0], logits,
                             h=1e-5)
    assert relative_error(ref_dz, num) < 1e-7


@given(n=st.integers(1, 8), k=st.integers(2, 9), seed=seeds())
@settings(**SETTINGS)
def test_mse_softmax_equals_the_reference(n, k, seed):
    rng = np.random.default_rng(seed)
    logits, labels = rng.standard_normal((n, k)), rng.integers(0, k, n)
    loss = minicnn.MSELoss()
    ref_loss, ref_dz = reference.mse_softmax(logits, labels)
    assert float(loss.forward(logits, labels)) == pytest.approx(ref_loss, rel=1e-12)
    close(loss.backward(), ref_dz)
    num = numerical_gradient(lambda: reference.mse_softmax(logits, labels)[0], logits)
    assert relative_error(ref_dz, num) < 1e-7


# --------------------------------------------------------------------------- optimisers


class _Params:
    """The two dicts an optimiser reads."""

    def __init__(self, w):
        self.params, self.grads = {"w": w}, {}


def _gradients(seed, shape, steps):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), [rng.standard_normal(shape) for _ in range(steps)]


@given(momentum=st.sampled_from([0.0, 0.9]), nesterov=st.booleans(), dampening=st.sampled_from([0.0, 0.3]),
       weight_decay=st.sampled_from([0.0, 0.01]), seed=seeds())
@settings(**SETTINGS)
def test_sgd_equals_the_reference(momentum, nesterov, dampening, weight_decay, seed):
    if nesterov and (momentum == 0 or dampening != 0):
        return
    w0, grads = _gradients(seed, (3, 4), 6)
    model = _Params(w0.copy())
    opt = optim.SGD(model, lr=0.1, momentum=momentum, nesterov=nesterov, dampening=dampening, weight_decay=weight_decay)
    w, buf = w0.copy(), None
    for g in grads:
        model.grads["w"] = g
        opt.step()
        w, buf = reference.sgd_step(w, g, buf, 0.1, momentum, dampening, nesterov, weight_decay)
        close(model.params["w"], w)


@given(decoupled=st.booleans(), weight_decay=st.sampled_from([0.0, 0.05]), seed=seeds())
@settings(**SETTINGS)
def test_adam_and_adamw_equal_the_reference(decoupled, weight_decay, seed):
    w0, grads = _gradients(seed, (5,), 8)
    model = _Params(w0.copy())
    cls = optim.AdamW if decoupled else optim.Adam
    opt = cls(model, lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=weight_decay)
    w, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        model.grads["w"] = g
        opt.step()
        w, m, v = reference.adam_step(w, g, m, v, t, 0.01, (0.8, 0.95), 1e-8, weight_decay, decoupled)
        close(model.params["w"], w)


@given(weight_decay=st.sampled_from([0.0, 0.05]), seed=seeds())
@settings(**SETTINGS)
def test_rmsprop_equals_the_reference(weight_decay, seed):
    w0, grads = _gradients(seed, (2, 3), 8)
    model = _Params(w0.copy())
    opt = optim.RMSprop(model, lr=0.01, alpha=0.9, weight_decay=weight_decay)
    w, s = w0.copy(), np.zeros_like(w0)
    for g in grads:
        model.grads["w"] = g
        opt.step()
        w, s = reference.rmsprop_step(w, g, s, 0.01, 0.9, 1e-8, weight_decay)
        close(model.params["w"], w)
