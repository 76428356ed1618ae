"""The benchmarks compute what they claim to time: PyTorch twins of the zoo networks, the Winograd and input-gradient variants."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import minicnn

torch = pytest.importorskip("torch")


def _load_bench(name):
    """benchmarks/<name>.py as a module, under a name of its own (no clash with other modules called common)."""
    spec = importlib.util.spec_from_file_location(
        f"minicnn_bench_{name}", Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torch_twin = _load_bench("common").torch_twin


@pytest.mark.parametrize("name", sorted(minicnn.MODELS))
def test_every_zoo_network_has_a_torch_twin_with_the_same_outputs(name):
    model = minicnn.build_model(name)
    rng = np.random.default_rng(0)
    for p in model.params.values():  # biases start at 0 and gammas at 1: make every copy count
        p += (0.1 * rng.standard_normal(p.shape)).astype(p.dtype)
    # Train a little so that BatchNorm's running statistics are not the defaults.
    x = rng.standard_normal((8, *model.input_shape)).astype(np.float32)
    model.forward(x, training=True)
    twin = torch_twin(model, torch).eval()
    with torch.no_grad():
        theirs = twin(torch.from_numpy(x)).numpy()
    ours = model.forward(x, training=False)
    np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-4 * float(np.abs(theirs).max()))


def test_the_distributed_benchmark_bounds_time_the_layers_they_name(monkeypatch):
    bench = _load_bench("bench_distributed")
    model = minicnn.build_model("hw3_cnn")
    x = np.random.default_rng(0).standard_normal((4, 1, 48, 48)).astype(np.float32)
    calls = []
    for layer in model.layers:
        for method in ("forward", "backward"):
            original = getattr(layer, method)
            monkeypatch.setattr(layer, method, lambda *a, _f=original, _n=type(layer).__name__, _m=method, **k:
                                (calls.append((_n, _m)), _f(*a, **k))[1])
    seconds = bench.layer_seconds(model, x, repeats=2, kinds=("Conv2D", "Dense"))
    assert seconds > 0
    backwards = [name for name, method in calls if method == "backward"]
    # one backward per Conv2D / Dense in each of the 2 warm-up and 2 timed runs: nothing else
    assert sorted(set(backwards)) == ["Conv2D", "Dense"]
    assert len(backwards) == 4 * (4 + 3)


@pytest.mark.parametrize("c, f, h, w", [(1, 2, 4, 4), (3, 5, 6, 8), (4, 3, 10, 2)])
def test_the_benchmarks_numpy_winograd_convolution_is_the_3x3_convolution(c, f, h, w):
    winograd_conv3x3 = _load_bench("bench_conv_algorithms").winograd_conv3x3
    rng = np.random.default_rng(c * 100 + h)
    x = rng.standard_normal((2, c, h, w))
    layer = minicnn.Conv2D(c, f, 3, padding=1, bias=False)
    layer.params["W"] = rng.standard_normal((f, c, 3, 3))
    np.testing.assert_allclose(winograd_conv3x3(x, layer.params["W"]), layer.forward(x), rtol=1e-10, atol=1e-10)


def test_the_convolution_benchmark_times_both_input_gradients_and_names_the_layers_choice(tmp_path):
    pytest.importorskip("threadpoolctl")
    bench = _load_bench("bench_conv_algorithms")
    out = tmp_path / "conv.json"
    assert bench.main(["--batch", "2", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["shape"] for r in rows] == ["1->32, 48x48", "32->64, 24x24", "64->128, 12x12", "128->256, 6x6", "all 4"]
    # the first layer (C_out = 32 C_in) scatters with col2im; the others (C_out = 2 C_in) convolve dout
    assert [r["dx_path"] for r in rows] == ["col2im", "convolution", "convolution", "convolution", ""]
    assert all(r["dx_col2im_ms"] > 0 and r["dx_convolution_ms"] > 0 for r in rows)
    # both algorithms timed; row shifts keep less for backward on every shape
    assert all(r["shifted_fwd_bwd_ms"] > 0 and r["shifted_kept_mb"] < r["im2col_kept_mb"] for r in rows)


def test_the_evaluation_memory_benchmark_measures_three_ways_that_compute_the_same_outputs(tmp_path):
    bench = _load_bench("bench_eval_memory")
    out = tmp_path / "memory.json"
    assert bench.main(["--models", "ece662_resnet", "--batch-size", "16", "--images", "32", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    # The same network and inputs in the three processes: the same outputs, up to float rounding.
    np.testing.assert_allclose(row["forward_only_checksum"], row["forward_checksum"], rtol=1e-6)
    np.testing.assert_allclose(row["torch_checksum"], row["forward_checksum"], rtol=1e-3)
    # 16 images: one 64 -> 64 im2col matrix is 85 MB; a forward keeping caches holds several at once.
    assert row["forward_gib"] > 2 * row["forward_only_gib"] > 0
    assert row["ratio_vs_torch"] == round(row["forward_only_gib"] / row["torch_gib"], 2)


# -- minicnn bench (benchmarks/bench_train_step.py): both sides timed, TF32 pinned, peaks of memory ----------
def test_the_train_step_benchmark_times_both_sides_pins_tf32_and_writes_json(tmp_path):
    from minicnn.cli import bench  # noqa: PLC0415

    out = tmp_path / "train_step.json"
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's own default: the benchmark must turn it off
    assert bench.main(["--models", "hw3_dnn", "--batch-sizes", "8", "--repeats", "2", "--warmup", "1", "--inference",
                       "--torch-compile", "--torch-compile-backend", "eager", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["precision"] == {"tf32": False, "torch.backends.cuda.matmul.allow_tf32": False,
                                   "torch.backends.cudnn.allow_tf32": False}
    assert not torch.backends.cudnn.allow_tf32
    modes = [r["mode"] for r in report["rows"]]
    assert modes == ["train", "inference", "train (torch.compile)", "inference (torch.compile)"]
    for r in report["rows"]:
        assert r["minicnn"]["repeats"] == 2 and r["torch"]["repeats"] == 2
        assert r["ratio"] == pytest.approx(r["torch"]["median_s"] / r["minicnn"]["median_s"], rel=1e-2, abs=1e-3)
    assert report["rows"][2]["peer"] == "torch.compile (eager)"
    assert "minicnn_peak_mib" not in report["rows"][0]  # device memory is a GPU figure
    if sys.platform.startswith("linux"):  # the CPU's page faults per step, both sides
        assert all(r["minicnn_faults_per_step"] >= 0 and r["torch_faults_per_step"] >= 0 for r in report["rows"])
    assert report["heap_allocator"] is True and report["malloc_trim_threshold"] == "never"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults with getrusage (Linux)")
def test_the_benchmark_counts_the_page_faults_of_each_call():
    import mmap  # noqa: PLC0415

    from minicnn.cli import bench  # noqa: PLC0415

    def touch_fresh_pages(pages=256):  # an anonymous mapping of its own: every page faults, whatever malloc does
        m = mmap.mmap(-1, pages * mmap.PAGESIZE)
        for i in range(0, len(m), mmap.PAGESIZE):
            m[i] = 1
        m.close()

    faulting, _ = bench.measure(touch_fresh_pages, repeats=3, warmup=2, sync=None)
    quiet, _ = bench.measure(lambda: None, repeats=3, warmup=2, sync=None)
    # 256 pages a call, over 1 warm-up and 3 timed calls (the first call is not counted): divided by 4
    assert 250 <= faulting["page_faults_per_call"] <= 275
    assert quiet["page_faults_per_call"] <= 10


def test_the_benchmark_refuses_a_trim_threshold_it_cannot_set(capsys):
    from minicnn.cli import bench  # noqa: PLC0415

    with pytest.raises(SystemExit) as exit_:
        bench.main(["--default-malloc", "--malloc-trim-threshold", "1073741824"])
    assert exit_.value.code == 2 and "--default-malloc leaves off" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--malloc-trim-threshold", "-5"])
    assert exit_.value.code == 2 and "expected bytes in [0, 2**31), got -5" in capsys.readouterr().err


def test_a_peer_that_does_not_work_is_a_row_that_says_why(tmp_path):
    from minicnn.cli import bench  # noqa: PLC0415

    out = tmp_path / "train_step.json"
    assert bench.main(["--models", "hw3_dnn", "--batch-sizes", "4", "--repeats", "1", "--warmup", "1",
                       "--torch-compile", "--torch-compile-backend", "no_such_backend", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert "error" not in rows[0] and rows[0]["ratio"] > 0
    assert "no_such_backend" in rows[1]["error"] and rows[1]["minicnn_img_s"] > 0


class _FakePool:
    """CuPy's memory pool as the peak reading sees it: blocks held, of which some are free."""

    def __init__(self):
        self.held, self.free, self.events = 100, 40, []

    def free_all_blocks(self):
        self.events.append("free_all_blocks")
        self.held -= self.free
        self.free = 0

    def total_bytes(self):
        return self.held

    def used_bytes(self):
        return self.held - self.free


