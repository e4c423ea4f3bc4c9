"""When does the demo LLaVA start reading the image? One process trains the connector (pretrain
config) and then the LLM (finetune config) on the demo's data, and at fixed steps measures on held-out
questions what the demo's report asks: short-answer VQA accuracy with each question's own image
against the same questions on another image (paired, McNemar), and the teacher-forced loss of
held-out training rows with their own image against another image.

It sizes the demo's LLaVA training (steps, learning rates, LoRA or full): the curve says how many rows
it takes before the image moves the answers, at this machine's cost per row.

    python bench/llava_reading.py --data runs/exp/data --vision embedded:demo-clip \
        --pretrain-steps 100 --finetune-steps 200 --eval-every 25 --out bench/results/llava_reading.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from l2c_llava.config import load_config
from l2c_llava.io import atomic_write_bytes
from l2c_llava.losses import supervised_loss
from l2c_llava.mllm.evaluate import _answers, _correct, read_questions, shifted_images
from l2c_llava.mllm.train import MllmRecipe
from l2c_llava.stats import paired_comparison, wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def recipe(config: str, data: Path, vision: str, extra: list[str]) -> MllmRecipe:
    stage = "pretrain" if "pretrain" in config else "finetune"
    ov = [
        f"model.vision_tower={vision}",
        f"data.image_root={data / 'images'}",
        f"data.path={data / 'llava' / ('pretrain.json' if stage == 'pretrain' else 'instruct.json')}",
        "model.init_from=null",
        "run.output_dir=/tmp/l2c_llava_reading",
    ] + extra
    return MllmRecipe(load_config(ROOT / config, ov))


@torch.no_grad()
def loss_gap(model, ds, collate, idx: list[int], batch: int = 8) -> dict:
    model.eval()
    own, other = [], []
    for lo in range(0, len(idx) - batch + 1, batch):
        b = collate([ds[i] for i in idx[lo : lo + batch]])
        own.append(supervised_loss(model, b).item())
        b["pixel_values"] = b["pixel_values"].roll(1, dims=0)
        other.append(supervised_loss(model, b).item())
    model.train()
    m = lambda v: sum(v) / max(1, len(v))  # noqa: E731
    return {
        "loss_own": round(m(own), 4),
        "loss_other": round(m(other), 4),
        "loss_gap": round(m(other) - m(own), 4),
    }


@torch.no_grad()
def vqa(model, processor, questions: list[dict]) -> dict:
    model.eval()
    own = _answers(model, processor, {}, questions, [q["image_path"] for q in questions], 8, 5, "vqa own")
    other = _answers(
        model,
        processor,
        {},
        questions,
        shifted_images([q["image_path"] for q in questions]),
        8,
        5,
        "vqa other",
    )
    model.train()
    a = [_correct(p, q) for p, q in zip(own, questions)]
    b = [_correct(p, q) for p, q in zip(other, questions)]
    by_type: dict[str, list] = {}
    for q, x, y in zip(questions, a, b):
        by_type.setdefault(q["type"], []).append((x, y))
    yes = sum(p.strip().lower().startswith("yes") for p, q in zip(own, questions) if q["type"] == "existence")
    n_ex = sum(q["type"] == "existence" for q in questions)
    return {
        "vqa_own": round(sum(a) / len(a), 4),
        "vqa_own_ci95": [round(x, 3) for x in wilson_interval(sum(a), len(a))],
        "vqa_other": round(sum(b) / len(b), 4),
        "mcnemar": paired_comparison(a, b),
        "by_type": {
            t: [round(sum(x for x, _ in v) / len(v), 3), round(sum(y for _, y in v) / len(v), 3), len(v)]
            for t, v in sorted(by_type.items())
        },
        "existence_yes_ratio": round(yes / max(1, n_ex), 3),
        "answers_sample": own[:8],
    }


def train_phase(
    name: str,
    rec: MllmRecipe,
    model,
    processor,
    steps: int,
    eval_every: int,
    questions,
    log,
    held: int = 32,
    bf16: bool = False,
) -> None:
    from torch.utils.data import DataLoader, Subset

    from l2c_llava.mllm.data import Collate

    t = rec.cfg.train
    ds = rec.build_data(processor, model)
    n = len(ds)
    collate = Collate(processor.tokenizer.pad_token_id)
    held_idx = list(range(n - held, n))  # the last rows: never trained on
    train_idx = list(range(n - held))
    opt = torch.optim.AdamW(rec.param_groups(model), lr=t.lr, weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    warm = max(1, int(steps * (t.warmup_ratio or 0)))
    step, epoch, t0 = 0, 0, time.perf_counter()

    def measure(step: int) -> None:
        rec_ = {
            "phase": name,
            "step": step,
            "rows_seen": step * t.global_batch_size,
            "seconds": round(time.perf_counter() - t0, 1),
            **loss_gap(model, ds, collate, held_idx),
        }
        if questions and name == "finetune" and step > 0:  # before any finetune step it answers in captions
            rec_.update(vqa(model, processor, questions))
        log(rec_)

    measure(0)
    model.train()
    while step < steps:
        g = torch.Generator().manual_seed(1000 + epoch)
        order = [train_idx[i] for i in torch.randperm(len(train_idx), generator=g).tolist()]
        loader = DataLoader(Subset(ds, order), batch_size=t.per_device_batch_size, collate_fn=collate)
        it = iter(loader)
        accum = t.global_batch_size // t.per_device_batch_size
        for _ in range(len(order) // t.global_batch_size):
            if step >= steps:
                break
            for k, grp in enumerate(opt.param_groups):  # linear warmup, then cosine to 0
                frac = (
                    (step + 1) / warm
                    if step < warm
                    else 0.5
                    * (1 + torch.cos(torch.tensor(3.14159265 * (step - warm) / max(1, steps - warm))).item())
                )
                grp["lr"] = base[k] * frac
            total = 0.0
            for _ in range(accum):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = supervised_loss(model, next(it))
                if torch.isfinite(loss):
                    (loss / accum).backward()
                    total += loss.item() / accum
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 5 == 0 or step <= 3:
                print(
                    f"[{name}] step {step}/{steps} loss {total:.4f} {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
            if step % eval_every == 0 or step == steps:
                measure(step)
        epoch += 1


def summarize(path: Path) -> str:
    """A markdown table of a results file: one row per measurement, runs in the order they ran."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out = [
        "| run | phase | step | rows seen | held-out loss own / other image (gap) | VQA own image [95%] "
        "| VQA other image | wins / losses, McNemar p | per type own / other | existence yes share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "step" not in r:
            continue
        vqa = ["", "", "", "", ""]
        if "vqa_own" in r:
            m, ci = r["mcnemar"], r["vqa_own_ci95"]
            types = ", ".join(f"{t} {a:.2f}/{b:.2f}" for t, (a, b, _) in r["by_type"].items())
            vqa = [
                f"{r['vqa_own']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]",
                f"{r['vqa_other']:.3f}",
                f"{m['wins']} / {m['losses']}, {m['p_value']:.3g}",
                types,
                f"{r['existence_yes_ratio']:.2f}",
            ]
        out.append(
            f"| {r['label']} | {r['phase']} | {r['step']} | {r['rows_seen']} | "
            f"{r['loss_own']:.3f} / {r['loss_other']:.3f} ({r['loss_gap']:+.3f}) | " + " | ".join(vqa) + " |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="an `l2c data synth` folder (the demo's)")
    p.add_argument("--summarize", type=Path, help="print a results file as a markdown table and stop")
    p.add_argument("--vision", default="embedded:demo-clip", help="the vision tower")
    p.add_argument("--pretrain-config", default="mllm/configs/demo_pretrain.yaml")
    p.add_argument("--finetune-config", default="mllm/configs/demo_finetune.yaml")
    p.add_argument("--pretrain-steps", type=int, default=100)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--pretrain-set", nargs="*", default=[], help="overrides of the pretrain config")
    p.add_argument("--finetune-set", nargs="*", default=[], help="overrides of the finetune config")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--questions", type=int, default=120, help="held-out VQA questions (test split, spread)")
    p.add_argument(
        "--projector",
        type=Path,
        default=None,
        help="safetensors file: written after the pretrain phase, read instead of it when it exists",
    )
    p.add_argument("--label", default="run")
    p.add_argument(
        "--bf16", action="store_true", help="train under bf16 autocast (CPU), as train.mixed_precision=bf16"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "llava_reading.jsonl")
    a = p.parse_args()
    if a.summarize:
        print(summarize(a.summarize))
        return
    if a.data is None:
        p.error("--data is required")
    torch.manual_seed(0)
    qs = read_questions(a.data / "eval" / "vqa_test.jsonl", a.data / "images")
    stride = max(1, len(qs) // a.questions)
    qs = qs[::stride][: a.questions]

    def log(r: dict) -> None:
        r = {"label": a.label, **r}
        print(json.dumps(r), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("a") as f:
            f.write(json.dumps(r) + "\n")

    log({"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}})
    if a.projector is not None and a.projector.exists():
        projector = load_file(a.projector)
        log({"phase": "pretrain", "projector_from": str(a.projector)})
    else:
        pre = recipe(a.pretrain_config, a.data, a.vision, a.pretrain_set)
        model, processor = pre.build()
        if a.pretrain_steps:
            train_phase(
                "pretrain", pre, model, processor, a.pretrain_steps, a.eval_every, qs, log, bf16=a.bf16
            )
        projector = {
            k: v.detach().clone() for k, v in model.state_dict().items() if "multi_modal_projector" in k
        }
        del model
        if a.projector is not None:
            atomic_write_bytes(a.projector, save(projector))
    ft = recipe(a.finetune_config, a.data, a.vision, a.finetune_set)
    model, processor = ft.build()
    model.load_state_dict(projector, strict=False)
    train_phase("finetune", ft, model, processor, a.finetune_steps, a.eval_every, qs, log, bf16=a.bf16)


if __name__ == "__main__":
    main()
