"""This machine's GEMM limit, and each stage's achieved FLOP/s as a share of it, in one run.

The limit: ``torch.matmul`` at a few large squares and at the stages' own shapes, float32 and bf16,
the process's threads (2 on the development machine), best of a few repeats; measured at the start
and again at the end of the run (the machine is shared: the two say how much it moved). The limit of
a dtype is the best large square.

The stages, each in float32 and in bf16 (bf16 weights for the text encoder, as the stage-2 cache
runs it; bf16 autocast for the training steps, as ``train.mixed_precision: bf16`` runs them):

- ``text_encode``: ``TextEncoder.encode`` of the demo's stage-2 captions (SmolLM2-135M, batch 32,
  max length 192);
- ``stage1_step``: a stage-1 contrastive step as ``Stage1Recipe.train_contrastive`` takes it: LoRA
  r 16 on SmolLM2-135M (every projection), 8 examples (query + positive + hard negative: 24 texts of the
  demo's captions, in the recipe's padded batch), forward in 4 length buckets, the hard-negative loss,
  backward, fused AdamW; in bf16 the frozen base held in bf16 (``frozen_linears_in``), beside the step
  that re-casts it at every forward (what it did before);
- ``stage2_step``: the demo's stage-2 step: the demo CLIP's vision tower (224 px / 32, width 256, 6
  layers, all trainable) + the 4-block adapter on 576-d cached features, batch 32, CLIP loss, fused
  AdamW, beside the same step with torch's default CPU AdamW (what it ran before);
- ``retrieval``: ``recall_at_k`` on 5K images x 25K captions, dim 256 (float32 only: the evaluation
  computes in float32);
- ``llava_pretrain`` / ``llava_finetune``: the real training code, ``MllmRecipe.run()`` (``l2c mllm
  pretrain / finetune``) on a small synthetic dataset with the demo's configs (pretrain: projector only,
  16 rows a step in 2 micro-batches of 8; finetune: LoRA r 16, 8 rows a step), the demo CLIP as the
  tower. Its steps are timed from one forward of a step to the first forward of the next (backward,
  optimizer, the next batch's loading included); the FLOPs are counted in a second run of the same
  steps (same seed, same batches).

Times: the fastest of a few steps (other work on a shared machine only ever slows a step down), the
variants of a stage interleaved (A B A B ...); a LLaVA stage times one step of the real loop.

FLOPs: counted with ``torch.utils.flop_counter.FlopCounterMode`` (every matrix product the step runs,
padding included), cross-checked with the analytic count (``analytic_*`` below): 2 x linear weights x
tokens forward; training adds the backward: x3 in all for trained weights, x2 for frozen weights that
gradients pass through (input gradient only), nothing for frozen weights at the bottom (the vision
tower of LLaVA, the embeddings); attention 4 x batch x heads x head_dim x length^2 per layer forward
(QK^T and PV), x3.5 with its backward (flash attention recomputes the scores; the counter is given
the CPU kernel's formulas, which it lacks). "useful": the counted FLOPs times the share of real
(not padding) tokens. Each stage's
time is profiled once (``torch.profiler``): the share of the step in matrix products, in other
operators and outside any operator (Python, data), and the largest non-GEMM operators: where the rest
goes.

    python bench/gemm_limit.py [--quick] [--only text_encode stage2_step ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GEMM_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::convolution",
    "aten::_convolution",
)
STAGES = ("text_encode", "stage1_step", "stage2_step", "retrieval", "llava_pretrain", "llava_finetune")
# the models the stages run: the demo's (``tiny_models`` swaps in tiny random ones for --quick)
MODELS = {"llm": "embedded:smollm2-135m-instruct", "tower": "embedded:demo-clip"}


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5, min_s: float = 0.2) -> float:
    """Best GFLOP/s of ``[m, k] @ [k, n]`` over `repeats` timings of at least `min_s` each."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.matmul(a, b)
    calls = max(1, math.ceil(min_s / max(1e-6, _seconds(lambda: torch.matmul(a, b)))))
    best = min(_seconds(lambda: [torch.matmul(a, b) for _ in range(calls)]) / calls for _ in range(repeats))
    return 2 * m * k * n / best / 1e9


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gemm_limit(squares, shapes, repeats: int = 5) -> dict:
    """GFLOP/s of each square and each stage shape, per dtype; ``limit``: the best square."""
    out = {}
    for name, dtype in DTYPES.items():
        sq = {str(s): round(gemm_rate(s, s, s, dtype, repeats), 1) for s in squares}
        own = {k: round(gemm_rate(*mkn, dtype, repeats), 1) for k, mkn in shapes.items()}
        out[name] = {"limit_gflops": max(sq.values()), "squares": sq, "stage_shapes": own}
    return out


