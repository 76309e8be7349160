#!/usr/bin/env bash
# Wan2.1-14B shape on one H200 (random weights): make the dense checkpoint in the Hub's diffusers layout, convert it
# on the GPU (dc 704, rope key 32, svd), then fine-tune STEPS steps on 9-latent-frame 480x832 clips without the
# final export (dense + MLA + a fine-tuned export need ~79 GB, more than the machine's 64 GB disk).
# Every stage resumes: run it again with the same W after a kill and it continues from the last checkpoint.
# Run from the repo root:  W=/tmp/w14 OUT=/some/folder bash docs/benchmarks/finetune_14b.sh 200 SECONDS
set -uo pipefail
: "${W:?set W to a work folder with ~60 GB free}" "${OUT:?set OUT to an output folder}"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$W" "$OUT"
[ -f "$W/dense/transformer/config.json" ] || python docs/benchmarks/make_random_checkpoint.py --preset wan2.1-14b --layout diffusers -o "$W/dense"
[ -f "$W/mla/config.json" ] || python -m mlaconvert convert "$W/dense" -o "$W/mla" --init svd --no-measure --dc 704 --rope-dim 32 --device cuda > "$OUT/convert.log" 2>&1
timeout -s INT "$2" python - "$1" "$W" <<'PY' > "$OUT/finetune.log" 2>&1
import json, sys
from pathlib import Path
from mlaconvert.training.finetune import FinetuneSettings, finetune
steps, work = int(sys.argv[1]), Path(sys.argv[2])
settings = FinetuneSettings(max_steps=steps, batch=1, lr=1e-4, warmup=20, train="mla", clips=8, held_out=2, frames=9,
                            height=480, width=832, chunk=3, checkpoint_every=25, eval_every=50)
resume = (work / "ft" / "checkpoint" / "state.pt").is_file()
finetune(str(work / "mla"), work / "ft", settings, teacher=str(work / "dense"), device="cuda", resume=resume, force=not resume,
         stop_after=steps - 1, on_plan=lambda plan: print("PLAN", json.dumps(plan.to_dict()), flush=True))
PY
cp "$W/ft/train_log.jsonl" "$OUT/"
