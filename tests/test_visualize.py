"""minicnn.visualize: saliency against numerical gradients, activations, and every plot writes a real PNG."""
import subprocess
import sys

import numpy as np
import pytest

from minicnn import visualize as viz
from minicnn.layers import BatchNorm2D, Conv2D, Dense, Dropout, Flatten, LeakyReLU, MaxPool2D, ReLU
from minicnn.metrics import confusion_matrix
from minicnn.models import Sequential, build_model

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")


def assert_png(path, min_bytes=2_000, min_side=100):
    """``path`` exists, Pillow reads it as a PNG, and it is not a blank postage stamp."""
    assert path.is_file(), f"{path} was not written"
    assert path.stat().st_size >= min_bytes, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert min(im.size) >= min_side, f"{path} is {im.size}"
        im.verify()
    with Image.open(path) as im:  # verify() leaves the image unusable: reopen to look at the pixels
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 5, f"{path} looks blank"


def tiny_model(in_channels=1, num_classes=5):
    """A float64 conv net on 8x8 inputs with every kind of layer the zoo uses before the head."""
    model = Sequential([
        Conv2D(in_channels, 3, 3, padding=1), BatchNorm2D(3), LeakyReLU(0.1), MaxPool2D(2, 2),
        Conv2D(3, 4, 3, padding=1), ReLU(), Dropout(0.3),
        Flatten(), Dense(4 * 4 * 4, num_classes),
    ], input_shape=(in_channels, 8, 8), name="tiny")
    rng = np.random.default_rng(1)
    # Non-trivial running statistics, so evaluation-mode BatchNorm is not the identity.
    model.layers[1].buffers["running_mean"][...] = rng.normal(0, 0.3, 3)
    model.layers[1].buffers["running_var"][...] = rng.uniform(0.5, 2.0, 3)
    return model


def numerical_saliency(model, x, classes, pixels, h=1e-5):
    """max over channels of |d logit_c / d x| at ``pixels`` [(n, i, j)], by central differences."""
    out = []
    for n, i, j in pixels:
        grads = []
        for c in range(x.shape[1]):
            xp_, xm = x[n : n + 1].copy(), x[n : n + 1].copy()
            xp_[0, c, i, j] += h
            xm[0, c, i, j] -= h
            fp = model.forward(xp_, training=False)[0, classes[n]]
            fm = model.forward(xm, training=False)[0, classes[n]]
            grads.append((fp - fm) / (2 * h))
        out.append(np.max(np.abs(grads)))
    return np.array(out)


@pytest.mark.parametrize("in_channels", [1, 2])
def test_saliency_equals_numerical_gradient(float64, in_channels):
    model = tiny_model(in_channels)
    x = np.random.default_rng(0).normal(size=(3, in_channels, 8, 8))
    predicted = model.forward(x, training=False).argmax(axis=1)
    pixels = [(0, 0, 0), (0, 3, 5), (1, 7, 2), (2, 4, 4), (2, 1, 6)]
    for classes in (None, np.array([4, 0, 2])):
        sal = viz.saliency_maps(model, x, classes)
        assert sal.shape == (3, 8, 8) and sal.dtype == np.float64
        used = predicted if classes is None else classes
        expected = numerical_saliency(model, x, used, pixels)
        got = np.array([sal[p] for p in pixels])
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    # A batch gives each image its own gradient (evaluation mode): same as one image at a time.
    one_by_one = np.concatenate([viz.saliency_maps(model, x[k : k + 1]) for k in range(3)])
    np.testing.assert_allclose(viz.saliency_maps(model, x, batch_size=2), one_by_one, rtol=1e-12)


def test_saliency_rejects_bad_input(float64):
    model = tiny_model()
    x = np.zeros((2, 1, 8, 8))
    with pytest.raises(ValueError, match="2 images"):
        viz.saliency_maps(model, x, classes=[1, 2, 3])
    with pytest.raises(ValueError, match="0..4"):
        viz.saliency_maps(model, x, classes=[1, 7])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        viz.saliency_maps(model, x[:, 0])


