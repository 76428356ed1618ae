"""Sequential, the model zoo, persistence, bad input, and a whole hw3_cnn training step against PyTorch."""
import zipfile

import numpy as np
import pytest

import minicnn
from minicnn import CheckpointError
from minicnn.checkpoint import load_npz, save_npz
from minicnn.models import MODELS, build_model


@pytest.mark.parametrize("name,trainable", [("hw3_cnn", 1_703_623), ("hw3_dnn", 1_974_791), ("ece662_resnet", 2_982_247),
                                            ("vgg_fer", 10_462_535), ("vgg_fer_slim", 2_327_623)])
def test_zoo_matches_the_reports_parameter_counts(name, trainable):
    model = build_model(name)
    assert model.count_params()[0] == trainable
    text = model.summary(print_fn=None)
    assert f"Trainable params: {trainable:,}" in text


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_runs_forward_and_backward(name):
    model = build_model(name)
    x = np.random.default_rng(0).standard_normal((4, 1, 48, 48)).astype(np.float32)
    out = model.forward(x, training=True)
    assert out.shape == (4, model.config["num_classes"])
    dx = model.backward(np.ones_like(out))
    assert dx.shape == x.shape
    assert set(model.grads) == set(model.params)


def test_summary_lists_every_layer_with_output_shape():
    text = build_model("hw3_cnn").summary(print_fn=None)
    assert "(N, 32, 24, 24)" in text and "(N, 256, 3, 3)" in text and "(N, 7)" in text
    assert "Non-trainable params: 2,496" in text  # BatchNorm running statistics


def test_trd_cnn_has_six_classes():
    assert build_model("trd_cnn").forward(np.zeros((2, 1, 48, 48), np.float32), False).shape == (2, 6)


def test_unknown_model_name_lists_the_zoo():
    with pytest.raises(ValueError, match="hw3_cnn"):
        build_model("vgg99")


# -- train / eval behaviour --------------------------------------------------------

def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    bn = minicnn.BatchNorm1D(3)
    x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32) * 5 + 2
    y = bn.forward(x, training=True)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(0), 1, atol=1e-3)
    np.testing.assert_allclose(bn.buffers["running_mean"], 0.1 * x.mean(0), rtol=1e-5)
    running = {k: v.copy() for k, v in bn.buffers.items()}
    y_eval = bn.forward(x, training=False)
    np.testing.assert_allclose(y_eval, (x - running["running_mean"]) / np.sqrt(running["running_var"] + 1e-5), rtol=1e-5)
    for k in running:  # evaluation never updates the statistics
        np.testing.assert_array_equal(bn.buffers[k], running[k])


def test_dropout_is_identity_in_eval_and_keeps_the_expectation_in_training():
    drop = minicnn.Dropout(0.25)
    x = np.ones((200, 500), np.float32)
    assert drop.forward(x, training=False) is x
    out = drop.forward(x, training=True)
    assert 0.24 < (out == 0).mean() < 0.26
    assert out.mean() == pytest.approx(1.0, abs=0.01)


def test_dropout_is_reproducible_under_a_seed():
    x = np.ones((10, 10), np.float32)
    minicnn.seed(3)
    a = minicnn.Dropout(0.5).forward(x)
    minicnn.seed(3)
    b = minicnn.Dropout(0.5).forward(x)
    np.testing.assert_array_equal(a, b)


def test_model_eval_is_deterministic_and_training_is_not():
    model = build_model("hw3_cnn")
    x = np.random.default_rng(1).standard_normal((8, 1, 48, 48)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x), model.predict(x))
    assert not np.array_equal(model.forward(x, True), model.forward(x, True))  # dropout masks differ


# -- persistence ---------------------------------------------------------------------

def _perturb(model, seed=0):
    rng = np.random.default_rng(seed)
    for p in model.params.values():
        p[...] = rng.standard_normal(p.shape)
    for name, b in model.buffers.items():  # running variances must stay positive
        b[...] = rng.uniform(0.5, 2.0, b.shape) if name.endswith("running_var") else rng.standard_normal(b.shape)


@pytest.mark.parametrize("name", ["hw3_cnn", "ece662_resnet"])
def test_save_load_round_trip_is_exact(tmp_path, name):
    a, b = build_model(name), build_model(name)
    _perturb(a, 1)
    path = a.save(tmp_path / "m.npz")
    meta = b.load(path)
    assert meta["name"] == name
    for k, v in a.state_arrays().items():
        np.testing.assert_array_equal(b.state_arrays()[k], v)
    x = np.random.default_rng(2).standard_normal((3, 1, 48, 48)).astype(np.float32)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    import os
    import stat

    model = build_model("hw3_dnn")
    model.save(tmp_path / "m.npz")
    model.save(tmp_path / "m.npz")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.npz").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def _state_copy(model):
    return {k: v.copy() for k, v in model.state_arrays().items()}


