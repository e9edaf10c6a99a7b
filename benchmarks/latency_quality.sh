#!/usr/bin/env bash
# Trains the baselines behind the NDCG@10 column of benchmarks/latency.py on the benchmark's
# template: the recipe's `ids` prompt (one learned token per history item), the last 50 items,
# SmolLM2-135M cut to its first 2 layers (the recipe's CPU profile), batch 16, at most MINUTES
# minutes (default 4) or 400 steps per model. ItemLM's row comes from the recipe's own run
# (configs/itemlm-cpu.yaml with train.out=OUT/itemlm); latency.py reports a checkpoint only if its
# prompt and layer count are the benchmark's.
#   bash benchmarks/latency_quality.sh /tmp/me/amazon2018-scientific /tmp/me/runs/sci
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 shared cores: more threads only contend
DATA=$1; OUT=$2; MINUTES=${MINUTES:-4}
common=(data.path="$DATA" data.max_history=50 train.batch_size=16 train.max_steps=${MAX_STEPS:-400} train.lr=0.001
        train.warmup_steps=20 train.eval_every=100 train.eval_users=50 train.max_minutes="$MINUTES" train.progress=false)
itemgen train model=title title.backbone=smollm2-135m title.n_layers=2 title.prompt=ids "${common[@]}" train.out="$OUT/title"
itemgen train model=semantic_id semantic_ids.backbone=smollm2-135m semantic_ids.n_layers=2 semantic_ids.prompt=ids "${common[@]}" train.out="$OUT/semantic_id"
