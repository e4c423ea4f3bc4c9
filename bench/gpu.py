"""GPU throughput and memory at the paper's sizes, with random weights (no download):

- ``stage2``: CLIP ViT-L/14-336 + the LLM2CLIP adapter on 4096-d cached caption features, CLIP loss,
  AdamW, bf16 autocast, per-GPU batch 256 (and the largest batch that fits);
- ``stage1``: LoRA (r=16) on an 8B-shaped Llama (Llama-3-8B: 32 layers x 4096, GQA 8, vocab 128K),
  bidirectional attention, mean pooling, contrastive loss on caption pairs of 128 tokens;
- ``llava``: LLaVA-1.5 with a 7B-shaped LLM (Vicuna-7B: 32 x 4096) and ViT-L/14-336 (576 image
  tokens), sequences of 1024 tokens: LoRA (r=128) and full finetune, both with gradient checkpointing.

For each: images or tokens per second, model FLOPs utilisation (6 x trainable-path parameters x tokens
for the matmuls, against the device's dense bf16 peak), peak memory, and the largest batch that fits
(doubling until out of memory). Writes bench/results/gpu-<device>.json and prints a Markdown table to
paste into bench/RESULTS.md.

    python bench/gpu.py                 # on a GPU machine, all three
    python bench/gpu.py --tiny          # CPU, tiny shapes: checks the script runs (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SEARCH_FACTOR = 8  # the largest-batch search goes up to this times the measured batch
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - t0) / iters


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def largest_batch(make_step, device, start: int, limit: int) -> int | None:
    """Double the batch from `start` until a step runs out of memory; the last that ran (None if none)."""
    best, b = None, start
    while b <= limit:
        try:
            step = make_step(b)
            step()
            sync(device)
            best = b
        except Exception as e:  # noqa: BLE001 - OOM shows up as several types
            if not is_oom(e):
                raise
            break
        finally:
            step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        b *= 2
    return best


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------- stage 2
def bench_stage2(device, tiny: bool, batch: int) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from l2c_llava.losses import clip_loss
    from l2c_llava.stage2.model import LLM2CLIPModel

    if tiny:
        vc = CLIPVisionConfig(
            image_size=28,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
        text_dim, proj = 64, 32
    else:  # ViT-L/14-336
        vc = CLIPVisionConfig(
            image_size=336,
            patch_size=14,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
        )
        text_dim, proj = 4096, 1280
    model = LLM2CLIPModel.from_vision_tower(CLIPVisionModel(vc), text_dim, projection_dim=proj).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    params = sum(p.numel() for p in model.vision_model.parameters())
    patches = (vc.image_size // vc.patch_size) ** 2 + 1

    def make(b):
        pixels = torch.randn(b, 3, vc.image_size, vc.image_size, device=device)
        feats = torch.randn(b, text_dim, device=device)

        def step():
            with _autocast(device):
                loss = clip_loss(*model(pixels, feats))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return _measure(
        device,
        make,
        batch,
        "images",
        lambda b: b,
        lambda b: 6 * params * patches * b,
        start=max(1, batch // 4),
        limit=batch * SEARCH_FACTOR,
    )


# ----------------------------------------------------------------------------- LLMs
def _llama(tiny: bool, vocab: int, layers: int, hidden: int, inter: int, heads: int, kv: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=4096,
        )
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model, cfg


def bench_stage1(device, tiny: bool, batch: int, seq: int = 128) -> dict:
    from peft import LoraConfig, get_peft_model

    model, cfg = _llama(tiny, 128256, 32, 4096, 14336, 32, 8, device)
    model.config.is_causal = False  # bidirectional (transformers >= 5.2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    params = sum(p.numel() for n, p in model.named_parameters() if "lm_head" not in n)

    def make(b):  # b caption pairs = 2b sequences
        ids = torch.randint(0, cfg.vocab_size, (2 * b, seq), device=device)

        def step():
            with _autocast(device):
                h = model.base_model.model.model(input_ids=ids).last_hidden_state.mean(dim=1)
                q, d = F.normalize(h[:b].float(), dim=-1), F.normalize(h[b:].float(), dim=-1)
                loss = F.cross_entropy(50 * q @ d.T, torch.arange(b, device=device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    # LoRA: the frozen weights still cost forward + activation-gradient (4x), the LoRA weights little
    return _measure(
        device,
        make,
        batch,
        "tokens",
        lambda b: 2 * b * seq,
        lambda b: 4 * params * 2 * b * seq,
        start=max(1, batch // 4),
        limit=batch * SEARCH_FACTOR,
    )


def bench_llava(device, tiny: bool, batch: int, tune: str, seq: int = 1024) -> dict:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    _, lcfg = _llama(tiny, 32064, 32, 4096, 11008, 32, 32, "meta")
    if tiny:
        vc = CLIPVisionConfig(
            image_size=28,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
        seq = 64
    else:
        vc = CLIPVisionConfig(
            image_size=336,
            patch_size=14,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
        )
    n_img = (vc.image_size // vc.patch_size) ** 2
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=lcfg,
        image_token_id=lcfg.vocab_size - 1,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for n, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in n)
    if tune == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=128,
                lora_alpha=256,
                target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                modules_to_save=["multi_modal_projector"],
            ),
        )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    llm_params = sum(
        p.numel() for n, p in model.named_parameters() if "language_model" in n and "lora" not in n
    )

    def make(b):
        ids = torch.randint(0, lcfg.vocab_size - 2, (b, seq), device=device)
        ids[:, 1 : 1 + n_img] = cfg.image_token_id
        pixels = torch.randn(b, 3, vc.image_size, vc.image_size, device=device, dtype=dtype)

        def step():
            with _autocast(device):
                loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    mult = 6 if tune == "full" else 4
    return _measure(
        device,
        make,
        batch,
        "tokens",
        lambda b: b * seq,
        lambda b: mult * llm_params * b * seq,
        start=1,
        limit=batch * SEARCH_FACTOR,
    )


def _measure(device, make, batch, unit, items, flops, start, limit) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict = {"batch": batch}
    try:
        seconds = timed(make(batch), device)
        out[f"{unit}_per_s"] = round(items(batch) / seconds, 1)
        out["step_s"] = round(seconds, 4)
        peak = peak_flops(device)
        out["mfu"] = round(flops(batch) / seconds / peak, 4) if peak else None
        if device.type == "cuda":
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        out["error"] = "out of memory at this batch"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["largest_batch"] = largest_batch(make, device, start, limit)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on whatever device there is (CPU check)")
    p.add_argument(
        "--only", nargs="*", default=None, choices=["stage2", "stage1", "llava_lora", "llava_full"]
    )
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    global SEARCH_FACTOR
    SEARCH_FACTOR = 2 if a.tiny else SEARCH_FACTOR
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    runs = {
        "stage2": lambda: bench_stage2(device, a.tiny, 4 if a.tiny else 256),
        "stage1": lambda: bench_stage1(device, a.tiny, 2 if a.tiny else 64),
        "llava_lora": lambda: bench_llava(device, a.tiny, 2 if a.tiny else 16, "lora"),
        "llava_full": lambda: bench_llava(device, a.tiny, 2 if a.tiny else 16, "full"),
    }
    results = {"device": name, "tiny": a.tiny, "torch": torch.__version__, "benches": {}}
    for key in a.only or list(runs):
        t0 = time.perf_counter()
        results["benches"][key] = r = runs[key]()
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        print(key, json.dumps(r), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "tiny-" if a.tiny else ""
    path = out / f"gpu-{tag}{name.replace(' ', '_').replace('/', '_')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print("| bench | batch | throughput | MFU | peak GiB | largest batch |\n|---|---|---|---|---|---|")
    for key, r in results["benches"].items():
        thr = next(
            (f"{v} {k.replace('_per_s', '')}/s" for k, v in r.items() if k.endswith("_per_s")), r.get("error")
        )
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        print(
            f"| {key} | {r['batch']} | {thr} | {mfu} | {r.get('peak_memory_gib', '-')} | {r['largest_batch']} |"
        )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
