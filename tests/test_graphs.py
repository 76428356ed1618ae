"""CUDA graphs (minicnn.graphs): a captured step replayed gives what the eager step gives.

The tests take the ``cupy`` fixture: on a GPU (benchmarks/gpu_suite.sh) they capture real
CUDA graphs; in CI they run on the stand-in (tests/fakecupy.py), which imitates stream
capture strictly: nothing runs during a capture, memory allocated during it holds garbage
afterwards, a replay reuses the captured memory and the captured scalar arguments, and host
syncs, host-device copies and allocations from the default pool are refused while capturing.
"""
import numpy as np
import pytest

import minicnn
from minicnn import kernels
from minicnn.graphs import GraphedStep, RecordedDraws
from minicnn.optim import SGD, Adam, AdamW, RMSprop, clip_grad_norm
from minicnn.training import Trainer

pytestmark = pytest.mark.gpu


def _small_net():
    """Conv, BatchNorm, LeakyReLU, pooling, dropout, dense: every kind of state a step touches."""
    return minicnn.Sequential([
        minicnn.Conv2D(1, 4, 3, padding=1), minicnn.BatchNorm2D(4), minicnn.LeakyReLU(), minicnn.MaxPool2D(2),
        minicnn.Flatten(), minicnn.Dropout(0.5), minicnn.Dense(4 * 4 * 4, 16), minicnn.BatchNorm1D(16),
        minicnn.ReLU(), minicnn.Dropout(0.3), minicnn.Dense(16, 5),
    ], input_shape=(1, 8, 8))


def _twins(cupy, seed=0):
    minicnn.set_backend("cupy")
    minicnn.seed(seed)
    a = _small_net()
    minicnn.seed(seed)
    b = _small_net()
    return a, b


def _step_fn(model, optimizer, loss_fn, clip=None):
    def step(x, y):
        logits = model.forward(x, training=True)
        loss = loss_fn.forward(logits, y)
        model.backward(loss_fn.backward())
        if clip:
            clip_grad_norm(model.grads, clip)
        optimizer.step()
        return loss, logits
    return step


def _same(cupy, got, want, what):
    """Bit for bit on the stand-in; on a GPU within float32 rounding (cuBLAS may pick another algorithm on the
    capture stream than on the default one)."""
    got, want = cupy.asnumpy(got), cupy.asnumpy(want)
    if hasattr(cupy, "ledger"):
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=what)


def _batches(cupy, n, batch=6, seed=3):
    rng = np.random.default_rng(seed)
    return [(cupy.asarray(rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)),
             cupy.asarray(rng.integers(0, 5, batch))) for _ in range(n)]


