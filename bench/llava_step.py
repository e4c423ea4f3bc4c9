"""LLaVA training step: the LM head on every position vs on the supervised positions only.

transformers' LLaVA computes the vocabulary logits (and their float32 copy in the loss) at every
position, though a row supervises only its caption or its answers: the image tokens, the prompt and
the padding carry no label. ``l2c_llava.losses.supervised_loss`` passes a boolean
``logits_to_keep`` mask so the LM head runs on the supervised positions only, with the same loss and
gradients (tests/test_mllm.py checks them).

The embedded LLaVA (SmolLM2-135M, 49k vocabulary, + a demo-size vision tower), real rows of the
embedded dataset, both stages as the recipe trains them: pretrain (plain template, projector only)
and finetune (vicuna_v1, projector + full LLM, AdamW). The two variants run interleaved on the same
batches (A B A B ...) so machine noise hits both alike. Reports the median step time of each, the
ratio kept / all, the share of positions kept and the size of the float32 logits each variant holds.

Needs the embedded dataset (``l2c data synth``); default runs/demo/data.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def run(data: str = "runs/demo/data", batch: int = 8, steps: int = 4, warmup: int = 1) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from l2c_llava.data.readers import read_llava_json
    from l2c_llava.losses import _mask_slicing, supervised_loss
    from l2c_llava.mllm.build import build_llava, num_image_tokens
    from l2c_llava.mllm.conversation import IGNORE
    from l2c_llava.mllm.data import Collate, LlavaDataset

    root = Path(data)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CLIPVisionConfig(
            image_size=224,
            patch_size=32,
            hidden_size=192,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=3,
        )
        torch.manual_seed(0)
        CLIPVisionModel(cfg).save_pretrained(tmp)
        model, processor = build_llava(
            tmp, SimpleNamespace(name_or_path="embedded:smollm2-135m-instruct", torch_dtype="float32")
        )
    n_img = num_image_tokens(model.config.vision_config)
    vocab = model.config.text_config.vocab_size
    collate = Collate(processor.tokenizer.pad_token_id)
    out = {
        "batch": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "mask_slicing": _mask_slicing(),
    }
    for stage, file, template, max_len in (
        ("pretrain", "pretrain.json", "plain", 512),
        ("finetune", "instruct.json", "vicuna_v1", 384),
    ):
        rows = read_llava_json(
            root / "llava" / file, root / "images", on_bad_row="skip", image_check="exists"
        )
        items = [r for r in rows.items if r.has_image]
        ds = LlavaDataset(items, processor, template, max_len, n_img, model.config.image_token_id)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
        batches = [
            collate([ds[i] for i in order[b * batch : (b + 1) * batch]]) for b in range(warmup + steps)
        ]
        for name, p in model.named_parameters():  # the recipe: pretrain the projector, finetune + the LLM
            p.requires_grad_(
                "multi_modal_projector" in name or (stage == "finetune" and "vision_tower" not in name)
            )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        model.train()
        times: dict[str, list[float]] = {"all": [], "kept": []}
        for i, b in enumerate(batches):
            for name in times:
                t0 = time.perf_counter()
                supervised_loss(model, b, only_supervised=name == "kept").backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        positions = sum(b["labels"].numel() for b in batches)
        kept = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        per_batch = len(batches)
        out[stage] = {
            "median_step_s": {k: round(v, 3) for k, v in med.items()},
            "ratio_kept_over_all": round(med["kept"] / med["all"], 3),
            "positions_kept_share": round(kept / positions, 3),
            "float32_logits_mb_per_batch": {
                "all": round(positions / per_batch * vocab * 4 / 2**20, 1),
                "kept": round(kept / per_batch * vocab * 4 / 2**20, 1),
            },
        }
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
