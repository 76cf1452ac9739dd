#!/usr/bin/env bash
# GPU check: one short run on one H100/H200 (under 8 minutes including data, warm-up and compile).
#
#   launch/gpu_check.sh [OUT_DIR]             on the GPU machine (default OUT_DIR runs/gpu-check-DATE)
#   launch/gpu_check.sh --dry-run [OUT_DIR]   on any CPU: the same steps at the tiny preset (checks the script)
#   launch/gpu_check.sh --vendor [PYVER]      on a machine with internet: wheels for an offline GPU machine
#
# Steps, each with its own time limit, all output appended to OUT_DIR/gpu_check.log:
#   1. environment: nvidia-smi, torch/CUDA/cuDNN versions           -> OUT_DIR/env.txt
#   2. `unetdist bench smoke`: loss falls over 50 steps; activation checkpointing gives the
#      same loss/gradients/BatchNorm statistics as none, on the GPU in bf16   -> OUT_DIR/smoke.json
#   3. `unetdist bench --preset gpu`: ours vs the reference trainer, memory headroom, each lever
#      at 512x512 (rows not started within the time budget are listed as skipped) -> OUT_DIR/bench.json
# Exit status: 0 when both passed, 1 when a check failed, 2 without torch, 3 with packages missing.
#
# Needs only this repository and a Python with torch (PYTHON=..., else .venv/bin/python, else python3);
# nothing is installed into that Python. numpy, pyyaml, pillow, tifffile and webdataset are imported
# from it when present; otherwise installed offline from vendor/wheels/ into OUT_DIR/pydeps (make the
# wheels with `launch/gpu_check.sh --vendor 3.11` where there is internet, matching the GPU machine's
# Python); otherwise the check stops with a message naming what is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry; shift ;;
  --vendor) MODE=vendor; shift ;;
esac

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
PACKAGES="numpy pyyaml pillow tifffile webdataset braceexpand"

if [[ $MODE == vendor ]]; then
  PYVER=${1:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
  mkdir -p vendor/wheels
  # shellcheck disable=SC2086
  exec "$PY" -m pip download --only-binary=:all: --python-version "$PYVER" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --dest vendor/wheels $PACKAGES
fi

OUT=${1:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
START=$SECONDS
say() { printf '[gpu_check %4ds] %s\n' $((SECONDS - START)) "$*"; }

if [[ $MODE == dry ]]; then
  PRESET=tiny; DEVICE=cpu; SMOKE_LIMIT=120; BENCH_LIMIT=240; DEADLINE=200
else
  PRESET=gpu; DEVICE=cuda; SMOKE_LIMIT=120; BENCH_LIMIT=330; DEADLINE=240
fi
say "mode $MODE, preset $PRESET, python $PY, output $OUT"

# ---- 1. environment
{
  date -u; hostname
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "cudnn", torch.backends.cudnn.version(),
          "bf16", torch.cuda.is_bf16_supported())
EOF
} > "$OUT/env.txt" 2>&1
TORCH_OK=$?
cat "$OUT/env.txt"
if [[ $TORCH_OK -ne 0 ]]; then say "torch does not import with $PY: nothing to check"; exit 2; fi
if [[ $MODE == gpu ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  say "torch sees no CUDA GPU; use --dry-run on a CPU machine"; exit 2
fi

# ---- dependencies: the environment's, else vendored wheels, else stop with a message
missing() {
  "$PY" - <<'EOF'
import importlib.util
names = {"numpy": "numpy", "yaml": "pyyaml", "PIL": "pillow", "tifffile": "tifffile", "webdataset": "webdataset"}
print(" ".join(pkg for mod, pkg in names.items() if importlib.util.find_spec(mod) is None))
EOF
}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MISSING=$(missing)
if [[ -n "$MISSING" && -d vendor/wheels ]]; then
  say "installing from vendor/wheels into $OUT/pydeps: $MISSING"
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet --no-index --find-links vendor/wheels --target "$OUT/pydeps" $MISSING
  export PYTHONPATH="$PYTHONPATH:$OUT/pydeps"
  MISSING=$(missing)
fi
if [[ -n "$MISSING" ]]; then
  say "SKIPPED: missing Python packages: $MISSING. Make wheels where there is internet with"
  say "  launch/gpu_check.sh --vendor <python version of this machine>   (writes vendor/wheels/), then rerun"
  exit 3
fi

# ---- 2. smoke, 3. benchmark (the dataset is made once under OUT/data and shared)
COMMON=(--preset "$PRESET" --device "$DEVICE" --out "$OUT" --data-dir "$OUT/data")
say "smoke (limit ${SMOKE_LIMIT}s)"
timeout --kill-after=10 "$SMOKE_LIMIT" "$PY" -m unetdist.cli bench smoke "${COMMON[@]}"
SMOKE=$?
say "smoke exit status $SMOKE"
say "benchmark (limit ${BENCH_LIMIT}s, rows not started by ${DEADLINE}s are skipped)"
timeout --kill-after=10 "$BENCH_LIMIT" "$PY" -m unetdist.cli bench "${COMMON[@]}" --deadline-s "$DEADLINE"
BENCH=$?
say "benchmark exit status $BENCH"
say "files: $(cd "$OUT" && ls -1 | tr '\n' ' ')"
if [[ $SMOKE -eq 0 && $BENCH -eq 0 ]]; then say "PASSED"; exit 0; fi
say "FAILED (smoke $SMOKE, bench $BENCH; 124 = time limit)"
exit 1