def _count_cpu_flash_attention() -> None:
    """FlopCounterMode knows the GPU attention kernels; the CPU's flash attention (what sdpa runs
    here) gets the same formulas: QK^T and PV forward, and the backward's five products (the scores
    recomputed, then dV, dP, dQ, dK)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _forward(query, key, value, *args, out_val=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query.shape, key.shape, value.shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def counted_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_flash_attention()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def profile_shares(fn, wall_s: float, top: int = 5) -> dict:
    """Where a step's time goes: matrix products, other operators (self time) and the rest of the wall
    time (Python, data loading, waiting), and the `top` costliest non-GEMM operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    gemm = sum(v for k, v in ops.items() if k in GEMM_OPS or "scaled_dot_product" in k)
    other = sum(v for k, v in ops.items() if not (k in GEMM_OPS or "scaled_dot_product" in k))
    busy = gemm + other
    rest = sorted(
        ((v, k) for k, v in ops.items() if not (k in GEMM_OPS or "scaled_dot_product" in k)), reverse=True
    )
    return {
        "profiled_wall_s": round(wall, 3),
        "gemm_share": round(gemm / max(wall, busy), 3),
        "other_ops_share": round(other / max(wall, busy), 3),
        "outside_ops_share": round(max(0.0, wall - busy) / wall, 3),
        "top_other_ops": {k: round(v / max(wall, busy), 3) for v, k in rest[:top]},
        "unprofiled_step_s": round(wall_s, 3),
    }


def _stage_result(seconds: float, flops: int, analytic: float, limit: float, real_share: float = 1.0) -> dict:
    """`real_share`: the share of the tokens that are not padding ("useful": the counted FLOPs times it)."""
    useful = flops * real_share
    return {
        "step_s": round(seconds, 3),
        "gflops_counted": round(flops / 1e9, 2),
        "gflops_analytic": round(analytic / 1e9, 2),
        "analytic_over_counted": round(analytic / flops, 3) if flops else None,
        "gflops_per_s": round(flops / seconds / 1e9, 1),
        "share_of_limit": round(flops / seconds / 1e9 / limit, 3),
        "useful_share_of_limit": round(useful / seconds / 1e9 / limit, 3),
    }


def _best_step(step, warmup: int, steps: int) -> float:
    """The fastest of `steps` timings: on a shared machine other work only ever slows a step down."""
    for _ in range(warmup):
        step()
    return min(_seconds(step) for _ in range(steps))


def _interleaved(variants: dict, warmup: int, steps: int) -> dict[str, float]:
    """The fastest timing of each step function, run in turn (A B A B ...) so machine noise hits all
    alike."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + steps):
        for k, fn in variants.items():
            s = _seconds(fn)
            if i >= warmup:
                times[k].append(s)
    return {k: min(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------
# analytic counts
# ---------------------------------------------------------------------------------------------


def linear_params(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Weights of the nn.Linear layers of `module` (names containing any of `skip` left out)."""
    return sum(
        m.weight.numel()
        for n, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip)
    )


def attention_flops(layers: int, width: int, batch: int, length: int, context: int | None = None) -> int:
    """Forward QK^T and PV: 4 x batch x (heads x head_dim) x length x context per layer."""
    return 4 * layers * width * batch * length * (context or length)