def _assert_unchanged(model, before):
    for k, v in model.state_arrays().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("damage,message", [
    ("missing", "missing arrays"),
    ("extra", "unexpected arrays"),
    ("shape", "has shape"),
])
def test_loading_a_mismatched_file_fails_clearly_and_changes_nothing(tmp_path, damage, message):
    src = build_model("hw3_dnn")
    arrays = src.state_arrays()
    if damage == "missing":
        arrays.pop("param/0.W") if "param/0.W" in arrays else arrays.pop(next(iter(arrays)))
    elif damage == "extra":
        arrays["param/99.W"] = np.zeros(3, np.float32)
    else:
        key = next(k for k in arrays if k.endswith(".W"))
        arrays[key] = np.zeros((2, 2), np.float32)
    path = save_npz(tmp_path / "bad.npz", arrays, {"name": "hw3_dnn"})
    target = build_model("hw3_dnn")
    before = _state_copy(target)
    with pytest.raises(ValueError, match=message) as info:
        target.load(path)
    assert str(path) in str(info.value)
    _assert_unchanged(target, before)


def test_loading_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"param/1.W": np.array([{"a": 1}], dtype=object)})
    target = build_model("hw3_dnn")
    before = _state_copy(target)
    with pytest.raises(CheckpointError, match="pickled"):
        target.load(path)
    _assert_unchanged(target, before)


def test_loading_garbage_or_a_missing_file_names_the_file(tmp_path):
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="garbage.npz"):
        build_model("hw3_dnn").load(bad)
    with pytest.raises(CheckpointError, match="nope.npz"):
        build_model("hw3_dnn").load(tmp_path / "nope.npz")


def test_npz_meta_round_trip(tmp_path):
    path = save_npz(tmp_path / "x.npz", {"a": np.arange(3)}, {"k": [1, 2], "s": "é"})
    arrays, meta = load_npz(path)
    assert meta == {"k": [1, 2], "s": "é"} and arrays["a"].tolist() == [0, 1, 2]
    with zipfile.ZipFile(path) as z:
        assert all(n.endswith(".npy") for n in z.namelist())


# -- bad input names the layer and both shapes ------------------------------------------

@pytest.mark.parametrize("layer,x,expected", [
    (minicnn.Conv2D(1, 4, 3), np.zeros((1, 48, 48), np.float32), r"Conv2D\(1, 4.*expected input of shape \(N, 1, H, W\), got \(1, 48, 48\)"),
    (minicnn.Conv2D(3, 4, 3), np.zeros((2, 1, 8, 8), np.float32), r"expected input of shape \(N, 3, H, W\), got \(2, 1, 8, 8\)"),
    (minicnn.Conv2D(1, 4, 5), np.zeros((2, 1, 3, 3), np.float32), r"kernel \(5, 5\) is larger than the padded input \(3, 3\)"),
    (minicnn.Dense(2304, 512), np.zeros((2, 2000), np.float32), r"Dense\(2304, 512\): expected input of shape \(N, 2304\), got \(2, 2000\)"),
    (minicnn.BatchNorm2D(8), np.zeros((2, 4, 3, 3), np.float32), r"BatchNorm2D\(8.*got \(2, 4, 3, 3\)"),
    (minicnn.MaxPool2D(2), np.zeros((2, 4, 3), np.float32), r"MaxPool2D.*expected input of shape \(N, C, H, W\)"),
    (minicnn.MaxPool2D(4), np.zeros((2, 4, 3, 3), np.float32), r"kernel \(4, 4\) is larger"),
])
def test_bad_input_raises_a_value_error_naming_layer_and_shapes(layer, x, expected):
    with pytest.raises(ValueError, match=expected):
        layer.forward(x)


def test_model_with_wrong_image_size_fails_at_the_dense_layer():
    with pytest.raises(ValueError, match=r"Dense\(2304, 512\).*got \(2, 4096\)"):
        build_model("hw3_cnn").forward(np.zeros((2, 1, 64, 64), np.float32))


# -- one whole training step of hw3_cnn against PyTorch -----------------------------------

