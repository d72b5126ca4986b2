#!/usr/bin/env bash
# One machine, NPROC processes (one pipeline rank each); extra arguments are Hydra overrides.
#   bash launch/single_node.sh 2 pipeline.schedule=gpipe train.steps=100
# --standalone runs the rendezvous on loopback; all ranks share one run directory.
set -euo pipefail
NPROC=${1:-2}
shift || true
exec torchrun --standalone --nproc-per-node="$NPROC" -m pipeline.train "$@"
