#!/usr/bin/env bash
# Pre-training with the DeepSpeed launcher, on one node or many.
#
#   launch/pretrain.sh CONFIG [key=value ...]
#
# Environment:
#   NUM_GPUS   GPUs per node (default: all visible; CPU-only: 1 process per NUM_GPUS)
#   HOSTFILE   a DeepSpeed hostfile for multi-node runs (see launch/hostfile.example)
#   MASTER_ADDR / MASTER_PORT   rendezvous of rank 0 (multi-node; default port 29500)
#   DS_ARGS    extra launcher flags, e.g. "--include worker-1:0,1"
#
# Examples:
#   launch/pretrain.sh configs/pretrain_detector.yaml 'data.train.urls=["/data/webvid/{00000..02999}.tar"]'
#   HOSTFILE=launch/hostfile NUM_GPUS=8 launch/pretrain.sh configs/pretrain_learned.yaml
set -euo pipefail
CONFIG=${1:?usage: launch/pretrain.sh CONFIG [key=value ...]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEEPSPEED=${DEEPSPEED:-deepspeed}

if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu  # gloo backend; bf16/fp32 only
fi

ARGS=(--num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  ARGS=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR for multi-node}" \
        --master_port "${MASTER_PORT:-29500}" --num_gpus "$NUM_GPUS")
fi
# shellcheck disable=SC2086
exec $DEEPSPEED "${ARGS[@]}" ${DS_ARGS:-} --module regionvlp.train "$CONFIG" train.resume=auto "$@"
