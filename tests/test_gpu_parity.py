"""NumPy vs CuPy: the same weights and inputs give the same results on both backends.

Every test takes the ``cupy`` fixture (tests/conftest.py): the real CuPy where it
sees a GPU (``benchmarks/gpu_suite.sh`` insists on it with MINICNN_TEST_DEVICE=cupy),
and otherwise the strict stand-in of tests/fakecupy.py, so that CI, without a GPU,
runs the whole CuPy path: device arrays that refuse implicit conversion, the fused
kernels' argument checks and transliterations, and a ledger of host syncs.
"""
import math

import numpy as np
import pytest

import minicnn

pytestmark = pytest.mark.gpu
RTOL, ATOL = 1e-4, 1e-5


def both(cupy, build, x, training=True, seed=0):
    """Forward + backward of the layer ``build()`` on NumPy and on CuPy with identical weights."""
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
    for k in cpu.buffers:
        np.testing.assert_allclose(cupy.asnumpy(gpu.buffers[k]), cpu.buffers[k], rtol=1e-4, atol=1e-5, err_msg=k)


def _copy_state(cupy, src, dst):
    for k, v in src.state_arrays().items():
        dst.state_arrays()[k][...] = cupy.asarray(v)


X4 = np.random.default_rng(1).standard_normal((8, 3, 12, 12)).astype(np.float32)


@pytest.mark.parametrize("build", [
    lambda: minicnn.Conv2D(3, 5, 3, padding=1),
    lambda: minicnn.Conv2D(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)),
    lambda: minicnn.Conv2D(3, 5, 3, padding=1, algorithm="shifted"),
    lambda: minicnn.Conv2D(3, 4, (2, 3), padding=(0, 2), algorithm="shifted"),
    lambda: minicnn.MaxPool2D(2),
    lambda: minicnn.MaxPool2D(3, 2, 1),
    lambda: minicnn.AvgPool2D(2),
    lambda: minicnn.GlobalAvgPool2D(),
    lambda: minicnn.BatchNorm2D(3),
    lambda: minicnn.LeakyReLU(),
    lambda: minicnn.ReLU(),
])
@pytest.mark.parametrize("training", [True, False])
def test_layer_parity(cupy, build, training):
    both(cupy, build, X4, training)


def test_dense_and_batchnorm1d_parity(cupy):
    x = np.random.default_rng(2).standard_normal((16, 10)).astype(np.float32)
    both(cupy, lambda: minicnn.Dense(10, 4), x)
    both(cupy, lambda: minicnn.BatchNorm1D(10), x)
    both(cupy, lambda: minicnn.BatchNorm1D(10), x, training=False)


@pytest.mark.parametrize("stride", [1, 2])
def test_residual_block_parity(cupy, stride):
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


def test_losses_parity(cupy):
    rng = np.random.default_rng(3)
    z, y = rng.standard_normal((9, 7)).astype(np.float32), rng.integers(0, 7, 9)
    weights = rng.uniform(0.5, 2.0, 7)
    for loss in (minicnn.SoftmaxCrossEntropy(), minicnn.SoftmaxCrossEntropy(label_smoothing=0.1),
                 minicnn.SoftmaxCrossEntropy(class_weights=weights, label_smoothing=0.2), minicnn.MSELoss()):
        v_c, g_c = loss.forward(z, y), loss.backward()
        v_g, g_g = loss.forward(cupy.asarray(z), cupy.asarray(y)), loss.backward()
        assert float(v_g) == pytest.approx(float(v_c), rel=1e-5)
        np.testing.assert_allclose(cupy.asnumpy(g_g), g_c, rtol=RTOL, atol=ATOL)


