"""Data-parallel training (minicnn.distributed): the shards, the streams, and real 2-rank MPI runs.

The MPI tests start tests/mpi_worker.py under ``mpiexec`` (from the MPICH wheel that the ``dev``
extra installs, or the system's) and compare what rank 0 wrote with a single-process run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minicnn
from minicnn.data import Augmenter
from minicnn.distributed import (
    Communicator,
    DistributedTrainer,
    GradientAllreduce,
    SyncBatchNorm2D,
    convert_sync_batchnorm,
    find_mpiexec,
    launched_by_mpi,
    launcher_free_environment,
)
from minicnn.optim import SGD
from minicnn.training import Trainer

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "mpi_worker.py"
sys.path.insert(0, str(WORKER.parent))
from mpi_worker import build, data  # noqa: E402


class FakeRanks(Communicator):
    """A stand-in of rank ``rank`` of ``size`` for the shard and seed arithmetic (no collectives)."""

    def __init__(self, rank, size):
        super().__init__(None)
        self.rank, self.size = rank, size


# -- in one process ----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), size=st.integers(1, 8))
def test_the_shards_of_a_batch_cover_it_exactly_once_in_order(n, size):
    model = build(False, 0.0)
    parts = []
    for rank in range(size):
        trainer = DistributedTrainer(model, SGD(model, lr=0.1), batch_size=max(size, 1), comm=FakeRanks(rank, size))
        parts.append(trainer._local_part(np.arange(n)))
    assert np.array_equal(np.concatenate(parts), np.arange(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_rank_streams_derive_from_seed_epoch_and_rank_and_rank_0_keeps_the_single_process_ones():
    model = build(False, 0.0)
    seeds = {}
    for rank in range(4):
        t = DistributedTrainer(model, SGD(model, lr=0.1), batch_size=8, seed=5, comm=FakeRanks(rank, 4))
        seeds[rank] = [t._rank_seed(e) for e in range(50)]
        again = DistributedTrainer(model, SGD(model, lr=0.1), batch_size=8, seed=5, comm=FakeRanks(rank, 4))
        assert seeds[rank] == [again._rank_seed(e) for e in range(50)]  # a pure function: resumable
    plain = Trainer(model, SGD(model, lr=0.1), batch_size=8, seed=5)
    assert seeds[0] == [plain._epoch_seed(e) for e in range(50)]
    every = [s for rank in seeds for s in seeds[rank]]
    assert len(set(every)) == len(every)  # no two (epoch, rank) pairs share a stream


def test_one_rank_is_exactly_the_plain_trainer(tmp_path):
    """Dropout, augmentation and BatchNorm included: DistributedTrainer on one process changes nothing."""
    x, y = data()
    weights = []
    for cls in (Trainer, DistributedTrainer):
        minicnn.seed(0)
        model = build(True, 0.3)
        trainer = cls(model, SGD(model, lr=0.05, momentum=0.9), augmenter=Augmenter(flip=True, shift=0.1, seed=0),
                      batch_size=16, seed=3, progress=False, log_every=2)
        trainer.fit(x[:72], y[:72], x[72:], y[72:], epochs=2, log=lambda *a: None)
        weights.append({k: v.copy() for k, v in model.state_arrays().items()})
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert np.array_equal(weights[0][k], weights[1][k]), k


def test_sync_batchnorm_on_one_rank_is_batchnorm_and_keeps_the_arrays():
    rng = np.random.default_rng(0)
    model = minicnn.Sequential([minicnn.Conv2D(2, 3, 3), minicnn.BatchNorm2D(3), minicnn.ReLU()])
    before = dict(model.params)
    x = rng.normal(size=(4, 2, 6, 6)).astype(np.float32)
    dout = rng.normal(size=(4, 3, 4, 4)).astype(np.float32)
    ref_out = model.forward(x, training=True)
    ref_dx = model.backward(dout)
    assert convert_sync_batchnorm(model, Communicator(None)) == 1
    assert isinstance(model[1], SyncBatchNorm2D)
    assert all(model.params[k] is before[k] for k in before)  # same arrays: optimisers and files see no change
    assert np.allclose(model.forward(x, training=True), ref_out)
    assert np.allclose(model.backward(dout), ref_dx)


def test_gradient_allreduce_is_a_no_op_on_one_process():
    model = build(False, 0.0)
    x, y = data(8)
    loss = minicnn.SoftmaxCrossEntropy()
    loss.forward(model.forward(x.astype(np.float32)), y)
    model.backward(loss.backward())
    before = {k: g.copy() for k, g in model.grads.items()}
    GradientAllreduce()(model, Communicator(None))
    assert all(np.array_equal(before[k], g) for k, g in model.grads.items())


def test_a_batch_smaller_than_the_number_of_ranks_is_refused():
    model = build(False, 0.0)
    with pytest.raises(ValueError, match="global batch size .2. must be at least the number of ranks .4."):
        DistributedTrainer(model, SGD(model, lr=0.1), batch_size=2, comm=FakeRanks(0, 4))


@pytest.mark.parametrize("variable", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"])
def test_an_mpi_launch_is_recognised_from_the_environment_and_hidden_from_children(monkeypatch, variable):
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_mpi()
    monkeypatch.setenv(variable, "2")
    assert launched_by_mpi()
    child = launcher_free_environment(OMP_NUM_THREADS="1")
    assert variable not in child and child["OMP_NUM_THREADS"] == "1"


# -- real MPI ranks -----------------------------------------------------------------------------
def _mpiexec():
    try:
        import mpi4py  # noqa: F401, PLC0415
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install -e '.[mpi]')")
    found = find_mpiexec()
    if found is None:
        pytest.skip("no mpiexec on PATH (pip install mpich, or a system MPI)")
    return found


def _env():
    return launcher_free_environment(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                                     OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def run_worker(tmp_path, name, ranks, *flags, check=True):
    out = tmp_path / f"{name}.npz"
    cmd = [sys.executable, str(WORKER), "--out", str(out), *flags]
    if ranks > 1:
        cmd = [_mpiexec(), "-n", str(ranks), *cmd]
    else:
        _mpiexec()  # the comparisons need the multi-rank side too
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return dict(np.load(out)), json.loads(out.with_suffix(".json").read_text())
    return proc


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("flags", [(), ("--batchnorm", "--sync-bn"), ("--batchnorm", "--sync-bn", "--precise-bn", "40")],
                         ids=["no-batchnorm", "sync-batchnorm", "sync-batchnorm-precise-bn"])
def test_two_ranks_train_like_one_process_on_the_same_global_batch(tmp_path, flags):
    """Global batch 15 over 2 ranks: shards of 7 and 8, so the loss scaling is exercised too."""
    one, h1 = run_worker(tmp_path, "one", 1, "--batch-size", "15", *flags)
    two, h2 = run_worker(tmp_path, "two", 2, "--batch-size", "15", *flags)
    assert h2["ranks"] == 2
    assert max_difference(one, two) < 1e-10  # float64: only the order of the sums differs
    for a, b in zip(h1["history"], h2["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_acc"] == b["val_acc"]
        assert a.get("val_acc_without_precise_bn") == b.get("val_acc_without_precise_bn")


def test_per_rank_batchnorm_differs_from_the_global_batch(tmp_path):
    """Without --sync-bn each rank normalises with its own shard's statistics: a different training."""
    one, _ = run_worker(tmp_path, "one", 1, "--batchnorm")
    two, _ = run_worker(tmp_path, "two", 2, "--batchnorm")
    assert max_difference(one, two) > 1e-3


