"""LLaVA-1.5 assembly, label masks, data, training with resume, exports and chat (tiny models)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from l2c_llava.cli import main
from l2c_llava.config import ConfigError, load_config
from l2c_llava.mllm.build import BuildError, build_llava, prepare_tokenizer, save_llava
from l2c_llava.mllm.conversation import IGNORE, encode
from l2c_llava.mllm.data import ModalityLengthSampler, padding_waste

from .recipe_configs import mllm_config
from .tiny_llm import tiny_tokenizer


def tok_with_image():
    tok = tiny_tokenizer()
    image_id, _ = prepare_tokenizer(tok)
    return tok, image_id


def supervised(enc, tok):
    return [tok.convert_ids_to_tokens(i) for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]


def test_vicuna_labels_multi_turn_and_text_only():
    tok, image_id = tok_with_image()
    conv = [
        {"from": "human", "value": "what shapes are there ?\n<image>"},
        {"from": "gpt", "value": "two red circles"},
        {"from": "human", "value": "and the background ?"},
        {"from": "gpt", "value": "a beige background"},
    ]
    enc = encode(
        conv, tok, "vicuna_v1", has_image=True, image_token_id=image_id, num_image_tokens=5, max_length=500
    )
    # <image> moved to the start of the first human turn, followed by a newline
    assert "USER: <image>\nwhat shapes are there ? ASSISTANT: two red circles</s>USER: and the" in enc.text
    assert enc.text.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert supervised(enc, tok) == ["two", "red", "circles", "</s>", "a", "beige", "background", "</s>"]
    assert enc.input_ids.count(image_id) == 5 and enc.input_ids[0] == tok.bos_token_id
    assert all(lab == IGNORE for i, lab in zip(enc.input_ids, enc.labels) if i == image_id)
    # labels equal the ids where supervised
    assert all(lab in (IGNORE, i) for i, lab in zip(enc.input_ids, enc.labels))
    text_only = encode(
        conv[:2],
        tok,
        "vicuna_v1",
        has_image=False,
        image_token_id=image_id,
        num_image_tokens=5,
        max_length=500,
    )
    assert image_id not in text_only.input_ids and supervised(text_only, tok) == [
        "two",
        "red",
        "circles",
        "</s>",
    ]


def test_plain_labels_and_truncation():
    tok, image_id = tok_with_image()
    conv = [
        {"from": "human", "value": "<image>\nrender a short caption"},
        {"from": "gpt", "value": "a red star"},
    ]
    enc = encode(
        conv, tok, "plain", has_image=True, image_token_id=image_id, num_image_tokens=4, max_length=500
    )
    assert enc.text == "<image>a red star\n"
    ids = enc.input_ids
    assert ids[:5] == [tok.bos_token_id] + [image_id] * 4 and supervised(enc, tok) == ["a", "red", "star"]
    cut = encode(
        conv, tok, "plain", has_image=True, image_token_id=image_id, num_image_tokens=4, max_length=7
    )
    assert len(cut.input_ids) == 7 and supervised(cut, tok) == ["a", "red"]
    with pytest.raises(ValueError, match="cuts into the 4 image tokens"):
        encode(conv, tok, "plain", has_image=True, image_token_id=image_id, num_image_tokens=4, max_length=3)
    with pytest.raises(ValueError, match="turn 1 is from 'human'"):
        encode(
            [conv[0], conv[0]],
            tok,
            "plain",
            has_image=True,
            image_token_id=image_id,
            num_image_tokens=4,
            max_length=50,
        )


@pytest.mark.parametrize("size,patch", [(32, 8), (48, 16), (64, 16)])
def test_image_tokens_equal_patch_features(tmp_path, llava_parts, size, patch):
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=size,
        patch_size=patch,
    )
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "v")
    model, proc = build_llava(tmp_path / "v", SimpleNamespace(name_or_path=str(llava_parts / "llm")))
    want = (size // patch) ** 2
    assert model.config.image_seq_length == want
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "red ?"}]}],
        add_generation_prompt=True,
    )
    inputs = proc(images=Image.new("RGB", (70, 50), (1, 2, 3)), text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == want
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=inputs["pixel_values"])
    feats = feats if isinstance(feats, torch.Tensor) else getattr(feats, "pooler_output", feats)
    n = feats[0].shape[0] if isinstance(feats, (list, tuple)) else feats.shape[-2]
    assert n == want
    model(**inputs)  # the forward checks tokens == features itself


def test_build_is_strict_and_generates_after_save_load(tmp_path, llava_parts):
    from PIL import Image
    from transformers import AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration

    model, proc = build_llava(llava_parts / "vision", SimpleNamespace(name_or_path=str(llava_parts / "llm")))
    tower = CLIPVisionModel.from_pretrained(llava_parts / "vision")
    for k, v in tower.state_dict().items():  # the tower's trained weights, not a random tower
        assert torch.equal(model.model.vision_tower.state_dict()[k], v), k
    save_llava(model, proc, tmp_path / "a")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    proc2 = AutoProcessor.from_pretrained(tmp_path / "a")
    text = proc2.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
        add_generation_prompt=True,
    )
    inputs = proc2(images=Image.new("RGB", (32, 32), (200, 0, 0)), text=text, return_tensors="pt")
    a = model.eval().generate(**inputs, max_new_tokens=4, do_sample=False)
    b = again.eval().generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b) and a.shape[1] == inputs["input_ids"].shape[1] + 4
    with pytest.raises(BuildError, match="not a CLIP vision model"):
        build_llava(llava_parts / "llm", SimpleNamespace(name_or_path=str(llava_parts / "llm")))


def test_linear_projector_is_one_linear_and_stays_so(tmp_path, llava_parts, synth_dir):
    from transformers import LlavaForConditionalGeneration

    from l2c_llava.mllm.export import export_original
    from l2c_llava.mllm.train import MllmRecipe

    _, cfg = mllm_config(
        tmp_path,
        llava_parts,
        synth_dir,
        "pretrain",
        tmp_path / "lin",
        ["model.projector_type=linear", "train.max_steps=2", "train.save_full_model=true"],
    )
    MllmRecipe(cfg).run()
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "lin" / "model")
    proj = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "linear"
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(proj(x), proj.linear_1(x), atol=1e-6)  # a single Linear, trained
    out = export_original(tmp_path / "lin", tmp_path / "llava-linear")
    config = json.loads((out / "config.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    assert config["mm_projector_type"] == "linear" and "model.mm_projector.weight" in weights
    assert not any(k.startswith("model.mm_projector.2") for k in weights)


def test_modality_grouped_batches():
    lengths = [10, -5, 30, -50, 12, 40, -7, 8, 22, -9, 15, 33, -2, 5]
    s = ModalityLengthSampler(lengths, batch_size=2, world=1, seed=0)
    order = list(s)
    assert sorted(order) == list(range(len(lengths)))
    batches = [order[i : i + 2] for i in range(0, len(order), 2)]
    mixed = [b for b in batches if len({lengths[i] > 0 for i in b}) > 1]
    assert len(mixed) <= 1  # only the merged remainder may mix modalities
    s.epoch = 1
    assert list(s) != order
    # within each mega-batch (batch x processes) rows come longest first, as LLaVA's sampler does
    s2 = ModalityLengthSampler(lengths, batch_size=2, world=2, seed=0)
    order2 = list(s2)
    megas = [order2[i : i + 4] for i in range(0, len(order2), 4)]
    for m in megas:
        if len({lengths[i] > 0 for i in m}) == 1:
            assert [abs(lengths[i]) for i in m] == sorted((abs(lengths[i]) for i in m), reverse=True)
    assert padding_waste([0, 1], [3, -1], 2) == pytest.approx(1 / 3)


def saved_state(folder):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder).state_dict()


class Killed(Exception):
    pass


def test_pretrain_and_finetune_resume_to_the_same_weights(
    tmp_path, llava_parts, synth_dir, monkeypatch, capsys
):
    from l2c_llava.mllm.train import MllmRecipe

    _, cfg = mllm_config(tmp_path, llava_parts, synth_dir, "pretrain", tmp_path / "pre")
    original = MllmRecipe.save_checkpoint

    def die_after_2(self, *args):
        original(self, *args)
        step = args[-1]
        if step == 2:
            raise Killed

    monkeypatch.setattr(MllmRecipe, "save_checkpoint", die_after_2)
    with pytest.raises(Killed):
        MllmRecipe(cfg).run()
    monkeypatch.setattr(MllmRecipe, "save_checkpoint", original)
    stats = MllmRecipe(cfg).run()
    assert stats["steps"] == 3 and stats["grad_accum"] == 2
    _, straight = mllm_config(tmp_path, llava_parts, synth_dir, "pretrain", tmp_path / "pre_straight")
    MllmRecipe(straight).run()
    # the pretrain keeps the projector only (LLaVA's mm_projector): the LLM and tower are unchanged
    assert not (tmp_path / "pre" / "model").exists()
    a = load_file(str(tmp_path / "pre" / "projector" / "projector.safetensors"))
    b = load_file(str(tmp_path / "pre_straight" / "projector" / "projector.safetensors"))
    proj = sorted(a)
    assert proj and all(k.startswith("model.multi_modal_projector.") for k in proj)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    built, _ = build_llava(llava_parts / "vision", SimpleNamespace(name_or_path=str(llava_parts / "llm")))
    init = built.state_dict()
    assert not torch.allclose(a[proj[0]], init[proj[0]])  # the projector trained
    lm_key = "model.language_model.layers.0.mlp.up_proj.weight"
    log = [json.loads(x) for x in (tmp_path / "pre" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["tokens_per_second"] > 0 for r in log)
    # finetune from the pretrained projector, full LLM, through the CLI; killed after step 2 it
    # resumes to the same weights as a straight run
    init_from = f"model.init_from={tmp_path / 'pre'}"
    path, _ = mllm_config(tmp_path, llava_parts, synth_dir, "finetune", tmp_path / "ft")
    monkeypatch.setattr(MllmRecipe, "save_checkpoint", die_after_2)
    with pytest.raises(Killed):
        main(["mllm", "finetune", "--config", str(path), init_from])
    monkeypatch.setattr(MllmRecipe, "save_checkpoint", original)
    assert main(["mllm", "finetune", "--config", str(path), init_from]) == 0
    straight_path, _ = mllm_config(tmp_path, llava_parts, synth_dir, "finetune", tmp_path / "ft_straight")
    assert main(["mllm", "finetune", "--config", str(straight_path), init_from]) == 0
    f, g = saved_state(tmp_path / "ft" / "model"), saved_state(tmp_path / "ft_straight" / "model")
    assert not torch.equal(f[lm_key], init[lm_key])
    assert all(torch.allclose(f[k], g[k], atol=1e-6) for k in f)
    assert torch.allclose(f[proj[0]], a[proj[0]], atol=0.1) and not torch.equal(f[proj[0]], init[proj[0]])
    # padding-free batches (data.packing) train to the padded run's losses and weights
    packed_path, _ = mllm_config(tmp_path, llava_parts, synth_dir, "finetune", tmp_path / "ft_packed")
    assert main(["mllm", "finetune", "--config", str(packed_path), init_from, "data.packing=true"]) == 0
    p = saved_state(tmp_path / "ft_packed" / "model")
    assert all(torch.allclose(p[k], g[k], atol=1e-5) for k in g)
    logs = [
        [json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        for run in ("ft_straight", "ft_packed")
    ]
    assert [r["loss"] for r in logs[0]] == pytest.approx([r["loss"] for r in logs[1]], abs=1e-5)
    # the config's stage must match the command
    capsys.readouterr()
    assert main(["mllm", "pretrain", "--config", str(path)]) == 2
    assert "run it with `l2c mllm finetune`" in capsys.readouterr().err


def test_lora_finetune_saves_a_plain_model(tmp_path, llava_parts, synth_dir):
    from transformers import LlavaForConditionalGeneration

    from l2c_llava.mllm.train import MllmRecipe

    _, cfg = mllm_config(
        tmp_path,
        llava_parts,
        synth_dir,
        "finetune",
        tmp_path / "lora",
        [
            "train.tune=lora",
            "train.lora.r=4",
            "train.lora.alpha=8",
            "train.projector_lr=1e-4",
            "train.max_steps=2",
        ],
    )
    MllmRecipe(cfg).run()
    model, info = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "lora" / "model", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in k for k in model.state_dict())


def test_lora_finetune_under_cpu_bf16_autocast(tmp_path, llava_parts, synth_dir):
    """train.mixed_precision=bf16 on the CPU (the demo's; 1.46x faster steps on a CPU with native bf16):
    the matmuls run in bf16, the weights, the loss log and the saved model stay float32."""
    import json

    from safetensors import safe_open

    from l2c_llava.mllm.train import MllmRecipe

    _, cfg = mllm_config(
        tmp_path,
        llava_parts,
        synth_dir,
        "finetune",
        tmp_path / "bf16",
        [
            "train.tune=lora",
            "train.lora.r=4",
            "train.lora.alpha=8",
            "train.max_steps=2",
            "train.mixed_precision=bf16",
        ],
    )
    seen = []
    orig = torch.nn.functional.linear

    def spy(x, w, b=None):
        out = orig(x, w, b)
        seen.append(out.dtype)
        return out

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(
        True
    )  # accelerate keeps one mixed precision per process; the suite's is "no"
    torch.nn.functional.linear = spy
    try:
        MllmRecipe(cfg).run()
    finally:
        torch.nn.functional.linear = orig
        AcceleratorState._reset_state(True)
    assert torch.bfloat16 in seen  # autocast was on during training
    log = [json.loads(x) for x in (tmp_path / "bf16" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    with safe_open(str(next((tmp_path / "bf16" / "model").glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog):
    from l2c_llava.models import llm
    from l2c_llava.train.accelerator import resolve_mixed_precision

    monkeypatch.setattr(llm, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING"):
        assert resolve_mixed_precision("bf16") == "bf16"
        assert llm.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "train.mixed_precision bf16",
        "torch_dtype bfloat16",
    ]
    caplog.clear()
    monkeypatch.setattr(llm, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level("WARNING"):
        resolve_mixed_precision("bf16")
        llm.resolve_dtype("bfloat16", "cpu")
    assert not caplog.records


def test_projector_lr_applies_to_the_full_finetune_too(tmp_path, llava_parts, synth_dir):
    """LLaVA's mm_projector_lr is not tied to LoRA: a full finetune gets the projector its own lr."""
    from l2c_llava.mllm.train import MllmRecipe

    _, cfg = mllm_config(
        tmp_path,
        llava_parts,
        synth_dir,
        "finetune",
        tmp_path / "full",
        ["train.tune=full", "train.lr=2e-5", "train.projector_lr=1e-3"],
    )
    recipe = MllmRecipe(cfg)
    model, _ = recipe.build()
    proj, rest = recipe.param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[1] for p in proj["params"]} == {"multi_modal_projector"}
    assert (proj["lr"], proj["lr_scale"], rest["lr"], rest["lr_scale"]) == (1e-3, 50.0, 2e-5, 1.0)
    assert len(proj["params"]) + len(rest["params"]) == sum(p.requires_grad for p in model.parameters())


