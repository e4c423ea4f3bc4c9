#!/usr/bin/env bash
# Reproduce the pretrained demo-world CLIP shipped in l2c_llava/assets/demo_clip/ (the demo's
# counterpart of OpenAI CLIP): draw its 40,000-image corpus (seed 7001, never the demo's seed 0),
# train it with `l2c clip pretrain --config stage2/configs/clip_demo_pretrain.yaml`, measure it on the
# corpus's held-out test split (retrieval with 95% intervals, encoder health, patch probe) and pack it.
# About 10 min of drawing and 1-2 h of training on 2 CPU cores. Resumable: run it again after a stop
# and every finished part is kept, a killed training resumes from its last checkpoint.
# Environment: L2C_DEMO_CLIP_DIR (work folder, default runs/demo_clip), L2C_DEMO_CLIP_OUT (the packed
# folder, default l2c_llava/assets/demo_clip). Extra arguments are overrides of the training config.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VPY="$(bash "$ROOT/scripts/setup_env.sh" | tail -n 1)"
L2C="$(dirname "$VPY")/l2c"
cd "$ROOT"
WORK="${L2C_DEMO_CLIP_DIR:-runs/demo_clip}"
OUT="${L2C_DEMO_CLIP_OUT:-l2c_llava/assets/demo_clip}"

if [ ! -f "$WORK/data/manifest.json" ]; then
  echo "== drawing the corpus ($WORK/data)"
  "$L2C" data synth --out "$WORK/data" --images 40000 --seed 7001 --val-fraction 0.02 --test-fraction 0.03
fi
echo "== training (log: $WORK/train/train_log.jsonl)"
"$L2C" clip pretrain --config stage2/configs/clip_demo_pretrain.yaml \
  "run.output_dir=$WORK/train" "data.train=$WORK/data/retrieval/karpathy.json" \
  "data.dense=$WORK/data/captions/train.jsonl" "data.image_root=$WORK/data/images" "$@"
echo "== held-out metrics (the corpus's test split)"
"$L2C" clip eval --model "$WORK/train/model" --data "$WORK/data" --probe-train 2000 --out "$WORK/heldout.json"
echo "== packing $OUT"
"$VPY" scripts/pack_demo_clip.py --run "$WORK/train" --heldout "$WORK/heldout.json" --data "$WORK/data" --out "$OUT"
