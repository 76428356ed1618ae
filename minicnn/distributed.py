"""Synchronous data-parallel training over MPI (``mpi4py``): several processes, one model.

Launch the same script on P processes ("ranks"), e.g. ``mpirun -n 2 python train.py``.
Every rank holds a full copy of the model and of the training set; per step:

1. all ranks visit the training set in the same order (the shuffle is seeded by
   ``(seed, epoch)`` only), and each takes its own contiguous *shard* of the
   global batch of B images: rank r gets images ``[r B / P, (r + 1) B / P)``;
2. each rank runs forward and backward on its shard, with its own random
   streams for dropout and augmentation, seeded by ``(seed, epoch, rank)``;
3. one allreduce over a flat buffer holding every gradient averages the
   gradients (ChainerMN's recipe: one large message instead of one per
   parameter), so every rank applies the same update and the copies of the
   model stay identical without ever being sent again.

Why the average is the gradient of the global batch: the loss on rank r is the
mean over its n_r images, L_r = (1 / n_r) sum_{i in r} l_i, while the
single-process loss is L = (1 / B) sum_i l_i. Scaling each rank's loss
gradient by n_r P / B (1 when the shards are equal) and averaging over ranks,

    (1 / P) sum_r (n_r P / B) dL_r/dw = (1 / B) sum_r sum_{i in r} dl_i/dw = dL/dw,

gives exactly the single-process gradient, up to the order of the float sums.
So P ranks with global batch B train like one process with batch B, and the
learning rate that suits batch B suits them (keep B fixed and the learning
rate stays; grow B with P and the learning rate is usually scaled with B).

BatchNorm: by default each rank normalises with the statistics of its own shard
(B / P images: a smaller, noisier batch than B), and the running statistics are
averaged over the ranks at the end of every epoch, so the saved model holds one
set. ``sync_batchnorm=True`` turns every BatchNorm into :class:`SyncBatchNorm1D` /
:class:`SyncBatchNorm2D`, which reduce their sums over all ranks: the batch
statistics, and so the training, are then those of the whole global batch.

Only rank 0 writes checkpoints and history (atomically, as always); every rank
reads the same ``last.npz`` on ``--resume``, which must use the same number of
ranks, and then continues bit-identically to an uninterrupted run.

GPUs: the collectives take NumPy or CuPy buffers. On CuPy, ``transport="nccl"``
uses NCCL (``cupy.cuda.nccl``), ``"mpi"`` hands device buffers to a CUDA-aware
MPI, and ``"host"`` copies through the host (always works, slowest); ``"auto"``
picks NCCL when CuPy has it, else the host. The GPU transports have not yet
run on a GPU (see README).
"""
from __future__ import annotations

import os

import numpy as np

from . import backend
from .backend import get_array_module, to_host
from .checkpoint import CheckpointError
from .layers.normalization import BatchNorm1D, BatchNorm2D, _BatchNorm, _per_feature, batchnorm_layers
from .optim import clip_grad_norm
from .training import Trainer

__all__ = [
    "Communicator",
    "world",
    "launched_by_mpi",
    "find_mpiexec",
    "launcher_free_environment",
    "DistributedTrainer",
    "SyncBatchNorm1D",
    "SyncBatchNorm2D",
    "convert_sync_batchnorm",
    "broadcast_model",
    "GradientAllreduce",
]

#: environment variables that MPI launchers (MPICH/Hydra, Open MPI, Intel MPI, Slurm's PMI) set in every rank
_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "PMI_RANK")


def launched_by_mpi() -> bool:
    """True when this process was started by ``mpirun`` / ``mpiexec`` / ``srun`` (read from the environment)."""
    return any(v in os.environ for v in _LAUNCHER_VARIABLES)


