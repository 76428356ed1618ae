"""minicnn.metrics.log_loss: the cross-entropy evaluate.py and precise_bn.py report."""
import numpy as np
import pytest

from minicnn.losses import SoftmaxCrossEntropy, softmax
from minicnn.metrics import log_loss


def test_log_loss_of_softmax_probabilities_equals_the_training_loss():
    rng = np.random.default_rng(0)
    logits, y = rng.standard_normal((20, 7)) * 3, rng.integers(0, 7, 20)
    expected = float(SoftmaxCrossEntropy().forward(logits, y))
    assert log_loss(softmax(logits), y) == pytest.approx(expected, rel=1e-10)


def test_log_loss_clips_a_zero_probability_instead_of_returning_infinity():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert log_loss(probs, np.array([1, 0])) == pytest.approx((-np.log(1e-12) - np.log(0.5)) / 2)


# -- the confusion matrix and the report, against counts made by hand ----------------------------------------------
def test_confusion_matrix_rows_are_true_classes_and_the_report_follows():
    from minicnn.metrics import classification_report, confusion_matrix

    y_true, y_pred = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 0]
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [2, 0, 1]]  # row = true class, column = prediction
    report = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(3 / 6)
    assert report["per_class"]["a"] == {"precision": pytest.approx(1 / 3), "recall": pytest.approx(1 / 2),
                                        "f1": pytest.approx(0.4), "support": 2}
    assert report["per_class"]["b"]["precision"] == pytest.approx(1 / 2) and report["per_class"]["b"]["recall"] == 1.0
    assert report["per_class"]["c"] == {"precision": 1.0, "recall": pytest.approx(1 / 3), "f1": pytest.approx(0.5),
                                        "support": 3}
    assert report["confusion_matrix_normalized"][2] == [pytest.approx(0.6667), 0.0, pytest.approx(0.3333)]


@pytest.mark.parametrize("call,message", [
    (lambda m: m.confusion_matrix([0], [3], 3), r"y_pred: holds class id 3, expected ids 0\.\.2 \(3 classes\)"),
    (lambda m: m.confusion_matrix([-1], [1], 3), r"y_true: holds class id -1, expected ids 0\.\.2"),
    (lambda m: m.confusion_matrix([0, 1], [0], 3), r"y_pred: expected 2 class ids \(one per example\), got 1"),
    (lambda m: m.accuracy([0, 1, 2], [0]), r"accuracy: y_pred: expected 3 class ids \(one per example\), got 1"),
    (lambda m: m.accuracy([[0, 1]], [[0, 1]]), r"accuracy: y_true: expected a 1-D array of class ids, got shape \(1, 2\)"),
    (lambda m: m.accuracy([0.5], [0]), r"accuracy: y_true: expected integer class ids, got dtype float64"),
    (lambda m: m.log_loss(np.full((2, 3), 1 / 3), [0, 3]), r"log_loss: y_true: holds class id 3, expected ids 0\.\.2"),
    (lambda m: m.log_loss(np.full((2, 3), 1 / 3), [0]), r"log_loss: y_true: expected 2 class ids"),
    (lambda m: m.log_loss(np.full(3, 1 / 3), [0]), r"log_loss: probs must be \(N, K\) class probabilities"),
])
def test_bad_labels_are_refused_naming_what_was_expected(call, message):
    import minicnn.metrics as metrics

    with pytest.raises(ValueError, match=message):
        call(metrics)


def test_float_labels_holding_whole_numbers_are_accepted():
    from minicnn.metrics import accuracy, confusion_matrix

    assert accuracy(np.array([0.0, 1.0, 2.0]), [0, 1, 1]) == pytest.approx(2 / 3)
    assert confusion_matrix(np.array([1.0]), np.array([1]), 2).tolist() == [[0, 0], [0, 1]]
