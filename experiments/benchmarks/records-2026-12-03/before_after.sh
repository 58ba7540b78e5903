#!/usr/bin/env bash
# Before/after of this change: flaxcnn.bench in a worktree of a2caef1 (BEFORE) and
# in this checkout (AFTER), alternating per model, two rounds, each run its own process.
#   BEFORE=/tmp/before bash before_after.sh > before_after_bench.txt
set -euo pipefail
PY=${PY:-python}
AFTER=$(git rev-parse --show-toplevel)
uptime
for round in 1 2; do
  for model in resnet50 efficientnet_v2_b0 mobilenet_v2 mobilenet_v3_large convnext_tiny; do
    for side in before after; do
      dir=$([ "$side" = before ] && echo "$BEFORE" || echo "$AFTER")
      echo "== round $round, $model, $side ($([ "$side" = before ] && git -C "$dir" rev-parse --short HEAD || echo "this change"))"
      (cd "$dir" && "$PY" -m flaxcnn.bench --model "$model" --rows inference,finetune \
        --batch-sizes 32 --steps 6 --warmup 2 2>&1 | grep -E "^\| $model|load average")
    done
  done
done
uptime