def launcher_free_environment(**extra) -> dict:
    """This process's environment without the MPI launcher's variables (plus ``extra``): for child
    processes that start their own MPI job, or must run as a single process."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env.update(extra)
    return env


def find_mpiexec():
    """The ``mpiexec`` (or ``mpirun``) to launch ranks with: on PATH, else beside this Python (where the
    MPICH wheel installs it); None when there is none."""
    import shutil  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if found is None and (Path(sys.executable).parent / "mpiexec").exists():
        found = str(Path(sys.executable).parent / "mpiexec")
    return found


def _import_mpi():
    try:
        from mpi4py import MPI  # noqa: PLC0415  (optional dependency, imported when asked for)
    except ImportError as exc:
        raise ImportError(
            "data-parallel training needs mpi4py and an MPI library: pip install -e '.[mpi]' from the minicnn "
            "checkout (mpi4py and the MPICH wheel), or mpi4py built against your cluster's MPI"
        ) from exc
    return MPI


class Communicator:
    """The processes of one training job and the collectives data parallelism needs.

    Parameters
    ----------
    mpi_comm: an ``mpi4py`` communicator, or None for a single process (no MPI needed).
    transport: how device (CuPy) buffers travel: ``"auto"``, ``"nccl"``, ``"mpi"`` (CUDA-aware MPI)
        or ``"host"`` (see the module docstring). Host (NumPy) buffers always go through MPI.

    Attributes: ``rank`` (0 .. size - 1), ``size`` (number of processes), ``local_rank`` and
    ``local_size`` (this process's index among, and the number of, the processes on this machine).
    """

    def __init__(self, mpi_comm=None, transport: str = "auto"):
        if transport not in ("auto", "nccl", "mpi", "host"):
            raise ValueError(f"Communicator: transport must be 'auto', 'nccl', 'mpi' or 'host', got {transport!r}")
        self.mpi = mpi_comm
        self.transport = transport
        self._nccl = None
        if mpi_comm is None:
            self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
        else:
            MPI = _import_mpi()
            self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
            local = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
            self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
            local.Free()

    def __repr__(self):
        return f"Communicator(rank={self.rank}, size={self.size}, transport={self.transport!r})"

    # -- collectives -------------------------------------------------------------------
    def allreduce_sum_(self, buf):
        """Replace ``buf`` (a contiguous NumPy or CuPy array) by its sum over all ranks, in place."""
        if self.size == 1:
            return buf
        xp = get_array_module(buf)
        if xp is np:
            self.mpi.Allreduce(_mpi_in_place(), buf)
            return buf
        mode = self._device_transport()
        if mode == "nccl":
            self._nccl_allreduce(buf)
        elif mode == "mpi":
            xp.cuda.get_current_stream().synchronize()  # MPI reads the buffer outside CuPy's stream
            self.mpi.Allreduce(_mpi_in_place(), buf)
        else:  # through the host
            host = to_host(buf)
            self.mpi.Allreduce(_mpi_in_place(), host)
            buf[...] = xp.asarray(host)
        return buf

    def broadcast_(self, buf, root: int = 0):
        """Overwrite ``buf`` on every rank with rank ``root``'s values, in place."""
        if self.size == 1:
            return buf
        xp = get_array_module(buf)
        if xp is np:
            self.mpi.Bcast(buf, root=root)
        else:  # rare (once per run): through the host whatever the transport
            host = to_host(buf)
            self.mpi.Bcast(host, root=root)
            buf[...] = xp.asarray(host)
        return buf

    def sum_scalars(self, values) -> np.ndarray:
        """Sum a few host numbers over all ranks (float64); every rank gets the totals."""
        host = np.array([float(v) for v in values], dtype=np.float64)
        return self.allreduce_sum_(host)

    def barrier(self):
        if self.size > 1:
            self.mpi.Barrier()

    def limit_blas_threads(self):
        """Give each rank on this machine an equal share of its cores for BLAS (needs threadpoolctl).

        P ranks each running the default number of BLAS threads (one per core)
        oversubscribe the cores; returns the number of threads per rank, or None
        where threadpoolctl is missing (then set OMP_NUM_THREADS yourself).
        """
        threads = max(1, (os.cpu_count() or 1) // self.local_size)
        try:
            from threadpoolctl import threadpool_limits  # noqa: PLC0415
        except ImportError:
            return None
        threadpool_limits(threads)
        return threads

    def use_local_gpu(self):
        """Make GPU ``local_rank % count`` CuPy's current device (one rank per GPU); returns its index."""
        import cupy  # noqa: PLC0415

        index = self.local_rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(index).use()
        return index

    # -- device transports ---------------------------------------------------------------
    def _device_transport(self):
        if self.transport != "auto":
            return self.transport
        try:
            from cupy.cuda import nccl  # noqa: F401, PLC0415
        except ImportError:
            return "host"
        return "nccl" if getattr(nccl, "available", True) else "host"

    def _nccl_allreduce(self, buf):
        import cupy  # noqa: PLC0415
        from cupy.cuda import nccl  # noqa: PLC0415

        if self._nccl is None:  # one NCCL communicator per job, its id sent over MPI
            uid = nccl.get_unique_id() if self.rank == 0 else None
            uid = self.mpi.bcast(uid, root=0)
            self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
        if buf.dtype not in dtypes:
            raise TypeError(f"Communicator: NCCL allreduce takes float32 or float64 buffers, got {buf.dtype}")
        stream = cupy.cuda.get_current_stream()
        self._nccl.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtypes[buf.dtype], nccl.NCCL_SUM, stream.ptr)


def _mpi_in_place():
    return _import_mpi().IN_PLACE


def world(transport: str = "auto") -> Communicator:
    """All processes of this job: MPI's COMM_WORLD when launched by an MPI launcher, else one process."""
    if not launched_by_mpi():
        return Communicator(None, transport)
    return Communicator(_import_mpi().COMM_WORLD, transport)


# -- the model's arrays across ranks --------------------------------------------------------
def broadcast_model(model, comm: Communicator, root: int = 0):
    """Give every rank rank ``root``'s parameters and buffers (BatchNorm statistics)."""
    for arrays in (model.params, model.buffers):
        for a in arrays.values():
            comm.broadcast_(a, root)


def average_buffers(model, comm: Communicator):
    """Replace every buffer (BatchNorm's running statistics) by its mean over the ranks."""
    if comm.size == 1:
        return
    for b in model.buffers.values():
        comm.allreduce_sum_(b)
        b /= comm.size


class GradientAllreduce:
    """Averages ``model.grads`` over the ranks with one allreduce over one flat buffer.

    Packing every gradient into one buffer costs a copy in and out (a few MB for
    the zoo's networks) but sends one large message per step instead of one per
    parameter, which is what keeps the collective's latency out of the step.
    The buffer is kept between steps.
    """

    def __init__(self):
        self._flat = None
        self._layout = None

    def __call__(self, model, comm: Communicator):
        if comm.size == 1:
            return
        grads = [(name, g) for name, g in model.grads.items() if g is not None]
        layout = tuple((name, g.shape, g.dtype) for name, g in grads)
        if layout != self._layout:
            xp = get_array_module(*(g for _, g in grads))
            self._flat = xp.empty(sum(int(g.size) for _, g in grads), dtype=grads[0][1].dtype)
            self._layout = layout
        flat, offset = self._flat, 0
        for _, g in grads:
            flat[offset : offset + g.size] = g.reshape(-1)
            offset += g.size
        comm.allreduce_sum_(flat)
        flat *= 1.0 / comm.size
        offset = 0
        for _, g in grads:
            g[...] = flat[offset : offset + g.size].reshape(g.shape)  # in place: layers keep their dicts
            offset += g.size


# -- synchronised BatchNorm --------------------------------------------------------------------
class _SyncBatchNorm(_BatchNorm):
    """BatchNorm whose batch statistics are those of the global batch, summed over all ranks.

    Shapes and parameters as :class:`~minicnn.BatchNorm1D` / :class:`~minicnn.BatchNorm2D`; ``comm``
    is the :class:`Communicator`. With M = the number of values per feature over all ranks
    (M = sum_r m_r) and sums over all ranks and the reduced axes (two allreduces of C numbers):

        mu = sum x / M,   var = sum (x - mu)^2 / M,   xhat = (x - mu) / sqrt(var + eps),   y = gamma xhat + beta

    Backward (one allreduce of 2C numbers: dbeta_all = sum dy and dgamma_all = sum dy xhat over all ranks):

        dx     = gamma / sqrt(var + eps) * (dy - dbeta_all / M - xhat * dgamma_all / M)
        dgamma = sum dy * xhat,  dbeta = sum dy      (this rank's part: averaged later with every gradient)

    Each rank's dy carries its loss scale (see :mod:`minicnn.distributed`), the
    same on every rank, so the global sums are consistent; with one rank this is
    exactly BatchNorm. Evaluation mode uses the running statistics, as BatchNorm does.
    """

    comm: Communicator = None

    def forward(self, x, training=True):
        """Training: normalise with the global batch's statistics (see the class docstring); evaluation: BatchNorm."""
        if not training or self.comm is None or self.comm.size == 1:
            return super().forward(x, training)
        self._check(x)
        xp = get_array_module(x)
        c = self.num_features
        m = int(self.comm.sum_scalars([x.size // c])[0])  # a host number: no device sync
        if m < 2:
            raise ValueError(f"{self!r}: training needs more than one value per feature over all ranks, got {m}")
        sums = self.comm.allreduce_sum_(x.sum(axis=self.axes).astype(np.float64))
        mu = _per_feature((sums / m).astype(x.dtype), x)
        xhat = x - mu
        sq = self.comm.allreduce_sum_((xhat * xhat).sum(axis=self.axes).astype(np.float64))
        var = _per_feature((sq / m).astype(x.dtype), x)
        inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(x.dtype, copy=False)
        xhat *= inv_std
        mom = self.momentum
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= 1 - mom
        rm += mom * mu.reshape(-1)
        rv *= 1 - mom
        rv += (mom * m / (m - 1)) * var.reshape(-1)
        self.cache = (True, xhat, inv_std)
        self._global_count = m
        out = xhat * _per_feature(self.params["gamma"], x)
        out += _per_feature(self.params["beta"], x)
        return out

    def backward(self, dout):
        """dx from the global sums of dy and dy * xhat; this rank's dgamma and dbeta (see the class docstring)."""
        batch_stats = self._saved()[0]
        if not batch_stats or self.comm is None or self.comm.size == 1:
            return super().backward(dout)
        self._check_dout(dout, self.cache[1].shape)
        xp = get_array_module(dout)
        _, xhat, inv_std = self.cache
        c = self.num_features
        dbeta = dout.sum(axis=self.axes)
        dgamma = (dout * xhat).sum(axis=self.axes)
        self.grads["gamma"], self.grads["beta"] = dgamma, dbeta
        both = self.comm.allreduce_sum_(xp.concatenate([dbeta, dgamma]).astype(np.float64))
        m = self._global_count
        dbeta_all = _per_feature((both[:c] / m).astype(dout.dtype), dout)
        dgamma_all = _per_feature((both[c:] / m).astype(dout.dtype), dout)
        dx = dout - dbeta_all
        dx -= xhat * dgamma_all
        dx *= _per_feature(self.params["gamma"], dout) * inv_std
        self.cache = None
        return dx


class SyncBatchNorm1D(_SyncBatchNorm, BatchNorm1D):
    """:class:`~minicnn.BatchNorm1D` with statistics over the global batch: x (N, D) -> y (N, D).

    See :class:`_SyncBatchNorm` for the formulas; built by :func:`convert_sync_batchnorm`.
    """


class SyncBatchNorm2D(_SyncBatchNorm, BatchNorm2D):
    """:class:`~minicnn.BatchNorm2D` with statistics over the global batch: x (N, C, H, W) -> same.

    See :class:`_SyncBatchNorm` for the formulas; built by :func:`convert_sync_batchnorm`.
    """


def _walk(layer):
    yield layer
    for _, child in layer.children():
        yield from _walk(child)


def convert_sync_batchnorm(model, comm: Communicator) -> int:
    """Make every BatchNorm1D/2D of ``model`` synchronise its statistics over ``comm``; returns how many.

    The layers change class in place (BatchNorm2D -> SyncBatchNorm2D): their
    parameter and buffer arrays, names and places in every container stay the
    same, so optimisers, checkpoints and summaries see the same model.
    """
    count = 0
    for layer in _walk(model):
        if isinstance(layer, _SyncBatchNorm):
            layer.comm = comm
            count += 1
        elif type(layer) in (BatchNorm1D, BatchNorm2D):
            layer.__class__ = SyncBatchNorm1D if type(layer) is BatchNorm1D else SyncBatchNorm2D
            layer.comm = comm
            count += 1
    return count


# -- the trainer ------------------------------------------------------------------------------
class DistributedTrainer(Trainer):
    """:class:`~minicnn.training.Trainer` on several MPI ranks (synchronous data parallelism).

    Parameters: those of :class:`~minicnn.training.Trainer` (``batch_size`` is the *global*
    batch, split over the ranks), plus ``comm`` (default :func:`world`) and ``sync_batchnorm``.
    Run the same code on every rank; only rank 0 logs, shows progress and writes files.
    With one rank it is exactly :class:`~minicnn.training.Trainer` (same streams, same weights).
    """

    def __init__(self, *args, comm: Communicator | None = None, sync_batchnorm: bool = False, **kwargs):
        if kwargs.get("cuda_graph"):
            raise ValueError("DistributedTrainer: cuda_graph is not supported: the gradient allreduce of each step "
                             "is an MPI call from the host, which a CUDA graph cannot replay")
        super().__init__(*args, **kwargs)
        self.comm = comm if comm is not None else world()
        if self.batch_size < self.comm.size:
            raise ValueError(f"DistributedTrainer: the global batch size ({self.batch_size}) must be at least "
                             f"the number of ranks ({self.comm.size}), so that every rank gets an image")
        self.sync_batchnorm = bool(sync_batchnorm)
        if self.sync_batchnorm:
            convert_sync_batchnorm(self.model, self.comm)
        self._allreduce_gradients = GradientAllreduce()
        if self.comm.rank != 0:
            self.progress = False

    # -- random streams: one global order, per-rank dropout and augmentation -----------------
    def _rank_seed(self, epoch):
        """The seed of rank r's streams in epoch e, derived from (seed, epoch, rank); rank 0 keeps Trainer's."""
        epoch_seed = self._epoch_seed(epoch)
        if self.comm.rank == 0:
            return epoch_seed
        return int(np.random.SeedSequence([epoch_seed, self.comm.rank]).generate_state(1)[0]) % (2**32 - 1)

    def _shuffle(self, xp, n, epoch):
        order = super()._shuffle(xp, n, epoch)  # seeded by (seed, epoch): the same on every rank
        if self.comm.rank:
            seed = self._rank_seed(epoch)
            backend.seed(seed)
            if self.augmenter is not None and hasattr(self.augmenter, "reseed"):
                self.augmenter.reseed(seed + 1)
        return order

    def _shard(self, n):
        """[lo, hi) of this rank's contiguous share of n items (sizes differ by at most one)."""
        r, p = self.comm.rank, self.comm.size
        return (n * r) // p, (n * (r + 1)) // p

    def _local_part(self, idx):
        lo, hi = self._shard(len(idx))
        return idx[lo:hi]

    # -- the step: scaled loss gradient, averaged gradients ---------------------------------
    def _train_step(self, xb, yb, global_batch):
        logits = self.model.forward(xb, training=True)
        loss = self.loss_fn.forward(logits, yb)
        dout = self.loss_fn.backward()
        scale = len(yb) * self.comm.size / global_batch  # 1 when the shards are equal (module docstring)
        if scale != 1.0:
            dout = dout * scale
        self.model.backward(dout)
        self._allreduce_gradients(self.model, self.comm)
        if self.clip_norm:
            clip_grad_norm(self.model.grads, self.clip_norm)  # the same averaged gradients on every rank
        self.optimizer.step()
        return loss, logits

    def _sum_across_processes(self, *values):
        return tuple(self.comm.sum_scalars(values))

    def _epoch(self, x, y, epoch, epochs):
        result = super()._epoch(x, y, epoch, epochs)
        if not self.sync_batchnorm:
            average_buffers(self.model, self.comm)  # one set of running statistics to evaluate and save
        return result

    def _recalibrate_batchnorm(self, x, epoch):
        """Precise BN (``precise_bn``): every rank recalibrates on the same images, alone.

        The statistics are then a single process's on every rank, with no collective to wait on; a
        synchronised BatchNorm would count each image once per rank (its unbiased variance would take
        M = ranks * m values), so it computes them as a plain BatchNorm for the time being.
        """
        synced = [layer for layer in batchnorm_layers(self.model) if getattr(layer, "comm", None) is not None]
        saved = [layer.comm for layer in synced]
        try:
            for layer in synced:
                layer.comm = None  # _SyncBatchNorm.forward is BatchNorm's without a communicator
            return super()._recalibrate_batchnorm(x, epoch)
        finally:
            for layer, comm in zip(synced, saved):
                layer.comm = comm

    def evaluate(self, x, y, batch_size=256):
        """(mean loss, accuracy) over all of x, y, each rank evaluating its shard."""
        n = len(y)
        lo, hi = self._shard(n)
        loss, acc = super().evaluate(x[lo:hi], y[lo:hi], batch_size) if hi > lo else (0.0, 0.0)
        total_loss, total_correct = self.comm.sum_scalars([loss * (hi - lo), round(acc * (hi - lo))])
        return float(total_loss) / max(n, 1), float(total_correct) / max(n, 1)

    # -- files: rank 0 writes, every rank reads ------------------------------------------------
    def _clean_orphaned_files(self, log):
        # Rank 0 alone: another rank cleaning up could remove rank 0's temporary file mid-write (it did,
        # under load: FileNotFoundError in rank 0's first save, the other ranks waiting forever in an allreduce).
        if self.comm.rank == 0:
            super()._clean_orphaned_files(log)

    def _save(self, name):
        if self.comm.rank != 0:
            return None
        self.extra_meta["distributed"] = {"ranks": self.comm.size, "sync_batchnorm": self.sync_batchnorm}
        return super()._save(name)

    def _write_history(self):
        if self.comm.rank == 0:
            super()._write_history()

    def resume(self, path=None):
        meta = super().resume(path)
        saved = (meta.get("distributed") or {}).get("ranks", 1)
        if saved != self.comm.size:
            raise CheckpointError(f"{path or self.out_dir / 'last.npz'}: was trained on {saved} rank(s), this run "
                                  f"has {self.comm.size}: resume with mpirun -n {saved} (the shards and random "
                                  "streams of each rank depend on the number of ranks)")
        return meta

    def fit(self, x_train, y_train, x_val=None, y_val=None, epochs=10, resume=False, log=print):
        broadcast_model(self.model, self.comm)  # identical copies from the start (resume reads one file)
        return super().fit(x_train, y_train, x_val, y_val, epochs=epochs, resume=resume,
                           log=log if self.comm.rank == 0 else (lambda *a, **k: None))
