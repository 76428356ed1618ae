"""minicnn.load / minicnn.pretrained: a checkpoint becomes a classifier of raw images, preprocessing included."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import minicnn
from minicnn.classifier import PRETRAINED_DIR, ImageClassifier, pretrained_path
from minicnn.data import Normalizer
from minicnn.training import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def tiny(num_classes=3):
    return minicnn.Sequential([minicnn.Conv2D(1, 2, 3, padding=1), minicnn.BatchNorm2D(2), minicnn.ReLU(),
                               minicnn.Flatten(), minicnn.Dense(2 * 8 * 8, num_classes)],
                              input_shape=(1, 8, 8), name="tiny", config={"num_classes": num_classes})


@pytest.fixture(autouse=True)
def _tiny_in_the_zoo(monkeypatch):
    """Checkpoints rebuild their network from the zoo by name: register the test's small one there."""
    monkeypatch.setitem(minicnn.models.zoo.MODELS, "tiny", tiny)


def tiny_checkpoint(path, classes=("a", "b", "c")):
    """A train.py-style checkpoint of a small network on 8x8 images (grey levels 0-255)."""
    rng = np.random.default_rng(0)
    model = tiny(len(classes))
    images = rng.integers(0, 256, (50, 8, 8)).astype(np.uint8)
    norm = Normalizer("per_pixel").fit(images)
    model.forward(norm.transform(images), training=True)  # non-default running statistics
    save_checkpoint(path, model, extra_meta={"class_names": list(classes)}, extra_arrays=norm.to_arrays("data/norm/"))
    return model, norm, images


def test_load_applies_the_checkpoint_normalisation_to_raw_pixels(tmp_path):
    model, norm, images = tiny_checkpoint(tmp_path / "c.npz")
    clf = minicnn.load(tmp_path / "c.npz")
    assert isinstance(clf, ImageClassifier) and clf.class_names == ["a", "b", "c"]
    expected = minicnn.to_host(model.predict_proba(norm.transform(images)))
    np.testing.assert_allclose(clf.predict_proba(images), expected, rtol=1e-5)
    np.testing.assert_array_equal(clf.predict(images), expected.argmax(axis=1))
    assert clf.predict_labels(images[:3]) == [clf.class_names[i] for i in expected[:3].argmax(axis=1)]
    # every accepted layout gives the same answer
    np.testing.assert_allclose(clf.predict_proba(images[:, None]), expected, rtol=1e-5)
    np.testing.assert_allclose(clf.predict_proba(images[0]), expected[:1], rtol=1e-5)
    np.testing.assert_allclose(clf.predict_proba(images.astype(np.float32)), expected, rtol=1e-5)


def test_predictions_leave_the_network_unchanged(tmp_path):
    tiny_checkpoint(tmp_path / "c.npz")
    clf = minicnn.load(tmp_path / "c.npz")
    before = {k: v.copy() for k, v in clf.model.state_arrays().items()}
    images = np.random.default_rng(1).integers(0, 256, (9, 8, 8))
    clf.predict_proba(images), clf.predict_proba(images, tta=True), clf.predict_logits(images)
    for k, v in clf.model.state_arrays().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_images_scaled_to_unit_range_or_misshaped_are_refused_with_advice(tmp_path):
    tiny_checkpoint(tmp_path / "c.npz")
    clf = minicnn.load(tmp_path / "c.npz")
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\]; give grey levels 0-255"):
        clf.predict(np.random.default_rng(0).random((2, 8, 8)))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 8, 8\).*got shape \(2, 3, 8, 8\)"):
        clf.predict(np.zeros((2, 3, 8, 8)))


def test_evaluate_scores_and_refuses_labels_that_name_no_class(tmp_path):
    model, norm, images = tiny_checkpoint(tmp_path / "c.npz")
    clf = minicnn.load(tmp_path / "c.npz")
    labels = np.arange(len(images)) % 3
    result = clf.evaluate(images, labels)
    probs = minicnn.to_host(model.predict_proba(norm.transform(images)))
    assert result["accuracy"] == pytest.approx((probs.argmax(axis=1) == labels).mean())
    assert result["loss"] == pytest.approx(-np.log(probs[np.arange(len(labels)), labels]).mean(), rel=1e-5)
    with pytest.raises(ValueError, match=r"evaluate: labels: holds class id -1, expected ids 0\.\.2 \(3 classes\)"):
        clf.evaluate(images[:3], [0, -1, 1])
    with pytest.raises(ValueError, match=r"evaluate: labels: holds class id 9"):
        clf.evaluate(images[:3], [0, 9, 1])
    with pytest.raises(ValueError, match=r"expected one label per image \(3\), got 2 labels"):
        clf.evaluate(images[:3], [0, 1])


def test_load_names_the_problem_with_files_that_are_not_training_checkpoints(tmp_path):
    with pytest.raises(minicnn.CheckpointError, match="no such checkpoint file"):
        minicnn.load(tmp_path / "missing.npz")
    model = tiny()
    model.save(tmp_path / "weights.npz")
    with pytest.raises(minicnn.CheckpointError, match="has no normalisation statistics"):
        minicnn.load(tmp_path / "weights.npz")


def test_the_shipped_network_is_package_data():
    assert pretrained_path("hw3_cnn") == PRETRAINED_DIR / "hw3_cnn.npz"
    with pytest.raises(ValueError, match=r"no pretrained network 'resnet50': minicnn ships \['amth667_cnn', 'dlcv_cnn', 'hw3_cnn'\]"):
        minicnn.pretrained("resnet50")


@pytest.mark.slow
@pytest.mark.parametrize("name, at_least", [("hw3_cnn", 0.64),  # README: 65.3 % in one pass
                                            ("amth667_cnn", 0.53),  # README: 53.6 %
                                            ("dlcv_cnn", 0.59)])  # README: 59.9 % (int8)