def test_an_interrupted_two_rank_run_resumes_bit_identically(tmp_path):
    flags = ("--batchnorm", "--dropout", "0.3", "--augment", "--epochs", "3")
    full, _ = run_worker(tmp_path, "full", 2, *flags, "--run-dir", str(tmp_path / "a"))
    run_worker(tmp_path, "part", 2, *flags, "--run-dir", str(tmp_path / "b"), "--stop-after", "1")
    resumed, hist = run_worker(tmp_path, "resumed", 2, *flags, "--run-dir", str(tmp_path / "b"), "--resume")
    assert [h["epoch"] for h in hist["history"]] == [1, 2, 3]
    for k in full:
        assert np.array_equal(full[k], resumed[k]), k


def test_resume_with_another_number_of_ranks_is_refused(tmp_path):
    run_worker(tmp_path, "part", 2, "--run-dir", str(tmp_path / "b"), "--stop-after", "1", "--epochs", "2")
    proc = run_worker(tmp_path, "again", 3, "--run-dir", str(tmp_path / "b"), "--resume", check=False)
    assert proc.returncode != 0
    assert "was trained on 2 rank(s), this run has 3: resume with mpirun -n 2" in proc.stderr


@pytest.mark.slow
def test_train_py_under_mpiexec_on_real_fer2013(fer2013_path, tmp_path):
    mpiexec = _mpiexec()
    out = tmp_path / "run"
    cmd = [mpiexec, "-n", "2", sys.executable, str(ROOT / "examples/fer2013/train.py"), "--data", fer2013_path,
           "--limit", "256", "--epochs", "1", "--batch-size", "64", "--out", str(out), "--no-progress", "--sync-bn"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "data-parallel on 2 MPI ranks, global batch 64" in proc.stdout
    assert proc.stdout.count("epoch 1/1") == 1  # rank 0 alone speaks
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["num_examples"] == 3589
    meta = minicnn.checkpoint.load_npz(out / "last.npz")[1]
    assert meta["distributed"] == {"ranks": 2, "sync_batchnorm": True}


# -- the device path, on the strict CuPy stand-in ----------------------------------------------------
class LoopbackMPI:
    """MPI for ``size`` ranks that all hold the same values: an allreduce sum multiplies by size."""

    def __init__(self, size):
        self.size = size

    def Allreduce(self, in_place, buf):  # noqa: N802  (mpi4py's names)
        buf *= self.size

    def Bcast(self, buf, root=0):  # noqa: N802
        pass

    def Barrier(self):  # noqa: N802
        pass


def loopback(size, transport="host"):
    pytest.importorskip("mpi4py")
    comm = Communicator(None, transport)
    comm.mpi, comm.size = LoopbackMPI(size), size
    return comm


def test_device_buffers_go_through_the_host_once_per_allreduce(fake_cupy):
    comm = loopback(2)
    buf = fake_cupy.asarray(np.arange(6.0, dtype=np.float32))
    with fake_cupy.counting() as ledger:
        comm.allreduce_sum_(buf)
    np.testing.assert_array_equal(fake_cupy.asnumpy(buf), 2 * np.arange(6.0))
    assert [c[0] for c in ledger.copies] == ["D2H", "H2D"], ledger.copies


def _device_epoch_copies(fake_cupy, n, sync_bn):
    minicnn.set_backend("cupy")
    minicnn.seed(0)
    model = build(True, 0.2)
    x, y = data(n)
    x, y = fake_cupy.asarray(x.astype(np.float32)), fake_cupy.asarray(y)
    trainer = DistributedTrainer(model, SGD(model, lr=0.05), batch_size=16, progress=False, log_every=1000,
                                 comm=loopback(2), sync_batchnorm=sync_bn)
    with fake_cupy.counting() as ledger:
        trainer.fit(x, y, epochs=1, log=lambda *a: None)
    grad_bytes = sum(int(p.size) * 4 for p in model.params.values())
    return ledger, grad_bytes


@pytest.mark.parametrize("sync_bn", [False, True], ids=["per-rank-bn", "sync-bn"])
def test_data_parallel_training_on_the_device_copies_one_gradient_buffer_per_step(fake_cupy, sync_bn):
    """On CuPy with the host transport: no implicit conversion anywhere (the stand-in would raise), and
    per step exactly the flat gradient buffer's round trip, plus with synchronised BatchNorm its small
    sums (2 BatchNorms x 2 forward allreduces + 1 backward, each D2H + H2D). 4 more steps cost:"""
    short, grad_bytes = _device_epoch_copies(fake_cupy, 64, sync_bn)
    long, _ = _device_epoch_copies(fake_cupy, 128, sync_bn)
    flat = lambda ledger: [c for c in ledger.copies if c[1] == grad_bytes]  # noqa: E731
    assert len(flat(long)) - len(flat(short)) == 2 * 4, long.summary()
    others = (len(long.copies) - len(flat(long))) - (len(short.copies) - len(flat(short)))
    assert others == (2 * 3 * 2 * 4 if sync_bn else 0), long.summary()
    assert len(long.syncs) - len(short.syncs) == (2 * 4 + others) // 2  # each device-to-host copy is a sync


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_removes_temporary_files_from_the_run_folder(tmp_path, rank):
    """Rank 0 writes the run's files through temporary ones; another rank cleaning up 'orphans' at its
    start removed rank 0's first checkpoint mid-write under load (rank 0 failed, rank 1 hung)."""
    comm = loopback(2)
    comm.rank = rank
    orphan = tmp_path / ".last.npz.abcd1234.tmp"
    orphan.write_bytes(b"a write in progress, or one a kill -9 interrupted")
    minicnn.set_default_dtype("float64")
    minicnn.seed(0)
    model = build(False, 0.0)
    x, y = data(32)
    trainer = DistributedTrainer(model, SGD(model, lr=0.05), batch_size=16, progress=False, log_every=1000,
                                 comm=comm, out_dir=tmp_path)
    seen = []
    trainer._save = lambda name: seen.append((name, orphan.exists()))  # the moment rank 0 would write
    trainer.fit(x, y, epochs=1, log=lambda *a: None)
    assert seen[0] == ("last.npz", rank != 0)  # rank 0 cleaned before writing; rank 1 left it alone
    assert orphan.exists() == (rank != 0)