def analytic_encode(shapes, params: int, layers: int, width: int) -> float:
    """Forward only: 2 x params x tokens + attention, over the (batch, length) of each forward."""
    return sum(2 * params * b * n + attention_flops(layers, width, b, n) for b, n in shapes)


def analytic_lora_step(shapes, params: int, lora: int, layers: int, width: int) -> float:
    """Frozen base weights: forward + input gradient (4 x params x tokens); LoRA weights x6;
    attention x3.5 (flash attention's backward recomputes the scores)."""
    return sum(
        (4 * params + 6 * lora) * b * n + 3.5 * attention_flops(layers, width, b, n) for b, n in shapes
    )


def analytic_vit_step(
    batch: int, tokens: int, params: int, conv: int, layers: int, width: int, head: int
) -> float:
    """A trained ViT: 6 x linear weights x tokens, the patch convolution forward + weight gradient
    (4 x its weights x patches), attention x3.5; `head`: the trained layers on the pooled output."""
    return (
        6 * params * batch * tokens
        + 4 * conv * batch * (tokens - 1)
        + 3.5 * attention_flops(layers, width, batch, tokens)
        + 6 * head * batch
    )


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------


def tiny_models(folder: Path) -> dict:
    """A tiny random Llama with SmolLM2's tokenizer and a tiny random CLIP vision tower, saved in
    `folder`: the --quick run's models (every stage's code path, seconds instead of minutes)."""
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from l2c_llava.embedded import materialize_gguf, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(materialize_gguf(gguf.parent, gguf.name))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder / "llm", safe_serialization=True)
    tok.save_pretrained(folder / "llm")
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
    )
    CLIPVisionModel(vc).save_pretrained(folder / "tower", safe_serialization=True)
    return {"llm": str(folder / "llm"), "tower": str(folder / "tower")}


def _smollm2_encoder(dtype: str, max_length: int = 192):
    from l2c_llava.stage1.encoder import TextEncoder

    return TextEncoder.from_pretrained(MODELS["llm"], max_length=max_length, torch_dtype=dtype, device="cpu")


def _llm_dims(model) -> tuple[int, int, int]:
    c = model.config
    return (
        c.num_hidden_layers,
        c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
        c.hidden_size,
    )


