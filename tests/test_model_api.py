"""The user-facing conveniences: inference by default, predict / predict_proba, fit / evaluate, gradcheck on a copy."""
from __future__ import annotations

import numpy as np
import pytest

import minicnn
from minicnn.training import Trainer


def small_model():
    return minicnn.Sequential([minicnn.Conv2D(1, 4, 3, padding=1), minicnn.BatchNorm2D(4), minicnn.ReLU(),
                               minicnn.MaxPool2D(2), minicnn.Dropout(0.3), minicnn.Flatten(),
                               minicnn.Dense(4 * 4 * 4, 3)], input_shape=(1, 8, 8), name="small")


def toy_data(n=120, seed=0):
    """Three classes told apart by where the bright square is: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    for i, c in enumerate(y):
        x[i, 0, 2 * c : 2 * c + 3, 2:6] += 2.0
    return x, y


def test_calling_a_model_is_inference_and_changes_nothing():
    model = small_model()
    x, _ = toy_data(16)
    before = {k: v.copy() for k, v in model.state_arrays().items()}
    out1, out2 = model(x), model(x)
    np.testing.assert_array_equal(out1, out2)  # no dropout: evaluation mode
    np.testing.assert_array_equal(out1, model.forward(x, training=False))
    for k, v in model.state_arrays().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)  # BatchNorm statistics untouched
    assert minicnn.Dropout(0.5)(np.ones((4, 4))).min() == 1.0  # a single layer too


def test_predict_gives_class_ids_and_predict_proba_probabilities():
    model = small_model()
    x, _ = toy_data(20)
    logits = minicnn.to_host(model.predict_logits(x, batch_size=7))
    ids = model.predict(x, batch_size=7)
    assert ids.dtype == np.int64 and ids.shape == (20,)
    np.testing.assert_array_equal(ids, logits.argmax(axis=1))
    proba = model.predict_proba(x, batch_size=7)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(proba, minicnn.to_host(minicnn.softmax(logits)), rtol=1e-5)


def test_fit_learns_and_evaluate_agrees_with_the_trainer():
    model = small_model()
    x, y = toy_data(160)
    history = model.fit(x[:120], y[:120], validation_data=(x[120:], y[120:]), epochs=8, batch_size=16, lr=3e-3,
                        progress=False, log=lambda *a: None)
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert history[-1]["val_acc"] is not None
    result = model.evaluate(x[120:], y[120:])
    assert set(result) == {"loss", "accuracy"}
    assert result["accuracy"] >= 0.9
    loss, acc = Trainer(model, None, progress=False).evaluate(x[120:], y[120:])
    assert result == {"loss": loss, "accuracy": acc}
    assert history[-1]["val_acc"] == pytest.approx(acc, abs=1e-6)


def test_fit_accepts_a_built_optimizer():
    model = small_model()
    x, y = toy_data(32)
    opt = minicnn.optim.SGD(model, lr=0.1, momentum=0.9)
    model.fit(x, y, epochs=1, batch_size=8, optimizer=opt, progress=False, log=lambda *a: None)
    assert opt.steps == 4


def test_gradcheck_works_on_a_copy_and_leaves_the_layer_alone():
    layer = minicnn.BatchNorm2D(3)
    layer.buffers["running_mean"][...] = 0.5
    before = {k: v.copy() for k, v in {**layer.params, **layer.buffers}.items()}
    report = minicnn.gradcheck(layer, np.random.default_rng(1).standard_normal((4, 3, 5, 5)))
    assert report.ok
    for k, v in {**layer.params, **layer.buffers}.items():
        assert v.dtype == np.float32, k  # not cast to float64 in place
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert layer.grads == {}  # the copy's gradients stayed on the copy


def test_gradcheck_refuses_a_whole_network_unless_sampled():
    model = minicnn.build_model("hw3_dnn")
    x = np.random.default_rng(0).standard_normal((2, 1, 48, 48))
    with pytest.raises(ValueError, match=r"entries to check .*more than max_entries=20,000: pass samples=K"):
        minicnn.gradcheck(model, x)
    report = minicnn.gradcheck(model, x, samples=3, training=False, progress=False)
    assert set(report.errors) == {"x", *model.params}
    assert report.max_error < 1e-4


class WrongDense(minicnn.Dense):
    def backward(self, dout):
        dx = super().backward(dout)
        self.grads["W"] = self.grads["W"] * 1.01  # a 1 % error
        return dx


def test_a_sampled_gradcheck_still_catches_a_wrong_backward():
    minicnn.set_default_dtype("float64")
    layer = WrongDense(30, 20)
    report = minicnn.gradcheck(layer, np.random.default_rng(1).standard_normal((5, 30)), samples=10)
    assert not report.ok and report.errors["W"] > 1e-3 and report.errors["x"] < 1e-6


def test_gradcheck_shows_progress_when_asked(capsys):
    minicnn.gradcheck(minicnn.Dense(4, 3), np.random.default_rng(0).standard_normal((2, 4)), progress=True)
    assert "gradcheck" in capsys.readouterr().err
