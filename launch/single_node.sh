#!/usr/bin/env bash
# One machine, NPROC processes (one pipeline rank each); extra arguments are Hydra overrides.
#   bash launch/single_node.sh 2 pipeline.schedule=gpipe train.steps=100
# --standalone runs the rendezvous on loopback; all ranks share one run directory.
# torchrun: the repository's .venv/bin/torchrun (the quickstart installs it there), else torchrun on PATH.
set -euo pipefail
NPROC=${1:-2}
shift || true

case ${BASH_SOURCE[0]} in  # builtins only: this must work with a PATH that has nothing on it
    */*) here=${BASH_SOURCE[0]%/*} ;;
    *) here=. ;;
esac
root=$(cd "$here/.." && pwd)
if [[ -x $root/.venv/bin/torchrun ]]; then
    torchrun=$root/.venv/bin/torchrun
elif command -v torchrun >/dev/null; then
    torchrun=torchrun
else
    echo "error: torchrun not found: no $root/.venv/bin/torchrun and none on PATH; run the quickstart's" \
         "first command (it installs .venv) or activate the environment that has torch" >&2
    exit 2
fi
exec "$torchrun" --standalone --nproc-per-node="$NPROC" -m pipeline.train "$@"