def _record_shapes(module, store: list):
    def hook(_, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        store.append((ids.shape[0], ids.shape[1], int(mask.sum()) if mask is not None else ids.numel()))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def stage_text_encode(limits: dict, images: int, batch: int = 32) -> dict:
    from text_encode import demo_captions

    texts = demo_captions(images)
    out = {"captions": len(texts), "batch": batch}
    for name, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        out[name] = _text_encode(texts, dtype, batch, limits[name])
    return out


def _text_encode(texts: list[str], dtype: str, batch: int, limit: float) -> dict:
    enc = _smollm2_encoder(dtype)
    layers, width, _ = _llm_dims(enc.model)
    params = linear_params(enc.model)

    def run():
        enc.encode(texts, batch_size=batch, show_progress=False)

    enc.encode(texts[:4], batch_size=4)
    seconds = _best_step(run, 0, 2)
    shapes: list = []
    handle = _record_shapes(enc.model, shapes)
    flops = counted_flops(run)
    handle.remove()
    analytic = analytic_encode([(b, n) for b, n, _ in shapes], params, layers, width)
    real = sum(s[2] for s in shapes) / sum(b * n for b, n, _ in shapes)
    r = _stage_result(seconds, flops, analytic, limit, real)
    r["padding_share"] = round(1 - sum(s[2] for s in shapes) / sum(b * n for b, n, _ in shapes), 3)
    r["tokens_per_s"] = round(sum(s[2] for s in shapes) / seconds, 1)
    r["profile"] = profile_shares(run, seconds)
    return r


def _stage1_examples(n: int):
    from text_encode import demo_captions

    from l2c_llava.config.schemas import Instructions
    from l2c_llava.data.readers import CaptionPair
    from l2c_llava.stage1.data import caption_examples

    caps = demo_captions(n)  # short_0, long_0, short_1, long_1, ... then the other short captions
    pairs = [CaptionPair(f"{i}.jpg", caps[2 * i], caps[2 * i + 1], str(i)) for i in range(n)]
    ins = Instructions()
    return caption_examples(pairs, ins.short_to_long, ins.long_to_short, seed=42)


def stage_stage1(limits: dict, batch: int = 8, steps: int = 2) -> dict:
    examples = _stage1_examples(batch * (steps + 2))
    out = {"batch": batch, "texts_per_step": 3 * batch, "length_buckets": 4}
    for name in ("bf16", "fp32"):
        out[name] = _stage1(examples, batch, steps, name == "bf16", limits[name])
    return out


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def _stage1(examples, batch: int, steps: int, bf16: bool, limit: float) -> dict:
    """The recipe's step (fused AdamW; under bf16 the frozen base held in bf16), and under bf16 the step
    as it was before (the frozen base re-cast at every forward) on a copy, interleaved."""
    import copy

    from peft import LoraConfig, get_peft_model

    from l2c_llava.losses import hard_negative_nll_loss
    from l2c_llava.stage1.encoder import frozen_linears_in, lora_targets
    from l2c_llava.stage1.train import Stage1Recipe
    from l2c_llava.train.optim import make_adamw

    enc = _smollm2_encoder("float32")
    layers, width, _ = _llm_dims(enc.model)
    params = linear_params(enc.model)
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lc = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=lora_targets(enc.model, every))
    enc.model = get_peft_model(enc.model, lc)
    enc.train()
    lora = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    batches = [
        Stage1Recipe._batch(enc, examples[i * batch : (i + 1) * batch], "cpu") for i in range(steps + 2)
    ]
    encoders = {"step": enc} | ({"recast": copy.deepcopy(enc)} if bf16 else {})
    opts = {
        k: make_adamw([p for p in e.parameters() if p.requires_grad], "adamw", fused=True, lr=2e-4)
        for k, e in encoders.items()
    }
    turn = iter(range(10**9))

    def step(kind: str = "step"):
        b = batches[next(turn) % len(batches)]
        with _autocast(bf16):
            feats = encoders[kind](**b, length_buckets=4)
            q, p, neg = feats[:batch], feats[batch : 2 * batch], feats[2 * batch :]
            hard_negative_nll_loss(q, p, neg, scale=50.0, gather=False).backward()
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)

    with frozen_linears_in(enc.model, torch.bfloat16) if bf16 else nullcontext():  # as the recipe, whole run
        med = _interleaved({k: (lambda k=k: step(k)) for k in encoders}, 1, steps)
        seconds = med["step"]
        shapes: list = []
        handle = _record_shapes(enc.model, shapes)
        flops = counted_flops(step)
        handle.remove()
        profile = profile_shares(step, seconds)
    analytic = analytic_lora_step([(b, n) for b, n, _ in shapes], params, lora, layers, width)
    real = sum(s[2] for s in shapes) / sum(b * n for b, n, _ in shapes)
    r = _stage_result(seconds, flops, analytic, limit, real)
    r["padding_share"] = round(1 - sum(s[2] for s in shapes) / sum(b * n for b, n, _ in shapes), 3)
    if bf16:
        r["step_s_frozen_base_recast_each_forward"] = round(med["recast"], 3)
    r["profile"] = profile
    return r


def stage_stage2(limits: dict, batch: int = 32, steps: int = 4) -> dict:
    out = {"batch": batch}
    for name in ("bf16", "fp32"):
        out[name] = _stage2(batch, steps, name == "bf16", limits[name])
    return out


