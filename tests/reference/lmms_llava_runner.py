"""lmms-eval's command line (``python -m lmms_eval ARGS``) in the consumers' environment (transformers
4.37.2, the original LLaVA code, lmms-eval installed ``--no-deps``), for lmms-eval's own ``llava`` model
on the original-format export. Nothing from l2c_llava (it is not installed there).

Usage: ``python lmms_llava_runner.py RECORD.json [--exact-ids] [--float32] -- LMMS_EVAL_ARGS...``

Nothing of lmms-eval or LLaVA is changed on disk; this file wraps two names in the process:

- always (observation only): ``tokenizer_image_token`` as lmms-eval's ``llava`` module imported it
  is wrapped to write every prompt's token ids to RECORD.json, with the dtype the model was loaded in;
- ``--exact-ids``: the wrapped name gives the training tokenization instead, the whole prompt
  through the export's tokenizer (``<image>`` is a token in it) with the ``<image>`` id replaced by
  ``IMAGE_TOKEN_INDEX`` (-200); LLaVA's ``tokenizer_image_token`` tokenizes the text after the image
  as a fresh sequence, so SentencePiece puts one extra ``▁`` right after the image tokens
  (mllm/README.md, "The token after the image");
- ``--float32``: the model LLaVA's loader gives in float16 is cast to float32 (the weights are
  float16-exact: the same numbers), and the pixels lmms-eval casts to float16 go back to float32
  before the vision tower (LLaVA's tower returns its features in the pixels' dtype, which the
  float32 projector would refuse); the pixels keep lmms-eval's float16 rounding.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    sep = sys.argv.index("--")
    record_path, flags, lmms_args = sys.argv[1], set(sys.argv[2:sep]), sys.argv[sep + 1 :]
    unknown = flags - {"--exact-ids", "--float32"}
    if unknown:
        raise SystemExit(f"lmms_llava_runner: unknown flags {sorted(unknown)}")
    import torch
    from lmms_eval.models.simple import llava as lmms_llava

    record: dict = {"prompts": [], "flags": sorted(flags)}
    llava_tokenizer_image_token = lmms_llava.tokenizer_image_token
    image_index = lmms_llava.IMAGE_TOKEN_INDEX

    def exact_ids(prompt, tokenizer, image_token_index=image_index, return_tensors=None):
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        ids = [image_token_index if i == image_id else i for i in tokenizer(prompt).input_ids]
        return torch.tensor(ids, dtype=torch.long) if return_tensors == "pt" else ids

    tokenize = exact_ids if "--exact-ids" in flags else llava_tokenizer_image_token

    def recorded(prompt, tokenizer, image_token_index=image_index, return_tensors=None):
        ids = tokenize(prompt, tokenizer, image_token_index, return_tensors=return_tensors)
        as_list = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        record["prompts"].append({"prompt": prompt, "ids": as_list})
        return ids

    lmms_llava.tokenizer_image_token = recorded

    load = lmms_llava.load_pretrained_model

    def loaded(*args, **kwargs):
        tokenizer, model, image_processor, max_length = load(*args, **kwargs)
        record["dtype_loaded"] = str(next(model.parameters()).dtype)
        if "--float32" in flags:
            model = model.float()
            encode = model.encode_images
            model.encode_images = lambda images: encode(images.float())
        record["dtype_run"] = str(next(model.parameters()).dtype)
        record["tokenizer_class"] = type(tokenizer).__name__
        return tokenizer, model, image_processor, max_length

    lmms_llava.load_pretrained_model = loaded

    from lmms_eval.cli.dispatch import main as lmms_main

    sys.argv = ["lmms_eval", *lmms_args]
    try:
        lmms_main()
    finally:
        with open(record_path, "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main()