def test_a_tower_trained_in_the_pretrain_is_kept_and_read_by_the_finetune(tmp_path, llava_parts, synth_dir):
    """freeze_vision_tower=false in the pretrain: the projector-only output keeps the trained tower
    beside the projector, at its own lr, and the finetune's init_from loads it over model.vision_tower."""
    from l2c_llava.mllm.train import MllmRecipe

    _, cfg = mllm_config(
        tmp_path,
        llava_parts,
        synth_dir,
        "pretrain",
        tmp_path / "pre",
        ["train.freeze_vision_tower=false", "train.vision_lr=1e-4"],
    )
    recipe = MllmRecipe(cfg)
    model, _ = recipe.build()
    groups = recipe.param_groups(model)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert len(groups[1]["params"]) == sum(1 for _ in model.model.vision_tower.parameters())
    recipe.run()
    folder = tmp_path / "pre" / "projector"
    tower = load_file(str(folder / "vision_tower.safetensors"))
    assert json.loads((folder / "l2c_mllm.json").read_text())["vision_tower_trained"] is True
    original = model.state_dict()  # built from llava_parts/vision, before training
    key = next(k for k in tower if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    assert not torch.allclose(tower[key], original[key])  # the tower trained
    _, ft = mllm_config(
        tmp_path, llava_parts, synth_dir, "finetune", tmp_path / "ft", [f"model.init_from={tmp_path / 'pre'}"]
    )
    loaded, _ = MllmRecipe(ft).build()
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tower.items())
    # a frozen tower is neither saved nor loaded, and vision_lr on a frozen tower is refused
    _, frozen = mllm_config(tmp_path, llava_parts, synth_dir, "pretrain", tmp_path / "pre_frozen")
    MllmRecipe(frozen).run()
    assert not (tmp_path / "pre_frozen" / "projector" / "vision_tower.safetensors").exists()
    with pytest.raises(ConfigError, match="the tower is frozen"):
        mllm_config(tmp_path, llava_parts, synth_dir, "pretrain", tmp_path / "x", ["train.vision_lr=1e-4"])


