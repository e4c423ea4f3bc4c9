"""Memory savers (QLoRA 4-bit, 8-bit AdamW): on a machine where bitsandbytes cannot run they fail
before any work with a message naming the config key, never falling back; where it can, the 8-bit
optimizer is bitsandbytes' own."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from l2c_llava.cli import main
from l2c_llava.config import ConfigError, load_config
from l2c_llava.errors import CannotRunError
from l2c_llava.quantization import quantize_linears_4bit_
from l2c_llava.train.optim import make_adamw

from .recipe_configs import mllm_config


def fake_bnb(monkeypatch):
    made = []

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kw):
            made.append(kw)
            super().__init__(params, **kw)

    mod = types.ModuleType("bitsandbytes")
    mod.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", mod)
    return made


def test_8bit_adamw_is_bitsandbytes_or_a_clear_error(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert type(make_adamw(params, "adamw", lr=1e-3)) is torch.optim.AdamW
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed (as on this machine)
    with pytest.raises(
        CannotRunError, match=r"train.optimizer: 8-bit AdamW needs bitsandbytes .*set train.optimizer=adamw"
    ):
        make_adamw(params, "adamw_8bit", lr=1e-3)
    made = fake_bnb(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CannotRunError, match="this machine has no CUDA GPU"):
        make_adamw(params, "adamw_8bit", lr=1e-3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    opt = make_adamw(params, "adamw_8bit", lr=1e-3, weight_decay=0.1)
    assert type(opt).__name__ == "AdamW8bit" and made == [{"lr": 1e-3, "weight_decay": 0.1}]


def test_4bit_needs_bitsandbytes_and_a_gpu(monkeypatch):
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(CannotRunError, match="model.llm.load_in_4bit: QLoRA"):
        quantize_linears_4bit_(layer, torch.bfloat16, "model.llm.load_in_4bit")
    fake_bnb(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CannotRunError, match="no CUDA GPU"):
        quantize_linears_4bit_(layer, torch.bfloat16, "model.llm.load_in_4bit")
    assert type(layer[0]) is torch.nn.Linear  # untouched


def test_qlora_settings_are_checked_with_the_config(tmp_path, llava_parts, synth_dir):
    path, _ = mllm_config(tmp_path, llava_parts, synth_dir, "finetune", tmp_path / "ft")
    with pytest.raises(ConfigError, match="model.llm.load_in_4bit"):
        load_config(path, ["model.llm.load_in_4bit=true"])  # full finetune of a 4-bit LLM
    load_config(path, ["model.llm.load_in_4bit=true", "train.tune=lora"])


def test_switches_stop_the_commands_before_any_work(tmp_path, llava_parts, synth_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    path, _ = mllm_config(tmp_path, llava_parts, synth_dir, "finetune", tmp_path / "ft")
    rc = main(["mllm", "finetune", "--config", str(path), "model.llm.load_in_4bit=true", "train.tune=lora"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.llm.load_in_4bit: QLoRA (4-bit base weights) needs bitsandbytes" in err
    assert not (tmp_path / "ft" / "checkpoints").exists() and not (tmp_path / "ft" / "model").exists()
    path, _ = mllm_config(tmp_path, llava_parts, synth_dir, "pretrain", tmp_path / "pre")
    rc = main(["mllm", "pretrain", "--config", str(path), "train.optimizer=adamw_8bit"])
    assert rc == 2 and "train.optimizer: 8-bit AdamW needs bitsandbytes" in capsys.readouterr().err
    assert not (tmp_path / "pre" / "checkpoints").exists()
