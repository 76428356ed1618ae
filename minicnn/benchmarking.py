"""Shared plumbing of the benchmarks (``benchmarks/``, ``minicnn bench``): timing, the PyTorch twin of a
zoo model, and reporting. PyTorch is imported by the caller and passed in: minicnn never needs it."""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import minicnn

__all__ = ["setup", "time_call", "summarize", "environment", "torch_twin", "TorchResidualBlock", "markdown_table",
           "RESULTS_DIR", "default_json_path", "write_json", "pin_tf32", "pool_peak_bytes", "torch_peak_bytes",
           "traced_peak_bytes"]


_PRECISION: dict = {}  # what pin_tf32 last put in force; environment() reports it


def setup(backend: str, torch, heap_allocator: bool = True, tf32: bool = False, trim_threshold: int | None = None):
    """Select the minicnn backend and PyTorch's device; return (xp, device, sync_minicnn, sync_torch).

    The sync functions wait for queued GPU work, so that timings measure it
    (None on the CPU, where calls are synchronous). TensorFloat-32 is pinned
    on both sides (:func:`pin_tf32`, off unless ``tf32``), and every report's
    ``environment`` says what was in force. ``heap_allocator`` and
    ``trim_threshold``: :func:`minicnn.backend.use_heap_allocator`'s setting
    (None: never trim), or glibc's own with ``heap_allocator=False``.
    """
    xp = minicnn.set_backend(backend)
    pin_tf32(torch, tf32, backend)
    if heap_allocator:
        # process-wide: PyTorch in this process gets it too
        minicnn.backend.use_heap_allocator(trim_threshold=trim_threshold)
    minicnn.seed(0)
    device = "cuda" if backend == "cupy" else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    sync_ours = (lambda: xp.cuda.Stream.null.synchronize()) if backend == "cupy" else None
    sync_torch = torch.cuda.synchronize if device == "cuda" else None
    return xp, device, sync_ours, sync_torch


def pin_tf32(torch, enabled: bool, backend: str) -> dict:
    """Pin TensorFloat-32 for float32 matrix products and convolutions on both sides; return what is in force.

    TF32 rounds the inputs of float32 products to 10 mantissa bits on the
    tensor cores: several times faster on an H100, and less precise. PyTorch
    lets cuDNN's convolutions use it by default while CuPy's cuBLAS products
    do not, so a comparison must set both: ``enabled`` sets
    ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
    and, on the CuPy backend, cuBLAS's float32 compute type (CuPy's
    ``cupy._core.set_compute_type``: TF32, or its default, full float32).
    The returned dict is read back from the libraries, for the JSON.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    state = {"tf32": enabled,
             "torch.backends.cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
             "torch.backends.cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32)}
    if backend == "cupy":
        from cupy._core import _routines_linalg as linalg  # noqa: PLC0415  (CuPy has no public switch)

        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)
        state["cupy float32 compute type"] = linalg.compute_type_to_str(linalg.get_compute_type(np.float32))
    _PRECISION.clear()
    _PRECISION.update(state)
    return state


def pool_peak_bytes(xp, run, extra_pools=()) -> dict:
    """Device memory CuPy's pool holds after ``run()``, starting from its live arrays alone.

    CuPy's default pool keeps freed blocks for reuse, so after ``free_all_blocks()``
    and a run, ``total_bytes()`` is the memory the run needed at its peak (as
    reserved, fragmentation included): the figure to set beside PyTorch's
    ``max_memory_reserved``. ``used_bytes()`` is what live arrays still hold.
    ``extra_pools``: other pools whose memory the run holds (a CUDA graph's private
    pool, :mod:`minicnn.graphs`), added to both figures after the run.
    """
    xp.cuda.Device().synchronize()
    pool = xp.get_default_memory_pool()
    pool.free_all_blocks()
    run()
    xp.cuda.Device().synchronize()
    extra = [p for p in extra_pools if p is not None]
    return {"reserved_bytes": int(pool.total_bytes()) + sum(int(p.total_bytes()) for p in extra),
            "live_bytes_after": int(pool.used_bytes()) + sum(int(p.used_bytes()) for p in extra),
            "private_pool_bytes": sum(int(p.total_bytes()) for p in extra)}


def traced_peak_bytes(run) -> int:
    """Peak bytes NumPy allocated over ``run()``, above what was live before (NumPy reports to tracemalloc)."""
    import tracemalloc  # noqa: PLC0415

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        run()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def torch_peak_bytes(torch, run) -> dict:
    """PyTorch's peak device memory over ``run()``: reserved by its caching allocator, and allocated to tensors."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return {"reserved_bytes": int(torch.cuda.max_memory_reserved()),
            "allocated_bytes": int(torch.cuda.max_memory_allocated())}


