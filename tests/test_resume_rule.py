"""One rule decides whether a run can resume (train/resume.py, issue 20), the same in every recipe and in the
pipeline: raising train.max_steps resumes, a changed training setting is refused with the key named,
bookkeeping may change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l2c_llava.config import load_config
from l2c_llava.errors import InputError
from l2c_llava.io import atomic_write_json
from l2c_llava.mllm.train import MllmRecipe
from l2c_llava.pipeline import load_pipeline
from l2c_llava.stage1.train import Stage1Recipe
from l2c_llava.stage2.clip_baseline import ClipPretrainRecipe
from l2c_llava.stage2.train import Stage2Recipe
from l2c_llava.train.resume import may_change_on_resume, resume_key

from .recipe_configs import clip_config, mllm_config, stage1_config, stage2_config
from .test_pipeline import QUICK

QUICK_STAGE1 = str(Path(QUICK).parents[2] / "stage1" / "configs" / "quick.yaml")


def test_a_key_added_later_at_its_original_value_changes_nothing():
    """text_encoder.torch_dtype came after stage-2 runs existed: a saved config without it is the same run
    as one with "auto" (same_run, differences, fingerprints); "bfloat16" is a change."""
    from l2c_llava.train.resume import differences, fingerprint_keys, flat_config

    old = {"text_encoder": {"path": "enc"}, "train": {"lr": 1.0}}
    auto = {"text_encoder": {"path": "enc", "torch_dtype": "auto"}, "train": {"lr": 1.0}}
    bf16 = {"text_encoder": {"path": "enc", "torch_dtype": "bfloat16"}, "train": {"lr": 1.0}}
    assert flat_config(old) == flat_config(auto) and not differences(old, auto)
    assert differences(old, bf16) == ["text_encoder.torch_dtype"]
    assert fingerprint_keys(flat_config(auto)) == fingerprint_keys(
        {"text_encoder.path": "enc", "train.lr": 1.0}
    )
    assert resume_key(flat_config(old)) == resume_key(flat_config(auto)) != resume_key(flat_config(bf16))


def test_a_removed_key_loads_at_its_old_value_and_keeps_fingerprints(tmp_path):
    """data.instructions.separator (stage 1) was never read and is gone: an old config or run folder that
    still holds it at its value loads and compares equal, another value is an error naming the key, and a
    fingerprint counts it as before (the pinned fingerprints in test_pipeline.py check the shipped ones)."""
    from l2c_llava.config import ConfigError
    from l2c_llava.train.resume import differences, fingerprint_keys

    old = {"data": {"instructions": {"short_to_long": "q", "separator": "!@#$%^&*()"}}, "train": {"lr": 1.0}}
    new = {"data": {"instructions": {"short_to_long": "q"}}, "train": {"lr": 1.0}}
    assert not differences(old, new)
    flat_new = {"data.instructions.short_to_long": "q", "train.lr": 1.0}
    assert fingerprint_keys(flat_new)["data.instructions.separator"] == "!@#$%^&*()"
    assert "data.instructions.separator" not in fingerprint_keys({"train.lr": 1.0})
    # in the place it had: a fingerprint hashes the keys in order (a key moved to the end re-ran stage 1)
    from l2c_llava.config.core import config_to_dict, flatten

    new_flat = flatten(config_to_dict(load_config(QUICK_STAGE1)))
    items = list(new_flat.items())
    at = [k for k, _ in items].index("data.instructions.long_to_short") + 1
    old_flat = dict(items[:at] + [("data.instructions.separator", "!@#$%^&*()")] + items[at:])
    got = list(fingerprint_keys(new_flat))
    assert got == [k for k in old_flat if k in got] and "data.instructions.separator" in got

    cfg_file = tmp_path / "s1.yaml"
    cfg_file.write_text(
        "recipe: stage1\nrun: {output_dir: runs/x}\nmodel: {name_or_path: embedded:smollm2-135m-instruct}\n"
        "data: {train: d/train.jsonl, eval: d/k.json, instructions: {separator: '!@#$%^&*()'}}\n"
    )
    cfg = load_config(cfg_file)
    assert not hasattr(cfg.data.instructions, "separator")
    with pytest.raises(ConfigError, match=r"data.instructions.separator.*removed key"):
        load_config(cfg_file, ["data.instructions.separator=##"])


def test_the_rule():
    for key in (
        "run.resume",
        "run.root",
        "run.output_dir",
        "train.log_every",
        "train.save_every",
        "train.keep_checkpoints",
        "train.report_to",
        "data.num_workers",
        "train.max_steps",
        "train.epochs",
        "eval.batch_size",
        "export.dir",
    ):
        assert may_change_on_resume(key), key
    for key in (
        "train.lr",
        "train.batch_size",
        "train.schedule",
        "model.name_or_path",
        "data.train",
        "run.seed",
        "lora.r",
        "vision.name_or_path",
    ):
        assert not may_change_on_resume(key), key
    assert resume_key({"train.max_steps": 2, "train.lr": 1.0}) == resume_key(
        {"train.max_steps": 9, "train.lr": 1.0}
    )
    assert resume_key({"train.lr": 1.0}) != resume_key({"train.lr": 2.0})


def _longer_then_changed(make, steps_of, longer=3, changed="train.lr=0.0007", key="train.lr"):
    """`make(extra)` -> a recipe on one run folder: 2 steps, then `longer` (resumes), then a changed key."""
    assert steps_of(make(["train.max_steps=2"]).run()) == 2
    assert steps_of(make([f"train.max_steps={longer}", "train.log_every=2"]).run()) == longer
    with pytest.raises(InputError, match=rf"another config.*{key}|{key}.*another config|may not change"):
        make([f"train.max_steps={longer}", changed]).run()
    assert steps_of(make([f"train.max_steps={longer}", changed, "run.resume=false"]).run()) == longer


def test_stage1(tmp_path, tiny_llama, synth_dir):
    path = stage1_config(tmp_path, tiny_llama, synth_dir, tmp_path / "run")
    common = ["eval.cra=false", "data.eval=null", "data.eval_pairs=null", "eval.causal_baseline=false"]

    def make(extra):
        return Stage1Recipe(load_config(path, [*common, *extra]))

    _longer_then_changed(make, lambda m: m["train"]["steps"])
    log = [json.loads(x)["step"] for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3]
    # a finished run of the same config (but for bookkeeping) is reused as it is
    assert make(["train.max_steps=3", "train.lr=0.0007", "train.log_every=5"]).finished() is not None
    assert make(["train.max_steps=4", "train.lr=0.0007"]).finished() is None


def test_stage2(tmp_path, stage2_parts, synth_dir):
    root, vision_dir, encoder, _ = stage2_parts
    _longer_then_changed(
        lambda extra: Stage2Recipe(
            stage2_config(root, vision_dir, encoder, synth_dir, tmp_path / "r", extra)
        ),
        lambda stats: stats["steps"],
    )


def test_clip_baseline(tmp_path, synth_dir):
    _longer_then_changed(
        lambda extra: ClipPretrainRecipe(clip_config(tmp_path, synth_dir, tmp_path / "c", extra)[1]),
        lambda stats: stats["steps"],
    )


def test_llava(tmp_path, llava_parts, synth_dir):
    _longer_then_changed(
        lambda extra: MllmRecipe(
            mllm_config(tmp_path, llava_parts, synth_dir, "pretrain", tmp_path / "m", extra)[1]
        ),
        lambda stats: stats["steps"],
    )


def test_pipeline_resumes_a_step_whose_run_got_longer(tmp_path):
    out = tmp_path / "p"
    pipe = load_pipeline(QUICK, [f"run.output_dir={out}"])
    steps = {}
    for s in pipe.steps:
        s.done_marker.parent.mkdir(parents=True, exist_ok=True)
        if s.done_marker.suffix == ".safetensors":  # a weights file must be whole to count as done
            import torch
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(2)}, str(s.done_marker))
        else:
            s.done_marker.touch()
        steps[s.name] = {"fingerprint": s.fingerprint, "resume_key": s.resume_key, "status": "done"}
    atomic_write_json(out / "pipeline" / "state.json", {"steps": steps})

    def plan(*overrides):
        return load_pipeline(QUICK, [f"run.output_dir={out}", *overrides]).run(
            dry_run=True, echo=lambda *_: None
        )

    assert set(plan().values()) == {"skip"}
    longer = plan("stage2.overrides=[train.max_steps=9]")
    assert longer["stage2"] == "resume" and longer["text_cache"] == "skip" and longer["retrieval"] == "fresh"
    assert plan("stage2.overrides=[train.lr=0.0003]")["stage2"] == "fresh"
    assert plan("stage1.overrides=[train.max_steps=9]")["stage1"] == "resume"
    assert plan("mllm.pretrain.overrides=[train.max_steps=9]")["pretrain_baseline"] == "resume"
