#!/usr/bin/env bash
# The consumers' environments of the compatibility matrix (tests/test_compat_matrix.py): torch pinned
# to the same 2.13.0 (CPU) next to an older transformers, as the users of the exports run them.
#   4.37.2  LLaVA's own pin (haotian-liu/LLaVA main): tokenizers 0.15.1, sentencepiece, and the
#           original LLaVA code itself (llava-torch 1.2.2.post1, installed --no-deps: its metadata pins
#           torch 2.0.1 / torchvision / bitsandbytes / gradio, none of which its loader imports), and
#           lmms-eval (the version scripts/setup_env.sh installs, --no-deps, with pyproject's `eval`
#           extra: what it imports) for its own `llava` model on the original-format export
#           (tests/test_lmms_llava_original.py). lmms-eval's metadata asks transformers >= 4.39.2,
#           which LLaVA's code does not run on (its generate fails from 4.38); its `llava` model and
#           evaluator run on 4.37.2 as they are
#   4.44.2  the llm2vec / LLM2CLIP era
#   vision  open_clip and timm (pyproject's `vision-consumers` extra) for the open_clip / timm exports
#           (tests/test_vision_consumers.py). Both import torchvision, whose wheels on the index are
#           built against the CUDA build of torch 2.13.0 (its _C.so links libtorch_cuda): so this one
#           environment takes that build (pinned `torch==2.13.0` but not `2.13.0+cpu`) with
#           torchvision 0.28.0, the pair the libraries' users install; it runs on the CPU. About 3 GB
#           to download and 5 GB on disk, once.
# Usage: setup_compat_env.sh 4.37.2|4.44.2|vision. Builds .venv-compat-tf437 / .venv-compat-tf444 /
# .venv-compat-vision once (idempotent: stamp of this file); prints the venv's python on its last line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${1:?usage: setup_compat_env.sh 4.37.2|4.44.2|vision}"
case "$VERSION" in
  4.37.2) TAG=tf437; PKGS=("transformers==4.37.2" "tokenizers==0.15.1" "accelerate==0.27.2" "numpy<2")
    # the `eval` extra's packages (pyproject.toml, the one list) beside LLaVA's pins, and lmms-eval's
    # version from the project's own set-up (one pin)
    mapfile -t EVAL < <(awk '/^eval = \[/{f=1} f{print} f&&/\]/{exit}' "$ROOT/pyproject.toml" | grep -o '"[^"]*"' | tr -d '"')
    LMMS_EVAL="$(grep -o 'lmms-eval==[0-9.]*' "$ROOT/scripts/setup_env.sh" | head -1)"
    [[ ${#EVAL[@]} -gt 0 && -n "$LMMS_EVAL" ]] || { echo "setup_compat_env.sh: no eval extra / lmms-eval pin found" >&2; exit 2; }
    # pyarrow (datasets' backend): the newest (26) imports only beside numpy >= 2, kept out here; 21 works
    PKGS+=("${EVAL[@]}" "pyarrow<22");;
  4.44.2) TAG=tf444; PKGS=("transformers==4.44.2" "tokenizers>=0.19,<0.20" "accelerate==0.33.0" "numpy<2.3");;
  vision) TAG=vision
    # the extra's pins, read from pyproject.toml (the one list of dependencies)
    mapfile -t PKGS < <(sed -n 's/^vision-consumers = \[\(.*\)\]$/\1/p' "$ROOT/pyproject.toml" | tr ',' '\n' | tr -d ' "')
    [[ ${#PKGS[@]} -gt 0 ]] || { echo "setup_compat_env.sh: no vision-consumers extra in pyproject.toml" >&2; exit 2; }
    PKGS+=("torchvision==0.28.0");;
  *) echo "setup_compat_env.sh: unsupported consumer $VERSION (4.37.2, 4.44.2 or vision)" >&2; exit 2;;
esac
VENV="$ROOT/.venv-compat-$TAG"
PY="${PYTHON:-python3}"
STAMP="$(cat "$ROOT/scripts/setup_compat_env.sh" <(printf '%s\n' "${PKGS[@]}") | sha256sum | cut -d' ' -f1)"
VPY="$VENV/bin/python"
if [[ -x "$VPY" && -f "$VENV/.stamp" && "$(cat "$VENV/.stamp")" == "$STAMP" ]]; then
  echo "$VPY"; exit 0
fi
echo "[setup-compat] building $VENV (torch 2.13.0, $VERSION)" >&2
[[ -x "$VPY" ]] || "$PY" -m venv "$VENV"
echo "torch==2.13.0" > "$VENV/constraints.txt"
# torchvision's wheels link the CUDA build of torch: the CPU build beside them fails at import
[[ "$TAG" == vision ]] && echo "torch!=2.13.0+cpu" >> "$VENV/constraints.txt"
pip_install() {
  PIP_CONSTRAINT="$VENV/constraints.txt" "$VPY" -m pip --disable-pip-version-check -q install "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if [[ "$TAG" == vision ]]; then
  pip_install "torch==2.13.0" "${PKGS[@]}" safetensors pillow
else
  pip_install "torch==2.13.0" "${PKGS[@]}" safetensors sentencepiece protobuf pillow
fi
if [[ "$TAG" == vision ]]; then
  "$VPY" -c "import torch, torchvision, open_clip, timm; print('[setup-compat] torch', torch.__version__, 'torchvision', torchvision.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__)" >&2
elif [[ "$TAG" == tf437 ]]; then
  # the original LLaVA code; its loader path imports only transformers, torch, PIL (and accelerate)
  pip_install --no-deps "llava-torch==1.2.2.post1" "$LMMS_EVAL"
  "$VPY" -c "from llava.model.builder import load_pretrained_model; import transformers, lmms_eval.evaluator; print('[setup-compat] llava ok, lmms-eval ok, transformers', transformers.__version__)" >&2
else
  "$VPY" -c "import transformers; print('[setup-compat] transformers', transformers.__version__)" >&2
fi
echo "$STAMP" > "$VENV/.stamp"
echo "$VPY"