def _stage2(batch: int, steps: int, bf16: bool, limit: float) -> dict:
    """The recipe's step (fused AdamW) and the same step with torch's default CPU AdamW (a loop of
    operators per tensor, what the recipe ran before), interleaved on two copies of the model."""
    import copy

    from transformers import AutoConfig

    from l2c_llava.losses import clip_loss
    from l2c_llava.models.llm import local_llm_folder
    from l2c_llava.models.vision import load_vision_tower
    from l2c_llava.stage2.model import LLM2CLIPModel
    from l2c_llava.train.optim import make_adamw

    text_dim = AutoConfig.from_pretrained(local_llm_folder(MODELS["llm"])).hidden_size  # the cache's features
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_vision_tower(
        load_vision_tower(MODELS["tower"]), text_dim, projection_dim=256, num_blocks=4, expansion=2
    )
    vc = model.vision_model.config
    pixels, feats = torch.randn(batch, 3, vc.image_size, vc.image_size), torch.randn(batch, text_dim)
    models = {"fused": model, "loop": copy.deepcopy(model)}
    opts = {k: make_adamw(m.parameters(), "adamw", fused=k == "fused", lr=1e-5) for k, m in models.items()}

    def step(kind: str = "fused"):
        with _autocast(bf16):
            clip_loss(*models[kind](pixels, feats)).backward()
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)

    med = _interleaved({"fused": step, "loop": lambda: step("loop")}, 1, steps)
    seconds = med["fused"]
    flops = counted_flops(step)
    tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    conv = model.vision_model.embeddings.patch_embedding.weight.numel()
    head = linear_params(model, skip=("vision_model.encoder",))
    encoder = linear_params(model.vision_model.encoder)
    analytic = analytic_vit_step(batch, tokens, encoder, conv, vc.num_hidden_layers, vc.hidden_size, head)
    r = _stage_result(seconds, flops, analytic, limit)
    r["step_s_unfused_adamw"] = round(med["loop"], 3)
    r["profile"] = profile_shares(step, seconds)
    return r


def stage_retrieval(
    limits: dict, images: int = 5000, per_image: int = 5, dim: int = 256, repeats: int = 3
) -> dict:
    from l2c_llava.stage2.retrieval import recall_at_k

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(images, dim, generator=g), dim=-1)
    owner = torch.arange(images).repeat_interleave(per_image)
    txt = F.normalize(img[owner] + 0.9 * torch.randn(len(owner), dim, generator=g), dim=-1)
    caption_image = owner.tolist()
    run = lambda: recall_at_k(img, txt, caption_image)  # noqa: E731
    seconds = _best_step(run, 1, repeats)
    flops = counted_flops(run)
    analytic = 2 * images * len(owner) * dim
    r = _stage_result(seconds, flops, analytic, limits["fp32"])
    r["profile"] = profile_shares(run, seconds)
    return {"images": images, "captions": len(owner), "dim": dim, "fp32": r}


def _llava_data(folder: Path, images: int) -> Path:
    from l2c_llava.data.synthetic import SynthOptions, generate

    generate(
        folder,
        SynthOptions(images=images, seed=0, size=224, val_fraction=0.05, test_fraction=0.05),
        workers=1,
        progress=False,
    )
    return folder


def _llava_recipe(stage: str, data: Path, out: Path, name: str, steps: int, quick: bool):
    from l2c_llava.config import load_config
    from l2c_llava.mllm.train import MllmRecipe

    config = ROOT / "mllm" / "configs" / f"demo_{stage}.yaml"
    ov = [
        f"model.vision_tower={MODELS['tower']}",
        f"model.llm.name_or_path={MODELS['llm']}",
        f"data.path={data / 'llava' / ('pretrain.json' if stage == 'pretrain' else 'instruct.json')}",
        f"data.image_root={data / 'images'}",
        "model.init_from=null",
        f"run.output_dir={out}",
        f"train.max_steps={steps}",
        "train.save_every=1000",
        "train.log_every=1",
        f"train.mixed_precision={'bf16' if name == 'bf16' else 'no'}",
    ]
    if stage == "finetune":  # the pipeline's demo finetune: LoRA r 16, 8 rows a step
        ov += [
            "train.tune=lora",
            "train.lora.r=16",
            "train.lora.alpha=32",
            "train.lora.dropout=0.0",
            "train.global_batch_size=8",
            "train.per_device_batch_size=8",
        ]
    if quick:
        ov += ["train.global_batch_size=2", "train.per_device_batch_size=1"]
    return MllmRecipe(load_config(config, ov))