def test_the_peak_of_cupys_pool_is_read_after_emptying_its_free_blocks():
    from types import SimpleNamespace  # noqa: PLC0415

    from minicnn.benchmarking import pool_peak_bytes  # noqa: PLC0415

    pool = _FakePool()
    xp = SimpleNamespace(get_default_memory_pool=lambda: pool,
                         cuda=SimpleNamespace(Device=lambda: SimpleNamespace(synchronize=lambda: None)))

    def run():  # a step that needs 500 bytes at its peak, then frees them (the pool keeps them)
        pool.events.append("run")
        pool.held += 500
        pool.free += 500

    assert pool_peak_bytes(xp, run) == {"reserved_bytes": 560, "live_bytes_after": 60, "private_pool_bytes": 0}
    assert pool.events == ["free_all_blocks", "run"]
    graph_pool = _FakePool()  # a CUDA graph's private pool: all of it counts
    assert pool_peak_bytes(xp, run, extra_pools=[graph_pool, None]) == {
        "reserved_bytes": 560 + 100, "live_bytes_after": 60 + 60, "private_pool_bytes": 100}


def test_the_graphed_benchmark_step_times_replays(fake_cupy):
    """``minicnn bench --cuda-graph``: after the warm-up that measure() gives it, every timed call is a replay."""
    from minicnn.cli import bench  # noqa: PLC0415

    minicnn.set_backend("cupy")
    model = minicnn.build_model("hw3_dnn")
    rng = np.random.default_rng(0)
    x = fake_cupy.asarray(rng.standard_normal((4, 1, 48, 48)).astype(np.float32))
    y = fake_cupy.asarray(rng.integers(0, 7, 4))
    step = bench.minicnn_step(model, x, y, graph=True)
    summary, _ = bench.measure(step, repeats=2, warmup=3, sync=None)
    g = step.graphed
    assert (g.eager_steps, g.captures, g.replays, summary["repeats"]) == (2, 1, 3, 2)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--cuda-graph"])  # NumPy: there is no graph to capture
    assert exc.value.code == 2


