# Shell helpers shared by the launch scripts and slurm/train.sh (sourced, never run).

# The command as one copy-pasteable line: every script prints exactly what it runs.
quote() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$arg "; else out+="$(printf '%q' "$arg") "; fi
  done
  echo "${out% }"
}
