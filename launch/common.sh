# Shell helpers shared by the launch scripts and slurm/train.sh, slurm/predict.sh (sourced, never run;
# the sourcing script defines log).

# The command as one copy-pasteable line: every script prints exactly what it runs.
quote() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$arg "; else out+="$(printf '%q' "$arg") "; fi
  done
  echo "${out% }"
}

# GPUs per node, said out loud: SLURM_GPUS_ON_NODE (GPUs tracked by SLURM), else SLURM_GPUS_PER_NODE
# (--gpus-per-node: "8", "h100:8", "a100:2,v100:2"), else the CUDA_VISIBLE_DEVICES SLURM set; cross-checked
# with `nvidia-smi -L` on this node (fewer GPUs there than SLURM claims: use those; none from SLURM: use them).
count_gpus_per_node() {  # "[type:]count[,[type:]count...]" -> total count, or nothing
  local total=0 part n
  for part in ${1//,/ }; do
    n=${part##*:}; n=${n%%(*}
    [[ "$n" =~ ^[0-9]+$ ]] || return 0
    total=$((total + n))
  done
  echo "$total"
}
choose_nproc() {
  local slurm="" from="" smi=""
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then slurm=$SLURM_GPUS_ON_NODE; from="SLURM_GPUS_ON_NODE=$SLURM_GPUS_ON_NODE"
  elif [ -n "${SLURM_GPUS_PER_NODE:-}" ] && slurm=$(count_gpus_per_node "$SLURM_GPUS_PER_NODE") && [ -n "$slurm" ]; then
    from="SLURM_GPUS_PER_NODE=$SLURM_GPUS_PER_NODE"
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    slurm=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true); from="CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
  fi
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    smi=$(nvidia-smi -L | grep -c '^GPU' || true)
  fi
  if [ -n "$slurm" ] && [ -n "$smi" ] && [ "$smi" -lt "$slurm" ]; then
    log "warning: $from but nvidia-smi -L lists $smi GPU(s) on $(hostname): starting $smi process(es) per node"
    NPROC_PER_NODE=$smi
  elif [ -n "$slurm" ] && [ "$slurm" -gt 0 ]; then
    NPROC_PER_NODE=$slurm
    log "$NPROC_PER_NODE process(es) per node, from $from${smi:+ (nvidia-smi -L lists $smi)}"
  elif [ -n "$smi" ] && [ "$smi" -gt 0 ]; then
    NPROC_PER_NODE=$smi
    log "warning: SLURM gives no GPU count (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE unset): using the $smi GPU(s)" \
      "nvidia-smi -L lists on $(hostname); request GPUs with --gpus-per-node, or set NPROC_PER_NODE"
  else
    NPROC_PER_NODE=1
    log "warning: no GPUs found (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, CUDA_VISIBLE_DEVICES unset, no nvidia-smi):" \
      "starting 1 process per node; request GPUs with --gpus-per-node, or set NPROC_PER_NODE"
  fi
}
