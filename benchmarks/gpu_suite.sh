#!/usr/bin/env bash
# One command for a CUDA machine: the GPU tests, the benchmarks and a short FER-2013 run on the real CuPy,
# then a summary table and JSON. At most 10 minutes: the stages' own time limits add up to 570 s, and a stage
# that ignores its SIGTERM is killed 2 s later.
#
#   benchmarks/gpu_suite.sh OUT_DIR                 # from the checkout; needs CuPy, a GPU, pytest, hypothesis, torch
#   FER2013_DATA=data/fer2013_subset benchmarks/gpu_suite.sh OUT_DIR   # + the FER-2013 stages
#   FER2013_DATA=data/fer2013.tar.xz benchmarks/gpu_suite.sh OUT_DIR   # the same, from an archive of fer_subset.py
#                                                                     # (read as it is, by the tests too)
#
# OUT_DIR receives at most 8 files: summary.md, summary.json, suite.log (every stage's output),
# gpu_tests.xml, train_step_cupy.json, layers_cupy.json, epoch_cupy.json, fer_history.json.
# The GPU tests run with MINICNN_TEST_DEVICE=cupy: on the real CuPy, never on the stand-in.
set -uo pipefail
OUT="${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the real CuPy or fail (a dry run of this script on the stand-in sets MINICNN_TEST_DEVICE=auto)
export MINICNN_TEST_DEVICE="${MINICNN_TEST_DEVICE:-cupy}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
: > "$OUT/suite.log"
: > "$WORK/stages.tsv"

stage() {  # stage NAME SECONDS COMMAND...: run it with a time limit, log it, record rc and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/suite.log"
  timeout --kill-after=2 "$limit" "$@" >> "$OUT/suite.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$WORK/stages.tsv"
  echo "=== $name: rc $rc, $((SECONDS - start))s" | tee -a "$OUT/suite.log"
}

stage environment 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true; \
  $PY -c 'import cupy, numpy, torch; print(\"cupy\", cupy.__version__, \"numpy\", numpy.__version__, \"torch\", torch.__version__); \
print(cupy.cuda.runtime.getDeviceProperties(0)[\"name\"].decode()); import minicnn; minicnn.set_backend(\"cupy\"); print(\"minicnn cupy backend: ok\")'"
# Every GPU-marked test on the real CuPy, the NVRTC compile check and the stand-in's API check against this CuPy
# (without FER-2013: its CLI test is a stage of its own below, so that a slow one cannot cost these results).
stage gpu_tests 170 env -u FER2013_DATA "$PY" -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/test_gpu_parity.py \
  tests/test_kernels.py tests/test_optim.py tests/test_augment.py tests/test_backend.py tests/test_fakecupy.py \
  tests/test_cupy_cli.py tests/test_graphs.py --junitxml="$OUT/gpu_tests.xml" -o junit_family=xunit1
# Training steps against PyTorch eager (cudnn.benchmark, TF32 off on both sides), with peaks of device memory:
# the reports' small networks at three batch sizes (fused, generic and replayed as a CUDA graph), the deeper zoo
# at 128 (also with convolutions by row shifts, to see whether their memory saving costs time on a GPU too), and
# PyTorch under torch.compile (inductor) at 128; the three reports are merged into one file (the
# device returns 8 files at most).
stage train_step 70 "$PY" benchmarks/bench_train_step.py --backend cupy --models hw3_cnn hw3_dnn \
  --batch-sizes 64 128 256 --inference --generic --cuda-graph --tf32 off --repeats 20 --warmup 5 \
  --json "$WORK/train_step_1.json"
stage train_step_deep 55 "$PY" benchmarks/bench_train_step.py --backend cupy \
  --models ece662_resnet vgg_fer_slim dlcv_cnn --batch-sizes 128 --inference --shifted --tf32 off --repeats 10 --warmup 3 \
  --json "$WORK/train_step_2.json"
stage train_step_compile 80 "$PY" benchmarks/bench_train_step.py --backend cupy --models hw3_cnn --batch-sizes 128 \
  --torch-compile --tf32 off --repeats 20 --warmup 5 --json "$WORK/train_step_3.json"
"$PY" benchmarks/gpu_summary.py --merge "$OUT/train_step_cupy.json" "$WORK"/train_step_[123].json \
  | tee -a "$OUT/suite.log"
stage layers 30 "$PY" benchmarks/bench_layers.py --backend cupy --repeats 20 --json "$OUT/layers_cupy.json"
if [ -n "${FER2013_DATA:-}" ] && [ -e "$FER2013_DATA" ]; then
  stage epoch 50 "$PY" benchmarks/bench_epoch.py --backend cupy --cuda-graph --data "$FER2013_DATA" \
    --json "$OUT/epoch_cupy.json"
  # train.py, evaluate.py and precise_bn.py with --backend cupy on the real data: resume, --cuda-graph, --init-from, TTA
  stage cli_fer 45 env MINICNN_REQUIRE_FER2013=1 "$PY" -m pytest -q -p no:cacheprovider \
    "tests/test_cupy_cli.py::test_train_resume_init_from_evaluate_tta_and_precise_bn_with_the_cupy_backend"
  stage fer_train 50 "$PY" examples/fer2013/train.py --backend cupy --data "$FER2013_DATA" --epochs 3 \
    --out "$WORK/fer_run" --no-progress --schedule none
  [ -f "$WORK/fer_run/history.json" ] && cp "$WORK/fer_run/history.json" "$OUT/fer_history.json"
  [ -f "$WORK/fer_run/test_metrics.json" ] && cp "$WORK/fer_run/test_metrics.json" "$WORK/test_metrics.json"
else
  echo "=== FER-2013 stages skipped: FER2013_DATA is not set to a FER-2013 folder or archive" | tee -a "$OUT/suite.log"
fi
"$PY" benchmarks/gpu_summary.py "$WORK/stages.tsv" "$OUT" "$WORK/test_metrics.json" | tee -a "$OUT/suite.log"
