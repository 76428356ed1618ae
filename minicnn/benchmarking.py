"""Shared plumbing of the benchmarks (``benchmarks/``, ``minicnn bench``): timing, the PyTorch twin of a
zoo model, and reporting. PyTorch is imported by the caller and passed in: minicnn never needs it."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import minicnn

__all__ = ["setup", "time_call", "summarize", "environment", "torch_twin", "TorchResidualBlock", "markdown_table",
           "RESULTS_DIR", "default_json_path", "write_json"]


def setup(backend: str, torch, heap_allocator: bool = True):
    """Select the minicnn backend and PyTorch's device; return (xp, device, sync_minicnn, sync_torch).

    The sync functions wait for queued GPU work, so that timings measure it
    (None on the CPU, where calls are synchronous).
    """
    xp = minicnn.set_backend(backend)
    if heap_allocator:
        minicnn.backend.use_heap_allocator()  # process-wide: PyTorch in this process gets it too
    minicnn.seed(0)
    device = "cuda" if backend == "cupy" else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    sync_ours = (lambda: xp.cuda.Stream.null.synchronize()) if backend == "cupy" else None
    sync_torch = torch.cuda.synchronize if device == "cuda" else None
    return xp, device, sync_ours, sync_torch


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
    if minicnn.get_backend() == "cupy":
        import cupy  # noqa: PLC0415

        info["cupy"] = cupy.__version__
        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
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
