"""Stage-2 retrieval evaluation (baseline CLIP vs LLM2CLIP), the whole-model export and the import of
a released LLM2CLIP checkpoint folder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from l2c_llava.cli import main
from l2c_llava.config import load_config
from l2c_llava.data.images import load_rgb
from l2c_llava.data.readers import read_caption_pairs, read_long_captions
from l2c_llava.stage2.cache import TextFeatureCache, build_cache, pair_captions
from l2c_llava.stage2.llm2clip import LLM2CLIP, LLM2CLIPLoadError
from l2c_llava.stage2.model import LLM2CLIPModel
from l2c_llava.stage2.retrieval import recall_at_k
from l2c_llava.stage2.train import Stage2Recipe

from .tiny_models import FakeEncoder


def test_eval_compares_both_models_on_short_and_long_captions(trained, capsys):
    root, cfg_path, cfg, _ = trained
    assert main(["stage2", "eval", "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "baseline CLIP" in out and "LLM2CLIP" in out and "difference" in out
    metrics = json.loads((root / "s2" / "metrics.json").read_text())
    assert set(metrics["llm2clip"]) == set(metrics["baseline"]) == {"short", "long"}
    for model in ("llm2clip", "baseline"):
        for name in ("short", "long"):
            m = metrics[model][name]
            assert {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} <= set(m)
            assert all(0 <= m[f"i2t_R@{k}"] <= 1 for k in (1, 5, 10))
            assert m["i2t_R@1"] <= m["i2t_R@5"] <= m["i2t_R@10"]
    assert metrics["baseline"]["long"]["captions_truncated"] > 0.9  # dense captions exceed 24 tokens
    assert (root / "s2" / "retrieval.md").read_text().count("| LLM2CLIP |") == 4
    # every R@K carries its 95% interval, and LLM2CLIP against the baseline its paired test
    for model in ("llm2clip", "baseline"):
        for name in ("short", "long"):
            for metric, (lo, hi) in metrics["intervals"][model][name].items():
                assert lo <= metrics[model][name][metric] <= hi, (model, name, metric)
    for name in ("short", "long"):
        for metric, t in metrics["paired"][name].items():
            assert t["diff"] == pytest.approx(
                metrics["llm2clip"][name][metric] - metrics["baseline"][name][metric], abs=1e-4
            )
            assert t["ci95"][0] <= t["diff"] <= t["ci95"][1] and 0 < t["p_value"] <= 1
    assert "paired bootstrap p" in (root / "s2" / "retrieval.md").read_text()
    # the LLM2CLIP numbers are those of the trained model on the cached test-caption features
    long = read_long_captions(cfg.data.eval_long, cfg.data.eval_image_root)
    model = LLM2CLIP.from_pretrained(root / "s2")
    cache = TextFeatureCache(root / "cache" / "eval_long")
    txt = F.normalize(
        model.get_text_features_from_llm(cache.features(cache.rows_of(long.captions).tolist())), dim=-1
    )
    img = F.normalize(model.get_image_features(model.preprocess([load_rgb(p) for p in long.images])), dim=-1)
    assert recall_at_k(img, txt, long.caption_image) == pytest.approx(metrics["llm2clip"]["long"])


def test_eval_refuses_a_cache_of_another_encoder_and_a_non_clip_baseline(trained, tmp_path, capsys):
    root, cfg_path, cfg, _ = trained
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"other": 1}')
    long = read_long_captions(cfg.data.eval_long, cfg.data.eval_image_root, image_check="none")
    build_cache(
        tmp_path / "cache" / "eval_long",
        long.captions,
        other,
        load_encoder=lambda: FakeEncoder(dim=12),
        progress=False,
    )
    args = [
        "stage2",
        "eval",
        "--config",
        str(cfg_path),
        f"cache.dir={tmp_path / 'cache'}",
        "data.eval_short=null",
    ]
    assert main(args) == 2
    assert "another text encoder" in capsys.readouterr().err
    assert main(["stage2", "eval", "--config", str(cfg_path), "--baseline", str(root / "s2" / "model")]) == 2
    assert "baseline CLIP" in capsys.readouterr().err


def test_whole_model_export_loads_and_gives_the_trained_features(trained, tmp_path, capsys):
    root, _, _, encoder = trained
    out = tmp_path / "llm2clip"
    assert main(["export", "llm2clip", "--run", str(root / "s2"), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "clip" and config["llm2clip"]["num_blocks"] == 2
    assert config["llm2clip"]["text_encoder"]["path"] == str(encoder)
    model = LLM2CLIP.from_pretrained(out, text_encoder=FakeEncoder(dim=12))
    run = LLM2CLIP.from_pretrained(root / "s2")
    pixels = torch.randn(3, 3, 32, 32)
    assert torch.allclose(model.get_image_features(pixels), run.get_image_features(pixels), atol=1e-6)
    texts = ["a red circle", "two blue squares"]
    want = run.model.get_text_features(FakeEncoder(dim=12).encode(texts))
    assert torch.allclose(model.get_text_features(texts), want, atol=1e-6)
    assert model.get_text_features(texts).shape == (2, 16)
    # the recorded encoder is checked by fingerprint before it is used
    (encoder / "config.json").write_text('{"changed": true}')
    try:
        with pytest.raises(LLM2CLIPLoadError, match="not the one this model was trained with"):
            LLM2CLIP.from_pretrained(out).get_text_features(texts)
    finally:
        (encoder / "config.json").write_text("{}")
    # and the vision export can be made from the whole-model export too
    assert main(["export", "vision", "--run", str(out), "--out", str(tmp_path / "vision")]) == 0


def release_folder(path, text_dim=12, proj=16):
    """A folder in the microsoft/LLM2CLIP-Openai-L-14-336 layout: model_type clip config with
    vision_config and an auto_map to remote code (never executed), vision_model.* / visual_projection
    / text_adapter.adaptor.* tensors, no preprocessor_config.json."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vcfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(5)
    model = LLM2CLIPModel.from_vision_tower(
        CLIPVisionModel(vcfg), text_dim, projection_dim=proj, num_blocks=4
    )
    path.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "logit_scale"}
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LLM2CLIPModel"],
                "model_type": "clip",
                "projection_dim": proj,
                "auto_map": {"AutoModel": "modeling_llm2clip.LLM2CLIPModel"},
                "vision_config": vcfg.to_dict(),
                "text_config": {"hidden_size": 32},
                "logit_scale_init_value": 2.6592,
            }
        )
    )
    (path / "modeling_llm2clip.py").write_text("raise SystemExit('remote code must not run')\n")
    return model


