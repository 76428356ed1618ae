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