def _torch_hw3_cnn(model, masks):
    """The same network in torch.nn, with our weights and our dropout masks."""
    import torch

    class FixedDropout(torch.nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.mask = torch.tensor(mask)

        def forward(self, x):
            return x * self.mask

    layers, pairs = [], []
    for i, layer in enumerate(model.layers):
        name = type(layer).__name__
        if name == "Conv2D":
            m = torch.nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1)
            pairs += [(f"{i}.W", m.weight, lambda a: a), (f"{i}.b", m.bias, lambda a: a)]
        elif name == "Dense":
            m = torch.nn.Linear(layer.in_features, layer.out_features)
            pairs += [(f"{i}.W", m.weight, lambda a: a.T), (f"{i}.b", m.bias, lambda a: a)]
        elif name in ("BatchNorm2D", "BatchNorm1D"):
            m = (torch.nn.BatchNorm2d if name == "BatchNorm2D" else torch.nn.BatchNorm1d)(layer.num_features)
            pairs += [(f"{i}.gamma", m.weight, lambda a: a), (f"{i}.beta", m.bias, lambda a: a)]
        elif name == "LeakyReLU":
            m = torch.nn.LeakyReLU(layer.negative_slope)
        elif name == "MaxPool2D":
            m = torch.nn.MaxPool2d(2, 2)
        elif name == "Dropout":
            m = FixedDropout(masks[i])
        elif name == "Flatten":
            m = torch.nn.Flatten()
        else:  # pragma: no cover
            raise AssertionError(name)
        layers.append(m)
    net = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for key, tparam, to_torch in pairs:
            tparam.copy_(torch.tensor(np.ascontiguousarray(to_torch(model.params[key]))))
    return net, pairs


def test_one_hw3_cnn_training_step_matches_torch():
    torch = pytest.importorskip("torch")
    from minicnn.optim import SGD

    model = build_model("hw3_cnn")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 48, 48)).astype(np.float32)
    y = rng.integers(0, 7, 16)
    loss_fn = minicnn.SoftmaxCrossEntropy()
    logits = model.forward(x, training=True)
    loss = loss_fn.forward(logits, y)
    model.backward(loss_fn.backward())
    masks = {i: layer.mask for i, layer in enumerate(model.layers) if isinstance(layer, minicnn.Dropout)}

    net, pairs = _torch_hw3_cnn(model, masks)
    tlogits = net(torch.tensor(x))
    tloss = torch.nn.functional.cross_entropy(tlogits, torch.tensor(y))
    tloss.backward()
    np.testing.assert_allclose(logits, tlogits.detach().numpy(), rtol=1e-4, atol=1e-4)
    assert float(loss) == pytest.approx(tloss.item(), rel=1e-5)
    for key, tparam, to_torch in pairs:
        np.testing.assert_allclose(to_torch(model.grads[key]), tparam.grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=key)

    # SGD, whose update is linear in the gradient: Adam's first step, lr * g / (|g| + eps),
    # would blow float32 rounding in near-zero gradients (e.g. a conv bias followed by
    # BatchNorm, whose true gradient is 0) up to +-lr. tests/test_optim.py checks Adam itself.
    SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-4).step()
    torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4).step()
    for key, tparam, to_torch in pairs:
        np.testing.assert_allclose(to_torch(model.params[key]), tparam.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=key)
    for i, layer in enumerate(model.layers):  # running statistics too
        if isinstance(layer, (minicnn.BatchNorm1D, minicnn.BatchNorm2D)):
            np.testing.assert_allclose(layer.buffers["running_var"], net[i].running_var.numpy(), rtol=1e-4)


def test_vgg_fer_slim_ships_and_travels_and_vgg_fer_does_not(tmp_path):
    """The sizes its docstring promises: float16 weights under the 16 MiB a file may have, and a resumable SGD
    checkpoint small enough to go to the GPU machine beside FER-2013's 33 MiB of Training images."""
    from minicnn.optim import SGD  # noqa: PLC0415
    from minicnn.training import export_for_inference, save_checkpoint  # noqa: PLC0415

    sizes = {}
    for name in ("vgg_fer_slim", "vgg_fer"):
        model = build_model(name)
        optimizer = SGD(model, lr=0.01, momentum=0.9, nesterov=True)
        x = np.random.default_rng(0).standard_normal((2, 1, 48, 48)).astype(np.float32)
        out = model.forward(x, training=True)
        model.backward(np.ones_like(out))
        optimizer.step()  # after a real step every parameter has its momentum buffer
        assert len(optimizer.state_dict()) >= len(model.params)
        save_checkpoint(tmp_path / f"{name}.npz", model, optimizer, epoch=1)
        export_for_inference(tmp_path / f"{name}.npz", tmp_path / f"{name}16.npz", dtype="float16")
        sizes[name] = ((tmp_path / f"{name}.npz").stat().st_size, (tmp_path / f"{name}16.npz").stat().st_size)
    mib = 2**20
    assert sizes["vgg_fer_slim"][1] < 5 * mib and 17 * mib < sizes["vgg_fer_slim"][0] < 18 * mib  # 17.8 MiB
    assert sizes["vgg_fer"][1] > 16 * mib  # why the slim one exists