def test_import_a_released_checkpoint_folder(tmp_path, capsys):
    from transformers import CLIPVisionModel

    src = tmp_path / "LLM2CLIP-Openai-L-14-336"
    original = release_folder(src).eval()
    assert main(["import", "llm2clip", str(src), "--out", str(tmp_path / "out")]) == 0
    outs = json.loads(capsys.readouterr().out)
    vision, info = CLIPVisionModel.from_pretrained(outs["vision"], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            vision.eval()(pixel_values=x).pooler_output,
            original.vision_model(pixel_values=x).pooler_output,
            atol=1e-5,
        )
    whole = LLM2CLIP.from_pretrained(outs["llm2clip"])
    feats = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.allclose(
            whole.get_text_features_from_llm(feats), original.get_text_features(feats), atol=1e-5
        )
        assert torch.allclose(whole.get_image_features(x), original.get_image_features(x), atol=1e-5)
    # bad folders: each refused with the reason
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"x")
    assert main(["import", "llm2clip", str(tmp_path / "pickle"), "--out", str(tmp_path / "o2")]) == 2
    assert "pickle" in capsys.readouterr().err
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    assert main(["import", "llm2clip", str(tmp_path / "llama"), "--out", str(tmp_path / "o3")]) == 2
    assert "model_type 'llama'" in capsys.readouterr().err
    state = {k: v for k, v in original.state_dict().items() if not k.startswith("text_adapter.")}
    (tmp_path / "noadapter").mkdir()
    (tmp_path / "noadapter" / "config.json").write_text((src / "config.json").read_text())
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(tmp_path / "noadapter" / "model.safetensors")
    )
    assert main(["import", "llm2clip", str(tmp_path / "noadapter"), "--out", str(tmp_path / "o4")]) == 2
    assert "no text_adapter" in capsys.readouterr().err


