#!/usr/bin/env bash
# GPU profile of the NDCG@10 column of benchmarks/latency.py, and L2D against the title baseline's
# own beam search (benchmarks/l2d.py), on one dataset. Every model uses the same backbone:
# SmolLM2-135M cut to its first 2 layers (a local HF folder; the full 30-layer model is too large
# to ship to a lent GPU machine), last 20 items, compact prompts, batch 64, at most MINUTES
# minutes of training each, side by side (bf16 on GPU; it runs on CPU too, slowly). ItemLM trains with text in
# 75% of examples (the paper's paradigm) and is asked with IDs only.
#   bash benchmarks/device_quality.sh BACKBONE_DIR DATA_DIR SEMANTIC_IDS_JSON RUNS_DIR OUT_DIR
# SEMANTIC_IDS_JSON: codes of an earlier semantic-ID run on the same catalog ("" = cluster anew,
# which needs faiss). Writes OUT_DIR/latency_quality_<model>.json (latency.py --quality-only format),
# OUT_DIR/l2d.json and l2d.md, OUT_DIR/eval_<model>.json (all test users), OUT_DIR/<model>.log.
# A dry run on CPU: MINUTES=0.05 EVAL_EVERY=2 FULL_EVAL=0 GEN_EVAL_USERS=8 Q_USERS=8 L2D_USERS=8 PYTHON=python bash benchmarks/device_quality.sh ...
set -uo pipefail  # no -e: a model that fails must not cost the others
BACKBONE=$1; DATA=$2; CODES=$3; RUNS=$4; OUT=$5
MINUTES=${MINUTES:-1.6}; EVAL_EVERY=${EVAL_EVERY:-400}; FULL_EVAL=${FULL_EVAL:-1}; PY=${PYTHON:-python3}
PARTS=${PARTS:-"itemlm title semantic_id l2d itemlm_two_level"}  # which steps to run, in this order
GEN_EVAL=${GEN_EVAL_USERS:-200}  # validation users of the beam-search models (slower to evaluate)
Q_USERS=${Q_USERS:-200}; L2D_USERS=${L2D_USERS:-500}  # latency.py's user sample; L2D's test users
mkdir -p "$RUNS" "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # four processes share the machine's cores
common=(data.path="$DATA" data.max_history=20 train.batch_size=64 train.max_steps=100000 train.warmup_steps=100
        train.eval_every="$EVAL_EVERY" train.eval_users=500 train.max_minutes="$MINUTES" train.progress=false
        ${EXTRA:-})  # EXTRA: more overrides for every model, e.g. EXTRA=train.mixed_precision=no
train() {  # name, overrides...
  local name=$1; shift
  echo "== $name $(date +%T)"
  $PY -m itemgen train "${common[@]}" "$@" train.out="$RUNS/$name" >"$OUT/$name.log" 2>&1 || echo "train $name failed (see $name.log)"
  tail -n 3 "$OUT/$name.log"
}
sample_ndcg() {  # NDCG@10 on latency.py's user sample
  $PY benchmarks/latency.py --data "$DATA" --quality-runs "$RUNS" --quality-only --methods "$1" --users "$Q_USERS" \
      --quality-profile "$PROFILE" --out "$OUT/latency_quality_$1.json" >>"$OUT/quality_$1.log" 2>&1 || echo "quality $1 failed"
}
full_eval() {  # every test user
  if [ "$FULL_EVAL" = 1 ]; then
    $PY -m itemgen evaluate "$RUNS/$1/best" --split test --out "$OUT/eval_$1.json" >>"$OUT/quality_$1.log" 2>&1 || echo "evaluate $1 failed"
  fi
}
quality() { sample_ndcg "$1"; full_eval "$1"; }
PROFILE="benchmarks/device_quality.sh on $($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")'): SmolLM2-135M first 2 layers, compact prompts, batch 64, at most $MINUTES min training per model"

want() { [[ " $PARTS " == *" $1 "* ]]; }

# The four models train side by side (a 2-layer backbone leaves a GPU mostly idle): each chain
# trains, then scores its model; L2D follows the title model.
chain_itemlm() {
  train itemlm model=itemlm itemlm.backbone="$BACKBONE" itemlm.prompt=compact itemlm.id_only_share=0.25 \
        "itemlm.fields=[title,brand,category]" itemlm.max_field_tokens=8 train.lr=0.002 train.backbone_lr=0.0005
  quality itemlm
}
chain_title() {
  train title model=title title.backbone="$BACKBONE" title.prompt=compact train.lr=0.0005 train.eval_users="$GEN_EVAL"
  sample_ndcg title
  if want l2d; then
    echo "== l2d $(date +%T)"
    $PY benchmarks/l2d.py --checkpoint "$RUNS/title/best" --name "$(basename "$DATA")/title" --test-users "$L2D_USERS" \
        --out "$OUT/l2d.json" --doc "$OUT/l2d.md" >"$OUT/l2d.log" 2>&1 || echo "l2d failed (see l2d.log)"
    tail -n 5 "$OUT/l2d.log"
  fi
  full_eval title
}
chain_semantic_id() {
  train semantic_id model=semantic_id semantic_ids.backbone="$BACKBONE" semantic_ids.prompt=compact \
        semantic_ids.codes="$CODES" train.lr=0.001 train.eval_users="$GEN_EVAL"
  quality semantic_id
}
chain_itemlm_two_level() {
  [ -f "$DATA/clusters/kmeans.json" ] || { echo "no $DATA/clusters/kmeans.json: two-level skipped"; return; }
  train itemlm_two_level model=itemlm itemlm.backbone="$BACKBONE" itemlm.prompt=compact itemlm.id_only_share=0.25 \
        "itemlm.fields=[title,brand,category]" itemlm.max_field_tokens=8 train.lr=0.002 train.backbone_lr=0.0005 \
        itemlm.head=two_level itemlm.cluster_method=kmeans
  quality itemlm_two_level
}
for part in itemlm title semantic_id itemlm_two_level; do
  want "$part" && "chain_$part" &
done
wait
echo "== done $(date +%T)"
