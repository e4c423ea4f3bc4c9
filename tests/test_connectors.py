"""Q-Former and perceiver-resampler connectors: shapes and token counts, a tiny LLaVA with each that
generates after save/load through our loader, trains 3 steps and reloads; and the places that need
transformers' own LLaVA class refuse them with the reason."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from l2c_llava.mllm.build import BuildError, build_llava, image_tokens_of, load_llava, save_llava
from l2c_llava.mllm.connectors import PerceiverResampler, QFormerConnector, make_connector

from .recipe_configs import mllm_config

KINDS = ["qformer", "perceiver"]


@pytest.mark.parametrize("cls", [QFormerConnector, PerceiverResampler])
@pytest.mark.parametrize("queries,hidden", [(4, None), (16, 24)])
def test_connector_shapes(cls, queries, hidden):
    torch.manual_seed(0)
    conn = cls(vision_dim=32, llm_dim=40, num_queries=queries, hidden_size=hidden, depth=2, heads=4)
    feats = torch.randn(3, 49, 32)
    out = conn(feats)
    assert out.shape == (3, queries, 40)
    # each image's tokens depend on that image only (no mixing across the batch)
    alone = conn(feats[1:2])
    assert torch.allclose(out[1:2], alone, atol=1e-5)
    # and on the image: other features, other tokens
    assert not torch.allclose(conn(feats.flip(0))[0], out[0], atol=1e-3)
    out.sum().backward()
    assert all(p.grad is not None for p in conn.parameters())


def test_connector_errors_name_the_setting():
    with pytest.raises(ValueError, match="not divisible by its 5 heads"):
        make_connector({"type": "qformer", "heads": 5}, vision_dim=32, llm_dim=16)
    with pytest.raises(ValueError, match="expected one of qformer, perceiver"):
        make_connector({"type": "resampler"}, vision_dim=32, llm_dim=16)


def tiny_llava(llava_parts, kind, queries=6):
    return build_llava(
        llava_parts / "vision",
        SimpleNamespace(name_or_path=str(llava_parts / "llm")),
        projector_type=kind,
        connector={"num_queries": queries, "heads": 4},
    )


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_llava_with_a_connector_generates_after_save_and_load(tmp_path, llava_parts, kind):
    from PIL import Image
    from transformers import AutoProcessor

    model, proc = tiny_llava(llava_parts, kind, queries=6)
    assert image_tokens_of(model.config) == model.config.image_seq_length == 6
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
        add_generation_prompt=True,
    )
    for size in [(32, 32), (70, 50)]:  # whatever the image size: num_queries tokens
        inputs = proc(images=Image.new("RGB", size, (200, 0, 0)), text=text, return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 6
    feats = model.get_image_features(pixel_values=inputs["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)
    assert feats[0].shape == (6, model.config.text_config.hidden_size)
    save_llava(model, proc, tmp_path / "m")
    again = load_llava(tmp_path / "m")
    assert type(again.model.multi_modal_projector) is type(model.model.multi_modal_projector)
    proc2 = AutoProcessor.from_pretrained(tmp_path / "m")
    inputs = proc2(images=Image.new("RGB", (32, 32), (0, 200, 0)), text=text, return_tensors="pt")
    a = model.eval().generate(**inputs, max_new_tokens=4, do_sample=False)
    b = again.eval().generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b) and a.shape[1] == inputs["input_ids"].shape[1] + 4
    # the image changes the answer's logits (the connector is wired in)
    other = proc2(images=Image.new("RGB", (32, 32), (0, 0, 200)), text=text, return_tensors="pt")
    with torch.no_grad():
        la, lb = again(**inputs).logits[0, -1], again(**other).logits[0, -1]
    assert not torch.allclose(la, lb)


def test_transformers_only_paths_refuse_a_connector_model(tmp_path, llava_parts, capsys):
    from l2c_llava.errors import CannotRunError, InputError
    from l2c_llava.mllm.export import export_original
    from l2c_llava.mllm.lmms import run_lmms_eval

    model, proc = tiny_llava(llava_parts, "qformer", queries=4)
    save_llava(model, proc, tmp_path / "m")
    with pytest.raises(InputError, match="takes only the MLP"):
        export_original(tmp_path / "m", tmp_path / "llava-orig")
    from l2c_llava.cli import main

    assert main(["export", "llava", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "hf")]) == 0
    assert "uses the qformer connector (4 vision tokens); load it with l2c_llava.mllm.build.load_llava" in (
        capsys.readouterr().out
    )
    assert (
        main(
            [
                "export",
                "llava",
                "--model",
                str(tmp_path / "m"),
                "--out",
                str(tmp_path / "llava-o"),
                "--format",
                "original",
            ]
        )
        == 2
    )
    assert "takes only the MLP" in capsys.readouterr().err
    with pytest.raises(CannotRunError, match="takes only the MLP connector"):
        run_lmms_eval(tmp_path / "m", ["l2c_vqa"], tmp_path / "ev")
    with pytest.raises(BuildError, match="expected one of mlp2x_gelu, linear, qformer, perceiver"):
        build_llava(
            llava_parts / "vision",
            SimpleNamespace(name_or_path=str(llava_parts / "llm")),
            projector_type="blip",
        )


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_llava_with_a_connector_trains_three_steps_and_reloads(tmp_path, llava_parts, synth_dir, kind):
    from l2c_llava.mllm.train import MllmRecipe

    extra = [f"model.projector_type={kind}", "model.connector.num_queries=8", "model.connector.heads=4"]
    _, cfg = mllm_config(
        tmp_path, llava_parts, synth_dir, "pretrain", tmp_path / "pre", [*extra, "train.save_full_model=true"]
    )
    stats = MllmRecipe(cfg).run()
    assert stats["steps"] == 3 and stats["final_loss"] == stats["final_loss"]  # finite
    trained = load_llava(tmp_path / "pre" / "model")
    init, _ = tiny_llava(llava_parts, kind, queries=8)
    a, b = trained.state_dict(), init.state_dict()
    proj = [k for k in a if "multi_modal_projector" in k]
    assert any(not torch.allclose(a[k], b[k]) for k in proj)  # the connector trained
    lm_key = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[lm_key], b[lm_key])  # and only the connector
    # the finetune starts from the pretrained connector (LoRA, 2 steps) and saves a loadable model
    _, ft = mllm_config(
        tmp_path,
        llava_parts,
        synth_dir,
        "finetune",
        tmp_path / "ft",
        [
            *extra,
            f"model.init_from={tmp_path / 'pre'}",
            "train.tune=lora",
            "train.lora.r=4",
            "train.max_steps=2",
        ],
    )
    MllmRecipe(ft).run()
    f = load_llava(tmp_path / "ft" / "model").state_dict()
    assert image_tokens_of(load_llava(tmp_path / "ft" / "model").config) == 8
    assert not any("lora" in k for k in f) and set(f) == set(a)