def test_original_format_maps_to_transformers_by_its_conversion_rules(
    tmp_path, llava_parts, synth_dir, capsys
):
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    from l2c_llava.mllm.export import original_to_hf

    model, proc = build_llava(llava_parts / "vision", SimpleNamespace(name_or_path=str(llava_parts / "llm")))
    torch.nn.init.normal_(model.model.multi_modal_projector.linear_1.weight)
    save_llava(model, proc, tmp_path / "a")
    args = ["export", "llava", "--model", str(tmp_path / "a"), "--format", "original", "--out"]
    assert main([*args, str(tmp_path / "x")]) == 2
    assert "contains 'llava'" in capsys.readouterr().err
    out = tmp_path / "llava-v1.5-tiny"
    assert main([*args, str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    assert config["mm_vision_select_feature"] == "patch" and config["mm_hidden_size"] == 32
    assert config["mm_vision_tower"] == str(out.resolve() / "vision_tower")  # absolute: any working directory
    original = load_file(str(out / "model.safetensors"))
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.embed_tokens.weight"} <= set(
        original
    )
    # the whole original checkpoint (its tower where the original code keeps it) through transformers' rules
    tower = CLIPVisionModel.from_pretrained(out / "vision_tower").state_dict()
    original |= {"model.vision_tower.vision_tower.vision_model." + k: v for k, v in tower.items()}
    converted = tmp_path / "converted"
    converted.mkdir()
    save_file(
        {k: v.contiguous() for k, v in original_to_hf(original).items()}, str(converted / "model.safetensors")
    )
    (converted / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    loaded, info = LlavaForConditionalGeneration.from_pretrained(converted, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_chat_and_bad_rows(tmp_path, llava_parts, synth_dir, capsys):
    model, proc = build_llava(llava_parts / "vision", SimpleNamespace(name_or_path=str(llava_parts / "llm")))
    save_llava(model, proc, tmp_path / "a", {"template": "vicuna_v1", "image_aspect_ratio": "pad"})
    image = next((synth_dir / "images").rglob("*.jpg"))
    assert (
        main(
            [
                "mllm",
                "chat",
                "--model",
                str(tmp_path / "a"),
                "--image",
                str(image),
                "--max-new-tokens",
                "3",
                "what shapes are there ?",
            ]
        )
        == 0
    )
    rows = json.loads((synth_dir / "llava" / "instruct.json").read_text())
    rows[1]["image"] = "00000/missing.jpg"
    rows[2]["conversations"] = [{"from": "gpt", "value": "x"}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    path, _ = mllm_config(tmp_path, llava_parts, synth_dir, "finetune", tmp_path / "badrun")
    capsys.readouterr()
    assert main(["mllm", "finetune", "--config", str(path), f"data.path={bad}"]) == 2
    err = capsys.readouterr().err
    assert "item 1" in err and "missing.jpg" in err and "item 2" in err


def test_eval_vqa_scores_answers_and_the_prior(tmp_path, llava_parts, synth_dir, capsys):
    from PIL import Image

    from l2c_llava.mllm.evaluate import normalize

    assert (
        normalize(" Two.") == "2"
        and normalize("The red") == "red"
        and normalize("top left\nmore") == "top left"
    )
    model, proc = build_llava(llava_parts / "vision", SimpleNamespace(name_or_path=str(llava_parts / "llm")))
    save_llava(model, proc, tmp_path / "m", {"template": "vicuna_v1", "image_aspect_ratio": "pad"})
    args = [
        "mllm",
        "eval-vqa",
        "--model",
        str(tmp_path / "m"),
        "--questions",
        str(synth_dir / "eval" / "vqa_test.jsonl"),
        "--image-root",
        str(synth_dir / "images"),
        "--train-json",
        str(synth_dir / "llava" / "instruct.json"),
        "--limit",
        "6",
        "--batch-size",
        "4",
        "--shuffled-images",
    ]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "m" / "vqa_metrics.json").read_text())
    assert metrics["n"] == 6 and 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["prior"]["accuracy"] <= 1
    answers = [json.loads(x) for x in (tmp_path / "m" / "vqa_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and all("prediction" in a for a in answers)
    assert metrics["accuracy"] == sum(a["correct"] for a in answers) / 6
    shuffled = metrics["shuffled_images"]
    assert (
        shuffled["n"] == 6 and shuffled["accuracy"] == sum(a["correct_shuffled_image"] for a in answers) / 6
    )
    changed = sum(normalize(a["prediction"]) != normalize(a["prediction_shuffled_image"]) for a in answers)
    assert shuffled["answers_changed"] == round(changed / 6, 4)
    paired = metrics["vs_shuffled_images"]
    assert paired["wins"] == sum(a["correct"] and not a["correct_shuffled_image"] for a in answers)
    assert paired["losses"] == sum(a["correct_shuffled_image"] and not a["correct"] for a in answers)
    assert paired["gain"] == round(metrics["accuracy"] - shuffled["accuracy"], 4)
    assert metrics["vs_prior"]["gain"] == round(metrics["accuracy"] - metrics["prior"]["accuracy"], 4)
    lo, hi = metrics["accuracy_ci95"]
    assert 0 <= lo <= metrics["accuracy"] <= hi <= 1
    with Image.open(tmp_path / "m" / "vqa_by_type.png") as plot:  # the per-type bars, a real PNG
        assert plot.format == "PNG" and plot.size[0] > 300


def test_paired_comparison_and_intervals_match_hand_computed_values():
    from l2c_llava.stats import paired_comparison, sign_test_p, wilson_interval

    assert sign_test_p(10, 0) == pytest.approx(2 / 1024)
    assert sign_test_p(3, 7) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)
    assert sign_test_p(5, 5) == 1.0 and sign_test_p(0, 0) == 1.0
    assert 0 < sign_test_p(1300, 1000) < 1e-8  # thousands of pairs: no overflow
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    a = [True, True, True, False, True, False]
    b = [False, True, False, False, False, True]
    assert paired_comparison(a, b) == {
        "gain": round(2 / 6, 4),
        "wins": 3,
        "losses": 1,
        "p_value": round(sign_test_p(3, 1), 6),
    }
    with pytest.raises(ValueError, match="same questions"):
        paired_comparison(a, b[:3])


def test_shuffled_images_never_keep_their_own_image():
    from pathlib import Path

    from l2c_llava.mllm.evaluate import shifted_images

    paths = [Path(p) for p in ["b.jpg", "a.jpg", "a.jpg", "c.jpg", "b.jpg"]]
    out = shifted_images(paths)
    assert all(o != p for o, p in zip(out, paths))
    assert out[1] == out[2] and out[0] == out[4]  # one replacement per image
    assert sorted(set(out)) == sorted(set(paths))  # a rotation: every image still used


def test_labels_with_a_byte_level_bpe_tokenizer_keep_the_first_answer_token():
    """GPT-2-style tokenizers (SmolLM2, Llama 3, Qwen) merge the space before an answer into its first
    token; that token must carry the loss, or a one-word answer teaches only the end token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=False)
    corpus = [
        "USER: what colour is it ? ASSISTANT: red",
        "A chat between a curious user and an assistant.",
    ] * 20
    bpe.train_from_iterator(
        corpus, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>", "<|im_end|>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    image_id, _ = prepare_tokenizer(tok)
    conv = [{"from": "human", "value": "<image>\nwhat colour is it ?"}, {"from": "gpt", "value": "red"}]
    enc = encode(
        conv, tok, "vicuna_v1", has_image=True, image_token_id=image_id, num_image_tokens=3, max_length=500
    )
    text = tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])
    assert text.strip() == "red<|im_end|>"
    assert "ASSISTANT" not in text and ":" not in text


def test_a_numeric_answer_supervises_the_lone_space_before_it():
    """Tokenizers that split digits (SmolLM2, Llama) give "ASSISTANT: 3" as ":", " ", "3": the inference
    prompt ends at "ASSISTANT:", so the model generates that space and it must carry the loss (without
    it a finetuned SmolLM2 answered every count question with a word it knew, "five")."""
    from tokenizers import ByteLevelBPETokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from l2c_llava.mllm.conversation import prompt

    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=False)
    bpe._tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    corpus = ["USER: how many stars ? ASSISTANT: 3", "USER: what colour ? ASSISTANT: red"] * 20
    bpe.train_from_iterator(
        corpus, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>", "<|im_end|>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    image_id, _ = prepare_tokenizer(tok)
    conv = [
        {"from": "human", "value": "<image>\nhow many stars ?"},
        {"from": "gpt", "value": "3"},
        {"from": "human", "value": "what colour ?"},
        {"from": "gpt", "value": "red"},
    ]
    enc = encode(
        conv, tok, "vicuna_v1", has_image=True, image_token_id=image_id, num_image_tokens=3, max_length=500
    )
    pieces = [(tok.convert_ids_to_tokens(i), lab != IGNORE) for i, lab in zip(enc.input_ids, enc.labels)]
    first = next(k for k, (_, sup) in enumerate(pieces) if sup)
    assert pieces[first - 1 : first + 3] == [(":", False), ("Ġ", True), ("3", True), ("<|im_end|>", True)]
    assert tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]) == (
        " 3<|im_end|> red<|im_end|>"
    )
    # everything after the inference prompt of the first turn is what the model learns to generate
    first_prompt = prompt("how many stars ?", "vicuna_v1", has_image=True)
    assert enc.text.startswith(first_prompt) and enc.text[len(first_prompt) :].startswith(" 3<|im_end|>")


def test_the_finetune_learns_an_answer_only_the_image_gives(tmp_path, llava_parts):
    """End to end on held-out images: the answer ("what colour is the picture?") is in the pixels
    only, so a model that reaches it has its image features wired through the projector, the
    labels, the training and the saved model. The same questions asked with another image, and the
    answer prior, stay at a quarter (four balanced colours)."""
    import numpy as np
    from PIL import Image

    from l2c_llava.mllm.evaluate import evaluate_vqa
    from l2c_llava.mllm.train import MllmRecipe

    colours = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
    names = list(colours)
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    question = "What color is the picture?"
    rows, tests = [], []
    for i in range(80):  # consecutive files differ in colour: the shuffled-image run never keeps it
        name = names[i % 4]
        pixels = np.clip(np.array(colours[name]) + rng.integers(-25, 26, (32, 32, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "img" / f"{i:03d}.png")
        if i < 64:
            rows.append(
                {
                    "id": str(i),
                    "image": f"{i:03d}.png",
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": name},
                    ],
                }
            )
        else:
            tests.append(
                {
                    "question_id": str(i),
                    "image": f"{i:03d}.png",
                    "question": question,
                    "answers": [name],
                    "type": "color",
                }
            )
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tests))
    (tmp_path / "ft.yaml").write_text(f"""recipe: mllm
run: {{output_dir: {tmp_path / "ft"}, seed: 0}}
model: {{vision_tower: {llava_parts / "vision"}, llm: {{name_or_path: {llava_parts / "llm"}, torch_dtype: float32}}}}
data: {{path: {tmp_path / "train.json"}, image_root: {tmp_path / "img"}, template: vicuna_v1, max_length: 120,
        num_workers: 0}}
train: {{stage: finetune, tune: full, lr: 3.0e-3, global_batch_size: 16, per_device_batch_size: 16,
         max_steps: 60, mixed_precision: "no", gradient_checkpointing: false, save_every: 60, log_every: 10}}
""")
    MllmRecipe(load_config(tmp_path / "ft.yaml")).run()
    m = evaluate_vqa(
        tmp_path / "ft",
        tmp_path / "test.jsonl",
        tmp_path / "img",
        tmp_path / "eval",
        train_json=str(tmp_path / "train.json"),
        shuffled_images=True,
    )
    assert m["n"] == 16 and m["prior"]["accuracy"] == 0.25
    assert m["accuracy"] >= 0.75, m
    assert m["shuffled_images"]["accuracy"] <= 0.5, m
    assert m["vs_shuffled_images"]["p_value"] < 0.05 and m["vs_prior"]["gain"] >= 0.5, m


def test_the_supervised_positions_loss_is_transformers_loss(tmp_path, llava_parts, synth_dir):
    """The LM head on the supervised positions only gives transformers' causal-LM loss and the same
    gradients, for captions (plain) and multi-turn answers with text-only rows (vicuna_v1)."""
    from l2c_llava.losses import _mask_slicing, supervised_loss
    from l2c_llava.mllm.data import Collate
    from l2c_llava.mllm.train import MllmRecipe

    assert _mask_slicing()  # the transformers this project pins does it; older ones fall back
    for stage in ("pretrain", "finetune"):
        _, cfg = mllm_config(tmp_path, llava_parts, synth_dir, stage, tmp_path / stage)
        recipe = MllmRecipe(cfg)
        model, proc = recipe.build()
        ds = recipe.build_data(proc, model)
        images = [i for i in range(len(ds)) if ds.rows[i].has_image][:3]
        text_only = [i for i in range(len(ds)) if not ds.rows[i].has_image][:2]
        assert len(images) == 3 and (stage == "pretrain" or len(text_only) == 2)
        for rows in (images, text_only) if text_only else (images,):
            batch = Collate(proc.tokenizer.pad_token_id)([ds[i] for i in rows])
            grads = []
            for only in (False, True):
                model.zero_grad(set_to_none=True)
                loss = supervised_loss(model, batch, only_supervised=only)
                loss.backward()
                grads.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
            (full, g_full), (kept, g_kept) = grads
            assert torch.isfinite(full) and torch.allclose(full, kept, atol=1e-6), (stage, full, kept)
            assert any(a is not None for a in g_full)
            assert all(a is b is None or torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_kept))
        nothing = dict(batch, labels=torch.full_like(batch["labels"], IGNORE))
        assert torch.isnan(supervised_loss(model, nothing)) and torch.isnan(model(**nothing).loss)


def test_packed_rows_give_the_padded_loss_and_gradients(tmp_path, llava_parts, synth_dir):
    """Padding-free batches: the same samples packed end to end (position_ids restarting, no
    attention mask) give the padded batch's loss and gradients, with image and text-only samples in
    one row, several rows when the capacity is short, and every sample's own image in its place; a
    packing that let attention cross samples (no position restart) changes the loss."""
    from l2c_llava.losses import supervised_loss
    from l2c_llava.mllm.data import Collate, PackedCollate, pack_rows
    from l2c_llava.mllm.train import MllmRecipe

    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert pack_rows([9, 2], 4) == [[0], [1]]  # longer than a row: a row of its own
    assert pack_rows([70] * 7 + [60], 512) == [list(range(0, 8, 2)), list(range(1, 8, 2))]  # even rows
    assert (
        pack_rows([6, 5, 5], 10) == [[0], [1, 2]]
        and pack_rows([6, 5, 5], 9) == [[0], [1], [2]]
        and pack_rows([], 8) == []
    )
    for stage in ("pretrain", "finetune"):
        _, cfg = mllm_config(tmp_path, llava_parts, synth_dir, stage, tmp_path / stage)
        recipe = MllmRecipe(cfg)
        model, proc = recipe.build()
        ds = recipe.build_data(proc, model)
        images = [i for i in range(len(ds)) if ds.rows[i].has_image][:4]
        text_only = [i for i in range(len(ds)) if not ds.rows[i].has_image][:2]
        samples = [ds[i] for i in images[:2] + text_only + images[2:]]
        total = sum(len(s["input_ids"]) for s in samples)
        padded = Collate(proc.tokenizer.pad_token_id)(samples)
        assert int(padded["attention_mask"].sum()) == total
        pad_id = proc.tokenizer.pad_token_id
        longest = max(len(s["input_ids"]) for s in samples)
        for capacity in (total, longest + 1, None):
            packed = PackedCollate(pad_id, capacity)(samples)
            assert int(packed.pop("num_tokens")) == total
            rows = packed["input_ids"].shape[0]
            assert (rows == 1) == (capacity == total) and packed["input_ids"].numel() <= padded[
                "input_ids"
            ].numel()
            assert capacity != total or packed["input_ids"].numel() == total  # one row, no padding
            grads = []
            for batch in (padded, packed):
                model.zero_grad(set_to_none=True)
                loss = supervised_loss(model, batch, use_cache=False)
                loss.backward()
                grads.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
            (a, ga), (b, gb) = grads
            assert torch.isfinite(a) and torch.allclose(a, b, atol=1e-5), (stage, capacity, a, b)
            assert any(g is not None for g in ga)
            assert all(x is y is None or torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))
        # the one row with positions running on: attention crosses the samples, the loss moves
        one_row = PackedCollate(pad_id, total)(samples)
        one_row.pop("num_tokens")
        leaky = dict(one_row, position_ids=torch.arange(total)[None])
        with torch.no_grad():
            kept, crossed = (model(**x, use_cache=False).logits for x in (one_row, leaky))
            assert (kept - crossed).abs().max() > 1e-3
