"""Pack a trained demo-world CLIP run into the shipped asset ``l2c_llava/assets/demo_clip/``.

Called by ``scripts/pretrain_demo_clip.sh`` after training and the held-out evaluation:

    python scripts/pack_demo_clip.py --run runs/demo_clip/train --heldout runs/demo_clip/heldout.json \
        --data runs/demo_clip/data --out l2c_llava/assets/demo_clip

The folder is a standard transformers ``CLIPModel`` folder (config, safetensors weights, OpenAI CLIP's
BPE tokenizer, ``preprocessor_config.json``) plus what describes it: ``README.md`` (a model card),
``heldout_metrics.json``, ``training_summary.json`` and ``SHA256SUMS``. Weights are stored in
float16 (as OpenAI ships CLIP) to keep the asset small; ``config.json`` says float32, so every
loader computes in float32. Prints the weights' sha256 for ``l2c_llava.embedded.DEMO_CLIP_SHA256``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def training_summary(run: Path) -> dict:
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
    stats = json.loads((run / "train_stats.json").read_text())
    every = max(1, len(log) // 40)
    return {
        "steps": log[-1]["step"],
        "epochs": log[-1]["epoch"] + 1,
        "first_loss": log[0]["loss"],
        "final_loss": log[-1]["loss"],
        "final_logit_scale": round(log[-1]["logit_scale"], 2),
        "loss_curve": [[r["step"], round(r["loss"], 4)] for r in log[::every]]
        + [[log[-1]["step"], round(log[-1]["loss"], 4)]],
        "last_session": stats,
    }


def _fmt_set(name: str, r: dict) -> list[str]:
    rows = [
        f"| {name} ({r['images']} images, {r['captions']} captions) | metric | value | 95% interval |",
        "|---|---|---|---|",
    ]
    for m, v in r.items():
        if isinstance(v, dict) and "value" in v:
            rows.append(f"| | {m} | {v['value']:.3f} | {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f} |")
    return rows


def card(cfg: dict, summary: dict, heldout: dict, manifest: dict, data_manifest: dict) -> str:
    m, h = cfg["model"], heldout.get("health", {})
    probe = h.get("probe", {})
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: zero-shot-image-classification",
        "tags: [clip, l2c-llava, synthetic]",
        "license: apache-2.0",
        "---",
        "# demo-world CLIP (l2c-llava)",
        "",
        "The l2c-llava demo's counterpart of OpenAI's CLIP ViT-L/14-336: a small CLIP pretrained once on a",
        "synthetic corpus of flat geometric scenes, so that the demo can do what the real method does: use a",
        "*pretrained* CLIP as the LLaVA baseline as is, and fine-tune that same tower against the LLM's caption",
        "features in stage 2. It knows nothing outside the synthetic world.",
        "",
        "## Load",
        "```python",
        "from transformers import CLIPModel, AutoProcessor",
        "from l2c_llava.embedded import demo_clip_path      # checks the weights' sha256",
        "model = CLIPModel.from_pretrained(demo_clip_path())",
        "processor = AutoProcessor.from_pretrained(demo_clip_path())",
        "```",
        "In configs: `embedded:demo-clip` wherever a CLIP folder goes (`baseline.vision`, `vision.name_or_path`,",
        "`model.vision_tower`).",
        "",
        "## Model",
        f"- vision: ViT, {m['image_size']} px, patch {m['patch_size']} ({(m['image_size'] // m['patch_size']) ** 2} patch tokens), "
        f"width {m['vision_width']}, {m['vision_layers']} layers, {m['vision_heads']} heads",
        f"- text: {m['text_layers']}-layer causal transformer, width {m['text_width']}, OpenAI CLIP's BPE, {m['context_length']} tokens",
        f"- shared embedding: {m['projection_dim']}; weights stored in float16, computed in float32",
        "",
        "## Training (reproduce: `bash scripts/pretrain_demo_clip.sh`, resumable)",
        f"- data: `l2c data synth --images {data_manifest['options']['images']} --seed {data_manifest['options']['seed']} "
        f"--val-fraction {data_manifest['options']['val_fraction']} --test-fraction {data_manifest['options']['test_fraction']}` "
        f"({data_manifest['stats']['splits']['train']} training images; the demo uses seed 0, so none of its images)",
        "- captions: the 5 COCO-like alternatives per image (several say where objects are) and, with probability "
        f"{cfg['data']['dense_share']}, the dense caption cut at {m['context_length']} tokens (its first sentences place 2-3 objects)",
        f"- `l2c clip pretrain --config stage2/configs/clip_demo_pretrain.yaml`: batch {cfg['train']['batch_size']}, "
        f"{cfg['train']['epochs']} epochs ({summary['steps']} steps), AdamW lr {cfg['train']['lr']}, weight decay "
        f"{cfg['train']['weight_decay']}, cosine with {cfg['train']['warmup_ratio']} warmup, {cfg['train']['mixed_precision']} autocast",
        f"- loss {summary['first_loss']:.3f} at the first logged step, {summary['final_loss']:.3f} at the last; logit scale "
        f"{summary['final_logit_scale']}",
        "",
        "## Held-out metrics (the corpus's test split, never trained on)",
    ]
    for name, r in heldout["sets"].items():
        lines += _fmt_set(name, r) + [""]
    if h:
        lines += [
            "Encoder health (test images):",
            f"- median cosine between two different images: {h['pooled']['median_cosine']} (pooled), "
            f"{h['patch_mean']['median_cosine']} (mean patch token)",
            f"- variance share of the top principal direction: {h['pooled']['top_direction_share']} (pooled)",
            f"- patch probe on the penultimate-layer patch tokens ({probe.get('train_scenes')} train / "
            f"{probe.get('test_scenes')} test scenes): "
            + ", ".join(
                f"{k} {probe['test'][k]} (chance {probe['chance'][k]})" for k in probe.get("test", {})
            ),
            "",
        ]
    lines += ["## Files", "| file | sha256 |", "|---|---|"]
    lines += [f"| {name} | `{digest}` |" for name, digest in manifest.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch
    import yaml
    from transformers import CLIPModel

    from l2c_llava.io import atomic_write_json, atomic_write_text, publish_folder, sha256_file

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the l2c clip pretrain run folder")
    p.add_argument("--heldout", required=True, help="l2c clip eval --out JSON of the trained model")
    p.add_argument("--data", required=True, help="the training corpus (its manifest.json is cited)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    run, out = Path(a.run), Path(a.out)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    heldout = json.loads(Path(a.heldout).read_text())
    data_manifest = json.loads((Path(a.data) / "manifest.json").read_text())
    summary = training_summary(run)

    def build(tmp: Path) -> None:
        model = CLIPModel.from_pretrained(run / "model", dtype=torch.float32)
        model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text())
        for c in (config, config.get("text_config", {}), config.get("vision_config", {})):
            for key in ("dtype", "torch_dtype"):
                if key in c:
                    c[key] = "float32"
        config["dtype"] = "float32"
        atomic_write_json(tmp / "config.json", config)
        for f in (run / "model").iterdir():
            if f.name not in ("config.json", "model.safetensors") and f.is_file():
                shutil.copy2(f, tmp / f.name)
        atomic_write_json(tmp / "heldout_metrics.json", heldout)
        atomic_write_json(tmp / "training_summary.json", summary)
        manifest = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        atomic_write_text(tmp / "SHA256SUMS", "".join(f"{d}  {n}\n" for n, d in manifest.items()))
        atomic_write_text(tmp / "README.md", card(cfg, summary, heldout, manifest, data_manifest))

    publish_folder(out, build)
    print(f"packed {out}; model.safetensors sha256 {sha256_file(out / 'model.safetensors')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