def test_default_activation_layer_is_the_second_conv_blocks_activation():
    # hw3_cnn: conv, BN, leaky ReLU, pool, (conv 4, BN 5, leaky ReLU 6) ...
    assert viz.default_activation_layer(build_model("hw3_cnn")) == 6
    assert viz.default_activation_layer(build_model("amth667_cnn")) == 4  # conv 3, ReLU 4
    assert viz.default_activation_layer(build_model("ece662_resnet")) == 3  # first residual block
    assert viz.default_activation_layer(tiny_model()) == 5
    with pytest.raises(ValueError, match="hw3_dnn"):
        viz.default_activation_layer(build_model("hw3_dnn"))


def test_top_activations(float64):
    model = tiny_model()
    x = np.random.default_rng(2).normal(size=(10, 1, 8, 8))
    act = viz.top_activations(model, x, top_k=3, keep_maps=4, batch_size=3)
    assert act.layer_index == 5 and act.layer.startswith("ReLU")
    h = x
    for layer in model.layers[:6]:
        h = layer.forward(h, training=False)
    np.testing.assert_allclose(act.scores, h.mean(axis=(2, 3)))
    np.testing.assert_allclose(act.maps, h[:4])
    assert act.top_indices.shape == (4, 3)
    for f in range(4):
        top = act.scores[act.top_indices[f], f]
        assert np.all(np.diff(top) <= 0), "not sorted, highest first"
        others = np.delete(act.scores[:, f], act.top_indices[f])
        assert top.min() >= others.max()
    with pytest.raises(ValueError, match="not feature maps"):
        viz.top_activations(model, x, layer_index=8)  # the Dense output


def test_plots_write_valid_pngs(tmp_path, float64):
    rng = np.random.default_rng(0)
    names = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    history = [{"epoch": e, "train_loss": 1.8 - 0.1 * e, "train_acc": 0.3 + 0.05 * e,
                "val_loss": 1.9 - 0.08 * e, "val_acc": 0.28 + 0.04 * e} for e in range(1, 6)]
    assert viz.plot_history(history, tmp_path / "h.png") == tmp_path / "h.png"
    assert_png(tmp_path / "h.png")
    no_val = [dict(h, val_loss=None, val_acc=None) for h in history]
    assert_png(viz.plot_history(no_val, tmp_path / "sub" / "h2.png"))  # folders are created
    phased = [dict(h, phase=int(h["epoch"] > 3)) for h in history]  # train.py --init-from after epoch 3
    assert_png(viz.plot_history(phased, tmp_path / "h3.png"))

    y_true = rng.integers(0, 7, 60)
    y_pred = np.where(rng.random(60) < 0.5, y_true, rng.integers(0, 7, 60))
    cm = confusion_matrix(y_true, y_pred, 7)
    assert_png(viz.plot_confusion_matrix(cm, names, tmp_path / "cm.png"))
    assert_png(viz.plot_confusion_matrix(cm.tolist(), names, tmp_path / "cm_counts.png", normalize=False))

    images = rng.integers(0, 256, (60, 48, 48), dtype=np.uint8)
    assert_png(viz.plot_misclassified(images, y_true, y_pred, names, tmp_path / "mis.png", per_class=3))
    assert_png(viz.plot_misclassified(images[:, None], y_true, y_pred, names, tmp_path / "mis2.png",
                                      confidence=rng.random(60)))

    model = tiny_model()
    x = rng.normal(size=(4, 1, 8, 8))
    sal = viz.saliency_maps(model, x)
    assert_png(viz.plot_saliency(x, sal, tmp_path / "sal.png", titles=list("abcd")))
    assert_png(viz.plot_filters(model, tmp_path / "filters.png"), min_side=50)
    assert_png(viz.plot_filters(model, tmp_path / "filters2.png", layer_index=4), min_side=50)

    act = viz.top_activations(model, x, top_k=3, keep_maps=2)
    assert_png(viz.plot_activations(x, act, tmp_path / "act.png", n_filters=3, image_index=1))


def test_plot_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        viz.plot_history([], tmp_path / "h.png")
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        viz.plot_confusion_matrix(np.zeros((2, 2)), ["a", "b", "c"], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="not a Conv2D"):
        viz.plot_filters(tiny_model(), tmp_path / "f.png", layer_index=1)
    assert not list(tmp_path.iterdir())


def test_import_minicnn_needs_no_matplotlib():
    code = "import sys, minicnn, minicnn.visualize, minicnn.inference; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