def test_mismatched_feature_dimension_is_named(trained, tmp_path, synth_dir):
    root, cfg_path, cfg, encoder = trained
    model = LLM2CLIP.from_pretrained(root / "s2")
    with pytest.raises(ValueError, match="dimension 7; the adapter of .* takes 12"):
        model.get_text_features_from_llm(torch.randn(2, 7))
    # resuming a run with the features of another encoder: the config check names the changed key,
    # and a checkpoint of another shape is refused with the tensor that does not fit
    pairs = read_caption_pairs(synth_dir / "captions" / "train.jsonl", synth_dir / "images")
    build_cache(
        tmp_path / "cache" / "train",
        pair_captions(pairs),
        encoder,
        shard_size=64,
        load_encoder=lambda: FakeEncoder(dim=10),
        progress=False,
    )
    other = load_config(cfg_path, [f"cache.dir={tmp_path / 'cache'}", "train.max_steps=4"])
    with pytest.raises(ValueError, match="another config .*cache.dir"):
        Stage2Recipe(other).run()
    from transformers import CLIPModel

    tower = CLIPModel.from_pretrained(root / "clip" / "model").vision_model
    wrong = LLM2CLIPModel.from_vision_tower(tower, 10, projection_dim=16, num_blocks=2)
    opt = torch.optim.AdamW(wrong.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ValueError, match="run of another shape: .*text_adapter"):
        recipe = Stage2Recipe(cfg)
        recipe.acc, recipe.model = SimpleNamespace(num_processes=1, is_main_process=True), wrong
        recipe.load_checkpoint(SimpleNamespace(wrapped=wrong, opt=opt, sched=sched))


def test_queries_are_encoded_in_the_dtype_of_the_training_features(trained, tmp_path, monkeypatch):
    """Stage 2 records the dtype its cached caption features were computed in (text_encoder_dtype); the
    whole model loads its text encoder in that dtype, through an export too. On the demo a bf16-trained
    adapter fed float32 query features lost 3.5 points of long R@1 (bench/RESULTS.md, search recall)."""
    import shutil

    import l2c_llava.stage2.llm2clip as llm2clip_module

    root, _, _, encoder = trained
    meta = json.loads((root / "s2" / "model" / "llm2clip_config.json").read_text())
    assert meta["text_encoder_dtype"] == "auto"  # the fixture's cache: build_cache's default
    run = tmp_path / "s2"
    shutil.copytree(root / "s2" / "model", run / "model")
    meta["text_encoder_dtype"] = "bfloat16"
    (run / "model" / "llm2clip_config.json").write_text(json.dumps(meta))
    asked = []

    def fake_load(path, **kw):
        asked.append(kw.get("torch_dtype"))
        return FakeEncoder(dim=12)

    monkeypatch.setattr(llm2clip_module.TextEncoder, "from_pretrained", staticmethod(fake_load))
    model = LLM2CLIP.from_pretrained(run)
    assert model.text_encoder_ref["torch_dtype"] == "bfloat16"
    model.get_text_features(["a red circle"])
    assert main(["export", "llm2clip", "--run", str(run), "--out", str(tmp_path / "whole")]) == 0
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["llm2clip"]["text_encoder"]["torch_dtype"] == "bfloat16"
    LLM2CLIP.from_pretrained(tmp_path / "whole").get_text_features(["a red circle"])
    old = dict(meta)
    del old["text_encoder_dtype"]  # a model written before the dtype was recorded
    (run / "model" / "llm2clip_config.json").write_text(json.dumps(old))
    LLM2CLIP.from_pretrained(run).get_text_features(["a red circle"])
    assert asked == ["bfloat16", "bfloat16", "auto"]
