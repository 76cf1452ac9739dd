#!/usr/bin/env bash
# GPU check: every code path that runs only with CUDA, on one GPU, in under 8 minutes (7 of work).
#
#   launch/gpu_check.sh [OUT_DIR] [--sections a,b ...]   on the GPU machine (default OUT_DIR runs/gpu-check-DATE)
#   launch/gpu_check.sh --dry-run [OUT_DIR]              on any CPU: the same sections at tiny sizes (checks the script)
#   launch/gpu_check.sh --vendor [PYVER]                 on a machine with internet: wheels for an offline GPU machine
#
# Each section runs in its own process with its own time limit; a failure (a compile error, a CUDA error
# that aborts the process, a hang) never stops the others, and no section starts after the deadline.
# Results: OUT_DIR/gpu_check.json and gpu_check.txt (table), each section's log in OUT_DIR/sections/NAME/.
#   train      torchrun, 1 process, NCCL (init_distributed with device_id): the real training loop, 30 steps,
#              validation, checkpoints, SIGUSR1 to the agent (exit 75) and resume; resumed losses = unbroken
#   deepspeed  DeepSpeed ZeRO-2 in bf16 and in fp16 (autocast + DeepSpeed's loss scaler), a group of one
#   syncbn     SyncBatchNorm conversion + activation checkpointing on 1 rank: same gradients and statistics
#   compile    torch.compile + checkpointing=all against eager: loss, gradients, BatchNorm statistics
#   predict    sliding-window prediction bf16 vs fp32: label agreement, megapixels/s of each
#   table      `unetdist bench` at 512x512: ours vs the reference trainer, levers (bf16, channels_last,
#              checkpointing, compile rows skipped if compile fails), MFU and HFU, images/s
#   loader     the training loader with configs/gpu-8x.yaml's data.workers: tiles/s for one rank
#   memory     the largest batch per checkpointing policy, by real allocation
# Exit status: 0 every section passed, 1 a section failed, 2 no torch (or no GPU without --dry-run),
# 3 Python packages missing.
#
# Needs only this repository and a Python with torch (PYTHON=..., else .venv/bin/python, else python3);
# nothing is installed into that Python. Packages missing from it are installed offline from
# vendor/wheels/ into OUT_DIR/pydeps (make the wheels with `launch/gpu_check.sh --vendor 3.11` where there
# is internet, matching the GPU machine's Python); otherwise the check stops naming what is missing.
# DeepSpeed has no wheel on PyPI: without it the deepspeed section fails and the others run.
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
PACKAGES="numpy pyyaml pillow tifffile webdataset braceexpand scipy tensorboard tqdm packaging"

if [[ $MODE == vendor ]]; then
  PYVER=${1:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
  mkdir -p vendor/wheels
  # shellcheck disable=SC2086
  exec "$PY" -m pip download --only-binary=:all: --python-version "$PYVER" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --dest vendor/wheels $PACKAGES
fi

OUT=runs/gpu-check-$(date +%Y%m%d-%H%M%S)
if [[ $# -gt 0 && "$1" != --* ]]; then OUT=$1; shift; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
START=$SECONDS
say() { printf '[gpu_check %4ds] %s\n' $((SECONDS - START)) "$*"; }

# Work deadline (no section starts after it) and the hard limit of the whole run, with margin under 8 min.
DEADLINE=${GPU_CHECK_DEADLINE:-420}
HARD_LIMIT=$((DEADLINE + 40))
say "mode $MODE, python $PY, output $OUT, deadline ${DEADLINE}s"

# ---- environment
{
  date -u; hostname
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "capability", torch.cuda.get_device_capability(0),
          "cudnn", torch.backends.cudnn.version(), "bf16 hardware", torch.cuda.is_bf16_supported(including_emulation=False))
PYEOF
} > "$OUT/env.txt" 2>&1
TORCH_OK=$?
cat "$OUT/env.txt"
if [[ $TORCH_OK -ne 0 ]]; then say "torch does not import with $PY: nothing to check"; exit 2; fi
if [[ $MODE == gpu ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  say "torch sees no CUDA GPU; use --dry-run on a CPU machine"; exit 2
fi

# ---- dependencies: the environment's, else vendored wheels, else stop with a message
missing() {
  "$PY" - <<'PYEOF'
import importlib.util
names = {"numpy": "numpy", "yaml": "pyyaml", "PIL": "pillow", "tifffile": "tifffile", "webdataset": "webdataset",
         "braceexpand": "braceexpand", "scipy": "scipy", "tensorboard": "tensorboard", "tqdm": "tqdm",
         "packaging": "packaging"}
print(" ".join(pkg for mod, pkg in names.items() if importlib.util.find_spec(mod) is None))
PYEOF
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
if ! "$PY" -c 'import deepspeed' 2>/dev/null; then say "note: deepspeed does not import: its section will fail"; fi

# ---- the sections, each in its own process (unetdist/bench/gpu_check.py)
timeout --kill-after=10 "$HARD_LIMIT" "$PY" -m unetdist.bench.gpu_check run --mode "$MODE" --out "$OUT" \
  --deadline-s "$DEADLINE" "$@"
STATUS=$?
if [[ $STATUS -eq 124 || $STATUS -eq 137 ]]; then say "FAILED: the run passed its hard limit of ${HARD_LIMIT}s"; exit 1; fi
say "results: $OUT/gpu_check.json, table: $OUT/gpu_check.txt (exit $STATUS)"
exit "$STATUS"
