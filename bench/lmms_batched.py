"""lmms-eval per question: lmms-eval's ``llava_hf`` at batch 1 (what ``l2c mllm eval`` ran before)
against the project's batched ``l2c_llava`` model, side by side in one process, on the same questions.

Each run is lmms-eval's own ``simple_evaluate`` on the local tasks (the demo's eval step: l2c_vqa and
l2c_pope, the same prompts, images and generation settings), with the model and the task index made
before the clock starts (both once per process in ``l2c mllm eval`` too). Reports seconds per question
for each run, the ratio to the first run, the machine's load average around the runs, and every
answer (``--out``), so the answers can be compared across runs (tests/test_lmms.py does).

The model: ``--model DIR`` (a trained LLaVA, e.g. runs/demo/mllm/baseline/finetune), or by default the
demo-sized LLaVA assembled on the spot (the shipped demo CLIP, 49 image tokens, + the embedded
SmolLM2-135M, float32 as the demo trains it; its projector untrained, so its answers run to
max_new_tokens where a trained one stops after a few tokens: the decode share is the larger here).
The questions: ``--data`` (the embedded dataset; default runs/demo/data where it exists, else a small
synthetic set drawn at the demo's image size).

    python bench/lmms_batched.py                       # llava_hf:1 vs l2c_llava:8, 48 questions per task
    python bench/lmms_batched.py --runs llava_hf:1,l2c_llava:1,l2c_llava:4 --questions 6 --model DIR --out o
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_llava(out: Path) -> Path:
    from types import SimpleNamespace

    from l2c_llava.embedded import EMBEDDED_CLIP, EMBEDDED_LLM
    from l2c_llava.mllm.build import build_llava, save_llava
    from l2c_llava.models.reference import resolve_vision_path as resolve_vision

    model, processor = build_llava(
        resolve_vision(EMBEDDED_CLIP), SimpleNamespace(name_or_path=EMBEDDED_LLM), torch_dtype="float32"
    )
    save_llava(model, processor, out, {"template": "vicuna_v1", "image_aspect_ratio": "pad"})
    return out


def synthetic_data(out: Path, images: int = 240) -> Path:
    from l2c_llava.data.synthetic import SynthOptions, generate

    generate(out, SynthOptions(images=images, seed=3, size=224), workers=1, progress=False)
    return out


def answers_by_doc(samples: list[dict]) -> dict[str, str]:
    out = {}
    for s in samples:
        r = s["filtered_resps"]
        out[str(s["doc_id"])] = r[0] if isinstance(r, list) else r
    return out


def run(
    model_dir: str | None = None,
    data: str | None = None,
    runs: list[tuple[str, int]] = (("llava_hf", 1), ("l2c_llava", 8)),
    tasks: list[str] = ("l2c_vqa", "l2c_pope"),
    questions: int = 48,
) -> dict:
    import torch

    from l2c_llava.mllm.lmms import prepare_local_tasks
    from l2c_llava.mllm.lmms_entry import pin_pil_backend, register_models

    pin_pil_backend()  # what `l2c mllm eval` does in lmms-eval's process
    register_models()
    from lmms_eval import evaluator
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(model_dir) if model_dir else demo_llava(tmp / "llava")
        if data is None:
            data = "runs/demo/data" if (ROOT / "runs/demo/data/eval").is_dir() else None
        data_dir = Path(data) if data else synthetic_data(tmp / "data")
        include = prepare_local_tasks(list(tasks), data_dir, tmp / "eval", limit=questions)
        tm = TaskManager(include_path=str(include))
        results = []
        load_before = os.getloadavg()
        for name, batch in runs:
            t0 = time.perf_counter()
            lm = get_model(name).create_from_arg_string(
                f"pretrained={model},device=cpu" + (",device_map=cpu" if name == "llava_hf" else ""),
                {"batch_size": batch},
            )
            loaded = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = evaluator.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=tm, log_samples=True, bootstrap_iters=0
            )
            seconds = time.perf_counter() - t0
            got = {t: answers_by_doc(res["samples"][t]) for t in tasks}
            n = sum(len(a) for a in got.values())
            results.append(
                {
                    "model": name,
                    "batch": batch,
                    "load_s": round(loaded, 2),
                    "eval_s": round(seconds, 2),
                    "questions": n,
                    "s_per_question": round(seconds / n, 4),
                    "answers": got,
                }
            )
            del lm
        first = results[0]["s_per_question"]
        for r in results:
            r["speedup_over_first"] = round(first / r["s_per_question"], 2)
        return {
            "model": str(
                model_dir or "demo-sized LLaVA (demo CLIP + SmolLM2-135M, float32, untrained projector)"
            ),
            "data": str(data or "synthetic, 240 images at 224 px"),
            "tasks": list(tasks),
            "questions_per_task": questions,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "runs": results,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a LLaVA folder (default: the demo-sized one, built)")
    ap.add_argument(
        "--data", default=None, help="the embedded dataset (default: runs/demo/data or synthetic)"
    )
    ap.add_argument("--runs", default="llava_hf:1,l2c_llava:8", help="MODEL:BATCH,... in order")
    ap.add_argument("--tasks", default="l2c_vqa,l2c_pope")
    ap.add_argument("--questions", type=int, default=48, help="questions per task")
    ap.add_argument("--out", default=None, help="folder for lmms_batched.json (with every answer)")
    a = ap.parse_args()
    runs = [(m, int(b)) for m, _, b in (x.partition(":") for x in a.runs.split(","))]
    res = run(a.model, a.data, runs, a.tasks.split(","), a.questions)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "lmms_batched.json").write_text(json.dumps(res, indent=1))
    print(
        f"model: {res['model']}; {res['questions_per_task']} questions per task of {', '.join(res['tasks'])}"
    )
    print(f"load average before / after: {res['loadavg_before']} / {res['loadavg_after']}")
    print("| lmms-eval model | batch | questions | eval s | s / question | speed-up over the first |")
    print("|---|---|---|---|---|---|")
    for r in res["runs"]:
        print(
            f"| {r['model']} | {r['batch']} | {r['questions']} | {r['eval_s']:.1f} | "
            f"{r['s_per_question']:.3f} | {r['speedup_over_first']:.2f}x |"
        )


if __name__ == "__main__":
    main()
