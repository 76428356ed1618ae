#!/usr/bin/env bash
# Train on the GPU machine for at most SECONDS, resumably: the long runs of issue #15 (vgg_fer_slim for the
# > 71.2 % goal, ece662_resnet) go on across device sessions of a few minutes each.
#
#   FER2013_DATA=data/fer2013_train.tar.xz benchmarks/gpu_train.sh OUT_DIR RUN_DIR SECONDS [train.py arguments]
#
# A new run (no RUN_DIR/last.npz) starts with the train.py arguments given; a carried RUN_DIR/last.npz.packed
# (`python benchmarks/travel.py carry RUN_DIR` writes it here: last.npz 15-33 % smaller, bit-exact) is
# expanded and resumed, as is a carried RUN_DIR/last.npz (--resume: give no arguments then, or --epochs N to
# lengthen the run, or --cuda-graph). train.py runs with
# --backend cupy --no-test --no-progress; after SECONDS it gets SIGTERM, keeps its last finished epoch and
# stops. Then benchmarks/travel.py packs the run into OUT_DIR (last.npz packed, in pieces of at most 15 MiB,
# best.npz without optimiser state, history.json, travel.json), beside train.log and gpu_train.json
# (device, versions, exit status, seconds, epochs). At most 7 files, none over 15 MiB.
#
# FER2013_DATA: a folder, or a .tar.xz of benchmarks/fer_subset.py (train.py reads archives as they are).
# Training only is enough (--test-fraction 0: 33.0 MiB): PublicTest is evaluated on this machine, once,
# when the run has ended. Back here:
#   python benchmarks/travel.py unpack FILES_AT RUN_DIR     # then, before the next session:
#   python benchmarks/travel.py carry RUN_DIR               # and carry RUN_DIR/last.npz.packed
# GPU_TRAIN_BACKEND=numpy runs the same script on the CPU (the tests' dry run).
set -uo pipefail
OUT="${1:?usage: benchmarks/gpu_train.sh OUT_DIR RUN_DIR SECONDS [train.py arguments]}"
RUN="${2:?usage: benchmarks/gpu_train.sh OUT_DIR RUN_DIR SECONDS [train.py arguments]}"
LIMIT="${3:?usage: benchmarks/gpu_train.sh OUT_DIR RUN_DIR SECONDS [train.py arguments]}"
shift 3
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT" "$RUN"
OUT="$(cd "$OUT" && pwd)"
RUN="$(cd "$RUN" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BACKEND="${GPU_TRAIN_BACKEND:-cupy}"
DATA="${FER2013_DATA:?set FER2013_DATA to a FER-2013 folder or a .tar.xz of benchmarks/fer_subset.py}"
[ -e "$DATA" ] || { echo "FER2013_DATA=$DATA: no such file or folder" >&2; exit 2; }

: > "$OUT/train.log"
if [ ! -f "$RUN/last.npz" ] && [ -f "$RUN/last.npz.packed" ]; then
  # the carried run, packed by `travel.py carry` to fit the device's 64 MiB: expand it, checked
  "$PY" benchmarks/travel.py expand "$RUN" 2>&1 | tee -a "$OUT/train.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "cannot expand $RUN/last.npz.packed" >&2; exit 2; }
fi
if [ -f "$RUN/last.npz" ]; then
  MODE=resume
  ARGS=(--resume --out "$RUN" "$@")
else
  MODE=new
  ARGS=(--out "$RUN" "$@")
fi
echo "=== $MODE run in $RUN for at most ${LIMIT}s on $BACKEND: train.py ${ARGS[*]}" | tee -a "$OUT/train.log"
START=$SECONDS
timeout --signal=TERM --kill-after=60 "$LIMIT" "$PY" examples/fer2013/train.py --backend "$BACKEND" \
  --data "$DATA" --no-test --no-progress "${ARGS[@]}" >> "$OUT/train.log" 2>&1
RC=$?
ELAPSED=$((SECONDS - START))
echo "=== train.py: exit status $RC after ${ELAPSED}s (124: stopped at the time limit, after its last epoch)" \
  | tee -a "$OUT/train.log"

"$PY" benchmarks/travel.py pack "$RUN" "$OUT" 2>&1 | tee -a "$OUT/train.log"
"$PY" - "$OUT" "$RUN" "$MODE" "$RC" "$ELAPSED" "$LIMIT" "$BACKEND" <<'EOF' | tee -a "$OUT/train.log"
import json, platform, sys
from pathlib import Path
out, run, mode, rc, elapsed, limit, backend = sys.argv[1:]
info = {"mode": mode, "train_exit_status": int(rc), "seconds": int(elapsed), "limit_seconds": int(limit),
        "backend": backend, "run_dir": run, "python": platform.python_version()}
try:
    import numpy
    info["numpy"] = numpy.__version__
    if backend == "cupy":
        import cupy
        info["cupy"] = cupy.__version__
        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["device"] = props["name"].decode()
        info["driver"] = cupy.cuda.runtime.driverGetVersion()
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
except Exception as exc:  # the summary must still be written
    info["versions_error"] = repr(exc)
history_path = Path(run) / "history.json"
if history_path.is_file():
    rows = json.loads(history_path.read_text())  # one row per epoch, as the Trainer writes it
    info["epochs_done"] = len(rows)
    scored = [r for r in rows if r["val_acc"] is not None]
    if scored:
        best = max(scored, key=lambda r: r["val_acc"])  # the first of equals, like the Trainer's best.npz
        info["best_epoch"], info["best_val_acc"] = best["epoch"], best["val_acc"]
    if rows:
        info["last_epoch_seconds"] = rows[-1]["seconds"]
(Path(out) / "gpu_train.json").write_text(json.dumps(info, indent=1) + "\n")
print(json.dumps(info))
EOF
