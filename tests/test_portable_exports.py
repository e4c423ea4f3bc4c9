"""The exports hold what transformers 4.x and the original LLaVA code read (issue 16), checked on the
files (transformers 5 only; the consumers themselves run in tests/test_compat_matrix.py):
the LLM's own tokenizer files with a 4.37-readable config, ``rope_theta`` / ``rope_scaling`` at the
top level, vision towers under ``vision_model.*``, an ``mm_vision_tower`` LLaVA's loader takes from any
working directory (absolute, or a Hub id; ``l2c export repoint`` after a move), and a Vicuna-like
LLM folder with ``tokenizer.model`` only."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from l2c_llava.cli import main

from .tiny_llm import save_tiny_llm, save_tiny_sp_llama
from .tiny_models import tiny_vision

TEXTS = ["a red circle", "Two blue squares and a large green star.", "USER: what is 123?\nASSISTANT: 4"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A Vicuna-like LLM (tokenizer.model only, RoPE base 100000, linear scaling 2) -> hf LLaVA ->
    original-format export."""
    from l2c_llava.mllm.build import build_llava, save_llava
    from l2c_llava.mllm.export import export_original

    root = tmp_path_factory.mktemp("portable")
    save_tiny_sp_llama(root / "llm", rope_theta=100000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    tiny_vision().save_pretrained(root / "vision")
    model, proc = build_llava(root / "vision", SimpleNamespace(name_or_path=str(root / "llm")))
    save_llava(model, proc, root / "hf", {"template": "vicuna_v1", "image_aspect_ratio": "pad"})
    out = export_original(root / "hf", root / "llava-v1.5-tiny")
    return SimpleNamespace(root=root, llm=root / "llm", hf=root / "hf", out=out, model=model, processor=proc)


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_the_export_carries_the_llms_own_tokenizer_in_a_form_transformers_4_reads(exported):
    out, llm = exported.out, exported.llm
    assert (out / "tokenizer.model").read_bytes() == (llm / "tokenizer.model").read_bytes()
    assert (exported.hf / "llm_tokenizer" / "tokenizer.model").read_bytes() == (
        llm / "tokenizer.model"
    ).read_bytes()
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer"  # the LLM's own class, which 4.x knows
    assert cfg["legacy"] is False  # the LLM's own setting, kept
    image_id = exported.model.config.image_token_id
    assert cfg["added_tokens_decoder"][str(image_id)]["content"] == "<image>"
    assert (
        max(int(i) for i in cfg["added_tokens_decoder"]) + 1 == exported.model.config.text_config.vocab_size
    )
    # tokenizer.json (the tokenization trained with) in the form tokenizers 0.15 parses
    tj = json.loads((out / "tokenizer.json").read_text())
    nodes = list(_walk(tj))
    metaspace = [n for n in nodes if isinstance(n, dict) and n.get("type") == "Metaspace"]
    assert metaspace and all("split" not in n and "add_prefix_space" in n for n in metaspace)
    bpe = [n for n in nodes if isinstance(n, dict) and n.get("type") == "BPE"]
    assert bpe and all(isinstance(m, str) for n in bpe for m in n["merges"]) and "ignore_merges" not in bpe[0]
    assert {"id": image_id, "content": "<image>"}.items() <= next(
        t for t in tj["added_tokens"] if t["id"] == image_id
    ).items()
    # and transformers 5 reads the exported tokenizer as it was trained
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(out)
    for text in [*TEXTS, "USER: <image>\nwhat?"]:
        assert again(text).input_ids == exported.processor.tokenizer(text).input_ids


def test_an_llm_without_its_own_tokenizer_class_gets_one_transformers_4_knows(tmp_path):
    from l2c_llava.mllm.build import build_llava, save_llava
    from l2c_llava.mllm.export import export_original

    save_tiny_llm(tmp_path / "llm", "llama")  # a word-level tokenizer.json written by transformers 5
    tiny_vision().save_pretrained(tmp_path / "vision")
    model, proc = build_llava(tmp_path / "vision", SimpleNamespace(name_or_path=str(tmp_path / "llm")))
    save_llava(model, proc, tmp_path / "hf")
    out = export_original(tmp_path / "hf", tmp_path / "llava-wordlevel")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not (out / "tokenizer.model").exists()
    assert "<image>" in cfg["additional_special_tokens"]


def test_config_has_rope_theta_and_rope_scaling_at_the_top_level(exported):
    config = json.loads((exported.out / "config.json").read_text())
    assert config["rope_theta"] == 100000.0  # transformers 4.x reads this one (else 10000, silently)
    assert config["rope_scaling"] == {"type": "linear", "factor": 2.0}  # the form 4.37 validates
    assert config["rope_parameters"]["rope_theta"] == 100000.0  # and 5.x its own
    hf = json.loads((exported.hf / "config.json").read_text())
    assert hf["text_config"]["rope_theta"] == 100000.0
    from l2c_llava.models.portable import portable_config

    assert (
        portable_config({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})["rope_scaling"]
        is None
    )
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0}
    assert portable_config({"rope_parameters": llama3})["rope_scaling"] == {
        "type": "llama3",
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
    }


