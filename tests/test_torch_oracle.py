"""PyTorch as the oracle: forward and backward of every layer and loss, float32 tolerance."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minicnn

torch = pytest.importorskip("torch")
F = torch.nn.functional
RTOL, ATOL = 1e-4, 1e-5


def t(a, grad=False):
    return torch.tensor(np.asarray(a), requires_grad=grad)


def close(ours, theirs, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=rtol, atol=atol)


def run_both(layer, x, torch_fn, torch_params, training=True, seed=0):
    """Forward + backward with a random upstream gradient through both; compare everything."""
    rng = np.random.default_rng(seed)
    out = layer.forward(x, training)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx = layer.backward(dout)
    tx = t(x, grad=True)
    tout = torch_fn(tx)
    tout.backward(t(dout))
    close(out, tout)
    close(dx, tx.grad)
    for key, (tparam, transform) in torch_params.items():
        close(layer.grads[key], transform(tparam.grad))


@given(
    k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    p=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=25, deadline=None)
def test_conv2d_matches_torch(k, s, p, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 2, 9, 8)).astype(np.float32)
    layer = minicnn.Conv2D(2, 4, k, stride=s, padding=p)
    layer.params["b"][...] = rng.standard_normal(4)
    W, b = t(layer.params["W"], True), t(layer.params["b"], True)
    run_both(layer, x, lambda tx: F.conv2d(tx, W, b, stride=s, padding=p), {"W": (W, lambda g: g), "b": (b, lambda g: g)}, seed=seed)


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1), ((2, 3), (1, 2), (1, 1))])
def test_maxpool_matches_torch(k, s, p):
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 10)).astype(np.float32)
    run_both(minicnn.MaxPool2D(k, s, p), x, lambda tx: F.max_pool2d(tx, k, s, p), {})


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (4, 4, 0)])
def test_avgpool_matches_torch(k, s, p):
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 10)).astype(np.float32)
    run_both(minicnn.AvgPool2D(k, s, p), x, lambda tx: F.avg_pool2d(tx, k, s, p), {})


def test_global_avgpool_matches_torch():
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 4)).astype(np.float32)
    run_both(minicnn.GlobalAvgPool2D(), x, lambda tx: F.adaptive_avg_pool2d(tx, 1).flatten(1), {})


@pytest.mark.parametrize("slope", [0.01, 0.3])
def test_leaky_relu_and_relu_match_torch(slope):
    x = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
    run_both(minicnn.LeakyReLU(slope), x, lambda tx: F.leaky_relu(tx, slope), {})
    run_both(minicnn.ReLU(), x, F.relu, {})


def test_dense_matches_torch_linear():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    layer = minicnn.Dense(6, 3)
    layer.params["b"][...] = rng.standard_normal(3)
    W, b = t(layer.params["W"].T.copy(), True), t(layer.params["b"], True)  # torch stores (out, in)
    run_both(layer, x, lambda tx: F.linear(tx, W, b), {"W": (W, lambda g: g.T), "b": (b, lambda g: g)})


@pytest.mark.parametrize("cls,tcls,shape", [
    (minicnn.BatchNorm1D, torch.nn.BatchNorm1d, (8, 5)),
    (minicnn.BatchNorm2D, torch.nn.BatchNorm2d, (4, 5, 3, 3)),
])
def test_batchnorm_matches_torch_in_train_and_eval(cls, tcls, shape):
    rng = np.random.default_rng(5)
    ours, theirs = cls(5, momentum=0.2), tcls(5, momentum=0.2)
    with torch.no_grad():
        theirs.weight.copy_(t(rng.uniform(0.5, 1.5, 5).astype(np.float32)))
        theirs.bias.copy_(t(rng.standard_normal(5).astype(np.float32)))
    ours.params["gamma"][...] = theirs.weight.detach().numpy()
    ours.params["beta"][...] = theirs.bias.detach().numpy()
    params = {"gamma": (theirs.weight, lambda g: g), "beta": (theirs.bias, lambda g: g)}
    for step in range(3):  # running statistics follow the same momentum rule
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        theirs.train()
        theirs.zero_grad()
        run_both(ours, x, theirs, params, training=True, seed=step)
        close(ours.buffers["running_mean"], theirs.running_mean)
        close(ours.buffers["running_var"], theirs.running_var)
    theirs.eval()
    theirs.zero_grad()
    run_both(ours, x, theirs, params, training=False)


class TorchResBlock(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block
        c_in, c_out, s = block.in_channels, block.out_channels, block.stride
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, s, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c_out)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c_out)
        self.proj = torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 1, s, bias=False), torch.nn.BatchNorm2d(c_out)) if block.projection else None
        with torch.no_grad():
            self.conv1.weight.copy_(t(block.params["conv1.W"]))
            self.conv2.weight.copy_(t(block.params["conv2.W"]))
            if self.proj is not None:
                self.proj[0].weight.copy_(t(block.params["proj.W"]))

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + (self.proj(x) if self.proj is not None else x))


@pytest.mark.parametrize("c_in,c_out,stride", [(4, 4, 1), (4, 6, 2)])
def test_residual_block_matches_torch(c_in, c_out, stride):
    block = minicnn.ResidualBlock(c_in, c_out, stride)
    tb = TorchResBlock(block)
    x = np.random.default_rng(6).standard_normal((3, c_in, 6, 6)).astype(np.float32)
    params = {"conv1.W": (tb.conv1.weight, lambda g: g), "conv2.W": (tb.conv2.weight, lambda g: g),
              "bn1.gamma": (tb.bn1.weight, lambda g: g), "bn2.beta": (tb.bn2.bias, lambda g: g)}
    if block.projection:
        params["proj.W"] = (tb.proj[0].weight, lambda g: g)
    run_both(block, x, tb, params)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_torch(smoothing, weighted):
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((9, 7)) * 3).astype(np.float32)
    labels = rng.integers(0, 7, 9)
    w = rng.uniform(0.2, 3.0, 7).astype(np.float32) if weighted else None
    loss = minicnn.SoftmaxCrossEntropy(w, smoothing)
    value = loss.forward(logits, labels)
    grad = loss.backward()
    tl = t(logits, True)
    tv = F.cross_entropy(tl, torch.tensor(labels), weight=None if w is None else t(w), label_smoothing=smoothing)
    tv.backward()
    close(value, tv)
    close(grad, tl.grad)


def test_mse_on_softmax_matches_torch():
    rng = np.random.default_rng(8)
    logits, labels = rng.standard_normal((6, 7)).astype(np.float32), rng.integers(0, 7, 6)
    loss = minicnn.MSELoss()
    value = loss.forward(logits, labels)
    grad = loss.backward()
    tl = t(logits, True)
    tv = F.mse_loss(F.softmax(tl, dim=1), F.one_hot(torch.tensor(labels), 7).float())
    tv.backward()
    close(value, tv)
    close(grad, tl.grad)
