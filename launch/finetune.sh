#!/usr/bin/env bash
# Fine-tuning from a pre-trained export (train.init_from in the config), with the
# DeepSpeed launcher. Same environment variables as launch/pretrain.sh.
#
#   regionvlp export runs/pretrain_detector exports/pretrain_detector
#   launch/finetune.sh configs/finetune_detector.yaml 'data.train.urls=[...]' 'data.val.urls=[...]'
#   launch/finetune.sh configs/finetune_learned.yaml train.init_from=exports/pretrain_learned ...
set -euo pipefail
CONFIG=${1:?usage: launch/finetune.sh CONFIG [key=value ...]}
shift
exec "$(dirname "$0")/pretrain.sh" "$CONFIG" "$@"
