#!/usr/bin/env bash
# The demo's detector pathway trained from fp16 and from int8 region shards, same seed and
# config, each evaluated in the loop on the raw val frames (issue 24: int8 R@1 within 1
# point of fp16). Run after `make demo` (it reuses the demo's shards and fitted detector):
#
#   launch/region_dtype_r1.sh [DEMO_OUT=runs/demo] [OUT=runs/region_dtype]
#
# Prints one JSON line per dtype (eval metrics + region bytes per clip), then a summary line.
set -euo pipefail
demo=${1:-runs/demo}
out=${2:-runs/region_dtype}
bin=${REGIONVLP:-regionvlp}
cfg=configs/demo/detector.yaml
[ -f "$demo/summary.json" ] || { echo "no $demo/summary.json: run make demo first" >&2; exit 2; }
read -r train val < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["data"]; print(d["train"], d["val"])' "$demo/summary.json")
common=("model.detector.weights=$demo/detector.pt" "seed=0" "data.val.urls=['$val']")
for dtype in fp16 int8; do
    rm -rf "$out/$dtype"
    "$bin" regions extract "$cfg" "$train" "$out/$dtype/regions" --feature-dtype "$dtype" --keep-frames 8 \
        "${common[@]}" > "$out.$dtype.extract.json"
    "$bin" train "$cfg" "data.train.urls=['$out/$dtype/regions/${train##*/}']" "run.out_dir=$out/$dtype/run" \
        "${common[@]}" > /dev/null
    "$bin" eval "$cfg" --checkpoint "$out/$dtype/run" "${common[@]}" | tail -n 1 > "$out.$dtype.eval.json"
done
python3 - "$out" <<'EOF'
import json, pathlib, sys
out = sys.argv[1]
rows = {}
for dtype in ("fp16", "int8"):
    m = json.load(open(f"{out}.{dtype}.eval.json"))
    regions = pathlib.Path(out, dtype, "regions")
    clips = sum(json.load(open(regions / "sizes.json")).values())
    rows[dtype] = {"t2v_r1": m["t2v_r1"], "t2v_r5": m["t2v_r5"], "v2t_r1": m["v2t_r1"],
                   "shard_bytes_per_clip": round(sum(p.stat().st_size for p in regions.glob("*.tar")) / clips)}
    print(json.dumps({"dtype": dtype, **rows[dtype]}))
print(json.dumps({"int8_minus_fp16_t2v_r1": rows["int8"]["t2v_r1"] - rows["fp16"]["t2v_r1"],
                  "int8_bytes_ratio": rows["int8"]["shard_bytes_per_clip"] / rows["fp16"]["shard_bytes_per_clip"]}))
EOF