def test_pytorchs_peak_is_reset_before_the_run_it_measures():
    from types import SimpleNamespace  # noqa: PLC0415

    from minicnn.benchmarking import torch_peak_bytes  # noqa: PLC0415

    events = []
    cuda = SimpleNamespace(synchronize=lambda: events.append("sync"), empty_cache=lambda: events.append("empty"),
                           reset_peak_memory_stats=lambda: events.append("reset"),
                           max_memory_reserved=lambda: 2048, max_memory_allocated=lambda: 1024)
    got = torch_peak_bytes(SimpleNamespace(cuda=cuda), lambda: events.append("run"))
    assert got == {"reserved_bytes": 2048, "allocated_bytes": 1024}
    assert events.index("reset") < events.index("run") < len(events) - 1 and events[-1] == "sync"


def test_tf32_is_pinned_in_cupys_cublas_too(monkeypatch):
    """On the CuPy backend the float32 compute type of cuBLAS is set and read back (a fake CuPy module here)."""
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415

    from minicnn.benchmarking import pin_tf32  # noqa: PLC0415

    linalg = types.ModuleType("cupy._core._routines_linalg")
    linalg.COMPUTE_TYPE_DEFAULT, linalg.COMPUTE_TYPE_TF32 = 1, 7
    chosen = {}
    linalg.set_compute_type = lambda dtype, kind: chosen.update({np.dtype(dtype): kind})
    linalg.get_compute_type = lambda dtype: chosen[np.dtype(dtype)]
    linalg.compute_type_to_str = {1: "COMPUTE_TYPE_DEFAULT", 7: "COMPUTE_TYPE_TF32"}.get
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    cupy = types.ModuleType("cupy")
    cupy._core = core
    for name, module in (("cupy", cupy), ("cupy._core", core), ("cupy._core._routines_linalg", linalg)):
        monkeypatch.setitem(sys.modules, name, module)
    try:
        on = pin_tf32(torch, True, "cupy")
        assert on["cupy float32 compute type"] == "COMPUTE_TYPE_TF32" and torch.backends.cudnn.allow_tf32
        off = pin_tf32(torch, False, "cupy")
        assert off["cupy float32 compute type"] == "COMPUTE_TYPE_DEFAULT" and not torch.backends.cuda.matmul.allow_tf32
    finally:
        pin_tf32(torch, False, "numpy")


