#!/usr/bin/env bash
# README command 1: set up the environment (idempotent) and run the main job on the embedded default:
# `l2c pipeline --config pipeline/configs/demo.yaml`, every step for both encoders (the demo baseline
# CLIP and LLM2CLIP): the embedded dataset, stage 1 on SmolLM2-135M, the baseline CLIP, the stage-2
# text cache, stage 2, retrieval, exports, LLaVA-1.5 pretrain + finetune on each encoder, lmms-eval on
# each, then runs/demo/report.md with its plots.
# A finished step is skipped on the next run, a changed input re-runs that step and what follows, a
# killed step resumes from its last checkpoint.
# Environment: L2C_DEMO_DIR (output folder, default runs/demo), L2C_DEMO_IMAGES (default: the config's 900; the 1,200- and 4,000-image sizings are pipeline/configs/demo_1200.yaml and demo_4k.yaml);
# extra arguments are pipeline overrides, e.g. `bash scripts/demo.sh eval.limit=50`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VPY="$(bash "$ROOT/scripts/setup_env.sh" | tail -n 1)"
L2C="$(dirname "$VPY")/l2c"
cd "$ROOT"
OUT="${L2C_DEMO_DIR:-runs/demo}"
EXTRA=()
if [ -n "${L2C_DEMO_IMAGES:-}" ]; then EXTRA+=("data.synth_images=$L2C_DEMO_IMAGES"); fi

start=$SECONDS
echo "== validating every shipped config"
"$L2C" validate stage1/configs/*.yaml stage2/configs/*.yaml mllm/configs/*.yaml pipeline/configs/*.yaml
"$L2C" pipeline --config pipeline/configs/demo.yaml "run.output_dir=$OUT" ${EXTRA[@]+"${EXTRA[@]}"} "$@"
echo "== done in $((SECONDS - start)) s; the report: $OUT/report.md (plots in $OUT/plots/)"
