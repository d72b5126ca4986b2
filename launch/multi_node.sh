#!/usr/bin/env bash
# Several machines, one torchrun per machine: run this same command on every node.
# Extra arguments are Hydra overrides, passed through to `python -m pipeline.train`.
#
# Two machines, 2 processes each (world size 4 = p x d; here p = 2 pipeline ranks, d = 2 replicas),
# with node-a (10.0.0.1) hosting the rendezvous on port 29400:
#
#   node-a$ RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=run1 GLOO_SOCKET_IFNAME=eth0 \
#             bash launch/multi_node.sh parallel.dp=2 hydra.run.dir=/shared/runs/run1
#   node-b$ RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=run1 GLOO_SOCKET_IFNAME=eth0 \
#             bash launch/multi_node.sh parallel.dp=2 hydra.run.dir=/shared/runs/run1
#
# Environment (defaults in brackets):
#   NNODES          machines in the job [2]
#   NPROC_PER_NODE  processes per machine [2]; global rank g = replica * p + pipeline rank, so with
#                   NPROC_PER_NODE = p each replica's pipeline stays inside one machine
#   RDZV_ENDPOINT   host:port of the node that hosts the rendezvous [localhost:29400]; the same on all nodes
#   RDZV_ID         a name for this job, the same on all nodes [pipeline]
#   MAX_RESTARTS    whole-group restarts after a failure [0]; they resume from the newest checkpoint
#
# Security: torch.distributed has no authentication. Anyone who can reach the rendezvous port or the
# workers' ports can join the job or feed it data: run it only on a trusted, private network.
# GLOO_SOCKET_IFNAME must name the network interface the nodes share (e.g. eth0); without it gloo
# picks the address the hostname resolves to, which may be loopback or a network the others cannot reach.
# hydra.run.dir should be on a file system every node mounts: each rank writes its stages' checkpoint
# shards there and rank 0 the rest, so a directory local to each node leaves every checkpoint incomplete.
set -euo pipefail

NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:29400}
RDZV_ID=${RDZV_ID:-pipeline}
MAX_RESTARTS=${MAX_RESTARTS:-0}

refuse() {  # one line naming the problem and the fix, exit code 2 (like the project's CLIs)
    echo "error: $1" >&2
    exit 2
}

[[ $NNODES =~ ^[1-9][0-9]*$ ]] || refuse "NNODES=$NNODES must be a positive integer, e.g. NNODES=2"
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] \
    || refuse "NPROC_PER_NODE=$NPROC_PER_NODE must be a positive integer, e.g. NPROC_PER_NODE=2"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || refuse "MAX_RESTARTS=$MAX_RESTARTS must be an integer >= 0, e.g. MAX_RESTARTS=0"
host_port='^([[][0-9a-fA-F:.]+[]]|[^]:[:space:][]+):[0-9]+$'  # name:port, 10.0.0.1:port or [::1]:port
[[ $RDZV_ENDPOINT =~ $host_port ]] \
    || refuse "RDZV_ENDPOINT=$RDZV_ENDPOINT must be HOST:PORT of the rendezvous node, e.g. RDZV_ENDPOINT=node0:29400"

exec torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --rdzv-backend=c10d \
    --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" --max-restarts="$MAX_RESTARTS" \
    -m pipeline.train "$@"
