"""The row-shift convolution (``Conv2D(..., algorithm="shifted")``) against im2col, the loop reference and PyTorch.

It must compute the same forward and backward as im2col for every stride-1 geometry (any kernel, any
padding, including padding beyond KH-1 where dx falls back to col2im), build its matrix as the
definition says, pass a numerical gradient check, keep less memory than im2col, and be selectable
on a whole model and from train.py.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minicnn
from minicnn import reference
from minicnn.benchmarking import traced_peak_bytes
from minicnn.gradcheck import numerical_gradient, relative_error
from minicnn.layers.conv import conv2d_shifted, shifted_rows

RTOL, ATOL = 1e-10, 1e-12


@st.composite
def stride1_case(draw):
    """Stride-1 convolutions: rectangular kernels, paddings up to KH (one beyond the dx-by-convolution limit)."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh)), draw(st.integers(0, kw))
    h, w = draw(st.integers(max(1, kh - 2 * ph), 8)), draw(st.integers(max(1, kw - 2 * pw), 8))
    return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 3)), f=draw(st.integers(1, 4)), h=h, w=w,
                k=(kh, kw), p=(ph, pw), seed=draw(st.integers(0, 2**31 - 1)))


def pair_of_layers(case, bias=True):
    """The same float64 convolution twice: by im2col and by row shifts."""
    a = minicnn.Conv2D(case["c"], case["f"], case["k"], padding=case["p"], bias=bias, algorithm="im2col")
    b = minicnn.Conv2D(case["c"], case["f"], case["k"], padding=case["p"], bias=bias, algorithm="shifted")
    rng = np.random.default_rng(case["seed"])
    for layer in (a, b):
        layer.astype(np.float64)
    b.params["W"][...] = a.params["W"] = rng.standard_normal(a.params["W"].shape)
    if bias:
        a.params["b"][...] = rng.standard_normal(case["f"])
        b.params["b"][...] = a.params["b"]
    return a, b, rng