def test_whole_training_step_parity(cupy):
    """hw3_cnn (dropout off: the two backends draw different masks), forward, backward and SGD.

    SGD, not Adam: Adam's first step is about ``lr * sign(g)`` for every weight, so a
    near-zero gradient whose float32 rounding differs between devices moves its weight
    by ``+-lr`` either way; that says nothing about correctness. Adam's fused update is
    compared with the NumPy formula in tests/test_optim.py (test_cupy_matches_numpy).
    """
    from minicnn.optim import SGD

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
    _copy_state(cupy, cpu, gpu)
    results = []
    for model, xb, yb in ((cpu, x, y), (gpu, cupy.asarray(x), cupy.asarray(y))):
        loss = minicnn.SoftmaxCrossEntropy()
        value = loss.forward(model.forward(xb, True), yb)
        model.backward(loss.backward())
        SGD(model, lr=0.1, momentum=0.9).step()
        results.append((float(value), {k: minicnn.to_host(v) for k, v in model.state_arrays().items()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for k, v in results[0][1].items():
        np.testing.assert_allclose(results[1][1][k], v, rtol=1e-3, atol=1e-4, err_msg=k)


@pytest.mark.parametrize("x_on_device", [False, True])
def test_recalibrate_batchnorm_parity(cupy, x_on_device):
    """Precise BN on the GPU (inputs on the host or the device) gives the CPU's running statistics."""
    x = np.random.default_rng(6).standard_normal((40, 1, 48, 48)).astype(np.float32)
    minicnn.set_backend("numpy")
    cpu = minicnn.build_model("hw3_cnn")
    minicnn.set_backend("cupy")
    gpu = minicnn.build_model("hw3_cnn")
    _copy_state(cupy, cpu, gpu)
    minicnn.recalibrate_batchnorm(cpu, x, batch_size=16)  # a NumPy model while the CuPy backend is active
    minicnn.recalibrate_batchnorm(gpu, cupy.asarray(x) if x_on_device else x, batch_size=16)
    for k, v in cpu.state_arrays().items():
        assert isinstance(cpu.state_arrays()[k], np.ndarray)
        np.testing.assert_allclose(minicnn.to_host(gpu.state_arrays()[k]), v, rtol=1e-3, atol=1e-4, err_msg=k)


def test_a_numpy_model_works_while_the_cupy_backend_is_active(cupy, tmp_path):
    """Batches go to the model's own device, not the active backend's."""
    from minicnn.inference import predict_proba, predict_tta
    from minicnn.optim import SGD
    from minicnn.training import Trainer
    from minicnn.visualize import saliency_maps

    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((24, 1, 48, 48)).astype(np.float32), rng.integers(0, 7, 24)
    model = minicnn.build_model("hw3_cnn")  # NumPy
    minicnn.set_backend("cupy")
    ref = minicnn.to_host(model.predict_logits(x))
    assert isinstance(model.predict_logits(x), np.ndarray)
    for batch in (cupy.asarray(x), x):
        np.testing.assert_allclose(predict_proba(model, batch).argmax(1), ref.argmax(1))
    assert predict_tta(model, x, padding=2).shape == (24, 7)
    assert saliency_maps(model, x[:4]).shape == (4, 48, 48)
    trainer = Trainer(model, SGD(model, lr=0.01), batch_size=8, progress=False)
    trainer.fit(cupy.asarray(x), cupy.asarray(y), cupy.asarray(x[:8]), cupy.asarray(y[:8]), epochs=1,
                log=lambda *_: None)
    assert isinstance(model.params["0.W"], np.ndarray)


@pytest.mark.parametrize("build", [lambda: minicnn.MaxPool2D(2), lambda: minicnn.MaxPool2D(3, 2, 1),
                                   lambda: minicnn.BatchNorm2D(3), lambda: minicnn.ReLU(), lambda: minicnn.LeakyReLU(),
                                   lambda: minicnn.Dropout(0.5), lambda: minicnn.Conv2D(3, 4, 3, padding=1)],
                         ids=["maxpool", "maxpool-overlapping", "batchnorm", "relu", "leaky-relu", "dropout", "conv"])
def test_the_fused_paths_refuse_a_dout_of_the_wrong_shape_too(cupy, build):
    minicnn.set_backend("cupy")
    layer = build()
    out = layer.forward(cupy.asarray(X4), training=True)
    with pytest.raises(ValueError, match=r"backward: expected dout of shape"):
        layer.backward(cupy.zeros((out.shape[0] - 1,) + tuple(out.shape[1:]), dtype=np.float32))
    assert layer.backward(cupy.ones(out.shape, dtype=np.float32)).shape == X4.shape


def test_augmentation_and_training_loop_run_on_the_gpu(cupy, tmp_path):
    """The Trainer keeps data on the device (labels may already be there) and checkpoints host arrays."""
    from minicnn.data import Augmenter
    from minicnn.optim import Adam
    from minicnn.training import Trainer, load_checkpoint

    minicnn.set_backend("cupy")
    model = minicnn.build_model("hw3_dnn")
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((256, 1, 48, 48)).astype(np.float32), rng.integers(0, 7, 256)
    trainer = Trainer(model, Adam(model), augmenter=Augmenter(True, 10, 0.1, (0.9, 1.1), crop_padding=2, seed=0),
                      batch_size=64, out_dir=tmp_path, progress=False)
    history = trainer.fit(x, cupy.asarray(y), x[:64], y[:64], epochs=2, log=lambda *_: None)
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    assert isinstance(model.params["1.W"], cupy.ndarray)
    minicnn.set_backend("numpy")
    restored, _, meta = load_checkpoint(tmp_path / "last.npz")
    assert meta["epoch"] == 2
    np.testing.assert_array_equal(restored.params["1.W"], cupy.asnumpy(model.params["1.W"]))


# -- host syncs: only the stand-in can count them ---------------------------------------------
def _epoch_ledger(fake_cupy, steps, log_every):
    from minicnn.data import Augmenter
    from minicnn.optim import Adam
    from minicnn.training import Trainer

    minicnn.set_backend("cupy")
    model = minicnn.build_model("hw3_cnn")
    rng = np.random.default_rng(8)
    n = 8 * steps
    x = fake_cupy.asarray(rng.standard_normal((n, 1, 48, 48)).astype(np.float32))
    y = fake_cupy.asarray(rng.integers(0, 7, n))
    augmenter = Augmenter(flip=True, rotation=30, shift=0.1, zoom=(0.8, 1.2), crop_padding=3, erase_prob=0.5, seed=0)
    trainer = Trainer(model, Adam(model), augmenter=augmenter, batch_size=8, progress=False, log_every=log_every,
                      clip_norm=5.0)
    with fake_cupy.counting() as ledger:
        trainer.fit(x, y, epochs=1, log=lambda *_: None)
    return ledger


@pytest.mark.parametrize("steps,log_every", [(7, 3), (7, 100), (3, 100)])
def test_a_training_epoch_syncs_only_when_it_logs_and_at_its_end(fake_cupy, steps, log_every):
    """No host sync and no host-device copy per step: the running loss is read every log_every steps,
    loss and accuracy once more at the end of the epoch, and one read-back says whether every weight and
    running statistic is finite; the shuffle, augmentation (crop and erasing included), forward, backward, clipping
    and Adam stay on the device. Before the epoch, fit checks the labels once on the host."""
    ledger = _epoch_ledger(fake_cupy, steps, log_every)
    logs = sum(1 for s in range(steps) if (s + 1) % log_every == 0 or s + 1 == steps)
    where = sorted({w for _, w in ledger.syncs})
    assert len(ledger.syncs) == logs + 2 + 1 + 1, ledger.summary()
    assert all(w.startswith(("minicnn/training.py:", "minicnn/backend.py:")) for w in where), where
    assert not [c for c in ledger.copies if c[0] == "H2D"], ledger.copies  # x and y are on the device already
    assert len(ledger.copies) == len(ledger.syncs)  # the only copies back are the logged scalars
    assert math.ceil(steps / log_every) <= logs


def test_the_sync_ledger_names_the_line(fake_cupy):
    a = fake_cupy.asarray(np.arange(3.0))
    with fake_cupy.counting() as ledger:
        float(a.sum())
    assert ledger.syncs == [("float", f"tests/test_gpu_parity.py:{test_the_sync_ledger_names_the_line.__code__.co_firstlineno + 3}")]
