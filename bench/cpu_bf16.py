"""bf16 on the CPU, measured: float32 against bf16 for the demo's two CPU-heavy kinds of work, side
by side on the same inputs, interleaved (A B A B) so the machine's noise hits both alike.

- text encoding (stage 2's cache): ``TextEncoder.encode`` of the demo's stage-1 encoder (or the
  embedded SmolLM2) with float32 weights against bf16 weights (``text_encoder.torch_dtype``), on the
  demo's own short and dense captions; texts/s, tokens/s and the cosine between the two features;
- LLaVA training (``train.mixed_precision``): the demo's pretrain (connector only) and finetune (LoRA
  r 16, the demo's rates) steps on real rows, float32 against bf16 autocast, two copies of the same
  model on the same batches; median step time and both loss curves.

It only pays on a CPU with native bf16 (AVX512-BF16 or AMX: ``l2c_llava.models.llm.cpu_has_native_bf16``);
elsewhere bf16 is emulated and slower. Needs the demo's data (``l2c data synth``; default runs/demo/data).

    python bench/cpu_bf16.py [--data runs/demo/data] [--encoder runs/demo/stage1/encoder] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def text_encoding(encoder: str, data: Path, n: int, batch: int, rounds: int) -> dict:
    from l2c_llava.data.readers import read_caption_pairs
    from l2c_llava.stage1.encoder import TextEncoder

    pairs = read_caption_pairs(data / "captions" / "train.jsonl")
    texts = [c for p in pairs.items[: n // 2] for c in (p.short, p.long)]
    encs = {
        dt: TextEncoder.from_pretrained(encoder, torch_dtype=dt, device="cpu")
        for dt in ("float32", "bfloat16")
    }
    tok = encs["float32"].tokenizer
    tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    times: dict[str, list[float]] = {k: [] for k in encs}
    feats = {}
    for _ in range(rounds):
        for dt, enc in encs.items():
            t0 = time.perf_counter()
            feats[dt] = enc.encode(texts, batch_size=batch, show_progress=False)
            times[dt].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    cos = torch.nn.functional.cosine_similarity(feats["float32"], feats["bfloat16"])
    return {
        "texts": len(texts),
        "tokens": tokens,
        "tokens_per_s": {k: round(tokens / v) for k, v in best.items()},
        "speedup_bf16": round(best["float32"] / best["bfloat16"], 2),
        "feature_cosine_min": round(float(cos.min()), 5),
        "feature_cosine_mean": round(float(cos.mean()), 5),
    }


def llava_steps(data: Path, vision: str, steps: int, warmup: int) -> dict:
    from llava_reading import recipe
    from torch.utils.data import DataLoader

    from l2c_llava.losses import supervised_loss
    from l2c_llava.mllm.data import Collate

    out = {}
    lora = [
        "train.tune=lora",
        "train.lora.r=16",
        "train.lora.alpha=32",
        "train.lora.dropout=0.0",
        "train.lr=1.0e-3",
        "train.projector_lr=1.0e-4",
    ]
    for stage, config, extra in (
        ("pretrain", "mllm/configs/demo_pretrain.yaml", []),
        ("finetune", "mllm/configs/demo_finetune.yaml", lora),
    ):
        rec = recipe(config, data, vision, extra)
        t = rec.cfg.train
        models, opts = {}, {}
        for name in ("float32", "bf16"):
            torch.manual_seed(0)
            model, processor = rec.build()
            model.train()
            models[name] = model
            opts[name] = torch.optim.AdamW(rec.param_groups(model), lr=t.lr, weight_decay=0.0)
        ds = rec.build_data(processor, models["float32"])
        loader = DataLoader(
            ds,
            batch_size=t.per_device_batch_size,
            shuffle=False,
            collate_fn=Collate(processor.tokenizer.pad_token_id),
        )
        batches = [b for _, b in zip(range(warmup + steps), loader)]
        times: dict[str, list[float]] = {k: [] for k in models}
        losses: dict[str, list[float]] = {k: [] for k in models}
        for i, b in enumerate(batches):
            for name, model in models.items():
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                    loss = supervised_loss(model, b)
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                losses[name].append(round(loss.item(), 4))
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[stage] = {
            "rows_per_step": t.per_device_batch_size,
            "median_step_s": {k: round(v, 2) for k, v in med.items()},
            "speedup_bf16": round(med["float32"] / med["bf16"], 2),
            "loss": losses,
        }
        del models, opts
    return out


def main() -> None:
    from l2c_llava.models.llm import cpu_has_native_bf16

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    p.add_argument(
        "--encoder",
        default="runs/demo/stage1/encoder",
        help="a stage-1 encoder folder (default: the demo's; embedded:smollm2-135m-instruct works too)",
    )
    p.add_argument("--vision", default="embedded:demo-clip")
    p.add_argument("--texts", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results" / "cpu_bf16.json")
    a = p.parse_args()
    res = {
        "threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "text_encoding": text_encoding(a.encoder, a.data, a.texts, a.batch, a.rounds),
        "llava": llava_steps(a.data, a.vision, a.steps, a.warmup),
    }
    print(json.dumps(res, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
