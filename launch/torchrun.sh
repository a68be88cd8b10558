#!/usr/bin/env bash
# SkipSync on one machine: torchrun with one process per GPU.
#
#   launch/torchrun.sh [NPROC] [hydra overrides...]
#   launch/torchrun.sh 4 parallel.sp=4 prompt="a red circle moves left"
#   launch/torchrun.sh parallel.sp=-1 prompt="..."        # NPROC: every visible GPU (else 1)
#
# NPROC can also come from the environment (NPROC=4). For several nodes use launch/slurm.sbatch.
# The launcher is skipsync's torchrun (python -m runner.launch: the job exits with the failing rank's
# code, 2 for bad input; OMP_NUM_THREADS defaults to cores / NPROC). TORCHRUN=torchrun (or any
# torchrun-compatible executable) uses that instead; PYTHON picks the interpreter (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then  # Hydra overrides are never bare integers
  NPROC="$1"
  shift
fi
if [[ -z "${NPROC:-}" ]]; then
  NPROC=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [[ "$n" -gt 0 ]] && NPROC="$n"
  fi
fi

if [[ -n "${TORCHRUN:-}" ]]; then
  launcher=("$TORCHRUN")
else
  launcher=("${PYTHON:-python3}" -m runner.launch)
fi
exec "${launcher[@]}" --standalone --nnodes=1 --nproc_per_node="$NPROC" -m runner.generate "$@"
