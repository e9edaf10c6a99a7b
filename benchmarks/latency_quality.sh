#!/usr/bin/env bash
# Trains the models behind the NDCG@10 column of benchmarks/latency.py with a cheap CPU profile:
# SmolLM2-135M cut to its first 2 layers, compact prompts, last 20 items, batch 16, at most
# MINUTES minutes (default 4) or 400 steps per model. Latency itself is measured with all 30 layers.
#   bash benchmarks/latency_quality.sh /tmp/me/amazon2018-scientific /tmp/me/runs/sci
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 shared cores: more threads only contend
DATA=$1; OUT=$2; MINUTES=${MINUTES:-4}
common=(data.path="$DATA" data.max_history=20 train.batch_size=16 train.max_steps=400 train.lr=0.001
        train.warmup_steps=20 train.eval_every=100 train.eval_users=50 train.max_minutes="$MINUTES" train.progress=false)
itemgen train model=itemlm itemlm.backbone=smollm2-135m itemlm.n_layers=2 itemlm.prompt=compact "${common[@]}" train.out="$OUT/itemlm"
itemgen train model=title title.backbone=smollm2-135m title.n_layers=2 title.prompt=compact "${common[@]}" train.out="$OUT/title"
itemgen train model=semantic_id semantic_ids.backbone=smollm2-135m semantic_ids.n_layers=2 semantic_ids.prompt=compact "${common[@]}" train.out="$OUT/semantic_id"
