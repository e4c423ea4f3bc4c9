#!/usr/bin/env bash
# README command 1: set up the environment (idempotent) and run the main job on the embedded default.
#
# Today the main job is what has landed: the embedded dataset (1,000 procedurally drawn images with
# short/dense captions, retrieval sets, LLaVA pretrain/instruction rows and VQA/POPE eval splits, in
# the real formats), the validation of every shipped config, stage 1 on the embedded SmolLM2, the
# demo CLIP baseline, stage 2 (text feature cache, training, retrieval eval against the baseline),
# the exports of the upgraded encoder, and LLaVA-1.5 (pretrain, finetune, held-out VQA) on each of
# the two encoders (L2C_DEMO_MLLM=0 skips that part).
# The steps still missing are listed at the end; once `l2c pipeline` lands this script runs it.
# Environment: L2C_DEMO_DIR (output folder, default runs/demo), L2C_DEMO_IMAGES (default 1000).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VPY="$(bash "$ROOT/scripts/setup_env.sh" | tail -n 1)"
L2C="$(dirname "$VPY")/l2c"
cd "$ROOT"
OUT="${L2C_DEMO_DIR:-runs/demo}"
IMAGES="${L2C_DEMO_IMAGES:-1000}"

start=$SECONDS
S2=("run.output_dir=$OUT/stage2" "text_encoder.path=$OUT/stage1/encoder" "cache.dir=$OUT/stage2/text_features"
    "vision.name_or_path=$OUT/clip/model" "data.train=$OUT/data/captions/train.jsonl" "data.image_root=$OUT/data/images"
    "data.eval_short=$OUT/data/retrieval/karpathy.json" "data.eval_long=$OUT/data/retrieval/long_test.json"
    "data.eval_image_root=$OUT/data/images")
echo "== [1/10] embedded dataset -> $OUT/data"
"$L2C" data synth --out "$OUT/data" --images "$IMAGES" --seed 0
echo "== [2/10] validating every shipped config"
"$L2C" validate stage1/configs/*.yaml stage2/configs/*.yaml mllm/configs/*.yaml
echo "== [3/10] stage 1: SmolLM2-135M -> caption encoder (CRA before/after in $OUT/stage1/metrics.json)"
"$L2C" stage1 --config stage1/configs/demo.yaml "run.output_dir=$OUT/stage1" \
  "data.train=$OUT/data/captions/train.jsonl" "data.eval=$OUT/data/retrieval/karpathy.json" \
  "data.eval_pairs=$OUT/data/captions/test.jsonl"
echo "== [4/10] baseline: a small CLIP trained from scratch on the short captions (no pretrained CLIP here)"
"$L2C" clip pretrain --config stage2/configs/clip_demo.yaml "run.output_dir=$OUT/clip" \
  "data.train=$OUT/data/retrieval/karpathy.json" "data.image_root=$OUT/data/images"
echo "== [5/10] stage 2 text feature cache: every caption embedded once by the stage-1 encoder"
"$L2C" stage2 cache --config stage2/configs/demo.yaml "${S2[@]}"
echo "== [6/10] stage 2: the baseline's vision tower fine-tuned against the cached LLM features"
"$L2C" stage2 train --config stage2/configs/demo.yaml "${S2[@]}"
echo "== [7/10] retrieval: baseline CLIP vs LLM2CLIP, short and long captions ($OUT/stage2/metrics.json)"
"$L2C" stage2 eval --config stage2/configs/demo.yaml "${S2[@]}"
echo "== [8/10] exports: $OUT/export/vision (CLIPVisionModel for LLaVA), $OUT/export/llm2clip (whole model)"
"$L2C" export vision --run "$OUT/stage2" --out "$OUT/export/vision"
"$L2C" export llm2clip --run "$OUT/stage2" --out "$OUT/export/llm2clip"

if [[ "${L2C_DEMO_MLLM:-1}" == 1 ]]; then
  # LLaVA-1.5 on each encoder: the demo baseline CLIP's tower and the LLM2CLIP tower
  for enc in baseline llm2clip; do
    if [[ $enc == baseline ]]; then VT="$OUT/clip/model"; else VT="$OUT/export/vision"; fi
    M=("model.vision_tower=$VT" "data.image_root=$OUT/data/images")
    echo "== [9/10] LLaVA ($enc encoder): pretrain the projector, then finetune projector + LLM"
    "$L2C" mllm pretrain --config mllm/configs/demo_pretrain.yaml "${M[@]}" \
      "run.output_dir=$OUT/mllm/$enc/pretrain" "data.path=$OUT/data/llava/pretrain.json"
    "$L2C" mllm finetune --config mllm/configs/demo_finetune.yaml "${M[@]}" \
      "run.output_dir=$OUT/mllm/$enc/finetune" "data.path=$OUT/data/llava/instruct.json" \
      "model.init_from=$OUT/mllm/$enc/pretrain"
    echo "== [10/10] LLaVA ($enc encoder): held-out short-answer questions ($OUT/mllm/$enc/finetune/vqa_metrics.json)"
    "$L2C" mllm eval-vqa --model "$OUT/mllm/$enc/finetune" --questions "$OUT/data/eval/vqa_test.jsonl" \
      --image-root "$OUT/data/images" --train-json "$OUT/data/llava/instruct.json" \
      --limit "${L2C_DEMO_VQA_QUESTIONS:-210}" > /dev/null
  done
  "$VPY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("VQA accuracy (held-out questions)  model  | answer prior")
for enc in ("baseline", "llm2clip"):
    m = json.load(open(f"{out}/mllm/{enc}/finetune/vqa_metrics.json"))
    print(f"  {enc:9s} {m['accuracy']:.3f} | {m['prior']['accuracy']:.3f}   by type: {m['by_type']}")
PY
fi

missing=()
for step in "pipeline:lmms-eval on both encoders and the comparison report (issue: Evaluation and pipeline)"; do
  cmd="${step%%:*}"
  if ! "$L2C" $cmd --help >/dev/null 2>&1; then missing+=("${step#*:}"); fi
done
echo "== done in $((SECONDS - start)) s; outputs under $OUT/"
if ((${#missing[@]})); then
  echo "Not built yet, so not run:"
  printf '  - %s\n' "${missing[@]}"
fi