def _gpu_driver() -> str | None:
    """The NVIDIA driver's version as nvidia-smi prints it (e.g. 580.159.04), or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def time_call(fn, repeats: int, warmup: int = 2, sync=None) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t)
    return out


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}


def environment(torch=None) -> dict:
    info = {
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "minicnn": minicnn.__version__,
        "minicnn_backend": minicnn.get_backend(),
    }
    info["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if _PRECISION:
        info["precision"] = dict(_PRECISION)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        # The vector units explain much of a CPU ratio: PyTorch's oneDNN uses AVX-512 where it exists, while
        # NumPy's OpenBLAS may keep its AVX2 kernels, so the same code has different ratios on two "2-core" VMs.
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
        info["cpu_vector_units"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    except (OSError, StopIteration):
        pass
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["torch_cuda"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()
    if minicnn.get_backend() == "cupy":
        import cupy  # noqa: PLC0415

        info["cupy"] = cupy.__version__
        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        info["cuda_driver_api"] = cupy.cuda.runtime.driverGetVersion()  # e.g. 13000 for CUDA 13.0
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["gpu_driver"] = _gpu_driver()
    return info


def _tensor(torch, a):
    return torch.from_numpy(np.ascontiguousarray(minicnn.to_host(a)))


def _copy_batchnorm(torch, m, layer):
    with torch.no_grad():
        m.weight.copy_(_tensor(torch, layer.params["gamma"]))
        m.bias.copy_(_tensor(torch, layer.params["beta"]))
        m.running_mean.copy_(_tensor(torch, layer.buffers["running_mean"]))
        m.running_var.copy_(_tensor(torch, layer.buffers["running_var"]))
    m.momentum, m.eps = layer.momentum, layer.eps
    return m


def _torch_layer(layer, torch):
    """The torch.nn module computing what minicnn ``layer`` computes, with its parameters and buffers copied."""
    nn = torch.nn
    name = type(layer).__name__
    if name == "Conv2D":
        m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                      bias="b" in layer.params)
        with torch.no_grad():
            m.weight.copy_(_tensor(torch, layer.params["W"]))
            if "b" in layer.params:
                m.bias.copy_(_tensor(torch, layer.params["b"]))
        return m
    if name == "Dense":
        m = nn.Linear(layer.in_features, layer.out_features, bias="b" in layer.params)
        with torch.no_grad():
            m.weight.copy_(_tensor(torch, layer.params["W"]).T)  # minicnn keeps W as (in, out)
            if "b" in layer.params:
                m.bias.copy_(_tensor(torch, layer.params["b"]))
        return m
    if name in ("BatchNorm2D", "BatchNorm1D"):
        return _copy_batchnorm(torch, (nn.BatchNorm2d if name == "BatchNorm2D" else nn.BatchNorm1d)(layer.num_features),
                               layer)
    if name == "ResidualBlock":
        return TorchResidualBlock(layer, torch)
    simple = {
        "LeakyReLU": lambda: nn.LeakyReLU(layer.negative_slope),
        "ReLU": nn.ReLU,
        "MaxPool2D": lambda: nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding),
        "AvgPool2D": lambda: nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding),
        "GlobalAvgPool2D": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        "Dropout": lambda: nn.Dropout(layer.p),
        "Flatten": nn.Flatten,
    }
    if name not in simple:
        raise NotImplementedError(f"no torch twin for {name}: add it to benchmarks/common.py")
    return simple[name]()


def TorchResidualBlock(block, torch):  # noqa: N802  (a class factory: torch is imported lazily)
    """torch twin of :class:`minicnn.ResidualBlock`: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""
    nn, F = torch.nn, torch.nn.functional

    class _Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = _torch_layer(block.conv1, torch), _torch_layer(block.bn1, torch)
            self.conv2, self.bn2 = _torch_layer(block.conv2, torch), _torch_layer(block.bn2, torch)
            self.proj = (nn.Sequential(_torch_layer(block.proj, torch), _torch_layer(block.proj_bn, torch))
                         if block.projection else None)

        def forward(self, x):
            h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(h + (self.proj(x) if self.proj is not None else x))

    return _Block()


def torch_twin(model, torch):
    """A torch.nn.Sequential computing the same function as a minicnn Sequential.

    Every parameter and buffer (BatchNorm's running statistics) is copied, so the two
    agree in evaluation mode (``tests/test_benchmarks.py`` checks every zoo network).
    """
    return torch.nn.Sequential(*(_torch_layer(layer, torch) for layer in model.layers))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


#: where a benchmark writes its JSON unless --json says otherwise: runs/ is ignored by git, so a run never
#: overwrites the reference figures in benchmarks/results/ (write those with --json benchmarks/results/NAME.json)
RESULTS_DIR = Path("runs") / "benchmarks"  # relative to where the benchmark runs


def default_json_path(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def write_json(path, payload) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path
