"""Every YAML shipped under stage1/, stage2/, mllm/ loads, validates and opens with its command."""

from __future__ import annotations

import pytest

from l2c_llava.config import load_config
from l2c_llava.config_names import shipped_configs

from .conftest import ROOT

CONFIGS = shipped_configs(ROOT)


def test_configs_are_shipped_for_every_stage():
    folders = {c.path.relative_to(ROOT).parts[0] for c in CONFIGS}
    assert folders == {"stage1", "stage2", "mllm", "pipeline"}
    names = {c.path.relative_to(ROOT).as_posix() for c in CONFIGS}
    for must in (
        "stage1/configs/demo.yaml",
        "stage1/configs/quick.yaml",
        "stage2/configs/demo.yaml",
        "stage2/configs/quick.yaml",
        "mllm/configs/demo_pretrain.yaml",
        "mllm/configs/demo_finetune.yaml",
        "pipeline/configs/demo.yaml",
        "pipeline/configs/quick.yaml",
        "pipeline/configs/paper.yaml",
    ):
        assert must in names


@pytest.mark.parametrize("shipped", CONFIGS, ids=lambda c: c.path.relative_to(ROOT).as_posix())
def test_shipped_config_validates_and_opens_with_its_command(shipped):
    cfg = load_config(shipped.path)
    rel = shipped.path.relative_to(ROOT).as_posix()
    assert shipped.command, f"{rel}: the first line must be a comment holding the command that runs it"
    assert f"--config {rel}" in shipped.command and (
        "l2c " in shipped.command or "l2c_llava.cli" in shipped.command
    )
    assert shipped.summary, f"{rel}: the second comment line says what the config is"
    stage_word = {
        "stage1": "stage1",
        "stage2": "stage2",
        "mllm": "mllm",
        "clip": "clip",
        "pipeline": "pipeline",
    }[cfg.recipe]
    assert f" {stage_word}" in shipped.command


def test_real_scale_configs_follow_the_recipe():
    s1 = load_config(ROOT / "stage1/configs/llama3_8b_cc.yaml")
    assert (s1.train.lr, s1.train.batch_size, s1.train.warmup_steps, s1.train.loss_scale) == (
        2e-4,
        64,
        300,
        50.0,
    )
    assert s1.model.max_length == 512 and s1.mntp.enabled and s1.mntp.lr == 5e-5
    s2 = load_config(ROOT / "stage2/configs/openai_l14_336.yaml")
    assert (s2.train.lr, s2.train.batch_size, s2.train.epochs, s2.train.weight_decay) == (1e-5, 512, 4, 0.05)
    assert (
        s2.vision.image_size == 336 and s2.adapter.projection_dim == 1280 and s2.data.format == "webdataset"
    )
    pre = load_config(ROOT / "mllm/configs/llava15_7b_pretrain.yaml")
    fin = load_config(ROOT / "mllm/configs/llava15_7b_finetune.yaml")
    lora = load_config(ROOT / "mllm/configs/llava15_7b_finetune_lora.yaml")
    assert (pre.train.lr, pre.train.global_batch_size, pre.data.template, pre.train.tune) == (
        1e-3,
        256,
        "plain",
        "projector",
    )
    assert (fin.train.lr, fin.train.global_batch_size, fin.data.template, fin.train.tune) == (
        2e-5,
        128,
        "vicuna_v1",
        "full",
    )
    assert (lora.train.lr, lora.train.projector_lr, lora.train.lora.r, lora.train.lora.alpha) == (
        2e-4,
        2e-5,
        128,
        256,
    )


ACCELERATE = sorted(ROOT.glob("*/accelerate/*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_accelerate_launch_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes == 8 and cfg.mixed_precision in ("bf16", "fp16")


def test_every_launch_line_points_at_a_shipped_accelerate_config():
    for c in CONFIGS:
        if "--config_file" in c.command:
            target = c.command.split("--config_file", 1)[1].split()[0]
            assert (ROOT / target).is_file(), f"{c.path}: launch line names missing {target}"


def test_pipeline_configs_name_shipped_step_configs_and_follow_the_recipe():
    from l2c_llava.pipeline import load_pipeline

    for name in ("demo", "quick", "paper"):
        pipe = load_pipeline(str(ROOT / "pipeline" / "configs" / f"{name}.yaml"), [])
        assert [s.name for s in pipe.steps][-1] == "report" and len(
            {s.fingerprint for s in pipe.steps}
        ) == len(pipe.steps)
    paper = load_pipeline(str(ROOT / "pipeline/configs/paper.yaml"), [])
    assert paper.cfg.baseline.vision == "openai/clip-vit-large-patch14-336" and "data" not in [
        s.name for s in paper.steps
    ]
    assert paper.cfg.eval.tasks == ["paper"] and paper.cfg.mllm.finetune.launch[:2] == [
        "accelerate",
        "launch",
    ]
