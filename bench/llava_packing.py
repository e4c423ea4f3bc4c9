"""Padding-free LLaVA training: padded micro-batches vs the same samples packed into rows
(``data.packing``: position_ids restarting per sample, no attention mask, ``use_cache=False``), in rows
as wide as the micro-batch's longest sample (what the recipe does) and in rows up to ``max_length``.

The demo's LLaVA (SmolLM2-135M from the embedded GGUF + a demo-size vision tower of random weights),
real rows of the embedded dataset, both stages as the demo trains them (bf16 autocast on a CPU with
native bf16): pretrain (plain template, projector only, batch 8, ``max_length`` 512) and finetune
(vicuna_v1, projector + LoRA r 16 on the LLM, batch 4, ``max_length`` 384).
Micro-batches are drawn in the recipe's order (LLaVA's modality-grouped sampler on one process). The
two layouts run interleaved on the same samples (padded, packed, padded, packed ...), forward and
backward, so machine noise hits both alike.

Reports per layout: median step time, positions computed, the padding share, the loss difference
(the same samples: it must be ~0), and seconds per 1,000 real tokens for each micro-batch, whose
spread across micro-batches shows whether the step time follows the real tokens (packed) or the
longest row (padded).

Needs the embedded dataset (``l2c data synth --out DIR``); default runs/demo/data.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def demo_llava():
    """(model, processor): the demo's LLaVA, SmolLM2-135M from the embedded GGUF with a demo-size
    vision tower of random weights (224 px, 32-px patches, width 256, 6 layers: 49 image tokens)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from l2c_llava.mllm.build import build_llava

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        CLIPVisionModel(
            CLIPVisionConfig(
                image_size=224,
                patch_size=32,
                hidden_size=256,
                intermediate_size=1024,
                num_hidden_layers=6,
                num_attention_heads=4,
            )
        ).save_pretrained(tmp)
        return build_llava(
            tmp, SimpleNamespace(name_or_path="embedded:smollm2-135m-instruct", torch_dtype="float32")
        )


def demo_trainable(model, stage: str) -> None:
    """Train what the demo trains: the projector (pretrain), the projector and LoRA r 16 on the LLM's
    q/v projections (finetune; injected once); train mode."""
    for name, p in model.named_parameters():
        p.requires_grad_("multi_modal_projector" in name or "lora_" in name)
    if stage == "finetune" and not any("lora_" in name for name, _ in model.named_parameters()):
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(
            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
            model.model.language_model,
        )
    model.train()


def run(data: str = "runs/demo/data", batches: int = 6, warmup: int = 1) -> dict:
    from l2c_llava.data.readers import read_llava_json
    from l2c_llava.losses import supervised_loss
    from l2c_llava.mllm.build import num_image_tokens
    from l2c_llava.mllm.data import Collate, LlavaDataset, ModalityLengthSampler, PackedCollate
    from l2c_llava.models.llm import cpu_has_native_bf16

    root = Path(data)
    model, processor = demo_llava()
    n_img = num_image_tokens(model.config.vision_config)
    pad_id = processor.tokenizer.pad_token_id
    bf16 = cpu_has_native_bf16()
    out: dict = {"threads": torch.get_num_threads(), "autocast_bf16": bf16, "micro_batches": batches}
    for stage, file, template, max_len, batch in (
        ("pretrain", "pretrain.json", "plain", 512, 8),
        ("finetune", "instruct.json", "vicuna_v1", 384, 4),
    ):
        rows = read_llava_json(
            root / "llava" / file, root / "images", on_bad_row="skip", image_check="exists"
        )
        ds = LlavaDataset(rows.items, processor, template, max_len, n_img, model.config.image_token_id)
        order = list(ModalityLengthSampler(ds.lengths, batch, 1, seed=42))
        samples = [[ds[i] for i in order[b * batch : (b + 1) * batch]] for b in range(warmup + batches)]
        layouts = {
            "padded": Collate(pad_id),
            "packed": PackedCollate(pad_id),  # rows as wide as the longest sample (the recipe's)
            f"packed_{max_len}": PackedCollate(pad_id, max_len),  # rows up to max_length
        }
        demo_trainable(model, stage)
        rec: dict[str, list] = {k: [] for k in layouts}
        for i, group in enumerate(samples):
            real = sum(len(s["input_ids"]) for s in group)
            for name, collate in layouts.items():
                b = collate(group)
                b.pop("num_tokens", None)
                amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
                t0 = time.perf_counter()
                with amp:
                    loss = supervised_loss(model, b, use_cache=False)
                loss.backward()
                dt = time.perf_counter() - t0
                model.zero_grad(set_to_none=True)
                if i >= warmup:
                    rec[name].append((dt, real, b["input_ids"].numel(), float(loss)))
        stats = {}
        for name, r in rec.items():
            per_k = [dt / real * 1000 for dt, real, _, _ in r]
            stats[name] = {
                "median_step_s": round(statistics.median(dt for dt, *_ in r), 3),
                "positions": sum(n for _, _, n, _ in r),
                "padding_share": round(1 - sum(x for _, x, _, _ in r) / sum(n for _, _, n, _ in r), 3),
                "s_per_1k_real_tokens": {
                    "median": round(statistics.median(per_k), 3),
                    "min": round(min(per_k), 3),
                    "max": round(max(per_k), 3),
                },
            }
        stats["real_tokens"] = sum(x for _, x, _, _ in rec["packed"])
        for name in list(layouts)[1:]:
            stats[f"max_loss_diff_{name}"] = max(abs(a[3] - b[3]) for a, b in zip(rec["padded"], rec[name]))
            stats[f"speedup_{name}"] = round(
                stats["padded"]["median_step_s"] / stats[name]["median_step_s"], 2
            )
        out[stage] = stats
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(*sys.argv[1:2]), indent=2))
