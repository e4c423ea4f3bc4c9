"""``python -m l2c_llava.mllm.lmms_entry ARGS``: lmms-eval's command line with transformers' image
processors pinned to the PIL backend, the one training, ``l2c mllm chat`` and the exports use.

transformers 5 picks the torchvision backend wherever torchvision is installed (every GPU node), and
it resizes differently from PIL; the saved processor cannot name a backend, so the choice is made
here, in the process lmms-eval runs in (``l2c mllm eval`` starts it this way). An explicit
``backend=`` / ``use_fast=`` from a caller is still honoured.

It also names the project's batched model, ``l2c_llava`` (:mod:`l2c_llava.mllm.lmms_model`), to
lmms-eval: :func:`lmms_eval_models` is the ``lmms_eval.models`` entry point of ``pyproject.toml``,
which lmms-eval reads when it starts; an environment installed before that entry point existed (its
metadata has none until the package is reinstalled) gets the same manifest registered here.
"""

from __future__ import annotations

import runpy
import sys


def pin_pil_backend() -> None:
    from transformers.models.auto import image_processing_auto as auto

    if getattr(auto._resolve_backend, "_l2c_pil", False):
        return
    resolve = auto._resolve_backend

    def resolve_pil_first(backend, use_fast, base_class_name):
        if backend is None and use_fast is None:
            backend = "pil"
        return resolve(backend, use_fast, base_class_name)

    resolve_pil_first._l2c_pil = True
    auto._resolve_backend = resolve_pil_first


MODEL_NAME = "l2c_llava"


def lmms_eval_models():
    """The ``lmms_eval.models`` entry point: the ``l2c_llava`` model, a chat class (lmms-eval's default
    resolution) and a simple one (``--force_simple``; loglikelihood / multiple-choice tasks)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=MODEL_NAME,
            simple_class_path="l2c_llava.mllm.lmms_model.L2CLlava",
            chat_class_path="l2c_llava.mllm.lmms_model.L2CLlavaChat",
        )
    ]


def register_models() -> None:
    """``l2c_llava`` in lmms-eval's registry where the installed metadata predates the entry point."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    if MODEL_NAME not in MODEL_REGISTRY_V2.list_model_names():
        for manifest in lmms_eval_models():
            MODEL_REGISTRY_V2.register_manifest(manifest)


def main(argv: list[str] | None = None) -> None:
    pin_pil_backend()
    register_models()
    sys.argv = ["lmms_eval", *(sys.argv[1:] if argv is None else argv)]
    runpy.run_module("lmms_eval", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