def stage_llava(stage: str, limits: dict, data: Path, steps: int = 4, quick: bool = False) -> dict:
    """Two runs of the real training code for `steps` steps: one timed (forward-start times of each
    step), one under the FLOP counter (the counter's total at each step's first forward)."""
    return {name: _llava(stage, name, limits[name], data, steps, quick) for name in ("bf16", "fp32")}


def _observed_recipe(marks: dict):
    """MllmRecipe whose model notes, at each forward, the time, the FLOPs counted so far and the
    batch's shape (rows, length, real tokens, supervised positions, images)."""
    from l2c_llava.mllm.train import MllmRecipe

    class Observed(MllmRecipe):
        counter = None

        def build(self, quantize: bool = True):
            model, processor = super().build(quantize)
            lm = model.model.language_model
            layers, width, _ = _llm_dims(lm)
            marks["dims"] = (linear_params(lm), layers, width)
            marks["tower"] = linear_params(model.model.vision_tower)
            marks["projector"] = linear_params(model.model.multi_modal_projector)
            marks["lora"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
            marks["head"] = model.lm_head.weight.numel()

            def hook(_, args, kwargs):
                ids, mask, keep = (
                    kwargs["input_ids"],
                    kwargs.get("attention_mask"),
                    kwargs.get("logits_to_keep"),
                )
                pixels = kwargs.get("pixel_values")
                marks["t"].append(time.perf_counter())
                marks["flops"].append(self.counter.get_total_flops() if self.counter else 0)
                marks["shapes"].append(
                    (
                        ids.shape[0],
                        ids.shape[1],
                        int(mask.sum()) if mask is not None else ids.numel(),
                        int(keep.sum()) if isinstance(keep, torch.Tensor) else ids.numel(),
                        pixels.shape[0] if pixels is not None else 0,
                    )
                )

            model.register_forward_pre_hook(hook, with_kwargs=True)
            return model, processor

    return Observed


def _llava(stage: str, name: str, limit: float, data: Path, steps: int, quick: bool) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    timed_marks: dict = {"t": [], "flops": [], "shapes": []}
    counted_marks: dict = {"t": [], "flops": [], "shapes": []}
    from accelerate.state import AcceleratorState

    _count_cpu_flash_attention()
    with tempfile.TemporaryDirectory() as tmp:
        # accelerate keeps one mixed precision per process: each run starts from a fresh state
        AcceleratorState._reset_state(True)
        cfg = _llava_recipe(stage, data, Path(tmp) / "timed", name, steps, quick).cfg
        _observed_recipe(timed_marks)(cfg).run()
        AcceleratorState._reset_state(True)
        cfg = _llava_recipe(stage, data, Path(tmp) / "counted", name, steps - 1, quick).cfg
        counted = _observed_recipe(counted_marks)(cfg)
        with FlopCounterMode(display=False) as counter:
            counted.counter = counted_marks["counter"] = counter
            counted.run()
            total = counter.get_total_flops()
        AcceleratorState._reset_state(True)
    times, shapes = timed_marks["t"], timed_marks["shapes"]
    flops_at = counted_marks["flops"] + [total]
    accum = len(shapes) // steps
    # steps 2 .. steps-1: from the first forward of step 2 to the first forward of the last step
    first, last = accum, accum * (steps - 1)
    seconds = (times[last] - times[first]) / (steps - 2)
    flops = (flops_at[last] - flops_at[first]) / (steps - 2)
    params, layers, width = timed_marks["dims"]
    window = shapes[first:last]
    tower_tokens = _tower_tokens()
    m = timed_marks
    # the demo's LLaVAs train the projector (pretrain) or LoRA (finetune): the LLM's and the LM
    # head's weights stay frozen (forward + input gradient, x4); the tower runs forward only
    analytic = sum(
        (4 * params + 6 * m["lora"]) * b * n
        + 3.5 * attention_flops(layers, width, b, n)
        + 4 * m["head"] * kept
        + 2 * m["tower"] * imgs * tower_tokens
        + 6 * m["projector"] * imgs * (tower_tokens - 1)
        for b, n, _, kept, imgs in window
    ) / (steps - 2)
    real = sum(s[2] for s in window) / sum(s[0] * s[1] for s in window)
    r = _stage_result(seconds, flops, analytic, limit, real)
    r["rows_per_step"] = sum(s[0] for s in window) // (steps - 2)
    r["padding_share"] = round(1 - sum(s[2] for s in window) / sum(s[0] * s[1] for s in window), 3)
    return r


def _tower_tokens() -> int:
    from l2c_llava.models.vision import load_vision_tower

    c = load_vision_tower(MODELS["tower"]).config
    return (c.image_size // c.patch_size) ** 2 + 1


# ---------------------------------------------------------------------------------------------


def run(quick: bool = False, only: list[str] | None = None) -> dict:
    import os

    names = only or list(STAGES)
    squares = (256, 512) if quick else (1024, 2048, 4096)
    shapes = {
        "smollm2 mlp (6144 x 576 x 1536)": (6144, 576, 1536),
        "smollm2 attn out (6144 x 576 x 576)": (6144, 576, 576),
        "demo vit mlp (1600 x 256 x 1024)": (1600, 256, 1024),
        "retrieval (5000 x 256 x 25000)": (5000, 256, 25000),
    }
    if quick:
        shapes = {"small (64 x 64 x 64)": (64, 64, 64)}
    if quick:
        MODELS.update(tiny_models(Path(tempfile.mkdtemp(prefix="l2c_gemm_limit_models_"))))
    res = {
        "models": dict(MODELS),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_before": list(os.getloadavg()),
        "limit_start": gemm_limit(squares, shapes, 2 if quick else 5),
    }
    limits = {k: v["limit_gflops"] for k, v in res["limit_start"].items()}
    stages = {}
    for name in names:
        t0 = time.perf_counter()
        if name == "text_encode":
            stages[name] = stage_text_encode(limits, images=1 if quick else 16)
        elif name == "stage1_step":
            stages[name] = stage_stage1(limits, batch=2 if quick else 8, steps=1 if quick else 2)
        elif name == "stage2_step":
            stages[name] = stage_stage2(limits, batch=4 if quick else 32, steps=1 if quick else 4)
        elif name == "retrieval":
            stages[name] = stage_retrieval(limits, images=200 if quick else 5000, repeats=1 if quick else 3)
        elif name in ("llava_pretrain", "llava_finetune"):
            if "data" not in res:
                res["data"] = str(
                    _llava_data(
                        Path(tempfile.mkdtemp(prefix="l2c_gemm_limit_")) / "data", 30 if quick else 200
                    )
                )
            stages[name] = stage_llava(name.split("_")[1], limits, Path(res["data"]), steps=3, quick=quick)
        stages[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(stages[name]), flush=True)
    res["stages"] = stages
    res["limit_end"] = gemm_limit(squares, shapes, 2 if quick else 5)
    res["load_after"] = list(os.getloadavg())
    return res


def table(res: dict) -> str:
    lines = [
        "| stage | dtype | step s | GFLOP counted (analytic / counted) | GFLOP/s | share of the limit | useful share | GEMM / other ops / outside ops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage, r in res["stages"].items():
        for dtype in ("bf16", "fp32"):
            if dtype not in r:
                continue
            x = r[dtype]
            p = x.get("profile", {})
            prof = (
                f"{p['gemm_share']:.2f} / {p['other_ops_share']:.2f} / {p['outside_ops_share']:.2f}"
                if p
                else "-"
            )
            lines.append(
                f"| {stage} | {dtype} | {x['step_s']} | {x['gflops_counted']} ({x['analytic_over_counted']}) | "
                f"{x['gflops_per_s']} | **{x['share_of_limit']:.0%}** | {x['useful_share_of_limit']:.0%} | {prof} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that every stage runs")
    p.add_argument("--only", nargs="*", choices=STAGES, default=None)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    res = run(a.quick, a.only)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gemm_limit{'-quick' if a.quick else ''}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "stages"}, indent=2))
    print(table(res))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
