"""Functions of the local lmms-eval tasks (l2c_vqa, l2c_pope, l2c_caption).

`l2c mllm eval` copies this folder next to the run, writes each task's rows as JSONL with the image
path resolved under the image root (``image_path``), and points the task YAMLs at those files. The
rows come from the embedded dataset's eval splits (or any data in the same formats).
"""

from __future__ import annotations

from PIL import Image

from l2c_llava.mllm.lmms import (  # the scoring lives in the package, where it is tested
    caption_bleu4,
    caption_process_results,
    pope_f1,
    pope_process_results,
    vqa_process_results,
)

# LLaVA-1.5 "pad": square with the CLIP mean colour (lmms-eval's llava_hf only resizes)
CLIP_MEAN = (122, 116, 104)

__all__ = [
    "caption_bleu4",
    "caption_process_results",
    "pope_f1",
    "pope_process_results",
    "vqa_process_results",
]


def doc_to_visual(doc):
    image = Image.open(doc["image_path"]).convert("RGB")
    w, h = image.size
    if w == h:
        return [image]
    side = max(w, h)
    square = Image.new("RGB", (side, side), CLIP_MEAN)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return [square]


def question_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question'].strip()}{kw.get('post_prompt', '')}"


def caption_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return kw.get("prompt", "Describe the image briefly.")


def caption_target(doc):
    return doc["references"][0]