@given(case=stride1_case())
@settings(max_examples=40, deadline=None)
def test_shifted_forward_and_backward_equal_im2col_and_the_loop_reference(case):
    a, b, rng = pair_of_layers(case)
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    out_a, out_b = a.forward(x), b.forward(x)
    assert b.cache[0] == "shifted" and a.cache[0] == "im2col"
    ref_out = reference.conv2d_forward(x, a.params["W"], a.params["b"], 1, case["p"])
    np.testing.assert_allclose(out_b, ref_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out_b, out_a, rtol=RTOL, atol=ATOL)
    dout = rng.standard_normal(out_a.shape)
    dx_a, dx_b = a.backward(dout), b.backward(dout)
    ref_dx, ref_dw, ref_db = reference.conv2d_backward(dout, x, a.params["W"], 1, case["p"])
    np.testing.assert_allclose(dx_b, ref_dx, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dx_b, dx_a, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(b.grads["W"], ref_dw, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(b.grads["b"], ref_db, rtol=RTOL, atol=ATOL)
    assert b.cache is None  # backward runs once per forward, as for im2col


def test_shifted_rows_is_the_definition_entry_by_entry():
    """R[(c, v), m] = z[c, m + v], z = xpad in channel-major order, flattened, followed by zeros."""
    rng = np.random.default_rng(3)
    n, c, h, w, kh, kw, ph, pw = 2, 3, 4, 5, 3, 2, 1, 2
    x = rng.standard_normal((n, c, h, w))
    hp, wp = h + 2 * ph, w + 2 * pw
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    length = n * hp * wp + (kh - 1) * wp
    z = np.zeros((c, length + kw))
    for ci in range(c):
        for ni in range(n):
            for y in range(hp):
                for xx in range(wp):
                    z[ci, (ni * hp + y) * wp + xx] = xpad[ni, ci, y, xx]
    expected = np.empty((c * kw, length))
    for ci in range(c):
        for v in range(kw):
            for m in range(length):
                expected[ci * kw + v, m] = z[ci, m + v]
    R = shifted_rows(x, kh, kw, (ph, pw))
    assert R.shape == (c * kw, length) and R.flags.c_contiguous
    np.testing.assert_array_equal(R, expected)


def test_conv2d_shifted_reads_each_window_from_views_of_one_matrix():
    """The module docstring's claim: the window at output (n, i, j) starts at m = (n*Hp + i)*Wp + j, and row
    offset u is column offset u*Wp of R."""
    rng = np.random.default_rng(4)
    x, W = rng.standard_normal((2, 2, 5, 6)), rng.standard_normal((3, 2, 3, 3))
    out, R = conv2d_shifted(x, W, 1)
    hp, wp = 7, 8
    n, i, j = 1, 2, 3
    m = (n * hp + i) * wp + j
    by_hand = sum(W[:, c, u, v] * R[c * 3 + v, m + u * wp] for c in range(2) for u in range(3) for v in range(3))
    np.testing.assert_allclose(out[n, :, i, j], by_hand, rtol=1e-12)
    assert out.shape == (2, 3, 5, 6)


@pytest.mark.parametrize("k, p", [((3, 3), (1, 1)), ((2, 3), (0, 2)), ((1, 3), (2, 0))])
def test_shifted_gradients_equal_the_numerical_gradients(k, p):
    """Central differences of sum(out * dout) in float64, with a random upstream gradient; (1, 3) with padding
    (2, 0) takes the col2im fallback for dx."""
    case = dict(n=2, c=2, f=3, h=5, w=4, k=k, p=p, seed=11)
    _, layer, rng = pair_of_layers(case)
    x = rng.standard_normal((2, 2, 5, 4))
    dout = rng.standard_normal(layer.forward(x).shape)
    dx = layer.backward(dout)
    loss = lambda: float((layer.forward(x) * dout).sum())  # noqa: E731
    assert relative_error(dx, numerical_gradient(loss, x)) < 1e-7
    for key in ("W", "b"):
        layer.forward(x)
        layer.backward(dout)
        analytic = layer.grads[key].copy()
        assert relative_error(analytic, numerical_gradient(loss, layer.params[key])) < 1e-7, key


def test_shifted_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 9, 7)).astype(np.float32)
    layer = minicnn.Conv2D(4, 6, (3, 2), padding=(1, 2), algorithm="shifted")
    layer.params["b"][...] = rng.standard_normal(6)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(layer.params["W"], requires_grad=True)
    tb = torch.tensor(layer.params["b"], requires_grad=True)
    tout = torch.nn.functional.conv2d(tx, tw, tb, padding=(1, 2))
    out = layer.forward(x)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    tout.backward(torch.tensor(dout))
    dx = layer.backward(dout)
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.grads["W"], tw.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.grads["b"], tb.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_shifted_keeps_well_under_half_of_what_im2col_keeps():
    """ece662_resnet's 64 -> 64 layer at 48 x 48: R is 3 x 64 x 50 x 50 floats an image, im2col's matrix
    9 x 64 x 48 x 48 (2.8x more); over the whole network's forward, the peak NumPy allocation falls too."""
    x = np.random.default_rng(0).standard_normal((4, 64, 48, 48)).astype(np.float32)
    kept = {}
    for algorithm in ("im2col", "shifted"):
        layer = minicnn.Conv2D(64, 64, 3, padding=1, bias=False, algorithm=algorithm)
        layer.forward(x)
        kept[algorithm] = layer.cache[2].nbytes
    assert kept["shifted"] < 0.4 * kept["im2col"], kept

    peaks = {}
    for algorithm in ("im2col", "shifted"):
        minicnn.seed(0)
        model = minicnn.build_model("ece662_resnet")
        minicnn.set_conv_algorithm(model, algorithm)
        images = np.random.default_rng(1).standard_normal((4, 1, 48, 48)).astype(np.float32)
        peaks[algorithm] = traced_peak_bytes(lambda m=model: m.forward(images, training=True))
    assert peaks["shifted"] < 0.6 * peaks["im2col"], peaks


