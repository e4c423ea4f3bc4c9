"""Connector comparison at demo scale: LLaVA's MLP vs a BLIP-2-style Q-Former vs a BLIP-3-style
perceiver resampler, on the same encoder, data and training settings, one after the other in one run.

    python bench/connectors.py --run runs/demo [--queries 16] [--kinds mlp2x_gelu,qformer,perceiver]

Needs a finished demo pipeline run (its embedded data and baseline CLIP). For each connector it runs
``l2c mllm pretrain`` and ``l2c mllm finetune`` with the pipeline's demo settings (only
``model.projector_type`` and the connector's shape change), then ``l2c mllm eval-vqa`` on the held-out
questions (our loader: transformers' LLaVA class, and so lmms-eval's llava_hf, takes only the MLP).
Writes RUN/connectors/connectors.json and .md (the pipeline report shows them when present) and a
copy in bench/results/. Compare the ratios (tokens per image, seconds per step, accuracy), not the
absolute times: this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def l2c(*args: str) -> None:
    cmd = [sys.executable, "-m", "l2c_llava.cli", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def run(run_dir: Path, pipeline_config: Path, kinds: list[str], queries: int, vqa_limit: int) -> dict:
    from l2c_llava import layout as L
    from l2c_llava.config import load_config
    from l2c_llava.mllm.build import image_tokens_of, load_llava

    pipe = load_config(str(pipeline_config), [])
    R = L.PipelineRun(run_dir)
    data, vision = R.data, R.clip_model
    for need in (data / L.LLAVA_PRETRAIN, vision / "config.json"):
        if not need.is_file():
            sys.exit(f"{need} is missing: run the demo pipeline first (bash scripts/demo.sh)")
    out = R.connectors
    rows = []
    for kind in kinds:
        base = out / kind
        shape = [f"model.projector_type={kind}", f"model.connector.num_queries={queries}"]
        common = [*shape, f"model.vision_tower={vision}", f"data.image_root={data / L.IMAGES}"]
        stats = {}
        for stage, section, data_file in (
            ("pretrain", pipe.mllm.pretrain, L.LLAVA_PRETRAIN),
            ("finetune", pipe.mllm.finetune, L.LLAVA_INSTRUCT),
        ):
            extra = [f"model.init_from={base / 'pretrain'}"] if stage == "finetune" else []
            t0 = time.perf_counter()
            l2c(
                "mllm",
                stage,
                "--config",
                str(ROOT / section.config),
                *section.overrides,
                *common,
                *extra,
                f"run.output_dir={base / stage}",
                f"data.path={data / data_file}",
            )
            s = json.loads((base / stage / "train_stats.json").read_text())
            s["wall_s"] = round(time.perf_counter() - t0, 1)
            stats[stage] = s
        l2c(
            "mllm",
            "eval-vqa",
            "--model",
            str(base / "finetune"),
            "--questions",
            str(data / L.VQA["test"]),
            "--image-root",
            str(data / L.IMAGES),
            "--train-json",
            str(data / L.LLAVA_INSTRUCT),
            "--limit",
            str(vqa_limit),
            "--out",
            str(base / "vqa"),
        )
        vqa = json.loads((base / "vqa" / "vqa_metrics.json").read_text())
        model = load_llava(base / "finetune" / "model")
        proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
        rows.append(
            {
                "connector": kind,
                "image_tokens": image_tokens_of(model.config),
                "connector_params": proj,
                "pretrain_s_per_step": round(
                    stats["pretrain"]["seconds_this_session"] / stats["pretrain"]["steps"], 2
                ),
                "finetune_s_per_step": round(
                    stats["finetune"]["seconds_this_session"] / stats["finetune"]["steps"], 2
                ),
                "pretrain_tokens_per_s": stats["pretrain"]["tokens_per_second"],
                "finetune_tokens_per_s": stats["finetune"]["tokens_per_second"],
                "pretrain_final_loss": round(stats["pretrain"]["final_loss"], 4),
                "finetune_final_loss": round(stats["finetune"]["final_loss"], 4),
                "vqa_accuracy": vqa.get("accuracy"),
                "vqa_n": vqa.get("n"),
                "vqa_prior": (vqa.get("prior") or {}).get("accuracy"),
            }
        )
        del model
    ref = next((r for r in rows if r["connector"] == "mlp2x_gelu"), rows[0])
    for r in rows:
        r["tokens_vs_mlp"] = round(r["image_tokens"] / ref["image_tokens"], 3)
        r["pretrain_speed_vs_mlp"] = round(ref["pretrain_s_per_step"] / r["pretrain_s_per_step"], 2)
        r["finetune_speed_vs_mlp"] = round(ref["finetune_s_per_step"] / r["finetune_s_per_step"], 2)
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "queries": queries,
        "run": str(run_dir),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }


def table(res: dict) -> str:
    cols = [
        ("connector", "connector"),
        ("image_tokens", "tokens / image"),
        ("connector_params", "connector params"),
        ("pretrain_s_per_step", "pretrain s/step"),
        ("pretrain_speed_vs_mlp", "pretrain speed vs MLP"),
        ("finetune_s_per_step", "finetune s/step"),
        ("finetune_speed_vs_mlp", "finetune speed vs MLP"),
        ("pretrain_final_loss", "pretrain loss"),
        ("finetune_final_loss", "finetune loss"),
        ("vqa_accuracy", "VQA acc"),
        ("vqa_prior", "answer prior"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            cells.append(
                f"{v:,}"
                if isinstance(v, int) and k == "connector_params"
                else (f"{v:.3f}" if isinstance(v, float) and k.startswith("vqa") else str(v))
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="a finished demo pipeline run folder")
    p.add_argument("--pipeline-config", default=str(ROOT / "pipeline" / "configs" / "demo.yaml"))
    p.add_argument("--kinds", default="mlp2x_gelu,qformer,perceiver")
    p.add_argument("--queries", type=int, default=16, help="vision tokens of the Q-Former / perceiver")
    p.add_argument("--vqa-limit", type=int, default=200)
    a = p.parse_args(argv)
    from l2c_llava.io import write_results
    from l2c_llava.layout import PipelineRun

    run_dir = Path(a.run).resolve()
    res = run(run_dir, Path(a.pipeline_config), a.kinds.split(","), a.queries, a.vqa_limit)
    md = f"# Connectors at demo scale ({res['host']}, {res['date']})\n\n" + table(res)
    here = (HERE / "results", f"connectors-{res['host']}")
    write_results([(PipelineRun(run_dir).connectors, "connectors"), here], res, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
