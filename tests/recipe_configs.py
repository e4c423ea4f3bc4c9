"""Small recipe configs over the tiny models (conftest's fixtures) and the session's synthetic dataset, each
written to a YAML file beside its run folder: what several test modules train and resume with."""

from __future__ import annotations

import textwrap
from pathlib import Path

from l2c_llava.config import load_config


def stage1_config(tmp_path: Path, base: Path, data: Path, out: Path, extra: str = "") -> Path:
    """Stage 1 on the LLM folder `base` (LoRA r 4, 3 steps, a checkpoint each step) over the dataset `data`;
    `extra`: YAML appended. Returns the file."""
    cfg = tmp_path / f"{out.name}.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        # l2c stage1 --config {cfg}
        # test config
        recipe: stage1
        run: {{output_dir: {out}, seed: 3}}
        model: {{name_or_path: {base}, max_length: 48, gradient_checkpointing: false}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          train: {data}/captions/train.jsonl
          eval: {data}/retrieval/karpathy.json
          eval_pairs: {data}/captions/test.jsonl
          max_samples: 24
        train: {{lr: 1.0e-3, batch_size: 4, max_steps: 3, warmup_steps: 1, log_every: 1, save_every: 1, keep_checkpoints: 2}}
        eval: {{batch_size: 8}}
        """)
        + extra
    )
    return cfg


def clip_config(tmp_path, synth_dir, out, extra=()):
    """A CLIP from scratch (32-wide towers, 3 steps): (the file, its config with the `extra` overrides)."""
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(f"""recipe: clip
run: {{output_dir: {out}, seed: 3}}
model: {{image_size: 32, patch_size: 16, vision_width: 32, vision_layers: 2, vision_heads: 2, text_width: 32,
         text_layers: 1, text_heads: 2, context_length: 24, projection_dim: 16}}
data: {{train: {synth_dir}/retrieval/karpathy.json, image_root: {synth_dir}/images, num_workers: 0}}
train: {{batch_size: 8, max_steps: 3, log_every: 1, save_every: 2, mixed_precision: "no"}}
""")
    return path, load_config(path, list(extra))


def stage2_config(root, vision_dir, encoder, synth_dir, out, extra=()):
    """Stage 2 over conftest's stage2_parts (`root`'s caches, its tower and encoder; 4 steps): the config with
    the `extra` overrides."""
    text = f"""recipe: stage2
run: {{output_dir: {out}, seed: 1}}
text_encoder: {{path: {encoder}}}
cache: {{dir: {root}/cache}}
vision: {{name_or_path: {vision_dir}, image_size: 32, gradient_checkpointing: false}}
adapter: {{num_blocks: 2, projection_dim: 16}}
data: {{train: {synth_dir}/captions/train.jsonl, image_root: {synth_dir}/images, num_workers: 0}}
train: {{lr: 1.0e-3, batch_size: 4, max_steps: 4, log_every: 1, save_every: 1, mixed_precision: "no"}}
"""
    path = out.parent / f"{out.name}.yaml"
    path.write_text(text)
    return load_config(path, list(extra))


def mllm_config(tmp_path, llava_parts, synth_dir, stage, out, extra=()):
    """A LLaVA `stage` (pretrain: the projector; finetune: everything) over conftest's llava_parts, 3 steps:
    (the file, its config with the `extra` overrides)."""
    path = tmp_path / f"{out.name}.yaml"
    tune = "projector" if stage == "pretrain" else "full"
    data = "pretrain" if stage == "pretrain" else "instruct"
    template = "plain" if stage == "pretrain" else "vicuna_v1"
    path.write_text(f"""recipe: mllm
run: {{output_dir: {out}, seed: 3}}
model: {{vision_tower: {llava_parts / "vision"}, llm: {{name_or_path: {llava_parts / "llm"}, torch_dtype: float32}}}}
data: {{path: {synth_dir}/llava/{data}.json, image_root: {synth_dir}/images, template: {template}, max_length: 120,
        num_workers: 0}}
train: {{stage: {stage}, tune: {tune}, lr: 1.0e-3, global_batch_size: 4, per_device_batch_size: 2, max_steps: 3,
         mixed_precision: "no", gradient_checkpointing: false, save_every: 1, log_every: 1, warmup_ratio: 0.0}}
""")
    return path, load_config(path, list(extra))