def test_a_whole_model_gives_the_same_step_with_either_algorithm():
    """ece662_resnet (residual blocks, a stride-2 conv that stays im2col, a 1x1 projection) in float64."""
    grads = {}
    for algorithm in ("im2col", "shifted"):
        minicnn.seed(0)
        model = minicnn.build_model("ece662_resnet").astype(np.float64)
        minicnn.set_conv_algorithm(model, algorithm)
        x = np.random.default_rng(2).standard_normal((2, 1, 48, 48))
        loss = minicnn.SoftmaxCrossEntropy()
        loss.forward(model.forward(x), np.array([0, 3]))
        model.backward(loss.backward())
        grads[algorithm] = {k: v.copy() for k, v in model.grads.items()}
    assert grads["im2col"].keys() == grads["shifted"].keys()
    for k, g in grads["im2col"].items():
        np.testing.assert_allclose(grads["shifted"][k], g, rtol=1e-8, atol=1e-12, err_msg=k)


def test_set_conv_algorithm_counts_what_it_changed_and_leaves_strided_convolutions_alone():
    model = minicnn.build_model("ece662_resnet")
    convs = [layer for layer in _walk(model) if isinstance(layer, minicnn.Conv2D)]
    assert len(convs) == 10
    # not the stride-2 conv nor its 1x1 projection, nor the first layer (one input channel)
    assert minicnn.set_conv_algorithm(model, "shifted") == 7
    assert sorted(c.algorithm for c in convs) == ["auto"] * 3 + ["shifted"] * 7
    assert all(c.algorithm == "auto" for c in convs if c.stride != (1, 1) or c.in_channels == 1)
    assert minicnn.set_conv_algorithm(model, "im2col") == 10
    assert "algorithm='im2col'" in repr(convs[0])
    assert minicnn.set_conv_algorithm(model, "auto") == 10 and "algorithm" not in repr(convs[0])
    with pytest.raises(ValueError, match="algorithm must be one of .*'winograd'"):
        minicnn.set_conv_algorithm(model, "winograd")


def test_a_bad_algorithm_is_an_error_naming_it():
    with pytest.raises(ValueError, match="algorithm must be one of .*got 'fft'"):
        minicnn.Conv2D(1, 2, 3, algorithm="fft")
    with pytest.raises(ValueError, match=r"'shifted' needs stride 1, got stride=\(2, 2\)"):
        minicnn.Conv2D(1, 2, 3, stride=2, algorithm="shifted")
    layer = minicnn.Conv2D(1, 2, 3, algorithm="shifted")
    with pytest.raises(RuntimeError, match="nothing saved by a forward pass"):
        layer.backward(np.zeros((1, 2, 2, 2), np.float32))


def test_forward_only_slices_by_the_row_shift_matrix_and_equals_forward(monkeypatch):
    """A budget of one image's R: slices of one image, the same output as one forward, nothing kept."""
    layer = minicnn.Conv2D(3, 4, 3, padding=1, algorithm="shifted")
    x = np.random.default_rng(6).standard_normal((5, 3, 7, 6)).astype(np.float32)
    expected = layer.forward(x, training=False)
    per_image = layer._matrix_bytes_per_image(x)
    assert per_image == 3 * 3 * 9 * 8 * 4
    seen = []
    original = layer.forward
    monkeypatch.setattr(layer, "forward", lambda xb, training=True: seen.append(len(xb)) or original(xb, training))
    layer.forward_only_cols_bytes = per_image
    np.testing.assert_allclose(layer.forward_only(x), expected, rtol=1e-6, atol=1e-6)
    assert seen == [1] * 5 and layer.cache is None


def _walk(layer):
    yield layer
    for _, child in layer.children():
        yield from _walk(child)
