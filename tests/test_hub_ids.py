"""Hub ids wherever a model is named: resolved through a local Hub cache laid out as huggingface_hub
writes it (models--org--name/{blobs,snapshots/<rev>,refs/main}); offline and not cached: one error."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from l2c_llava.errors import InputError
from l2c_llava.models.reference import is_hub_id, resolve_model_path
from tests.tiny_llm import save_tiny_llm

REV = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Copy `folder` into `cache` the way huggingface_hub stores a download: content-addressed blobs,
    a snapshot folder of relative symlinks, refs/main naming the revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REV
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network in tests
    monkeypatch.chdir(tmp_path)  # so org/name is not a relative folder by chance
    return cache


def tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=16,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=99,
            max_position_embeddings=16,
        ),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    return folder


def test_is_hub_id_tells_ids_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("openai/clip-vit-large-patch14-336") and is_hub_id("lmsys/vicuna-7b-v1.5@main")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    assert not is_hub_id("runs/x")  # an existing folder is a folder
    assert not is_hub_id("/abs/path") and not is_hub_id("a/b/c") and not is_hub_id("embedded:demo-clip")


def test_vision_tower_llm_and_baseline_load_from_the_hub_cache(tmp_path, hub):
    from l2c_llava.mllm.build import build_llava
    from l2c_llava.models.llm import local_llm_folder
    from l2c_llava.models.vision import load_vision_tower
    from l2c_llava.stage2.evaluate import BaselineCLIP

    snap_clip = put_in_hub_cache(hub, "openai/clip-tiny", tiny_clip(tmp_path / "clip"))
    snap_llm = put_in_hub_cache(hub, "lmsys/vicuna-tiny", save_tiny_llm(tmp_path / "llm"))
    shutil.rmtree(tmp_path / "clip"), shutil.rmtree(tmp_path / "llm")

    tower = load_vision_tower("openai/clip-tiny")
    assert tower.config.hidden_size == 32
    assert Path(local_llm_folder("lmsys/vicuna-tiny")).resolve() == snap_llm.resolve()
    assert BaselineCLIP("openai/clip-tiny").folder.resolve() == snap_clip.resolve()
    model, _ = build_llava("openai/clip-tiny", SimpleNamespace(name_or_path="lmsys/vicuna-tiny"))
    assert model.config.image_seq_length == 4


def test_text_encoder_from_a_hub_id(tmp_path, hub):
    from l2c_llava.stage1.encoder import TextEncoder
    from l2c_llava.stage2.cache import encoder_fingerprint

    put_in_hub_cache(hub, "microsoft/tiny-cc", save_tiny_llm(tmp_path / "llm"))
    shutil.rmtree(tmp_path / "llm")
    enc = TextEncoder.from_pretrained("microsoft/tiny-cc", device="cpu", torch_dtype="float32")
    assert enc.encode(["a red circle"]).shape == (1, 32)
    assert encoder_fingerprint("microsoft/tiny-cc")["files"] > 0


def test_offline_and_not_cached_is_one_clear_error(hub):
    from l2c_llava.models.vision import load_vision_tower

    with pytest.raises(InputError, match=r"openai/clip-vit-large-patch14-336: HF_HUB_OFFLINE=1.*not in"):
        load_vision_tower("openai/clip-vit-large-patch14-336")
    with pytest.raises(InputError, match="lmsys/vicuna-7b-v1.5: HF_HUB_OFFLINE=1"):
        resolve_model_path("lmsys/vicuna-7b-v1.5", "LLM")


def test_a_cached_config_without_weights_is_not_taken_for_the_model(tmp_path, hub):
    """transformers caches config.json alone when it only reads the config: not a model yet."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    put_in_hub_cache(hub, "org/half", tmp_path / "cfg")
    with pytest.raises(InputError, match="only partly in"):
        resolve_model_path("org/half")


def test_a_cached_pickle_only_model_points_at_the_conversion(tmp_path, hub):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    put_in_hub_cache(hub, "lmsys/vicuna-bin", tmp_path / "bin")
    with pytest.raises(InputError, match="l2c convert weights lmsys/vicuna-bin"):
        resolve_model_path("lmsys/vicuna-bin", "LLM")
