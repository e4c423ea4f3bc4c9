"""``python -m l2c_llava.mllm.lmms_entry ARGS``: lmms-eval's command line with transformers' image
processors pinned to the PIL backend, the one training, ``l2c mllm chat`` and the exports use.

transformers 5 picks the torchvision backend wherever torchvision is installed (every GPU node), and
it resizes differently from PIL; the saved processor cannot name a backend, so the choice is made
here, in the process lmms-eval runs in (``l2c mllm eval`` starts it this way). An explicit
``backend=`` / ``use_fast=`` from a caller is still honoured.
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


def main(argv: list[str] | None = None) -> None:
    pin_pil_backend()
    sys.argv = ["lmms_eval", *(sys.argv[1:] if argv is None else argv)]
    runpy.run_module("lmms_eval", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