def _keys(folder):
    return set(load_file(str(folder / "model.safetensors")))


def test_vision_towers_are_written_under_vision_model_and_both_layouts_load(exported, tmp_path):
    from transformers import CLIPVisionModel

    from l2c_llava.models.vision import load_vision_tower
    from l2c_llava.stage2.export import export_vision_tower
    from l2c_llava.stage2.llm2clip import LLM2CLIP
    from l2c_llava.stage2.model import LLM2CLIPModel

    tower = tiny_vision().eval()
    new = export_vision_tower(tower, tmp_path / "vision-export")
    assert _keys(new) and all(k.startswith("vision_model.") for k in _keys(new))  # `l2c export vision`
    llava_tower = exported.out / "vision_tower"
    assert all(k.startswith("vision_model.") for k in _keys(llava_tower))  # the LLaVA export's tower
    l2c = LLM2CLIP(LLM2CLIPModel.from_vision_tower(tiny_vision(), 12, projection_dim=16, num_blocks=2))
    release = l2c.save_pretrained(tmp_path / "llm2clip")  # the release layout
    tower_keys = {
        k for k in _keys(release) if not k.startswith(("visual_projection", "text_adapter", "logit_scale"))
    }
    assert tower_keys and all(k.startswith("vision_model.") for k in tower_keys)
    # every loader here reads both the new layout and the old one (transformers 5's own save_pretrained)
    tower.save_pretrained(tmp_path / "old-layout")
    assert not any(k.startswith("vision_model.") for k in _keys(tmp_path / "old-layout"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = tower(pixel_values=x).pooler_output
        for folder in (new, tmp_path / "old-layout"):
            got, info = CLIPVisionModel.from_pretrained(folder, output_loading_info=True)
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
            assert torch.allclose(got.eval()(pixel_values=x).pooler_output, want, atol=1e-6)
            assert torch.allclose(
                load_vision_tower(str(folder)).eval()(pixel_values=x).pooler_output, want, atol=1e-6
            )
    old_export = tmp_path / "old-vision-export"
    shutil.copytree(tmp_path / "old-layout", old_export)
    shutil.copy(new / "preprocessor_config.json", old_export)
    assert (
        main(
            [
                "mllm",
                "build",
                "--vision",
                str(old_export),
                "--llm",
                str(exported.llm),
                "--out",
                str(tmp_path / "built-old"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "mllm",
                "build",
                "--vision",
                str(new),
                "--llm",
                str(exported.llm),
                "--out",
                str(tmp_path / "built-new"),
            ]
        )
        == 0
    )


def test_mm_vision_tower_is_absolute_and_repoint_follows_a_moved_folder(exported, tmp_path, capsys):
    """LLaVA's build_vision_tower takes a path that exists from the working directory (or an
    openai/laion Hub id): the export names its tower absolutely; `l2c export repoint` re-writes it after
    a move and keeps the folder a previous output of the export (its record updated)."""
    from transformers import CLIPVisionModel

    from l2c_llava.io import check_output_folder, output_problem
    from l2c_llava.mllm.export import ORIGINAL_KIND

    config = json.loads((exported.out / "config.json").read_text())
    assert config["mm_vision_tower"] == str(exported.out.resolve() / "vision_tower")
    moved = tmp_path / "elsewhere" / exported.out.name
    shutil.copytree(exported.out, moved)
    assert main(["export", "repoint", str(moved)]) == 0
    assert f"-> {moved.resolve() / 'vision_tower'}" in capsys.readouterr().out
    tower_path = json.loads((moved / "config.json").read_text())["mm_vision_tower"]
    assert tower_path == str(moved.resolve() / "vision_tower")
    assert output_problem(moved) is None and check_output_folder(moved, ORIGINAL_KIND) == moved
    tower, info = CLIPVisionModel.from_pretrained(tower_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    want = exported.model.model.vision_tower.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in tower.state_dict().items())
    readme = (exported.out / "README.md").read_text()
    assert "--conv-mode vicuna_v1" in readme and "l2c export repoint" in readme and "Tested with:" in readme
    assert f"`mm_vision_tower` is `{config['mm_vision_tower']}`" in readme
    assert "tokenizer_image_token" in readme and "▁" in readme
    # not an original-format export: refused with what it is
    assert main(["export", "repoint", str(exported.hf)]) == 2
    assert "not an original-format LLaVA export" in capsys.readouterr().err


def test_vision_tower_option_takes_the_same_tower_by_path_or_an_id_llavas_loader_knows(
    exported, tmp_path, monkeypatch, capsys
):
    from .test_hub_ids import put_in_hub_cache

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    args = ["export", "llava", "--model", str(exported.hf), "--format", "original", "--out"]
    # a folder with the same tower: taken, absolute
    assert main([*args, "llava-a", "--vision-tower", str(exported.root / "vision")]) == 0
    cfg = json.loads((tmp_path / "llava-a" / "config.json").read_text())
    assert cfg["mm_vision_tower"] == str((exported.root / "vision").resolve())
    # a folder with another tower: refused before anything is written
    other = tmp_path / "other-vision"
    t = tiny_vision()
    with torch.no_grad():
        next(p for n, p in t.named_parameters() if n.endswith("post_layernorm.bias")).add_(1.0)
    t.save_pretrained(other)
    assert main([*args, "llava-b", "--vision-tower", str(other)]) == 2
    assert "vision weights differ" in capsys.readouterr().err and not (tmp_path / "llava-b").exists()
    # a Hub id LLaVA's loader does not take (it raises "Unknown vision tower" for it)
    assert main([*args, "llava-c", "--vision-tower", "my-org/llm2clip-vision"]) == 2
    assert "starts with openai or laion" in capsys.readouterr().err
    # a released tower's id, cached locally: compared, then named
    put_in_hub_cache(cache, "openai/clip-tiny", exported.root / "vision")
    assert main([*args, "llava-d", "--vision-tower", "openai/clip-tiny"]) == 0
    assert (
        json.loads((tmp_path / "llava-d" / "config.json").read_text())["mm_vision_tower"]
        == "openai/clip-tiny"
    )
    assert "same weights as the cached snapshot" in (tmp_path / "llava-d" / "README.md").read_text()
    put_in_hub_cache(cache, "openai/clip-other", other)
    assert main([*args, "llava-e", "--vision-tower", "openai/clip-other"]) == 2
    assert "is not that release" in capsys.readouterr().err
    # repoint to the released id, then back to the folder's own tower
    assert main(["export", "repoint", "llava-a", "--vision-tower", "openai/clip-tiny"]) == 0
    assert (
        json.loads((tmp_path / "llava-a" / "config.json").read_text())["mm_vision_tower"]
        == "openai/clip-tiny"
    )


def test_a_model_on_an_unchanged_released_tower_names_its_hub_id(exported, tmp_path, monkeypatch):
    """No --vision-tower: the Hub id the model was built on, when LLaVA takes it, the tower was not
    trained and the cached snapshot holds the same weights; otherwise the exported folder."""
    from l2c_llava.mllm.export import export_original

    from .test_hub_ids import put_in_hub_cache

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    put_in_hub_cache(cache, "openai/clip-tiny", exported.root / "vision")
    hf = tmp_path / "hf-copy"
    shutil.copytree(exported.hf, hf)
    for meta, want in (
        ({"vision_tower": "openai/clip-tiny"}, "openai/clip-tiny"),
        ({"vision_tower": "openai/clip-tiny", "vision_tower_trained": True}, None),
        ({"vision_tower": "someone/clip-tiny"}, None),  # LLaVA's loader would not take the id
    ):
        (hf / "l2c_mllm.json").write_text(json.dumps({"template": "vicuna_v1", **meta}))
        out = export_original(hf, tmp_path / "out" / "llava-x", overwrite=True)
        got = json.loads((out / "config.json").read_text())["mm_vision_tower"]
        assert got == (want or str(out.resolve() / "vision_tower")), meta


def test_a_vicuna_like_folder_with_only_tokenizer_model_builds(tmp_path, capsys):
    import sentencepiece as spm

    llm = save_tiny_sp_llama(tmp_path / "vicuna-like")
    assert not (llm / "tokenizer.json").exists()
    tiny_vision().save_pretrained(tmp_path / "vision")
    assert (
        main(
            [
                "mllm",
                "build",
                "--vision",
                str(tmp_path / "vision"),
                "--llm",
                str(llm),
                "--out",
                str(tmp_path / "llava"),
            ]
        )
        == 0
    ), capsys.readouterr().err
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(tmp_path / "llava").tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(llm / "tokenizer.model"))
    for text in TEXTS:  # SentencePiece's own pieces, after the BOS
        assert tok(text).input_ids == [1, *sp.encode(text)], text
    assert tok.convert_tokens_to_ids("<image>") == 400 and tok.pad_token == "<unk>"