OPTIMIZERS = {
    "adam": lambda m: Adam(m, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda m: AdamW(m, lr=1e-2, weight_decay=0.1),
    "sgd": lambda m: SGD(m, lr=0.05),
    "sgd_nesterov": lambda m: SGD(m, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "rmsprop": lambda m: RMSprop(m, lr=1e-3, momentum=0.5, centered=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_graphed_step_trains_exactly_like_the_eager_one(cupy, name):
    """Same draws, same numbers: weights, running statistics, optimiser state and losses agree after every
    step, while the learning rate changes (as a schedule changes it) and Adam's bias corrections change."""
    eager_model, graph_model = _twins(cupy)
    loss_e = minicnn.SoftmaxCrossEntropy(class_weights=np.linspace(0.5, 1.5, 5), label_smoothing=0.1)
    loss_g = minicnn.SoftmaxCrossEntropy(class_weights=np.linspace(0.5, 1.5, 5), label_smoothing=0.1)
    opt_e, opt_g = OPTIMIZERS[name](eager_model), OPTIMIZERS[name](graph_model)
    eager = _step_fn(eager_model, opt_e, loss_e, clip=1.0)
    graphed = GraphedStep(_step_fn(graph_model, opt_g, loss_g, clip=1.0), graph_model, opt_g)
    minicnn.seed(11)
    draws_e = []
    for i, (x, y) in enumerate(_batches(cupy, 7)):
        if i == 4:
            opt_e.lr = opt_g.lr = opt_e.lr / 3  # a schedule's change between steps
        minicnn.seed(100 + i)
        le, _ = eager(x, y)
        minicnn.seed(100 + i)
        lg, logits_g = graphed(x, y)
        _same(cupy, lg, le, f"loss of step {i}")
        draws_e.append(cupy.asnumpy(eager_model.layers[5].mask))
        for k, v in eager_model.state_arrays().items():
            _same(cupy, graph_model.state_arrays()[k], v, f"{k} after step {i}")
    assert (graphed.eager_steps, graphed.captures, graphed.replays) == (2, 1, 5)
    assert opt_g.steps == opt_e.steps == 7 and opt_g.param_steps == opt_e.param_steps
    for slot, arrays in opt_e.state.items():
        for k, v in arrays.items():
            _same(cupy, opt_g.state[slot][k], v, f"{slot}/{k}")
    assert not np.array_equal(draws_e[-1], draws_e[-2])  # the masks were new at every step


@pytest.mark.parametrize("build", [
    lambda m: SGD(m, lr=0.1), lambda m: SGD(m, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=1e-3),
    lambda m: SGD(m, lr=0.1, momentum=0.9, nesterov=True), lambda m: Adam(m, lr=1e-2, weight_decay=1e-2),
    lambda m: AdamW(m, lr=1e-2), lambda m: RMSprop(m, lr=1e-2),
    lambda m: RMSprop(m, lr=1e-2, momentum=0.9, weight_decay=1e-3), lambda m: RMSprop(m, lr=1e-2, centered=True),
    lambda m: RMSprop(m, lr=1e-2, momentum=0.5, centered=True),
])
def test_step_values_read_from_the_device_give_the_same_update(cupy, build):
    """Each fused update kernel and its device-scalar twin (minicnn.kernels.Elementwise.with_device_scalars)
    compute the same numbers: the same body, the same double values."""
    minicnn.set_backend("cupy")
    rng = np.random.default_rng(2)
    models = [minicnn.Dense(6, 4) for _ in range(2)]
    start = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in models[0].params.items()}
    for m in models:
        for k, v in m.params.items():
            v[...] = cupy.asarray(start[k])
    opts = [build(m) for m in models]
    for step in range(3):
        grads = {k: cupy.asarray(rng.standard_normal(v.shape).astype(np.float32)) for k, v in models[0].params.items()}
        for m in models:
            m.grads.update({k: g.copy() for k, g in grads.items()})
        opts[0].step()
        t = opts[1].param_steps.get("W", 0) + 1
        opts[1].device_scalars = cupy.asarray(np.asarray(opts[1].step_scalars(t), dtype=np.float64))
        opts[1].step()
        for k in models[0].params:
            np.testing.assert_array_equal(cupy.asnumpy(models[1].params[k]), cupy.asnumpy(models[0].params[k]),
                                          err_msg=f"{k} after step {step}")


def test_the_warm_up_steps_compile_the_kernels_the_graph_will_replay(fake_cupy):
    """The optimiser's device-scalar kernels run first in the warm-up, not inside the capture."""
    minicnn.set_backend("cupy")
    model = _small_net()
    opt = Adam(model, lr=1e-3)
    graphed = GraphedStep(_step_fn(model, opt, minicnn.SoftmaxCrossEntropy()), model, opt, warmup_steps=1)
    x, y = _batches(fake_cupy, 1)[0]
    with fake_cupy.counting() as ledger:
        graphed(x, y)
    ops = ledger.by_operation()
    assert ops["ElementwiseKernel minicnn_adam_device_scalars"] == len(model.params)
    assert ops["ElementwiseKernel minicnn_adam"] == 0 and opt.device_scalars is None


def test_the_graph_is_captured_once_and_recaptured_when_its_arrays_are_replaced(cupy):
    minicnn.set_backend("cupy")
    model = _small_net()
    opt = Adam(model, lr=1e-3)
    graphed = GraphedStep(_step_fn(model, opt, minicnn.SoftmaxCrossEntropy()), model, opt, warmup_steps=1)
    batches = _batches(cupy, 4)
    for x, y in batches[:3]:
        graphed(x, y)
    assert (graphed.eager_steps, graphed.captures, graphed.replays) == (1, 1, 2)
    opt.load_state_dict(opt.state_dict())  # new arrays for the optimiser's state: the graph's are stale
    graphed(*batches[3])
    assert (graphed.captures, graphed.replays) == (2, 3)
    x, y = batches[0]
    graphed(x[:4], y[:4])  # another shape: another capture
    assert graphed.captures == 3


@pytest.mark.parametrize("precise_bn", [0, 24], ids=["moving-average-bn", "precise-bn"])
def test_graphed_training_in_the_trainer_matches_eager_training(cupy, tmp_path, precise_bn):
    """Two epochs with a cosine schedule (the rate changes between epochs), augmentation, dropout, a last
    smaller batch (eager) and checkpoints: the same history and the same weights as without graphs; with precise
    BN too (recalibrated in place between epochs, outside the graph, which is still captured once)."""
    from minicnn.data import Augmenter
    from minicnn.optim import CosineLR

    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((44, 1, 8, 8)).astype(np.float32), rng.integers(0, 5, 44)  # 5 batches of 8, then 4
    results = []
    for graph in (False, True):
        minicnn.set_backend("cupy")
        minicnn.seed(0)
        model = _small_net()
        opt = SGD(model, lr=0.05, momentum=0.9, nesterov=True)
        trainer = Trainer(model, opt, schedule=CosineLR(opt, 2), augmenter=Augmenter(True, 10, crop_padding=1, seed=0),
                          batch_size=8, out_dir=tmp_path / str(graph), progress=False, cuda_graph=graph,
                          precise_bn=precise_bn)
        history = trainer.fit(x, y, x[:16], y[:16], epochs=2, log=lambda *_: None)
        results.append((history, {k: cupy.asnumpy(v) for k, v in model.state_arrays().items()}, trainer))
    (h_e, w_e, _), (h_g, w_g, trainer) = results
    assert [h["lr"] for h in h_g] == [h["lr"] for h in h_e]
    keys = ("train_loss", "val_loss", "val_acc") + (("val_loss_without_precise_bn",) if precise_bn else ())
    for key in keys:
        _same(cupy, np.array([h[key] for h in h_g]), np.array([h[key] for h in h_e]), key)
    for k, v in w_e.items():
        _same(cupy, w_g[k], v, k)
    assert trainer.graphed_step.captures == 1 and trainer.graphed_step.replays == 2 * 5 - 2


def test_graphs_need_the_cupy_backend_and_the_fused_kernels(cupy):
    minicnn.set_backend("numpy")
    model = _small_net()
    opt = SGD(model, lr=0.1)
    with pytest.raises(ValueError, match="CuPy backend"):
        Trainer(model, opt, cuda_graph=True).fit(np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, int), epochs=1,
                                                  log=lambda *_: None)
    minicnn.set_backend("cupy")
    model = _small_net()
    opt = SGD(model, lr=0.1)
    graphed = GraphedStep(_step_fn(model, opt, minicnn.SoftmaxCrossEntropy()), model, opt)
    x, y = _batches(cupy, 1)[0]
    with pytest.raises(ValueError, match="NumPy inputs"):
        graphed(cupy.asnumpy(x), cupy.asnumpy(y))
    with kernels.use_fused(False), pytest.raises(ValueError, match="fused kernels"):
        graphed(x, y)
    with pytest.raises(ValueError, match="at least 1"):
        GraphedStep(lambda x, y: None, model, opt, warmup_steps=0)
    opt.device_scalars = cupy.zeros(1)
    with kernels.use_fused(False), pytest.raises(ValueError, match="fused kernels"):
        _step_fn(model, opt, minicnn.SoftmaxCrossEntropy())(x, y)  # the generic rules refuse device step values


def test_a_capture_that_fails_leaves_training_eager_and_unharmed(cupy):
    """A step the capture refuses (here: it draws with permutation(), which a graph would freeze) warns once,
    then runs eagerly: the same weights as an eager run, the optimiser's counters right."""
    eager_model, graph_model = _twins(cupy)
    opt_e, opt_g = Adam(eager_model, lr=1e-2), Adam(graph_model, lr=1e-2)

    def with_a_shuffle(model, opt):
        inner = _step_fn(model, opt, minicnn.SoftmaxCrossEntropy())

        def step(x, y):
            order = minicnn.backend.random_state(cupy).permutation(len(y))
            return inner(x[order], y[order])
        return step

    eager = with_a_shuffle(eager_model, opt_e)
    graphed = GraphedStep(with_a_shuffle(graph_model, opt_g), graph_model, opt_g)
    for i, (x, y) in enumerate(_batches(cupy, 5)):
        minicnn.seed(i)
        eager(x, y)
        minicnn.seed(i)
        if i == 2:
            with pytest.warns(RuntimeWarning, match="permutation"):
                graphed(x, y)
        else:
            graphed(x, y)
    assert (graphed.eager_steps, graphed.captures, graphed.replays) == (5, 0, 0)
    assert "permutation" in graphed.capture_error and opt_g.param_steps == opt_e.param_steps
    for k, v in eager_model.state_arrays().items():
        _same(cupy, graph_model.state_arrays()[k], v, k)
    strict = GraphedStep(with_a_shuffle(graph_model, opt_g), graph_model, opt_g, warmup_steps=1, fallback=False)
    strict(x, y)
    with pytest.raises(AttributeError, match="permutation"):
        strict(x, y)


def test_a_step_that_draws_what_cannot_be_redrawn_is_refused(cupy):
    draws = RecordedDraws(cupy)
    with pytest.raises(AttributeError, match="permutation"):
        draws.permutation(5)


# -- what only the stand-in can show: a wrong graph is caught --------------------------------
def test_frozen_step_values_would_be_caught(fake_cupy):
    """Without device_scalars the learning rate is baked into the graph at capture: the stand-in replays
    the stale rate, and the weights part from the eager run's as soon as the rate changes."""
    minicnn.set_backend("cupy")
    eager_model, graph_model = _twins(fake_cupy)
    opt_e, opt_g = SGD(eager_model, lr=0.1), SGD(graph_model, lr=0.1)
    graphed = GraphedStep(_step_fn(graph_model, opt_g, minicnn.SoftmaxCrossEntropy()), graph_model, opt_g,
                          warmup_steps=1)
    eager = _step_fn(eager_model, opt_e, minicnn.SoftmaxCrossEntropy())
    original = type(opt_g)._device_kw
    type(opt_g)._device_kw = lambda self: {}  # the mutation: pass the rate by value
    try:
        for i, (x, y) in enumerate(_batches(fake_cupy, 4)):
            if i == 2:
                opt_e.lr = opt_g.lr = 0.01
            minicnn.seed(i)
            eager(x, y)
            minicnn.seed(i)
            graphed(x, y)
    finally:
        type(opt_g)._device_kw = original
    w = "6.W"
    assert not np.array_equal(fake_cupy.asnumpy(graph_model.params[w]), fake_cupy.asnumpy(eager_model.params[w]))


def test_the_stand_in_captures_as_cuda_does(fake_cupy):
    cp = fake_cupy
    w = cp.asarray(np.ones(3, np.float32))
    pool, stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
    lr = 0.5
    with cp.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        assert stream.is_capturing()
        tmp = w * lr  # recorded with lr = 0.5
        w -= tmp
        noise = cp.random.RandomState(0).random_sample(3)
        graph = stream.end_capture()
    np.testing.assert_array_equal(cp.asnumpy(w), 1.0)  # nothing ran during the capture
    assert np.isnan(cp.asnumpy(tmp)).all() and np.isnan(cp.asnumpy(noise)).all()  # new memory: garbage
    assert pool.used_bytes() > 0
    lr = 0.25  # too late: the graph has 0.5
    graph.launch()
    np.testing.assert_array_equal(cp.asnumpy(w), 0.5)
    first = cp.asnumpy(noise)
    graph.launch()
    np.testing.assert_array_equal(cp.asnumpy(w), 0.25)
    np.testing.assert_array_equal(cp.asnumpy(noise), first)  # the same "random" numbers at every replay
    assert lr == 0.25


@pytest.mark.parametrize("what", ["sync", "copy", "default_pool", "other_stream", "legacy"])
def test_the_stand_in_refuses_what_a_capture_cannot_hold(fake_cupy, what):
    cp = fake_cupy
    a = cp.asarray(np.ones(3, np.float32))
    pool, stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
    if what == "legacy":
        with pytest.raises(RuntimeError, match="legacy"):
            cp.cuda.Stream.null.begin_capture()
        return
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(cp.StreamCaptureError):
                if what == "sync":
                    with cp.cuda.using_allocator(pool.malloc):
                        a.sum().item()
                elif what == "copy":
                    with cp.cuda.using_allocator(pool.malloc):
                        cp.asarray(np.zeros(2))
                elif what == "default_pool":
                    a + 1.0
                else:
                    with cp.cuda.using_allocator(pool.malloc), cp.cuda.Stream.null:
                        a + 1.0
        finally:
            stream.end_capture()
