"""NumPy vs CuPy: the same weights and inputs give the same results on both backends.

Runs where CuPy and a CUDA device are present; skipped with the reason elsewhere
(CI has no GPU).
"""
import numpy as np
import pytest

import minicnn
from minicnn import backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not backend.cupy_available(), reason="needs CuPy and a CUDA GPU (none here)"),
]
RTOL, ATOL = 1e-4, 1e-5


def both(build, x, training=True, seed=0):
    """Forward + backward of the layer ``build()`` on NumPy and on CuPy with identical weights."""
    import cupy

    rng = np.random.default_rng(seed)
    minicnn.set_backend("numpy")
    minicnn.seed(seed)
    cpu = build()
    minicnn.set_backend("cupy")
    minicnn.seed(seed)
    gpu = build()
    for store in ("params", "buffers"):
        for k, v in getattr(cpu, store).items():
            getattr(gpu, store)[k][...] = cupy.asarray(v)
    out_c = cpu.forward(x, training)
    out_g = gpu.forward(cupy.asarray(x), training)
    dout = rng.standard_normal(out_c.shape).astype(np.float32)
    dx_c, dx_g = cpu.backward(dout), gpu.backward(cupy.asarray(dout))
    np.testing.assert_allclose(cupy.asnumpy(out_g), out_c, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(cupy.asnumpy(dx_g), dx_c, rtol=RTOL, atol=ATOL)
    for k in cpu.grads:
        np.testing.assert_allclose(cupy.asnumpy(gpu.grads[k]), cpu.grads[k], rtol=1e-3, atol=1e-4, err_msg=k)


def _copy_state(src, dst):
    import cupy

    for k, v in src.state_arrays().items():
        dst.state_arrays()[k][...] = cupy.asarray(v)


X4 = np.random.default_rng(1).standard_normal((8, 3, 12, 12)).astype(np.float32)


@pytest.mark.parametrize("build", [
    lambda: minicnn.Conv2D(3, 5, 3, padding=1),
    lambda: minicnn.Conv2D(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)),
    lambda: minicnn.MaxPool2D(2),
    lambda: minicnn.MaxPool2D(3, 2, 1),
    lambda: minicnn.AvgPool2D(2),
    lambda: minicnn.GlobalAvgPool2D(),
    lambda: minicnn.BatchNorm2D(3),
    lambda: minicnn.LeakyReLU(),
    lambda: minicnn.ReLU(),
])
def test_layer_parity(build):
    both(build, X4)


def test_dense_and_batchnorm1d_parity():
    x = np.random.default_rng(2).standard_normal((16, 10)).astype(np.float32)
    both(lambda: minicnn.Dense(10, 4), x)
    both(lambda: minicnn.BatchNorm1D(10), x)
    both(lambda: minicnn.BatchNorm1D(10), x, training=False)


@pytest.mark.parametrize("stride", [1, 2])
def test_residual_block_parity(stride):
    import cupy

    minicnn.set_backend("numpy")
    cpu = minicnn.ResidualBlock(3, 6, stride)
    minicnn.set_backend("cupy")
    gpu = minicnn.ResidualBlock(3, 6, stride)
    for k, v in cpu.params.items():
        gpu.params[k][...] = cupy.asarray(v)
    out_c, out_g = cpu.forward(X4), gpu.forward(cupy.asarray(X4))
    np.testing.assert_allclose(cupy.asnumpy(out_g), out_c, rtol=RTOL, atol=ATOL)
    dx_c, dx_g = cpu.backward(np.ones_like(out_c)), gpu.backward(cupy.ones_like(out_g))
    np.testing.assert_allclose(cupy.asnumpy(dx_g), dx_c, rtol=RTOL, atol=1e-4)


def test_losses_parity():
    import cupy

    rng = np.random.default_rng(3)
    z, y = rng.standard_normal((9, 7)).astype(np.float32), rng.integers(0, 7, 9)
    for loss in (minicnn.SoftmaxCrossEntropy(label_smoothing=0.1), minicnn.MSELoss()):
        v_c, g_c = loss.forward(z, y), loss.backward()
        v_g, g_g = loss.forward(cupy.asarray(z), cupy.asarray(y)), loss.backward()
        assert float(v_g) == pytest.approx(float(v_c), rel=1e-5)
        np.testing.assert_allclose(cupy.asnumpy(g_g), g_c, rtol=RTOL, atol=ATOL)


def test_whole_training_step_parity():
    """hw3_cnn (dropout off: the two backends draw different masks), forward, backward and Adam."""
    import cupy
    from minicnn.optim import Adam

    def build():
        model = minicnn.build_model("hw3_cnn")
        for layer in model.layers:
            if isinstance(layer, minicnn.Dropout):
                layer.p = 0.0
        return model

    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((32, 1, 48, 48)).astype(np.float32), rng.integers(0, 7, 32)
    minicnn.set_backend("numpy")
    cpu = build()
    minicnn.set_backend("cupy")
    gpu = build()
    _copy_state(cpu, gpu)
    results = []
    for model, xb, yb in ((cpu, x, y), (gpu, cupy.asarray(x), cupy.asarray(y))):
        loss = minicnn.SoftmaxCrossEntropy()
        value = loss.forward(model.forward(xb, True), yb)
        model.backward(loss.backward())
        Adam(model, lr=1e-3).step()
        results.append((float(value), {k: minicnn.to_host(v) for k, v in model.state_arrays().items()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for k, v in results[0][1].items():
        if k.endswith(".b") and "param/" in k:
            continue  # conv biases before BatchNorm: zero true gradient, Adam amplifies rounding (see test_models)
        np.testing.assert_allclose(results[1][1][k], v, rtol=1e-3, atol=1e-4, err_msg=k)


@pytest.mark.parametrize("x_on_device", [False, True])
def test_recalibrate_batchnorm_parity(x_on_device):
    """Precise BN on the GPU (inputs on the host or the device) gives the CPU's running statistics."""
    import cupy

    x = np.random.default_rng(6).standard_normal((40, 1, 48, 48)).astype(np.float32)
    minicnn.set_backend("numpy")
    cpu = minicnn.build_model("hw3_cnn")
    minicnn.set_backend("cupy")
    gpu = minicnn.build_model("hw3_cnn")
    _copy_state(cpu, gpu)
    minicnn.recalibrate_batchnorm(cpu, x, batch_size=16)
    minicnn.recalibrate_batchnorm(gpu, cupy.asarray(x) if x_on_device else x, batch_size=16)
    for k, v in cpu.state_arrays().items():
        np.testing.assert_allclose(minicnn.to_host(gpu.state_arrays()[k]), v, rtol=1e-3, atol=1e-4, err_msg=k)


def test_augmentation_and_training_loop_run_on_the_gpu(tmp_path):
    """The Trainer keeps data on the device and returns host numbers once per epoch."""
    import cupy
    from minicnn.data import Augmenter
    from minicnn.optim import Adam
    from minicnn.training import Trainer

    minicnn.set_backend("cupy")
    model = minicnn.build_model("hw3_dnn")
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((256, 1, 48, 48)).astype(np.float32), rng.integers(0, 7, 256)
    trainer = Trainer(model, Adam(model), augmenter=Augmenter(True, 10, 0.1, (0.9, 1.1), seed=0),
                      batch_size=64, out_dir=tmp_path, progress=False)
    history = trainer.fit(x, y, x[:64], y[:64], epochs=2, log=lambda *_: None)
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    assert isinstance(model.params["1.W"], cupy.ndarray)
