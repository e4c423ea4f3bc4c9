#!/usr/bin/env bash
# The reference environment for stage 1: llm2vec 0.2.3 next to transformers 4.44.2 (llm2vec does not
# import on transformers 5), torch pinned to the same 2.13.0. Used by the parity test and bench/.
# Idempotent (stamp of this file). Prints the venv's python on its last line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${L2C_LLM2VEC_VENV:-$ROOT/.venv-llm2vec}"
PY="${PYTHON:-python3}"
STAMP="$(sha256sum "$ROOT/scripts/setup_llm2vec_env.sh" | cut -d' ' -f1)"
VPY="$VENV/bin/python"
if [[ -x "$VPY" && -f "$VENV/.stamp" && "$(cat "$VENV/.stamp")" == "$STAMP" ]]; then
  echo "$VPY"; exit 0
fi
echo "[setup-llm2vec] building $VENV (torch 2.13.0, transformers 4.44.2, peft 0.13.2, llm2vec 0.2.3)" >&2
[[ -x "$VPY" ]] || "$PY" -m venv "$VENV"
echo "torch==2.13.0" > "$VENV/constraints.txt"
pip_install() {
  PIP_CONSTRAINT="$VENV/constraints.txt" "$VPY" -m pip --disable-pip-version-check -q install "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install "torch==2.13.0" "transformers==4.44.2" "peft==0.13.2" "gguf>=0.10" "numpy<2.3" tqdm safetensors sentencepiece
# llm2vec's other requirements (datasets, evaluate, scikit-learn) serve its training scripts, not LLM2Vec.encode
pip_install --no-deps "llm2vec==0.2.3"
"$VPY" -c "import llm2vec, transformers; print('[setup-llm2vec] llm2vec ok, transformers', transformers.__version__)" >&2
echo "$STAMP" > "$VENV/.stamp"
echo "$VPY"
