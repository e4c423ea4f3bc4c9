"""Every shipped accelerate launch config, turned into the plugin accelerate builds from it (through
accelerate's own launcher code), with the values the training config sets: micro batch, accumulation,
clipping, precision, ZeRO stage / FSDP sharding: the config each engine would be given is checked here (the launches themselves run in
test_launches.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import ROOT

# each recipe's paper-scale training config, launched with the yamls beside it
PAPER = {
    "stage1": "stage1/configs/llama3_8b_cc.yaml",
    "stage2": "stage2/configs/openai_l14_336.yaml",
    "mllm": "mllm/configs/llava15_7b_finetune.yaml",
}
LAUNCH = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("*/accelerate/*.yaml"))


def launch_env(yaml_path: Path) -> tuple[dict[str, str], int]:
    """The environment `accelerate launch --config_file yaml` gives each process, and its process count."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(yaml_path), "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # what accelerate's launch_command adds before deepspeed_launcher
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(
            fields + (["mixed_precision"] if mp_from_config else [])
        )
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}, int(args.num_processes)


def training_values(recipe: str, world: int) -> dict:
    from l2c_llava.config.loader import load_config

    t = load_config(ROOT / PAPER[recipe]).train
    if recipe == "mllm":
        micro, accum = t.per_device_batch_size, t.global_batch_size // (t.per_device_batch_size * world)
    else:
        micro, accum = t.batch_size, t.grad_accum
    return {"micro": micro, "accum": accum, "clip": t.grad_clip, "precision": t.mixed_precision}


def test_every_recipe_ships_launch_configs():
    assert {p.split("/")[0] for p in LAUNCH} == set(PAPER) and len(LAUNCH) == 11


@pytest.mark.parametrize("yaml_path", LAUNCH)
def test_launch_config_resolves_to_the_training_configs_values(yaml_path, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    from l2c_llava.train.accelerator import deepspeed_values

    env, world = launch_env(ROOT / yaml_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    recipe, kind = yaml_path.split("/")[0], Path(yaml_path).stem
    want = training_values(recipe, world)
    assert world == 8
    resolved = {"launch": yaml_path, "processes": world, **want}
    if kind.startswith("deepspeed"):
        plugin = DeepSpeedPlugin()
        ds = plugin.deepspeed_config
        # today's accelerate, left alone: micro batch "auto" with no DataLoader prepared -> ValueError at
        # start; clipping "auto" -> 1.0 (stage 2's 5.0 silently lost)
        assert plugin.is_auto("train_micro_batch_size_per_gpu") and plugin.is_auto("gradient_clipping")
        deepspeed_values(
            ds, micro_batch=want["micro"], accum=want["accum"], grad_clip=want["clip"], world=world
        )
        # what accelerate's _prepare_deepspeed then fills without a DataLoader: nothing may change
        plugin.deepspeed_config_process(must_match=False, gradient_clipping=1.0)
        assert ds["train_micro_batch_size_per_gpu"] == want["micro"]
        assert ds["gradient_accumulation_steps"] == want["accum"]
        assert ds["gradient_clipping"] == float(want["clip"] or 0.0)
        assert ds["train_batch_size"] == want["micro"] * want["accum"] * world
        assert ds["zero_optimization"]["stage"] == int(kind[-1]) == plugin.zero_stage
        resolved.update(zero_stage=plugin.zero_stage, ds_clip=ds["gradient_clipping"])
    elif kind == "fsdp":
        assert env["FSDP_SYNC_MODULE_STATES"] == "true"  # rank 0's weights broadcast: needs a GPU to build
        monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # so the plugin builds on this CPU
        monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # (it implies the broadcast)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.use_orig_params and "FULL_SHARD" in str(plugin.sharding_strategy)
        layers = set(plugin.transformer_cls_names_to_wrap or [])
        assert layers and layers <= {"LlamaDecoderLayer", "CLIPEncoderLayer", "MistralDecoderLayer"}
        resolved.update(sharding=str(plugin.sharding_strategy), wrap=sorted(layers))
    # the training config's precision is passed to Accelerator() and wins over the yaml's
    assert want["precision"] in ("fp16", "bf16", "auto", "no")
    print(resolved)


def test_stage2_keeps_its_clip_of_5_under_deepspeed():
    from l2c_llava.train.accelerator import deepspeed_values

    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 1,
        "gradient_clipping": "auto",
    }
    deepspeed_values(ds, micro_batch=512, accum=2, grad_clip=5.0, world=8)
    assert ds == {
        "train_micro_batch_size_per_gpu": 512,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 5.0,
        "train_batch_size": 8192,
    }
    assert deepspeed_values({}, micro_batch=4, accum=1, grad_clip=None, world=1)["gradient_clipping"] == 0.0


def test_clip_gradients_uses_the_config_value_without_deepspeed():
    """One process (the DDP path): the config's norm, not 1.0."""
    import torch
    from accelerate import Accelerator

    from l2c_llava.train.accelerator import clip_gradients

    acc = Accelerator(cpu=True)
    lin = torch.nn.Linear(4, 4)
    for p in lin.parameters():
        p.grad = torch.full_like(p, 10.0)
    clip_gradients(acc, lin, list(lin.parameters()), 5.0)
    total = torch.sqrt(sum((p.grad**2).sum() for p in lin.parameters()))
    assert abs(float(total) - 5.0) < 1e-4


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (the deepspeed extra); the config mapping is tested above",
)
def test_deepspeed_accelerator_prepares_without_a_dataloader():
    """The engine starts from the training config's values, no DataLoader prepared: one process of a
    launch (gloo on the CPU, DS_ACCELERATOR=cpu), in a child so that accelerate's state stays its own."""
    import json
    import os
    import subprocess
    import sys

    from .conftest import free_port

    env, _ = launch_env(ROOT / "stage2/accelerate/deepspeed_zero2.yaml")
    env = {
        **os.environ,
        **env,
        "DS_ACCELERATOR": "cpu",
        "LOCAL_RANK": "0",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    script = """
import json, torch
from l2c_llava.train.accelerator import configure_launch, make_accelerator
acc = make_accelerator("no", 0)
model = torch.nn.Linear(4, 4)
opt = torch.optim.AdamW(model.parameters())
configure_launch(acc, micro_batch=8, accum=2, grad_clip=5.0)
acc.prepare(model, opt)
ds = acc.state.deepspeed_plugin.deepspeed_config
print(json.dumps({k: ds[k] for k in ("gradient_clipping", "train_micro_batch_size_per_gpu",
      "gradient_accumulation_steps", "train_batch_size")} | {"type": acc.distributed_type.name}))
"""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {
        "gradient_clipping": 5.0,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 16,
        "type": "DEEPSPEED",
    }
