"""minicnn.optim against PyTorch: optimisers, gradient clipping, schedules, checkpoints."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minicnn.backend import get_array_module
from minicnn.optim import (
    SGD,
    Adam,
    AdamW,
    ConstantLR,
    CosineLR,
    ExponentialLR,
    ReduceLROnPlateau,
    RMSprop,
    StepLR,
    clip_grad_norm,
    make_optimizer,
    make_schedule,
)

RTOL, ATOL = 1e-5, 1e-6
SHAPES = {"conv.W": (4, 3, 3, 3), "conv.b": (4,), "fc.W": (6, 5), "scale": ()}
FAST = settings(max_examples=20, deadline=None)


class FakeModel:
    """Like a Container: ``params``/``grads`` are new dicts on every access."""

    def __init__(self, params: dict) -> None:
        # copies on the arrays' own device (np.array of a CuPy array would raise: no implicit conversion)
        self._params = {k: get_array_module(v).array(v, dtype=v.dtype) for k, v in params.items()}
        self._grads: dict = {}

    @property
    def params(self):
        return dict(self._params)

    @property
    def grads(self):
        return dict(self._grads)


def make_params(seed: int, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {k: np.asarray(rng.standard_normal(s)).astype(dtype) for k, s in SHAPES.items()}


TORCH = {
    SGD: torch.optim.SGD,
    Adam: torch.optim.Adam,
    AdamW: torch.optim.AdamW,
    RMSprop: torch.optim.RMSprop,
}


def compare_with_torch(cls, kw: dict, steps: int = 10, seed: int = 0, dtype=np.float32,
                       skip=lambda step, name: False, rtol=RTOL, atol=ATOL):
    """Run ``steps`` updates with the same random gradients on minicnn and torch."""
    init = make_params(seed, dtype)
    model = FakeModel(init)
    ids = {k: id(v) for k, v in model._params.items()}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in init.items()}
    opt = cls(model, **kw)
    torch_kw = dict(kw)
    topt = TORCH[cls](list(tparams.values()), **torch_kw)
    rng = np.random.default_rng(seed + 1)
    for step in range(steps):
        model._grads = {}
        for name, tp in tparams.items():
            g = np.asarray(rng.standard_normal(SHAPES[name])).astype(dtype)
            if skip(step, name):
                tp.grad = None
                continue
            model._grads[name] = g
            tp.grad = torch.tensor(g.copy())
        before = {k: v.copy() for k, v in model._grads.items()}
        opt.step()
        topt.step()
        for name, tp in tparams.items():
            np.testing.assert_allclose(model._params[name], tp.detach().numpy(), rtol=rtol, atol=atol,
                                       err_msg=f"{cls.__name__}{kw} step {step} param {name}")
        for name, g in before.items():  # the optimiser must not touch the gradients
            np.testing.assert_array_equal(model._grads[name], g)
    # updated in place: the model's arrays are still the same objects
    assert {k: id(v) for k, v in model._params.items()} == ids
    return opt


# -- optimisers vs torch ------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(lr=0.1),
    dict(lr=0.1, weight_decay=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.01),
])
def test_sgd_matches_torch(kw):
    compare_with_torch(SGD, kw)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(lr=0.01, betas=(0.8, 0.99)),
    dict(lr=0.003, weight_decay=0.1),
    dict(lr=0.01, eps=1e-3, betas=(0.0, 0.9)),
])
def test_adam_matches_torch(kw):
    compare_with_torch(Adam, kw)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(lr=0.01, weight_decay=0.5),
    dict(lr=0.003, weight_decay=0.0, betas=(0.5, 0.9)),
])
def test_adamw_matches_torch(kw):
    compare_with_torch(AdamW, kw)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(lr=0.001, alpha=0.9),
    dict(lr=0.001, momentum=0.9),
    dict(lr=0.001, centered=True),
    dict(lr=0.001, centered=True, momentum=0.5, weight_decay=0.01),
    dict(lr=0.003, weight_decay=0.1, eps=1e-4),
])
def test_rmsprop_matches_torch(kw):
    compare_with_torch(RMSprop, kw)


@FAST
@given(lr=st.floats(1e-4, 0.3), momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       nesterov=st.booleans(), dampening=st.sampled_from([0.0, 0.1]),
       weight_decay=st.sampled_from([0.0, 1e-4, 0.1]), seed=st.integers(0, 2**16))
def test_sgd_matches_torch_hypothesis(lr, momentum, nesterov, dampening, weight_decay, seed):
    if nesterov and (momentum == 0 or dampening != 0):
        with pytest.raises(ValueError):
            SGD(FakeModel({}), lr=lr, momentum=momentum, nesterov=True, dampening=dampening)
        return
    compare_with_torch(SGD, dict(lr=lr, momentum=momentum, nesterov=nesterov, dampening=dampening,
                                 weight_decay=weight_decay), seed=seed)


@FAST
@given(cls=st.sampled_from([Adam, AdamW]), lr=st.floats(1e-4, 0.1),
       beta1=st.sampled_from([0.0, 0.5, 0.9]), beta2=st.sampled_from([0.9, 0.99, 0.999]),
       eps=st.sampled_from([1e-8, 1e-6, 1e-2]), weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
       seed=st.integers(0, 2**16))
def test_adam_family_matches_torch_hypothesis(cls, lr, beta1, beta2, eps, weight_decay, seed):
    compare_with_torch(cls, dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay), seed=seed)


@FAST
@given(lr=st.floats(1e-4, 0.01), alpha=st.sampled_from([0.9, 0.99]),
       eps=st.sampled_from([1e-8, 1e-3]), momentum=st.sampled_from([0.0, 0.9]),
       weight_decay=st.sampled_from([0.0, 0.01]), centered=st.booleans(), seed=st.integers(0, 2**16))
def test_rmsprop_matches_torch_hypothesis(lr, alpha, eps, momentum, weight_decay, centered, seed):
    compare_with_torch(RMSprop, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum,
                                     weight_decay=weight_decay, centered=centered), seed=seed)


@pytest.mark.parametrize("cls,kw", [
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (Adam, dict(lr=0.01)),
    (AdamW, dict(lr=0.01, weight_decay=0.1)),
    (RMSprop, dict(lr=0.01, centered=True, momentum=0.9)),
    (RMSprop, dict(lr=0.01, momentum=0.5, weight_decay=0.1)),
    (RMSprop, dict(lr=0.01, centered=True, weight_decay=0.1)),
    (AdamW, dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.9))),
])
def test_parameters_without_gradient_are_skipped_like_torch(cls, kw):
    # "fc.W" gets no gradient on even steps, "scale" never: its state never starts
    opt = compare_with_torch(cls, kw, skip=lambda step, name: name == "scale" or (name == "fc.W" and step % 2 == 0))
    assert opt.param_steps["fc.W"] == 5 and opt.param_steps["conv.W"] == 10
    assert "scale" not in opt.param_steps and "t/scale" not in opt.state_dict()


@pytest.mark.parametrize("cls,kw", [
    (SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    (Adam, dict(lr=0.01, weight_decay=0.01)),
    (RMSprop, dict(lr=0.01, centered=True, momentum=0.9)),
    (RMSprop, dict(lr=0.01, momentum=0.5, weight_decay=0.1)),
    (RMSprop, dict(lr=0.01, centered=True, weight_decay=0.1)),
    (AdamW, dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.9))),
])
def test_float64_parameters_match_torch(cls, kw):
    compare_with_torch(cls, kw, dtype=np.float64, rtol=1e-12, atol=1e-14)


def test_lr_can_be_changed_between_steps():
    model = FakeModel(make_params(0))
    tp = [torch.tensor(v.copy(), requires_grad=True) for v in model._params.values()]
    opt, topt = Adam(model, lr=0.1), torch.optim.Adam(tp, lr=0.1)
    rng = np.random.default_rng(3)
    for step in range(6):
        opt.lr = topt.param_groups[0]["lr"] = 0.1 * 0.5 ** step
        model._grads = {k: np.asarray(rng.standard_normal(v.shape)).astype(np.float32)
                        for k, v in model._params.items()}
        for t, g in zip(tp, model._grads.values()):
            t.grad = torch.tensor(g.copy())
        opt.step()
        topt.step()
    for v, t in zip(model._params.values(), tp):
        np.testing.assert_allclose(v, t.detach().numpy(), rtol=RTOL, atol=ATOL)


def test_invalid_hyper_parameters():
    m = FakeModel(make_params(0))
    for bad, message in [
        (lambda: SGD(m, lr=-1.0), r"SGD: lr \(the learning rate\) must be >= 0, got -1.0"),
        (lambda: Adam(m, lr=float("nan")), r"Adam: lr \(the learning rate\) must be >= 0, got nan"),
        (lambda: SGD(m, lr=0.1, nesterov=True), r"SGD: Nesterov momentum needs momentum > 0 .*got momentum=0.0"),
        (lambda: SGD(m, lr=0.1, momentum=0.9, nesterov=True, dampening=0.1), r"SGD: Nesterov .*dampening=0.1"),
        (lambda: SGD(m, lr=0.1, momentum=-0.5), r"SGD: momentum must be >= 0, got -0.5"),
        (lambda: Adam(m, betas=(1.0, 0.9)), r"Adam: betas\[0\] must be in \[0, 1\), got 1.0"),
        (lambda: Adam(m, betas=(0.9, -0.1)), r"Adam: betas\[1\] must be in \[0, 1\), got -0.1"),
        (lambda: Adam(m, eps=-1.0), r"Adam: eps must be >= 0, got -1.0"),
        (lambda: RMSprop(m, weight_decay=-0.1), r"RMSprop: weight_decay must be >= 0, got -0.1"),
        (lambda: RMSprop(m, alpha=-1), r"RMSprop: alpha must be >= 0, got -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            bad()


def test_gradient_of_wrong_shape_is_rejected():
    m = FakeModel(make_params(0))
    m._grads = {"conv.b": np.zeros(5, np.float32)}
    with pytest.raises(ValueError, match="conv.b"):
        SGD(m, lr=0.1).step()


# -- state dict ---------------------------------------------------------------
OPT_CONFIGS = [
    (SGD, dict(lr=0.1)),
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (SGD, dict(lr=0.1, momentum=0.9, dampening=0.5)),
    (Adam, dict(lr=0.01, weight_decay=0.01)),
    (AdamW, dict(lr=0.01)),
    (RMSprop, dict(lr=0.01)),
    (RMSprop, dict(lr=0.01, centered=True, momentum=0.9)),
    (RMSprop, dict(lr=0.01, momentum=0.5, weight_decay=0.1)),
    (RMSprop, dict(lr=0.01, centered=True, weight_decay=0.1)),
    (AdamW, dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.9))),
]


def _grad_sequence(n: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    return [{k: np.asarray(rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(n)]


def _npz_round_trip(d: dict) -> dict:
    buf = io.BytesIO()
    np.savez(buf, **d)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("cls,kw", OPT_CONFIGS)
def test_state_dict_round_trip_resumes_exactly(cls, kw):
    grads = _grad_sequence(10)
    # uninterrupted run of 10 steps; a schedule halves lr after the 5th
    ref = FakeModel(make_params(0))
    opt = cls(ref, **kw)
    for i, g in enumerate(grads):
        if i == 5:
            opt.lr *= 0.5
        ref._grads = g
        opt.step()
    # 5 steps, checkpoint (params + optimiser, through an .npz without pickle), resume
    first = FakeModel(make_params(0))
    opt1 = cls(first, **kw)
    for g in grads[:5]:
        first._grads = g
        opt1.step()
    opt1.lr *= 0.5  # the checkpoint must carry the changed lr
    state = _npz_round_trip(opt1.state_dict())
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    resumed = FakeModel({k: v.copy() for k, v in first._params.items()})
    opt2 = cls(resumed, **kw)
    opt2.load_state_dict(state)
    assert opt2.lr == opt1.lr and opt2.steps == 5
    for g in grads[5:]:
        resumed._grads = g
        opt2.step()
    for k in SHAPES:
        np.testing.assert_array_equal(resumed._params[k], ref._params[k], err_msg=k)
    assert opt2.steps == 10


def test_state_dict_keys_and_copies():
    m = FakeModel(make_params(0))
    opt = Adam(m)
    assert sorted(opt.state_dict()) == ["lr", "step"]
    m._grads = _grad_sequence(1)[0]
    opt.step()
    d = opt.state_dict()
    assert set(d) == {"lr", "step"} | {f"{s}/{k}" for s in ("t", "m", "v") for k in SHAPES}
    assert d["m/fc.W"].shape == SHAPES["fc.W"] and d["m/fc.W"].dtype == np.float32
    assert int(d["step"]) == 1 and int(d["t/conv.W"]) == 1 and float(d["lr"]) == 1e-3
    # the returned arrays and the loaded ones are copies, not the live state
    d["m/fc.W"][...] = 123.0
    assert not np.any(opt.state["m"]["fc.W"] == 123.0)
    opt2 = Adam(m)
    opt2.load_state_dict(d)
    d["m/fc.W"][...] = -1.0
    assert np.all(opt2.state["m"]["fc.W"] == 123.0)


def _adam_state():
    m = FakeModel(make_params(0))
    opt = Adam(m)
    m._grads = _grad_sequence(1)[0]
    opt.step()
    return m, opt.state_dict()


@pytest.mark.parametrize("mutate,key", [
    (lambda d: d.pop("v/conv.W"), "v/conv.W"),
    (lambda d: d.pop("t/fc.W"), "t/fc.W"),
    (lambda d: d.pop("lr"), "lr"),
    (lambda d: d.pop("step"), "step"),
    (lambda d: d.__setitem__("m/fc.W", np.zeros((5, 6), np.float32)), "m/fc.W"),
    (lambda d: d.__setitem__("m/nope", np.zeros(3, np.float32)), "m/nope"),
    (lambda d: d.__setitem__("momentum/fc.W", np.zeros((6, 5), np.float32)), "momentum/fc.W"),
])
def test_bad_state_dict_raises_naming_the_key(mutate, key):
    m, d = _adam_state()
    mutate(d)
    opt = Adam(m)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        opt.load_state_dict(d)
    assert opt.steps == 0 and opt.state == {"m": {}, "v": {}}  # nothing was loaded


def test_state_of_another_optimizer_is_rejected():
    m, d = _adam_state()
    with pytest.raises(ValueError, match="m/conv"):
        SGD(m, lr=0.1, momentum=0.9).load_state_dict(d)


# -- gradient clipping --------------------------------------------------------
@FAST
@given(max_norm=st.sampled_from([1e-3, 0.5, 2.0, 10.0, 1e6]), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       seed=st.integers(0, 2**16))
def test_clip_grad_norm_matches_torch(max_norm, scale, seed):
    grads = {k: np.array(v * scale, dtype=np.float32) for k, v in _grad_sequence(1, seed)[0].items()}
    tensors = []
    for g in grads.values():
        t = torch.zeros(g.shape, requires_grad=True)
        t.grad = torch.tensor(g.copy())
        tensors.append(t)
    ids = {k: id(v) for k, v in grads.items()}
    norm = clip_grad_norm(grads, max_norm)
    tnorm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    assert isinstance(norm, np.ndarray) and norm.ndim == 0
    np.testing.assert_allclose(norm, tnorm.numpy(), rtol=RTOL)
    for g, t in zip(grads.values(), tensors):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=RTOL, atol=ATOL * scale)
    assert {k: id(v) for k, v in grads.items()} == ids  # scaled in place
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert total <= max_norm * (1 + 1e-5) or math.isclose(total, max_norm, rel_tol=1e-4)


def test_clip_grad_norm_edge_cases():
    assert float(clip_grad_norm({}, 1.0)) == 0.0
    g = {"a": np.array([3.0, 4.0], np.float32)}
    assert float(clip_grad_norm(g, 10.0)) == 5.0
    np.testing.assert_array_equal(g["a"], [3.0, 4.0])  # below the limit: unchanged
    assert float(clip_grad_norm(list(g.values()), 1.0)) == 5.0  # a list of arrays works too
    np.testing.assert_allclose(g["a"], [0.6, 0.8], rtol=1e-5)


# -- schedules vs torch -------------------------------------------------------
class LrHolder:
    def __init__(self, lr):
        self.lr = lr


def _torch_opt(lr):
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def _compare_schedule(ours, theirs, topt, epochs=30, metrics=None, rel=1e-12):
    lrs = []
    for e in range(epochs):
        tlr = topt.param_groups[0]["lr"]
        assert math.isclose(ours.optimizer.lr, tlr, rel_tol=rel, abs_tol=1e-15), (e, ours.optimizer.lr, tlr)
        lrs.append(ours.optimizer.lr)
        metric = None if metrics is None else metrics[e]
        topt.step()
        if metric is None:
            theirs.step()
        else:
            theirs.step(metric)
        ours.step(metric)
    return lrs


@pytest.mark.parametrize("step_size,gamma", [(1, 0.5), (3, 0.1), (7, 0.9)])
def test_step_lr_matches_torch(step_size, gamma):
    topt = _torch_opt(0.1)
    _compare_schedule(StepLR(LrHolder(0.1), step_size, gamma),
                      torch.optim.lr_scheduler.StepLR(topt, step_size, gamma), topt)


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_exponential_lr_matches_torch(gamma):
    topt = _torch_opt(0.3)
    _compare_schedule(ExponentialLR(LrHolder(0.3), gamma),
                      torch.optim.lr_scheduler.ExponentialLR(topt, gamma), topt)


@pytest.mark.parametrize("total,min_lr", [(10, 0.0), (25, 1e-3)])
def test_cosine_without_warmup_matches_torch_cosine_annealing(total, min_lr):
    topt = _torch_opt(0.1)
    _compare_schedule(CosineLR(LrHolder(0.1), total, 0, min_lr),
                      torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=total, eta_min=min_lr),
                      topt, epochs=total + 1, rel=1e-9)


def test_cosine_with_warmup_follows_the_documented_formula():
    holder = LrHolder(1.0)
    sched = CosineLR(holder, total_epochs=6, warmup_epochs=2, min_lr=0.0)
    lrs = [holder.lr]
    for _ in range(8):
        sched.step()
        lrs.append(holder.lr)
    c = math.cos
    expected = [1 / 3, 2 / 3, 1.0, (1 + c(math.pi / 4)) / 2, 0.5, (1 + c(3 * math.pi / 4)) / 2, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12, atol=1e-15)


@FAST
@given(total=st.integers(1, 40), warmup=st.integers(0, 40), base=st.floats(1e-4, 1.0),
       min_frac=st.sampled_from([0.0, 0.01, 0.5]))
def test_cosine_properties(total, warmup, base, min_frac):
    warmup = min(warmup, total)
    min_lr = base * min_frac
    holder = LrHolder(base)
    sched = CosineLR(holder, total, warmup, min_lr)
    lrs = [holder.lr]
    for _ in range(total + 3):
        sched.step()
        lrs.append(holder.lr)
    for e, lr in enumerate(lrs):
        if e < warmup:
            assert math.isclose(lr, base * (e + 1) / (warmup + 1), rel_tol=1e-12)
        else:
            s = min(1.0, (e - warmup) / max(1, total - warmup))
            assert math.isclose(lr, min_lr + (base - min_lr) * (1 + math.cos(math.pi * s)) / 2,
                                rel_tol=1e-12, abs_tol=1e-15)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # warm-up climbs to base
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then never rises
    assert lrs[warmup] == base and math.isclose(lrs[total + 1], min_lr, abs_tol=1e-15)


PLATEAU_METRICS = [5.0, 4.0, 4.0, 4.0, 4.0, 3.9999, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 2.5, 2.6, 2.7,
                   2.5, 2.5, 2.49999, 2.4, 2.4, 2.4, 2.4, 2.4, 2.4, 2.4, 2.4, 2.4, 2.4, 1.0, 1.0]


RISING_SLOWLY = [1.0, 1.02, 1.04, 1.06, 1.07, 1.08, 1.09, 1.2, 1.2, 1.21, 1.22, 1.23, 1.24, 1.3, 1.31,
                 1.32, 1.33, 1.34, 1.35, 1.36, 1.5, 1.5, 1.5, 1.5, 1.5, 1.51, 1.52, 1.53, 1.54, 1.55]


@pytest.mark.parametrize("kw,metrics", [
    (dict(mode="max", patience=2, threshold=0.05, threshold_mode="abs"), RISING_SLOWLY),
    (dict(mode="max", patience=2, threshold=0.02), RISING_SLOWLY),
    (dict(mode="max", patience=2, threshold=0.0, threshold_mode="abs"), RISING_SLOWLY),
    (dict(mode="min", patience=2, threshold=0.02), [3.0 - m for m in RISING_SLOWLY]),
    (dict(mode="min", patience=2, threshold=0.05, threshold_mode="abs"), [-m for m in RISING_SLOWLY]),
])
def test_plateau_threshold_matches_torch(kw, metrics):
    topt = _torch_opt(0.1)
    lrs = _compare_schedule(ReduceLROnPlateau(LrHolder(0.1), **kw),
                            torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kw), topt, metrics=metrics)
    if kw["threshold"] > 0:
        assert lrs[-1] < 0.1  # small improvements do not count: the threshold triggers reductions


@pytest.mark.parametrize("kw", [
    dict(),
    dict(patience=2),
    dict(patience=3),
    dict(patience=1, cooldown=2, factor=0.5),
    dict(patience=0, factor=0.5, min_lr=0.02),
    dict(patience=2, threshold=0.1, threshold_mode="abs"),
    dict(mode="max", patience=1),
    dict(mode="max", patience=1, threshold=0.05, threshold_mode="abs", cooldown=1),
])
def test_plateau_matches_torch(kw):
    topt = _torch_opt(0.1)
    lrs = _compare_schedule(ReduceLROnPlateau(LrHolder(0.1), **kw),
                            torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kw), topt,
                            metrics=PLATEAU_METRICS)
    if kw.get("patience", 10) <= 2 and kw.get("mode") != "max":
        assert lrs[-1] < 0.1  # the sequence does trigger reductions


@settings(max_examples=50, deadline=None)
@given(metrics=st.lists(st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.49999, 0.4]), min_size=30, max_size=30),
       mode=st.sampled_from(["min", "max"]), threshold_mode=st.sampled_from(["rel", "abs"]),
       threshold=st.sampled_from([0.0, 1e-4, 0.05]), patience=st.integers(0, 4),
       cooldown=st.integers(0, 3), factor=st.sampled_from([0.1, 0.5]), min_lr=st.sampled_from([0.0, 0.01]))
def test_plateau_matches_torch_hypothesis(metrics, mode, threshold_mode, threshold, patience, cooldown,
                                          factor, min_lr):
    kw = dict(mode=mode, threshold_mode=threshold_mode, threshold=threshold, patience=patience,
              cooldown=cooldown, factor=factor, min_lr=min_lr)
    topt = _torch_opt(0.1)
    ours = ReduceLROnPlateau(LrHolder(0.1), **kw)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kw)
    _compare_schedule(ours, theirs, topt, metrics=metrics, rel=0.0)
    assert (ours.best, ours.num_bad_epochs, ours.cooldown_counter) == \
        (theirs.best, theirs.num_bad_epochs, theirs.cooldown_counter)


def test_plateau_needs_a_metric_and_accepts_0d_arrays():
    sched = ReduceLROnPlateau(LrHolder(0.1), patience=0)
    with pytest.raises(ValueError, match="metric"):
        sched.step()
    sched.step(np.asarray(1.0, np.float32))
    sched.step(np.asarray(1.0, np.float32))
    assert math.isclose(sched.optimizer.lr, 0.01)


def test_constant_schedule():
    h = LrHolder(0.05)
    sched = make_schedule("none", h)
    assert isinstance(sched, ConstantLR) and isinstance(make_schedule(None, h), ConstantLR)
    for _ in range(5):
        sched.step(metric=1.0)
    assert h.lr == 0.05


SCHEDULE_CONFIGS = [
    ("none", {}),
    ("step", dict(step_size=4, gamma=0.5)),
    ("exponential", dict(gamma=0.9)),
    ("cosine", dict(total_epochs=20, warmup_epochs=3, min_lr=1e-4)),
    ("plateau", dict(patience=1, cooldown=1, factor=0.5)),
]


@pytest.mark.parametrize("name,kw", SCHEDULE_CONFIGS)
def test_schedule_state_dict_resumes_exactly(name, kw):
    metrics = PLATEAU_METRICS[:20]
    ref = LrHolder(0.1)
    sched = make_schedule(name, ref, **kw)
    expected = []
    for m in metrics:
        expected.append(ref.lr)
        sched.step(m)
    first = LrHolder(0.1)
    s1 = make_schedule(name, first, **kw)
    got = []
    for m in metrics[:10]:
        got.append(first.lr)
        s1.step(m)
    state = _npz_round_trip(s1.state_dict())  # numbers survive an .npz without pickle
    resumed = LrHolder(0.1)  # the optimiser's lr comes back from the schedule's state
    s2 = make_schedule(name, resumed, **kw)
    s2.load_state_dict(state)
    assert resumed.lr == first.lr and s2.epoch == 10
    for m in metrics[10:]:
        got.append(resumed.lr)
        s2.step(m)
    assert got == expected


def test_schedule_bad_state_dict():
    sched = StepLR(LrHolder(0.1), 2)
    with pytest.raises(ValueError, match="epoch"):
        sched.load_state_dict({"base_lr": 0.1})
    plateau = ReduceLROnPlateau(LrHolder(0.1))
    d = plateau.state_dict()
    del d["num_bad_epochs"]
    with pytest.raises(ValueError, match="num_bad_epochs"):
        plateau.load_state_dict(d)


def test_schedule_drives_an_optimizer():
    model = FakeModel(make_params(0))
    opt = SGD(model, lr=0.1, momentum=0.9)
    sched = StepLR(opt, step_size=2, gamma=0.1)
    for _ in range(4):
        sched.step()
    assert math.isclose(opt.lr, 0.001)


# -- factories ----------------------------------------------------------------
def test_make_optimizer():
    m = FakeModel(make_params(0))
    assert type(make_optimizer("SGD", m, lr=0.1, momentum=None)) is SGD
    opt = make_optimizer("adam", m, lr=0.01, weight_decay=None)
    assert type(opt) is Adam and opt.lr == 0.01 and opt.weight_decay == 0.0
    assert type(make_optimizer("adamw", m)) is AdamW and make_optimizer("adamw", m).weight_decay == 0.01
    assert make_optimizer("rmsprop", m, momentum=0.9, centered=True).centered
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs", m)
    with pytest.raises(ValueError, match="momentum"):
        make_optimizer("adam", m, momentum=0.9)
    with pytest.raises(ValueError, match="lr"):
        make_optimizer("sgd", m)  # SGD has no default learning rate


def test_make_schedule():
    h = LrHolder(0.1)
    assert type(make_schedule("step", h, step_size=3)) is StepLR
    assert type(make_schedule("exponential", h, gamma=0.9)) is ExponentialLR
    assert type(make_schedule("cosine", h, total_epochs=10, warmup_epochs=None)) is CosineLR
    assert type(make_schedule("plateau", h, mode="max")) is ReduceLROnPlateau
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("cyclic", h)
    with pytest.raises(ValueError, match="gamma"):
        make_schedule("cosine", h, total_epochs=10, gamma=0.1)
    with pytest.raises(ValueError, match=r"'step' \(StepLR\).*missing 1 required positional argument: 'step_size'"):
        make_schedule("step", h)  # step_size is required


# -- GPU ----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("cls,kw", OPT_CONFIGS)
def test_cupy_matches_numpy(cls, kw, cupy):
    """The fused CuPy update (one kernel per parameter) follows the NumPy formula step by step."""
    grads = _grad_sequence(6)
    host = FakeModel(make_params(0))
    dev = FakeModel({k: cupy.asarray(v) for k, v in make_params(0).items()})
    oh, od = cls(host, **kw), cls(dev, **kw)
    for i, g in enumerate(grads):
        host._grads = {k: v.copy() for k, v in g.items()}
        dev._grads = {k: cupy.asarray(v) for k, v in g.items()}
        norm = clip_grad_norm(dev._grads, 5.0)
        assert isinstance(norm, cupy.ndarray)
        clip_grad_norm(host._grads, 5.0)
        oh.step()
        od.step()
        if i == 2:  # checkpoint on the device, resume from host arrays
            state = od.state_dict()
            assert all(isinstance(v, np.ndarray) for v in state.values())
            od = cls(dev, **kw)
            od.load_state_dict(state)
            assert all(isinstance(a, cupy.ndarray) for slot in od.state.values() for a in slot.values())
    for k in SHAPES:
        assert isinstance(dev._params[k], cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(dev._params[k]), host._params[k], rtol=1e-5, atol=1e-6)
