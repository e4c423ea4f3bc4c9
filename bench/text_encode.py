"""Text encoding throughput: our ``TextEncoder.encode`` vs llm2vec's ``LLM2Vec.encode`` on the same model
and captions, in the setting stage 2 caches with.

Captions: the demo's stage-2 caption list (``l2c data synth``'s generators and seeds, in the cache's
order: an image's first short caption, its dense caption, then the other four short captions of every
image; 5 of 6 captions are 10-25 tokens, 1 of 6 is 100-250). Model: SmolLM2-135M (the embedded
checkpoint's weights, or random ones of its shape), mean pooling, bidirectional attention, no
instruction, max length 192 (the demo stage-1 encoder's), batch 32 (the demo stage-2 config's), 2
threads. Three runs alternate, each side reports its best round: ours in bfloat16 (what stage 2 runs:
``text_encoder.torch_dtype: bfloat16``), llm2vec in float32 (its own encode, in its own environment),
ours in float32. Agreement: per-caption cosine and largest absolute difference of each of ours against
llm2vec's float32 features. Target: ours at least 1.5x llm2vec.

llm2vec does not import next to transformers 5, so it runs in its own environment
(scripts/setup_llm2vec_env.sh, about 80 s the first time).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_captions(images: int, seed: int = 0) -> list[str]:
    """The stage-2 caption list of the first `images` images of ``l2c data synth --seed seed``
    (``pair_captions`` order with ``short_key: alternatives``), made without drawing the images."""
    import random

    from l2c_llava.data import captions as C
    from l2c_llava.data.readers import CaptionPair
    from l2c_llava.data.scenes import sample_scene
    from l2c_llava.stage2.cache import pair_captions

    pairs = []
    for i in range(images):
        scene = sample_scene(random.Random(f"{seed}-scene-{i}"), i, 5)
        rng = random.Random(f"{seed}-text-{i}")  # drawn in the generator's order
        C.short_caption(scene, rng)
        alternatives = C.alternative_captions(scene, rng, n=5)
        dense = C.dense_caption(scene, rng)
        pairs.append(CaptionPair(f"{i}.jpg", alternatives[0], dense, str(i), None, tuple(alternatives[1:])))
    return pair_captions(pairs)


def agreement(ours, reference, groups: dict | None = None) -> dict:
    """Per-caption cosine (min, mean, share >= 0.999) and the largest absolute difference, also
    relative to the largest absolute reference value; the same for each boolean row mask of `groups`."""
    import torch

    cos = torch.nn.functional.cosine_similarity(ours.float(), reference.float(), dim=-1)
    diff = (ours.float() - reference.float()).abs().max().item()
    out = {
        "cosine_min": round(cos.min().item(), 6),
        "cosine_mean": round(cos.mean().item(), 6),
        "share_cosine_at_least_0.999": round((cos >= 0.999).float().mean().item(), 4),
        "max_abs_diff": float(f"{diff:.3g}"),
        "max_abs_diff_over_max_abs": float(f"{diff / reference.abs().max().item():.3g}"),
    }
    for name, rows in (groups or {}).items():
        if bool(rows.any()):
            out[name] = agreement(ours[rows], reference[rows])
    return out


def run(
    images: int = 32, batch: int = 32, rounds: int = 3, max_length: int = 192, weights: str = "real"
) -> dict:
    import torch
    from safetensors.torch import load_file

    from l2c_llava.embedded import materialize_gguf, smollm2_gguf_path
    from l2c_llava.stage1.encoder import TextEncoder

    setup = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_llm2vec_env.sh")], capture_output=True, text=True
    )
    if setup.returncode != 0:
        raise RuntimeError(f"llm2vec environment: {setup.stderr[-2000:]}")
    ref_python = setup.stdout.strip().splitlines()[-1]
    texts = demo_captions(images)
    gguf = smollm2_gguf_path()
    with tempfile.TemporaryDirectory() as tmp:
        model, tfile, emb = Path(tmp) / "model", Path(tmp) / "texts.json", Path(tmp) / "llm2vec.safetensors"
        tfile.write_text(json.dumps(texts))
        helper = [ref_python, str(ROOT / "bench" / "_llm2vec_encode.py"), str(model), str(gguf), str(tfile)]
        build = ["--build"] + ([str(materialize_gguf(gguf.parent, gguf.name))] if weights == "real" else [])
        subprocess.run(helper + ["1", *build], check=True, capture_output=True, text=True)
        ours = {
            dtype: TextEncoder.from_pretrained(
                model,
                pooling="mean",
                max_length=max_length,
                torch_dtype=dtype,
                attn_implementation="sdpa",
                device="cpu",
            )
            for dtype in ("bfloat16", "float32")
        }
        ids = ours["float32"].tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        tokens = sum(len(x) for x in ids)
        short = torch.tensor([len(x) < 40 for x in ids])  # 10-25 tokens; the dense ones 100-192
        for enc in ours.values():
            enc.encode(texts[:2], batch_size=2)  # warm-up
        times: dict[str, list[float]] = {"ours_bf16": [], "llm2vec_fp32": [], "ours_fp32": []}
        feats = {}
        for r in range(rounds):
            t0 = time.perf_counter()
            feats["ours_bf16"] = ours["bfloat16"].encode(texts, batch_size=batch, show_progress=False)
            times["ours_bf16"].append(time.perf_counter() - t0)
            out = subprocess.run(
                helper
                + [str(batch), "--max-length", str(max_length)]
                + (["--save", str(emb)] if r == 0 else []),
                check=True,
                capture_output=True,
                text=True,
            )
            times["llm2vec_fp32"].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
            t0 = time.perf_counter()
            feats["ours_fp32"] = ours["float32"].encode(texts, batch_size=batch, show_progress=False)
            times["ours_fp32"].append(time.perf_counter() - t0)
        reference = load_file(str(emb))["embeddings"]
    best = {k: min(v) for k, v in times.items()}
    n = len(texts)
    return {
        "captions": n,
        "tokens": tokens,
        "short_captions": int(short.sum()),
        "batch": batch,
        "max_length": max_length,
        "weights": weights,
        "threads": torch.get_num_threads(),
        **{
            k: {"seconds": round(s, 2), "texts_per_s": round(n / s, 1), "tokens_per_s": round(tokens / s, 1)}
            for k, s in best.items()
        },
        "speedup_ours_bf16_over_llm2vec_fp32": round(best["llm2vec_fp32"] / best["ours_bf16"], 3),
        "speedup_ours_fp32_over_llm2vec_fp32": round(best["llm2vec_fp32"] / best["ours_fp32"], 3),
        "agreement_with_llm2vec_fp32": {
            name: agreement(feats[name], reference, {"short": short, "dense": ~short})
            for name in ("ours_fp32", "ours_bf16")
        },
        "rounds_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
