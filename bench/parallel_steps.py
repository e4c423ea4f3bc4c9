"""Two steps at once (``l2c pipeline``'s ``parallel``) against one step on every thread: the demo's
LLaVA training steps in one process on all the machine's threads, and in N processes on threads/N
each, started together (a barrier), the same micro-batches in each process.

The demo's LLaVA (SmolLM2-135M from the embedded GGUF + a demo-size vision tower of random weights,
as ``bench/llava_packing.py`` builds it), real rows of the embedded dataset in packed micro-batches,
both stages as the demo trains them: pretrain (plain template, projector only, 8 rows) and finetune
(vicuna_v1, projector + LoRA r 16, 4 rows), forward and backward under bf16 autocast on a CPU with
native bf16. The layouts alternate (one, N, one, N ...) so machine noise hits both alike.

Reports per stage and layout: real tokens per second (all processes together, over the slowest
process's time) and the ratio N processes / one. ``python bench/parallel_steps.py [DATA] [N]``;
DATA default runs/demo/data (``l2c data synth --out DIR``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = {  # stage: (file, template, max_length, rows per micro-batch)
    "pretrain": ("pretrain.json", "plain", 512, 8),
    "finetune": ("instruct.json", "vicuna_v1", 384, 4),
}


def worker(data: str, stage: str, batches: int, barrier: str, procs: int) -> dict:
    """One process: build, wait until every process of the layout is built, time `batches` steps."""
    import torch
    from llava_packing import demo_llava, demo_trainable

    from l2c_llava.data.readers import read_llava_json
    from l2c_llava.losses import supervised_loss
    from l2c_llava.mllm.build import num_image_tokens
    from l2c_llava.mllm.data import LlavaDataset, ModalityLengthSampler, PackedCollate
    from l2c_llava.models.llm import cpu_has_native_bf16

    file, template, max_len, batch = STAGES[stage]
    root = Path(data)
    model, processor = demo_llava()
    rows = read_llava_json(root / "llava" / file, root / "images", on_bad_row="skip", image_check="exists")
    ds = LlavaDataset(
        rows.items,
        processor,
        template,
        max_len,
        num_image_tokens(model.config.vision_config),
        model.config.image_token_id,
    )
    order = list(ModalityLengthSampler(ds.lengths, batch, 1, seed=42))
    collate = PackedCollate(processor.tokenizer.pad_token_id)
    micro = [collate([ds[i] for i in order[b * batch : (b + 1) * batch]]) for b in range(batches + 1)]
    demo_trainable(model, stage)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if cpu_has_native_bf16() else contextlib.nullcontext()

    def step(b: dict) -> int:
        b = dict(b)
        real = int(b.pop("num_tokens"))
        with amp:
            loss = supervised_loss(model, b, use_cache=False)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return real

    step(micro[0])  # warm-up
    Path(barrier, f"ready-{os.getpid()}").touch()
    while len(list(Path(barrier).glob("ready-*"))) < procs:
        time.sleep(0.05)
    t0 = time.perf_counter()
    tokens = sum(step(b) for b in micro[1:])
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "threads": torch.get_num_threads()}


def _layout(data: str, stage: str, batches: int, procs: int, threads: int) -> dict:
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false"
    )
    with tempfile.TemporaryDirectory() as barrier:
        cmd = [sys.executable, __file__, "--worker", data, stage, str(batches), barrier, str(procs)]
        running = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
        outs = []
        for p in running:
            text, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"a worker failed (exit {p.returncode})")
            outs.append(json.loads(text.strip().splitlines()[-1]))
    seconds = max(o["seconds"] for o in outs)
    tokens = sum(o["tokens"] for o in outs)
    return {
        "tokens_per_second": round(tokens / seconds, 1),
        "seconds": round(seconds, 2),
        "threads_each": threads,
    }


def run(data: str = "runs/demo/data", procs: int = 2, batches: int = 6, rounds: int = 2) -> dict:
    cores = os.cpu_count() or 1
    out: dict = {"cores": cores, "processes": procs, "micro_batches": batches, "rounds": rounds}
    for stage in STAGES:
        rec: dict[str, list] = {"one": [], "parallel": []}
        for _ in range(rounds):
            rec["one"].append(_layout(data, stage, batches, 1, cores))
            rec["parallel"].append(_layout(data, stage, batches, procs, max(1, cores // procs)))
        best = {k: max(r["tokens_per_second"] for r in v) for k, v in rec.items()}
        out[stage] = {
            "one_process_tokens_per_second": best["one"],
            f"{procs}_processes_tokens_per_second": best["parallel"],
            "ratio": round(best["parallel"] / best["one"], 3),
            "rounds": rec,
        }
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        d, s, n, b, p = sys.argv[2:7]
        print(json.dumps(worker(d, s, int(n), b, int(p))))
    else:
        args = sys.argv[1:]
        res = run(args[0] if args else "runs/demo/data", int(args[1]) if len(args) > 1 else 2)
        print(json.dumps(res, indent=2))
