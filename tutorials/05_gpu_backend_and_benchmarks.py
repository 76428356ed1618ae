# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. One code path for CPU and GPU, and how minicnn measures its speed
#
# minicnn's layers never ask "am I on the GPU?". Each one asks its input which array module it
# belongs to, `xp = minicnn.get_array_module(x)`, and calls `xp.zeros`, `xp.maximum`, `@`...
# NumPy and CuPy share that interface, so the same `forward`/`backward` runs on either device
# (Chainer's "xp idiom"). This tutorial
#
# * shows the idiom and the device moves (`to_device`, `to_host`);
# * runs one layer on both backends and compares (when CuPy and a GPU are present; on a machine
#   without them everything below runs on NumPy and says so);
# * times a training step on the active backend;
# * runs the layer benchmark (`benchmarks/bench_layers.py`) that compares minicnn with PyTorch
#   in the same process, and reads its JSON.
#
# Choose the backend with the environment variable `MINICNN_TUTORIAL_BACKEND` (`numpy` or
# `cupy`; default: `cupy` when it is usable). On a GPU machine install CuPy with
# `pip install -e '.[gpu]'` (CUDA 12) from the checkout.

# %%
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import minicnn

QUICK = os.environ.get("MINICNN_TUTORIAL_QUICK") == "1"  # CI: tiny batches, few repeats
OUT = Path(os.environ.get("MINICNN_TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(parents=True, exist_ok=True)
GPU = minicnn.backend.cupy_available()
BACKEND = os.environ.get("MINICNN_TUTORIAL_BACKEND", "cupy" if GPU else "numpy")
xp = minicnn.set_backend(BACKEND)
print(f"CuPy with a GPU available: {GPU}; active backend: {minicnn.get_backend()} ({xp.__name__})")

# %% [markdown]
# ## The xp idiom
#
# `get_array_module` looks at the arrays it is given (never importing CuPy for NumPy arrays);
# `to_device` copies to the active backend, `to_host` back to NumPy. Parameters are created on
# the active backend, so `set_backend` comes before building a model.

# %%
host = np.arange(6, dtype=np.float32).reshape(2, 3)
device = minicnn.to_device(host)
print("host:", type(host).__module__, "| device:", type(device).__module__,
      "| get_array_module(device):", minicnn.get_array_module(device).__name__)
assert np.array_equal(minicnn.to_host(device), host)


def relu_forward(x):
    """Backend-generic code: the module comes from the data, not from a global switch."""
    xp = minicnn.get_array_module(x)
    return xp.maximum(x, 0)


print(relu_forward(device - 2))

# %% [markdown]
# ## The same layer on both backends
#
# A convolution built on NumPy, copied to the GPU with `layer.to(cupy)`, gives the same output
# and gradients up to float32 rounding (the GPU sums in a different order). `tests/test_gpu_parity.py`
# checks every layer this way on a GPU machine.

# %%
minicnn.set_backend("numpy")
minicnn.seed(0)
conv = minicnn.Conv2D(3, 8, 3, padding=1)
x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
dout = np.random.default_rng(1).standard_normal((4, 8, 16, 16)).astype(np.float32)
out_cpu, dx_cpu = conv.forward(x), None
dx_cpu = conv.backward(dout)
if GPU:
    import cupy  # noqa: PLC0415

    conv.to(cupy)
    out_gpu = conv.forward(cupy.asarray(x))
    dx_gpu = conv.backward(cupy.asarray(dout))
    print("max |CPU - GPU| output:", float(np.abs(minicnn.to_host(out_gpu) - out_cpu).max()),
          "dx:", float(np.abs(minicnn.to_host(dx_gpu) - dx_cpu).max()))
    assert np.allclose(minicnn.to_host(out_gpu), out_cpu, rtol=1e-4, atol=1e-4)
else:
    print("no GPU here: the comparison runs on a machine with CuPy (python -m pytest tests/test_gpu_parity.py)")
minicnn.set_backend(BACKEND)

# %% [markdown]
# ## A training step on the active backend
#
# On the GPU, calls return before the work is done (kernels are queued), so a timing must wait
# for the device: `cupy.cuda.Stream.null.synchronize()`. minicnn's training loop avoids waiting
# otherwise: the loss stays a 0-d device array and is read back only every few steps.

# %%
minicnn.seed(0)
model = minicnn.build_model("hw3_cnn")
from minicnn.optim import Adam  # noqa: E402

optimizer, loss_fn = Adam(model, lr=1e-3), minicnn.SoftmaxCrossEntropy()
batch = 8 if QUICK else 64
xb = minicnn.to_device(np.random.default_rng(0).standard_normal((batch, 1, 48, 48)).astype(np.float32))
yb = minicnn.to_device(np.random.default_rng(1).integers(0, 7, batch))
sync = (lambda: xp.cuda.Stream.null.synchronize()) if BACKEND == "cupy" else (lambda: None)


def train_step():
    loss = loss_fn.forward(model.forward(xb, training=True), yb)
    model.backward(loss_fn.backward())
    optimizer.step()
    return loss


train_step()  # warm-up: allocations, and CuPy compiles its kernels on first use
sync()
repeats = 2 if QUICK else 5
start = time.perf_counter()
for _ in range(repeats):
    train_step()
sync()
seconds = (time.perf_counter() - start) / repeats
print(f"hw3_cnn training step on {BACKEND}, batch {batch}: {1e3 * seconds:.0f} ms, {batch / seconds:.0f} images/s")

# %% [markdown]
# ## The benchmarks
#
# A timing means little alone: the machine, the library versions and the load all move it.
# minicnn's benchmarks therefore time minicnn **and PyTorch in the same process**, on the same
# inputs, and report the ratio; they print a markdown table and write JSON with the hardware and
# versions (`benchmarks/results/`).
#
# ```bash
# python benchmarks/bench_train_step.py                  # hw3_cnn training step, NumPy vs PyTorch CPU
# python benchmarks/bench_layers.py                      # forward + backward of every hw3_cnn layer
# python benchmarks/bench_epoch.py --data $FER2013_DATA  # one FER-2013 epoch, augmentation included
# python benchmarks/bench_train_step.py --backend cupy   # CuPy vs PyTorch CUDA, on a GPU
# python examples/fer2013/train.py --backend cupy        # the real training job on the GPU
# ```
#
# Here the layer benchmark runs with a small batch (its JSON goes to `tutorial_output/`, not to
# the committed `benchmarks/results/`). It needs PyTorch (`pip install -e '.[dev]'`).

# %%
def repository_root() -> Path:
    here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "benchmarks" / "bench_layers.py").exists():
            return folder
    raise SystemExit("cannot find benchmarks/bench_layers.py above " + str(here))


try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False
    print("PyTorch is not installed: pip install -e '.[dev]' to run the benchmark")

if HAVE_TORCH:
    result_file = OUT / f"layers_{BACKEND}.json"
    cmd = [sys.executable, str(repository_root() / "benchmarks" / "bench_layers.py"), "--backend", BACKEND,
           "--batch-size", "8" if QUICK else "64", "--repeats", "2" if QUICK else "5", "--warmup", "1",
           "--json", str(result_file)]
    print("$", " ".join(cmd[1:]))
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    print(run.stdout[-2500:])
    rows = [r for r in json.loads(result_file.read_text())["rows"] if r["index"] != ""]

# %% [markdown]
# The ratio column is PyTorch's time divided by minicnn's: above 1, minicnn is faster. On a CPU
# the convolutions (one big GEMM each) come close to PyTorch; the element-wise layers pay for
# NumPy's one pass over memory per operation, which fused kernels avoid.

# %%
if HAVE_TORCH:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = [f"{r['index']} {r['layer'].split('(')[0]}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(names[::-1], [r["ratio"] for r in rows][::-1])
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("PyTorch time / minicnn time (> 1: minicnn faster)")
    ax.set_title(f"hw3_cnn layers, {BACKEND}, batch {'8' if QUICK else '64'}")
    fig.tight_layout()
    fig.savefig(OUT / "05_layer_ratios.png", dpi=80)
    plt.show()
    assert len(rows) == len(model.layers) and all(r["minicnn_ms"] >= 0 and r["torch_ms"] >= 0 for r in rows)
