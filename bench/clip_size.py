"""What a demo-world CLIP of each candidate size costs per training image on this machine.

The pretrained demo CLIP (``stage2/configs/clip_demo_pretrain.yaml``) has to be trained once on 2 CPU
cores, and then every demo run pays for its image tokens again (stage 2 fine-tunes the tower; each
LLaVA reads one token per patch). This times one CLIP training step (image + text tower, the CLIP
loss, backward, AdamW) for each candidate, side by side in one process, and reports images per second
and the ratio to the first candidate, with the tokens per image a LLaVA on that tower reads.

    python bench/clip_size.py [--batch 64] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

CANDIDATES = {
    # name: image_size, patch_size, vision_width, vision_layers, vision_heads
    "224/32 w192 d4 (old demo)": (224, 32, 192, 4, 3),
    "224/32 w256 d6": (224, 32, 256, 6, 4),
    "224/16 w256 d6": (224, 16, 256, 6, 4),
    "160/16 w256 d6": (160, 16, 256, 6, 4),
    "224/28 w256 d6": (224, 28, 256, 6, 4),
    "224/32 w384 d6": (224, 32, 384, 6, 6),
}


def model_section(image_size: int, patch: int, width: int, layers: int, heads: int) -> SimpleNamespace:
    return SimpleNamespace(
        image_size=image_size,
        patch_size=patch,
        vision_width=width,
        vision_layers=layers,
        vision_heads=heads,
        text_width=256,
        text_layers=4,
        text_heads=4,
        context_length=77,
        mlp_ratio=4,
        projection_dim=256,
        attn_implementation="sdpa",
    )


def run(batch: int = 64, steps: int = 3, text_tokens: int = 60) -> dict:
    import torch.nn.functional as F

    from l2c_llava.embedded import clip_tokenizer
    from l2c_llava.stage2.clip_baseline import ClipEmbedder, build_clip

    tok = clip_tokenizer()
    out, base = {}, None
    for name, spec in CANDIDATES.items():
        torch.manual_seed(0)
        model = ClipEmbedder(build_clip(model_section(*spec), tok))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        px = torch.randn(batch, 3, spec[0], spec[0])
        ids = torch.randint(0, len(tok), (batch, text_tokens))
        mask = torch.ones_like(ids)
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            img, txt, scale = model(px, ids, mask)
            logits = scale * img @ txt.T
            labels = torch.arange(batch)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - t0)
        ips = batch / (sum(times) / len(times))
        base = base or ips
        vision_params = sum(p.numel() for p in model.clip.vision_model.parameters())
        out[name] = {
            "images_per_s": round(ips, 1),
            "ratio_to_first": round(ips / base, 3),
            "llava_tokens_per_image": (spec[0] // spec[1]) ** 2,
            "vision_params_M": round(vision_params / 1e6, 2),
        }
        print(name, out[name], flush=True)
    return {"batch": batch, "steps": steps, "threads": torch.get_num_threads(), "candidates": out}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    print(json.dumps(run(a.batch, a.steps), indent=2))
