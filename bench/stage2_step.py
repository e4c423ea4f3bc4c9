"""Stage-2 training step: cached LLM features vs plain CLIP fine-tuning vs LLM features computed online.

Same vision tower (the demo CLIP's: ViT 4 x 192 at 224 px / patch 32), same batch, same optimizer, run
side by side and interleaved (A B C A B C ...) so machine noise hits all three alike:

- ``cached``: stage 2 as built: vision tower + adapter on cached caption features (the text side is a
  lookup and a small MLP);
- ``clip``: plain CLIP fine-tuning of the same tower with a CLIP text tower (4 x 256, 77 tokens);
- ``online``: stage 2 without the cache: each step embeds its captions with the frozen LLM
  (SmolLM2-135M, no gradient) before the adapter.

Reports the median step time of each and the ratios cached/clip (target <= 1.15: the text side must
cost almost nothing) and online/cached (what the cache saves).
"""

from __future__ import annotations

import statistics
import time

import torch

SHORT = "three purple pentagons and an orange star on a mint background"
LONG = (
    "This picture presents a simple composition of four geometric objects placed on a mint background with a "
    "subtle checkerboard pattern. A medium outlined orange star can be seen at the top. In the top left corner "
    "sits a small solid purple pentagon, next to two more purple pentagons of the same size. On the right side "
    "there is a large red circle, slightly tilted, and below it a small green square with a thin outline. The "
    "objects are evenly spaced and nothing overlaps; the background fills the rest of the frame."
)


def _vision_tower(image_size=224, patch=32, width=192, layers=4, heads=3):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    torch.manual_seed(0)
    return CLIPVisionModel(cfg)


def run(batch: int = 32, steps: int = 6, warmup: int = 1, online: bool = True) -> dict:
    from types import SimpleNamespace

    from l2c_llava.embedded import clip_tokenizer
    from l2c_llava.losses import clip_loss
    from l2c_llava.stage2.clip_baseline import ClipEmbedder, build_clip
    from l2c_llava.stage2.model import LLM2CLIPModel

    torch.set_num_threads(torch.get_num_threads())
    pixels = torch.randn(batch, 3, 224, 224)
    texts = [SHORT if i % 2 else LONG for i in range(batch)]  # dense_share 0.5, as the demo trains

    encoder = None
    if online:
        from l2c_llava.stage1.encoder import TextEncoder

        encoder = TextEncoder.from_pretrained("embedded:smollm2-135m-instruct", torch_dtype="float32")
        text_dim = encoder.encode(texts[:2]).shape[-1]
    else:
        text_dim = 576
    cached = torch.randn(batch, text_dim)

    llm2clip = LLM2CLIPModel.from_vision_tower(_vision_tower(), text_dim, projection_dim=256, num_blocks=4)
    tok = clip_tokenizer()
    m = SimpleNamespace(
        text_width=256,
        text_layers=4,
        text_heads=4,
        context_length=77,
        projection_dim=256,
        image_size=224,
        patch_size=32,
        vision_width=192,
        vision_layers=4,
        vision_heads=3,
        mlp_ratio=4,
        attn_implementation="sdpa",
    )
    clip = ClipEmbedder(build_clip(m, tok))
    enc = tok(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    opt_a = torch.optim.AdamW(llm2clip.parameters(), lr=1e-5)
    opt_b = torch.optim.AdamW(clip.parameters(), lr=1e-5)

    def step_cached(features=None):
        img, txt, s = llm2clip(pixels, cached if features is None else features)
        loss = clip_loss(img, txt, s)
        loss.backward()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)

    def step_clip():
        img, txt, s = clip(pixels, enc["input_ids"], enc["attention_mask"])
        loss = clip_loss(img, txt, s)
        loss.backward()
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)

    def step_online():
        with torch.no_grad():
            feats = encoder.encode(texts, batch_size=batch, show_progress=False)
        step_cached(feats)

    variants = {"cached": step_cached, "clip": step_clip}
    if online:
        variants["online"] = step_online
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + steps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "batch": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "median_step_s": {k: round(v, 4) for k, v in med.items()},
        "ratio_cached_over_clip": round(med["cached"] / med["clip"], 3),
    }
    if online:
        out["ratio_online_over_cached"] = round(med["online"] / med["cached"], 3)
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
