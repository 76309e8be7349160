#!/usr/bin/env bash
# Does the fixed held-out loss (eval_loss) rise with --train all where --train mla keeps falling?
# Wan-1.3B shape with random weights, converted at dc 192 (svd), then two short fine-tunes from the same teacher
# clips (generated once, shared through --cache-dir): 30 steps on 6-frame 240x416 clips (30x52 latents).
# Run from the repo root on one CUDA GPU:  OUT=/some/folder bash docs/benchmarks/finetune_train_all_vs_mla.sh
set -euo pipefail
: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
PYTHONPATH=. python -c "
from mlaconvert.checkpoints.builtin import make_tiny_wan
from mlaconvert.modeling.config import PRESETS
from mlaconvert.checkpoints.formats import save_native
config = PRESETS['wan2.1-1.3b']
save_native(config, make_tiny_wan(0, config), '$OUT/dense')
"
printf '[finetune]\neval_every = 5\n' > "$OUT/eval.toml"
PYTHONPATH=. python -m mlaconvert convert "$OUT/dense" --dc 192 --rope-dim 32 --init svd -o "$OUT/mla" --force
for mode in mla all; do
  PYTHONPATH=. python -m mlaconvert finetune "$OUT/mla" --recipe "$OUT/eval.toml" --train "$mode" --steps 30 --warmup 3 \
    --lr 1e-4 --batch 1 --clips 16 --frames 6 --height 30 --width 52 --cache-dir "$OUT/clips" -o "$OUT/train-$mode" --force
done
PYTHONPATH=. python -c "
import json
for mode in ('mla', 'all'):
    rows = [json.loads(l) for l in open('$OUT/train-' + mode + '/train_log.jsonl')]
    print(mode, 'eval_loss by step:', {r['step']: round(r['eval_loss'], 6) for r in rows if 'eval_loss' in r})
" | tee "$OUT/summary.txt"
# The weights (random, multi-GB) and checkpoints go; logs, loss.png, agreement.json and rank reports stay.
rm -rf "$OUT/dense" "$OUT"/train-*/checkpoint
find "$OUT" -name 'model*.safetensors*' -delete