def test_the_shipped_networks_reach_their_accuracy_on_raw_publictest_pixels(name, at_least, fer2013_path):
    from minicnn.data import load_fer2013  # noqa: PLC0415

    test = load_fer2013(fer2013_path).split("PublicTest")
    result = minicnn.pretrained(name).evaluate(test.images, test.labels)
    assert result["accuracy"] > at_least, result


#: how each shipped file stores its weights (README: "The minicnn command")
SHIPPED_AS = {"hw3_cnn": "float16", "amth667_cnn": "float16", "dlcv_cnn": "int8"}


def test_every_shipped_network_is_a_zoo_network_of_seven_classes():
    assert set(SHIPPED_AS) == set(minicnn.classifier.PRETRAINED_NAMES)
    for name in minicnn.classifier.PRETRAINED_NAMES:
        clf = minicnn.pretrained(name)
        assert clf.model.name == name and len(clf.class_names) == 7
        stored = np.load(pretrained_path(name))
        assert not any(k.startswith("optim/") for k in stored.files)  # exported
        state = [k for k in stored.files if k.startswith(("param/", "buffer/"))]
        if SHIPPED_AS[name] == "float16":  # half the bytes
            assert state and {stored[k].dtype for k in state} == {np.dtype(np.float16)}
        else:  # int8 weight matrices and kernels with their scales; biases and BatchNorm in float32
            matrices = {k for k in state if k.startswith("param/") and stored[k].ndim >= 2}
            assert matrices and {stored[k].dtype for k in matrices} == {np.dtype(np.int8)}
            assert {k for k in stored.files if k.startswith("scale/")} == {"scale/" + k for k in matrices}
            assert {stored[k].dtype for k in set(state) - matrices} == {np.dtype(np.float32)}
        assert {p.dtype for p in clf.model.params.values()} == {np.dtype(np.float32)}  # computed in float32


@pytest.mark.slow
def test_a_wheel_carries_the_shipped_weights(tmp_path):
    src = tmp_path / "src"  # build from a copy: setuptools leaves a build/ folder behind
    shutil.copytree(ROOT / "minicnn", src / "minicnn", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr[-300:]}")
    (wheel,) = tmp_path.glob("minicnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in minicnn.classifier.PRETRAINED_NAMES:
        assert f"minicnn/pretrained/{name}.npz" in names


def test_predict_reads_image_files_and_folders_as_the_loader_does(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    model, norm, images = tiny_checkpoint(tmp_path / "c.npz")
    clf = minicnn.load(tmp_path / "c.npz")
    folder = tmp_path / "faces"
    (folder / "more").mkdir(parents=True)
    # 8x8 grey files (the tiny network's input size), one a 16x16 colour image that must be resized
    names = [folder / "b.png", folder / "a.png", folder / "more" / "c.png"]
    for path, img in zip(names, images[:3]):
        Image.fromarray(img, "L").save(path)
    big = np.repeat(np.repeat(images[3], 2, axis=0), 2, axis=1)
    Image.fromarray(np.dstack([big] * 3), "RGB").save(folder / "d.png")
    (folder / "notes.txt").write_text("not an image: a folder lists only image files")

    expected = clf.predict_proba(images[:3])
    np.testing.assert_allclose(clf.predict_proba([str(p) for p in names]), expected, rtol=1e-5)
    np.testing.assert_array_equal(clf.predict(names[:2]), expected[:2].argmax(axis=1))
    np.testing.assert_allclose(clf.predict_proba(names[0]), expected[:1], rtol=1e-5)  # one path
    from minicnn.data.images import load_image

    resized = load_image(folder / "d.png", (8, 8))
    # a folder: its image files sorted (a, b, d, more/c), the 16x16 one resized to the network's 8x8
    want = np.concatenate([expected[1:2], expected[0:1], clf.predict_proba(resized), expected[2:3]])
    np.testing.assert_allclose(clf.predict_proba(folder), want, rtol=1e-5)
    assert clf.predict_labels([folder]) == [clf.class_names[i] for i in want.argmax(axis=1)]
    with pytest.raises(ValueError, match="not an image file"):
        clf.predict([folder / "notes.txt"])
    with pytest.raises(ValueError, match="no such file"):
        clf.predict([tmp_path / "gone.png"])


TTA_PADDING_CHOSEN = {"hw3_cnn": 2, "amth667_cnn": 2, "dlcv_cnn": 3}


@pytest.mark.parametrize("name", sorted(TTA_PADDING_CHOSEN))
def test_the_shipped_weights_record_the_tta_padding_chosen_on_validation(name):
    """`minicnn evaluate --split val --tta --choose-tta-padding 2 3 4` on each shipped file recorded its padding."""
    assert set(TTA_PADDING_CHOSEN) == set(minicnn.classifier.PRETRAINED_NAMES)
    clf = minicnn.pretrained(name)
    tta = clf.meta["tta"]
    assert tta["chosen_on"] == "val" and tta["padding"] == clf.tta_padding == TTA_PADDING_CHOSEN[name]
    assert set(tta["candidates"]) == {"2", "3", "4"}
    best = max(tta["candidates"].values())
    # the best on val, the first of equals in the order tried
    assert tta["val_accuracy"] == best == tta["candidates"][str(tta["padding"])]
    assert all(tta["candidates"][str(q)] < best for q in (2, 3, 4) if q < tta["padding"])
    # chosen on the very validation split the weights were selected on (not on a test set)
    val = clf.meta["data_fingerprint"]["val"]
    assert tta["val_fingerprint"] == val["sha256"] and tta["val_images"] == val["images"]
