"""Every translation that docs/conventions.md gives is checked here, in float64."""
import numpy as np
import pytest

import minicnn
from minicnn import optim, reference


@pytest.fixture(autouse=True)
def _float64(float64):
    yield


def test_defaults_are_pytorchs():
    bn = minicnn.BatchNorm2D(3)
    assert (bn.momentum, bn.eps) == (0.1, 1e-5)
    assert minicnn.LeakyReLU().negative_slope == 0.01
    assert minicnn.Dropout().p == 0.5


def test_cs231n_batchnorm_momentum_and_biased_running_variance_translate():
    """CS231n: running = 0.9 * running + 0.1 * batch, with np.var (biased); minicnn: momentum 0.1, unbiased."""
    rng = np.random.default_rng(0)
    bn = minicnn.BatchNorm1D(4)
    cs_mean, cs_var = np.zeros(4), np.ones(4)
    for _ in range(3):
        x = rng.standard_normal((6, 4)) * 2 + 1
        bn.forward(x, training=True)
        m = x.shape[0]
        cs_mean = 0.9 * cs_mean + (1 - 0.9) * x.mean(axis=0)
        cs_var = 0.9 * cs_var + (1 - 0.9) * x.var(axis=0) * m / (m - 1)  # the doc's factor m / (m - 1)
    np.testing.assert_allclose(bn.buffers["running_mean"], cs_mean)
    np.testing.assert_allclose(bn.buffers["running_var"], cs_var)


def test_pytorch_linear_weight_is_the_transpose():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    linear = torch.nn.Linear(5, 3).double()
    dense = minicnn.Dense(5, 3)
    dense.params["W"] = linear.weight.detach().numpy().T.copy()  # W = linear.weight.T
    dense.params["b"] = linear.bias.detach().numpy().copy()
    x = rng.standard_normal((4, 5))
    np.testing.assert_allclose(dense.forward(x), linear(torch.from_numpy(x)).detach().numpy(), rtol=1e-12)


def test_keras_nhwc_images_and_kernels_translate():
    """x_nchw = x_nhwc.transpose(0, 3, 1, 2); W = kernel.transpose(3, 2, 0, 1) for a (KH, KW, C_in, C_out) kernel."""
    rng = np.random.default_rng(2)
    x_nhwc = rng.standard_normal((2, 6, 5, 3))
    kernel = rng.standard_normal((3, 2, 3, 4))  # Keras: (KH, KW, C_in, C_out)
    oh, ow = 6 - 3 + 1, 5 - 2 + 1
    keras = np.zeros((2, oh, ow, 4))  # Keras' (valid) correlation, by its definition in NHWC
    for i in range(oh):
        for j in range(ow):
            keras[:, i, j, :] = np.einsum("nuvc,uvcf->nf", x_nhwc[:, i : i + 3, j : j + 2, :], kernel)
    conv = minicnn.Conv2D(3, 4, (3, 2), bias=False)
    conv.params["W"] = kernel.transpose(3, 2, 0, 1).copy()
    out = conv.forward(x_nhwc.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(out.transpose(0, 2, 3, 1), keras, rtol=1e-12)


def test_keras_dense_after_flatten_needs_its_rows_permuted():
    """Keras flattens (H, W, C), minicnn (C, H, W):
    W = W_keras.reshape(H, W, C, out).transpose(2, 0, 1, 3).reshape(-1, out)."""
    rng = np.random.default_rng(3)
    h, w, c, k = 3, 2, 4, 5
    maps_nhwc = rng.standard_normal((2, h, w, c))
    w_keras = rng.standard_normal((h * w * c, k))
    keras = maps_nhwc.reshape(2, -1) @ w_keras
    dense = minicnn.Dense(c * h * w, k, bias=False)
    dense.params["W"] = w_keras.reshape(h, w, c, k).transpose(2, 0, 1, 3).reshape(-1, k)
    flat = minicnn.Flatten().forward(maps_nhwc.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(dense.forward(flat), keras, rtol=1e-12)
    assert not np.allclose(flat @ w_keras, keras)  # without the permutation the layer computes something else


def test_conv2d_is_scipys_correlate2d_not_convolve2d():
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((7, 6)), rng.standard_normal((3, 3))
    conv = minicnn.Conv2D(1, 1, 3, bias=False)
    conv.params["W"] = w[None, None].copy()
    out = conv.forward(x[None, None])[0, 0]
    np.testing.assert_allclose(out, signal.correlate2d(x, w, mode="valid"), rtol=1e-12)
    np.testing.assert_allclose(out, signal.convolve2d(x, w[::-1, ::-1], mode="valid"), rtol=1e-12)
    assert not np.allclose(out, signal.convolve2d(x, w, mode="valid"))


def test_cs231n_momentum_and_l2_penalty_are_sgd_momentum_and_weight_decay():
    """CS231n: v = mu v - lr (g + reg w); w += v (loss + 0.5 reg |w|^2)
    == SGD(momentum=mu, weight_decay=reg) at a constant lr."""
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal(6)

    class Model:
        params, grads = {"w": w0.copy()}, {}

    opt = optim.SGD(Model, lr=0.05, momentum=0.9, weight_decay=0.01)
    w, v = w0.copy(), np.zeros(6)
    for _ in range(5):
        g = rng.standard_normal(6)
        Model.grads["w"] = g
        opt.step()
        v = 0.9 * v - 0.05 * (g + 0.01 * w)
        w = w + v
        np.testing.assert_allclose(Model.params["w"], w, rtol=1e-12)


def test_adam_step_count_starts_at_one_and_keras_eps_is_scaled():
    """CS231n: increment t before the bias corrections.
    DLfS / Keras: their eps, added to sqrt(v), is minicnn's eps * sqrt(1 - beta2^t)."""
    rng = np.random.default_rng(6)
    w0 = rng.standard_normal(5)

    class Model:
        params, grads = {"w": w0.copy()}, {}

    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-3  # a large eps makes its placement visible
    opt = optim.Adam(Model, lr=lr, betas=(b1, b2), eps=eps)
    w_cs, m_cs, v_cs, t_cs = w0.copy(), np.zeros(5), np.zeros(5), 0  # CS231n's config['t'] starts at 0
    w_k, m_k, v_k = w0.copy(), np.zeros(5), np.zeros(5)
    for t in range(1, 5):
        g = rng.standard_normal(5)
        Model.grads["w"] = g
        opt.step()
        assert opt.param_steps["w"] == t
        t_cs += 1  # incremented before use
        w_cs, m_cs, v_cs = reference.adam_step(w_cs, g, m_cs, v_cs, t_cs, lr, (b1, b2), eps)
        np.testing.assert_allclose(Model.params["w"], w_cs, rtol=1e-12)
        m_k = b1 * m_k + (1 - b1) * g  # DLfS / Keras form, with the translated eps
        v_k = b2 * v_k + (1 - b2) * g**2
        lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        w_k = w_k - lr_t * m_k / (np.sqrt(v_k) + eps * np.sqrt(1 - b2**t))
        np.testing.assert_allclose(w_k, w_cs, rtol=1e-12)


def test_cs231n_keep_probability_is_one_minus_p():
    x = np.ones((400, 500))
    keep_prob = 0.8  # CS231n's p
    layer = minicnn.Dropout(1 - keep_prob)
    out = layer.forward(x, training=True)
    assert abs((out != 0).mean() - keep_prob) < 0.01
    np.testing.assert_allclose(out[out != 0], 1 / keep_prob)  # CS231n's inverted dropout: mask / p
