#!/usr/bin/env bash
# Every GPU benchmark in one go, one JSON line each, for the first time a GPU is at hand.
#
#   launch/gpu_check.sh [--out FILE] [--only NAME[,NAME...]] [--small] [--print]
#
# Checks (names for --only), at the settings the GPU goals name:
#   regions         bench regions: R50-FPN, 384 px, bf16, batch 64 (extractor vs backbone+RPN head vs stock)
#   learner         bench learner: ViT-B/16 of configs/pretrain_learned.yaml, 1 frame, 224 px, bf16
#   train_detector  bench train: detector pathway, 1 frame, 224 px, bf16 (memory vs loader)
#   train_learned   bench train: learned pathway, 1 frame, 224 px, bf16
#   train_region_shards
#                   bench train --from region_shards: detector pathway, 1 frame, 224 px, bf16,
#                   trained from region shards (regions extract of the same clips, on the GPU)
#                   vs the in-loop detector, each with its data_wait_frac
#   loss            bench loss: the shared loss at B = 256
#   paper_demovlp, paper_demovlp_ft, paper_regionlearner, paper_regionlearner_ft
#                   bench train of configs/paper/{demovlp_pretrain,demovlp_finetune_msrvtt,
#                   regionlearner_pretrain,regionlearner_finetune_msrvtt}.yaml at their own batch,
#                   frames and sizes (clips/s of the papers' recipes; the DemoVLP ones run the
#                   detector in the loop at 600 px, the cost of both of its steps per batch;
#                   weights random: speed does not depend on them)
# Each line is the benchmark's own JSON (device, dtype, sizes, <variant>_per_s, baseline ...),
# or {"bench": NAME, "error": ..., "rc": ...} when it failed, so one failure never hides the
# rest. Per check at most CHECK_TIMEOUT seconds (default 150).
#
#   --out FILE   where the lines go (default gpu_check.jsonl; appended)
#   --small      CPU-sized settings on --device cpu (a smoke run of this script, not figures)
#   --print      print the commands instead of running them
#
# Environment: PYTHON (default python), DETECTOR_WEIGHTS (default none: speed does not need
# COCO weights; DEFAULT or a file for box_agreement on real boxes), TEXT_MODEL (text tower for
# the train checks; default the config's distilbert-base-uncased, must be in the HF cache).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=gpu_check.jsonl
ONLY=""
SMALL=0
PRINT=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=${2:?--out FILE}; shift 2 ;;
    --only) ONLY=${2:?--only NAME}; shift 2 ;;
    --small) SMALL=1; shift ;;
    --print) PRINT=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
LIMIT=${CHECK_TIMEOUT:-150}
WEIGHTS=${DETECTOR_WEIGHTS:-none}
TEXT=()
[ -n "${TEXT_MODEL:-}" ] && TEXT=(--set "model.text.name=$TEXT_MODEL")

NAMES=(regions learner train_detector train_learned loss paper_demovlp paper_demovlp_ft paper_regionlearner
       paper_regionlearner_ft train_region_shards)
PAPER=configs/paper
if [ "$SMALL" = 1 ]; then
  declare -A ARGS=(
    [regions]="regions --arch fasterrcnn_tiny --size 64 --batch 2 --iters 1 --warmup 0 --device cpu"
    [learner]="learner --backbone vit_tiny_patch16_224 --depth 2 --img-size 32 --batch 2 --codebook-size 16 --code-dim 8 --num-regions 2 --iters 1 --warmup 1 --device cpu"
    [train_detector]="train --regions detector --device cpu --steps 1 --warmup 1"
    [train_learned]="train --regions learned --device cpu --steps 1 --warmup 1"
    [loss]="loss --batch 16 --regions 8 --words 8 --dim 32 --repeats 1 --device cpu"
    [paper_demovlp]="train --config $PAPER/tiny/demovlp_pretrain.yaml --device cpu --steps 1 --warmup 1"
    [paper_demovlp_ft]="train --config $PAPER/tiny/demovlp_finetune_msrvtt.yaml --device cpu --steps 1 --warmup 1"
    [paper_regionlearner]="train --config $PAPER/tiny/regionlearner_pretrain.yaml --regions learned --device cpu --steps 1 --warmup 1"
    [paper_regionlearner_ft]="train --config $PAPER/tiny/regionlearner_finetune_msrvtt.yaml --regions learned --device cpu --steps 1 --warmup 1"
    [train_region_shards]="train --regions detector --from region_shards --device cpu --batch 2 --steps 1 --warmup 1"
  )
else
  declare -A ARGS=(
    [regions]="regions --arch fasterrcnn_resnet50_fpn --size 384 --batch 64 --dtype bf16 --device cuda --iters 5 --weights $WEIGHTS"
    [learner]="learner --batch 64 --dtype bf16 --device cuda --iters 5"
    [train_detector]="train --regions detector --device cuda --dtype bf16 --frames 1 --size 224 --steps 5 --set model.detector.weights=$WEIGHTS"
    [train_learned]="train --regions learned --device cuda --dtype bf16 --frames 1 --size 224 --steps 5 --set model.learner.pretrained=none"
    [loss]="loss --batch 256 --device cuda"
    [paper_demovlp]="train --config $PAPER/demovlp_pretrain.yaml --device cuda --dtype bf16 --steps 3 --warmup 1 --set model.detector.weights=$WEIGHTS --set model.region_transformer.init=none"
    [paper_demovlp_ft]="train --config $PAPER/demovlp_finetune_msrvtt.yaml --device cuda --dtype bf16 --steps 5 --set model.detector.weights=$WEIGHTS --set train.init_from=none"
    [paper_regionlearner]="train --config $PAPER/regionlearner_pretrain.yaml --regions learned --device cuda --dtype bf16 --steps 5 --set model.learner.pretrained=none"
    [paper_regionlearner_ft]="train --config $PAPER/regionlearner_finetune_msrvtt.yaml --regions learned --device cuda --dtype bf16 --steps 5 --set train.init_from=none"
    [train_region_shards]="train --regions detector --from region_shards --device cuda --dtype bf16 --frames 1 --size 224 --steps 5 --set model.detector.weights=$WEIGHTS"
  )
fi

error_line() {  # NAME RC MESSAGE -> one JSON line
  "$PY" -c 'import json, sys; print(json.dumps({"bench": sys.argv[1], "error": sys.argv[3][-500:], "rc": int(sys.argv[2])}))' "$@"
}

for name in "${NAMES[@]}"; do
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    continue
  fi
  # shellcheck disable=SC2206
  cmd=("$PY" -m regionvlp bench ${ARGS[$name]})
  case "$name" in train_*|paper_*) cmd+=("${TEXT[@]}") ;; esac
  if [ "$PRINT" = 1 ]; then
    echo "${cmd[*]}"
    continue
  fi
  echo "gpu_check: $name: ${cmd[*]}" >&2
  err=$(mktemp)
  line=$(timeout "$LIMIT" "${cmd[@]}" 2>"$err" | tail -n 1)
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ] && "$PY" -c 'import json, sys; json.loads(sys.argv[1])' "$line" 2>/dev/null; then
    echo "$line" >>"$OUT"
  else
    [ "$rc" = 124 ] && echo "timed out after ${LIMIT}s" >>"$err"
    error_line "$name" "$rc" "$(tail -c 500 "$err")" >>"$OUT"
  fi
  rm -f "$err"
done
[ "$PRINT" = 1 ] || echo "gpu_check: results in $OUT" >&2