def test_the_gpu_summary_explains_its_usage_instead_of_a_traceback(tmp_path, capsys):
    summary = _load_bench("gpu_summary")
    assert summary.main(["--help"]) == 0 and "usage: python benchmarks/gpu_summary.py STAGES_TSV" in capsys.readouterr().out
    for argv, message in [([], "expected STAGES_TSV OUT_DIR [TEST_METRICS_JSON], got []"),
                          (["--merge", "out.json"], "--merge needs OUT_JSON and at least one TRAIN_STEP_JSON"),
                          ([str(tmp_path / "stages.tsv"), str(tmp_path)], "stages.tsv: no such file")]:
        assert summary.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and ("usage:" in err or "no such file" in err)


def test_the_gpu_summary_merges_the_train_step_reports_and_shows_failed_peers(tmp_path):
    summary = _load_bench("gpu_summary")
    env = {"gpu": "NVIDIA H100", "cupy": "14.2.0"}
    eager = {"benchmark": "train_step", "environment": env, "precision": {"tf32": False}, "repeats": 20,
             "rows": [{"model": "hw3_cnn", "mode": "train", "batch": 128, "minicnn_img_s": 9000.0,
                       "torch_img_s": 12000.0, "ratio": 0.75, "minicnn_peak_mib": 900.0, "torch_peak_mib": 600.0,
                       "memory_ratio": 1.5}]}
    compiled = {"benchmark": "train_step", "environment": env, "precision": {"tf32": False}, "repeats": 20,
                "rows": [{"model": "hw3_cnn", "mode": "train (torch.compile)", "batch": 128, "minicnn_img_s": 9100.0,
                          "error": "BackendCompilerFailed: no triton"}]}
    (tmp_path / "a.json").write_text(json.dumps(eager))
    (tmp_path / "b.json").write_text(json.dumps(compiled))
    out = tmp_path / "out"
    out.mkdir()
    assert summary.main(["--merge", str(out / "train_step_cupy.json"), str(tmp_path / "a.json"),
                         str(tmp_path / "b.json"), str(tmp_path / "missing.json")]) == 0
    merged = json.loads((out / "train_step_cupy.json").read_text())
    assert [r["mode"] for r in merged["rows"]] == ["train", "train (torch.compile)"]
    assert merged["runs"][1] == {"file": "b.json", "precision": {"tf32": False}, "repeats": 20}
    (tmp_path / "stages.tsv").write_text("train_step\t0\t41\ntrain_step_compile\t0\t63\n")
    assert summary.main([str(tmp_path / "stages.tsv"), str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "| hw3_cnn | train | 128 | 9000.0 | 12000.0 | 0.75 | 900.0 | 600.0 |" in text
    assert "failed: BackendCompilerFailed: no triton" in text
    assert summary.main(["--merge", str(out / "x.json"), str(tmp_path / "missing.json")]) == 1


def test_the_sass_count_compiles_each_index_path_alone():
    """benchmarks/sass_count.py (needs nvcc, so not run here) replaces each gather kernel's dispatch by one call."""
    from minicnn import kernels  # noqa: PLC0415

    sass_count = _load_bench("sass_count")
    narrow = {k.name: k for k in kernels.KERNELS.values() if isinstance(k, kernels.Raw) and "{INDEX_WIDTH}" in k.source}
    assert len(narrow) == 4
    for k in narrow.values():
        code = k.code("float")
        for path, other in (("int", "long long"), ("long long", "int")):
            alone = sass_count.one_path(code, path)
            assert f"_body<{path}>(" in alone.split("__global__")[1] and f"_body<{other}>(" not in alone.split(
                "__global__")[1] and "if (fits_int" not in alone
    with pytest.raises(ValueError, match="dispatch"):
        sass_count.one_path(kernels.KERNELS["minicnn_bn_stats_float"].code("float"), "int")


def test_the_gpu_suites_stage_limits_fit_one_device_call():
    """gpu_suite.sh promises to end within 10 minutes, the most one device call may run: its stages' limits say so."""
    script = (Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.sh").read_text()
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*stage (\w+) (\d+) ", script, flags=re.MULTILINE)}
    assert set(limits) == {"environment", "gpu_tests", "train_step", "train_step_deep", "train_step_compile", "layers",
                           "epoch", "cli_fer", "fer_train"}
    total = sum(limits.values())
    kill_after = int(re.search(r"timeout --kill-after=(\d+) ", script).group(1))
    # each stage may outlive its limit by kill_after; the merge and summary steps take a few seconds
    assert total + kill_after * len(limits) <= 590, (limits, kill_after)
    assert f"the stages' own time limits add up to {total} s" in script
