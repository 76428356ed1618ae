"""Shared plumbing of the benchmarks: timing, the PyTorch twin of a zoo model, and reporting."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import minicnn


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
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
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


def torch_twin(model, torch):
    """A torch.nn.Sequential computing the same function as a minicnn Sequential (weights copied)."""
    nn = torch.nn
    layers = []
    for layer in model.layers:
        name = type(layer).__name__
        if name == "Conv2D":
            m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          bias="b" in layer.params)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(minicnn.to_host(layer.params["W"])))
        elif name == "Dense":
            m = nn.Linear(layer.in_features, layer.out_features)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(minicnn.to_host(layer.params["W"]).T.copy()))
        elif name == "BatchNorm2D":
            m = nn.BatchNorm2d(layer.num_features)
        elif name == "BatchNorm1D":
            m = nn.BatchNorm1d(layer.num_features)
        elif name == "LeakyReLU":
            m = nn.LeakyReLU(layer.negative_slope)
        elif name == "ReLU":
            m = nn.ReLU()
        elif name == "MaxPool2D":
            m = nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
        elif name == "AvgPool2D":
            m = nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding)
        elif name == "Dropout":
            m = nn.Dropout(layer.p)
        elif name == "Flatten":
            m = nn.Flatten()
        else:
            raise NotImplementedError(f"no torch twin for {name}")
        layers.append(m)
    return nn.Sequential(*layers)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_json(path, payload) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path
