"""LLaVA data pipeline: is data ever the bottleneck, and how much padding does length grouping save?

- collation: rows per second of the dataset + collate (JSON row -> image decode, pad-to-square,
  CLIP preprocessing, tokenisation with the label mask, padding) in the training process, against the
  rows per second of a training step of the embedded LLaVA (SmolLM2-135M + a demo-size vision tower,
  full finetune, forward + backward + AdamW) at the same batch;
- padding waste of the instruction mix cut into batches, in random order vs LLaVA's modality- and
  length-grouped order.

Needs the embedded dataset (``l2c data synth``); default runs/demo/data.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def run(data: str = "runs/demo/data", batch: int = 8, batches: int = 6, model_steps: int = 3) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from l2c_llava.data.readers import read_llava_json
    from l2c_llava.mllm.build import build_llava, num_image_tokens
    from l2c_llava.mllm.data import Collate, LlavaDataset, ModalityLengthSampler, padding_waste

    root = Path(data)
    rows = read_llava_json(
        root / "llava" / "instruct.json", root / "images", on_bad_row="skip", image_check="exists"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CLIPVisionConfig(
            image_size=224,
            patch_size=32,
            hidden_size=192,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=3,
        )
        CLIPVisionModel(cfg).save_pretrained(tmp)
        model, processor = build_llava(
            tmp, SimpleNamespace(name_or_path="embedded:smollm2-135m-instruct", torch_dtype="float32")
        )
    n_img = num_image_tokens(model.config.vision_config)
    ds = LlavaDataset(rows.items, processor, "vicuna_v1", 384, n_img, model.config.image_token_id)
    collate = Collate(processor.tokenizer.pad_token_id)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    data_s, step_s, tokens = [], [], []
    for b in range(batches):
        t0 = time.perf_counter()
        items = collate([ds[i] for i in order[b * batch : (b + 1) * batch]])
        data_s.append(time.perf_counter() - t0)
        tokens.append(int(items["attention_mask"].sum()))
    for name, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in name)  # the recipe's finetune: projector + LLM
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    for b in range(model_steps + 1):
        items = collate([ds[i] for i in order[b * batch : (b + 1) * batch]])
        t0 = time.perf_counter()
        model(**items).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if b:  # the first step warms up
            step_s.append(time.perf_counter() - t0)
    d, s = statistics.median(data_s), statistics.median(step_s)
    lengths = ds.lengths
    grouped = list(ModalityLengthSampler(lengths, batch, 1, 0))
    # LLaVA sorts by length within mega-batches of batch x world: on 8 GPUs each device's batch is a
    # run of 8 similar lengths out of 64; on one process the mega-batch is the batch itself
    grouped8 = list(ModalityLengthSampler(lengths, batch, 8, 0))
    return {
        "rows": len(ds),
        "batch": batch,
        "collate_rows_per_s": round(batch / d, 1),
        "model_step_rows_per_s": round(batch / s, 2),
        "data_time_share_of_step": round(d / s, 4),
        "padding_waste_random": round(padding_waste(order, lengths, batch), 4),
        "padding_waste_grouped": round(padding_waste(grouped, lengths, batch), 4),
        "padding_waste_grouped_8_processes": round(padding_waste(grouped8, lengths, batch), 4),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
