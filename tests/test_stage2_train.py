from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from l2c_llava.cli import main
from l2c_llava.data.readers import read_caption_pairs
from l2c_llava.data.webdataset import write_shards
from l2c_llava.errors import InputError
from l2c_llava.models.vision import load_vision_tower
from l2c_llava.stage2.cache import build_cache, pair_captions
from l2c_llava.stage2.train import LLM2CLIPModel, Stage2Recipe, param_groups

from .recipe_configs import stage2_config
from .tiny_models import FakeEncoder, tiny_vision


class Killed(Exception):
    pass


def test_train_saves_resumes_to_the_same_weights(tmp_path, stage2_parts, synth_dir, monkeypatch):
    root, vision_dir, encoder, _ = stage2_parts
    cfg = stage2_config(root, vision_dir, encoder, synth_dir, tmp_path / "killed")
    original = Stage2Recipe.save_checkpoint

    def die_after_2(self, *args):
        original(self, *args)
        step = args[-1]
        if step == 2:
            raise Killed

    monkeypatch.setattr(Stage2Recipe, "save_checkpoint", die_after_2)
    with pytest.raises(Killed):
        Stage2Recipe(cfg).run()
    monkeypatch.setattr(Stage2Recipe, "save_checkpoint", original)
    stats = Stage2Recipe(cfg).run()
    assert stats["steps"] == 4
    log = [json.loads(x) for x in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["logit_scale"] <= 100 for r in log)
    Stage2Recipe(stage2_config(root, vision_dir, encoder, synth_dir, tmp_path / "straight")).run()
    a = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} == {
        "vision_model",
        "visual_projection",
        "text_adapter",
        "logit_scale",
    }
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    before = tiny_vision().state_dict()
    assert not torch.allclose(
        a["vision_model.encoder.layers.0.self_attn.q_proj.weight"],
        before["encoder.layers.0.self_attn.q_proj.weight"],
    )
    meta = json.loads((tmp_path / "killed" / "model" / "llm2clip_config.json").read_text())
    assert meta["text_dim"] == 12 and meta["projection_dim"] == 16


def test_webdataset_shards_are_streamed_in_training(tmp_path, stage2_parts, synth_dir):
    root, vision_dir, encoder, pairs = stage2_parts
    shards = write_shards(
        [(f"{i:05d}", p.image_path, p.short, p.long) for i, p in enumerate(pairs)],
        tmp_path / "wds",
        per_shard=20,
    )
    pattern = str(tmp_path / "wds" / f"{{00000..{len(shards) - 1:05d}}}.tar")
    cfg = stage2_config(
        root,
        vision_dir,
        encoder,
        synth_dir,
        tmp_path / "wds_run",
        ["data.format=webdataset", f"data.train={pattern}", "train.max_steps=3"],
    )
    assert Stage2Recipe(cfg).run()["steps"] == 3


def test_layer_decay_groups():
    model = LLM2CLIPModel.from_vision_tower(tiny_vision(), text_dim=8, projection_dim=4, num_blocks=1)
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert (
        by_param[id(named["vision_model.embeddings.patch_embedding.weight"])]["lr"] == 0.5**3
    )  # 2 blocks: depth 0
    assert by_param[id(named["vision_model.encoder.layers.1.mlp.fc1.weight"])]["lr"] == 0.5  # last block
    assert by_param[id(named["visual_projection.weight"])]["lr"] == 1.0
    assert by_param[id(named["text_adapter.adaptor.2.weight"])]["lr"] == 1.0  # no decay on the adapter
    assert by_param[id(named["logit_scale"])]["weight_decay"] == 0.0
    assert by_param[id(named["text_adapter.adaptor.2.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["text_adapter.adaptor.2.weight"])]["weight_decay"] == 0.05


def test_bad_input(tmp_path, stage2_parts, synth_dir, capsys):
    from .tiny_llm import save_tiny_llm

    root, vision_dir, encoder, _ = stage2_parts
    llama = save_tiny_llm(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match="is a 'llama' model, not a CLIP vision model"):
        load_vision_tower(str(llama))
    with pytest.raises(ValueError, match="no config.json"):
        load_vision_tower(str(tmp_path))
    # captions without a cached feature: the test split was never cached
    cfg = stage2_config(
        root,
        vision_dir,
        encoder,
        synth_dir,
        tmp_path / "nocache",
        [f"data.train={synth_dir}/captions/test.jsonl"],
    )
    with pytest.raises(InputError, match="has no cached feature"):
        Stage2Recipe(cfg).run()
    # the CLI reports it and exits 2
    path = tmp_path / "nocache.yaml"
    assert (
        main(["stage2", "train", "--config", str(path), f"data.train={synth_dir}/captions/test.jsonl"]) == 2
    )
    assert "has no cached feature" in capsys.readouterr().err


def test_several_short_captions_per_image_are_cached_once_and_drawn_in_turn(tmp_path, synth_dir):
    """data.short_key=alternatives (the synthetic set's five COCO-like captions): the cache holds each
    distinct caption once, and training draws every one of an image's short captions across epochs."""
    from l2c_llava.stage2.train import PairImages

    pairs = read_caption_pairs(
        synth_dir / "captions" / "train.jsonl", synth_dir / "images", short_key="alternatives"
    )
    assert all(len(p.shorts) == 5 for p in pairs)
    captions = pair_captions(pairs)
    assert len(captions) == len(set(captions)) == len({c for p in pairs for c in (*p.shorts, p.long)})
    assert captions[:2] == [pairs[0].short, pairs[0].long]
    row = {c: i for i, c in enumerate(captions)}
    ds = PairImages(
        pairs.items,
        [[row[c] for c in p.shorts] for p in pairs],
        [row[p.long] for p in pairs],
        lambda img: 0,
        seed=0,
        share=0.0,
    )
    seen = set()
    for epoch in range(40):
        ds.epoch = epoch
        seen.add(ds[0][1])
    assert seen == {row[c] for c in pairs[0].shorts}  # every short caption of image 0 comes up


def _cached_pairs(root, synth_dir, **read):
    """A tiny tower, a stand-in encoder folder and a train cache (FakeEncoder features) of the caption
    pairs `read_caption_pairs(train.jsonl, **read)` gives: (vision, encoder, pairs)."""
    tiny_vision().save_pretrained(root / "vision")
    encoder = root / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    pairs = read_caption_pairs(synth_dir / "captions" / "train.jsonl", synth_dir / "images", **read)
    build_cache(
        root / "cache" / "train",
        pair_captions(pairs),
        encoder,
        shard_size=64,
        load_encoder=lambda: FakeEncoder(dim=12),
        progress=False,
    )
    return root / "vision", encoder, pairs


def test_train_on_several_short_captions(tmp_path, synth_dir):
    vision, encoder, _ = _cached_pairs(tmp_path, synth_dir, short_key="alternatives")
    cfg = stage2_config(
        tmp_path, vision, encoder, synth_dir, tmp_path / "run", ["data.short_key=alternatives"]
    )
    assert Stage2Recipe(cfg).run()["steps"] == 4


def test_max_train_rows_trains_on_the_first_rows_which_is_all_their_cache_holds(tmp_path, synth_dir):
    """data.max_train_rows: training reads the first N caption pairs only, so a cache of those rows'
    captions (what `l2c stage2 cache` builds under the same key) is enough; the whole file is not."""
    vision, encoder, pairs = _cached_pairs(tmp_path, synth_dir, max_rows=8)
    assert len(pairs) == 8 < len((synth_dir / "captions" / "train.jsonl").read_text().splitlines())
    cfg = stage2_config(tmp_path, vision, encoder, synth_dir, tmp_path / "run", ["data.max_train_rows=8"])
    assert Stage2Recipe(cfg).run()["steps"] == 4
    whole = stage2_config(tmp_path, vision, encoder, synth_dir, tmp_path / "whole")
    with pytest.raises(InputError, match="has no cached feature"):
        Stage2Recipe(whole).run()


def test_dense_share_and_reproducible_choices():
    from l2c_llava.stage2.train import pick_dense

    picks = [pick_dense(0, 0, i, 0.5) for i in range(2000)]
    assert 0.45 < sum(picks) / len(picks) < 0.55
    assert picks == [pick_dense(0, 0, i, 0.5) for i in range(2000)]
    assert picks != [pick_dense(0, 1, i, 0.5) for i in range(2000)]  # a new draw each epoch
    assert not any(pick_dense(0, 0, i, 0.0) for i in range(100)) and all(
        pick_dense(0, 0, i, 1.0) for i in range(100)
    )


def test_vision_tower_from_a_clip_model_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
    )
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    tower = load_vision_tower(str(tmp_path / "clip"))
    model = LLM2CLIPModel.from_vision_tower(tower, text_dim=8, projection_dim=4, num_blocks=1)
    model.vision_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    img, txt, _ = model(torch.randn(2, 3, 32, 32), torch.randn(2, 8))
    (img.sum() + txt.sum()).backward()
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.grad is not None


def test_too_little_data_for_one_batch_is_an_error_not_a_hang(tmp_path, stage2_parts, synth_dir):
    root, vision_dir, encoder, _ = stage2_parts
    cfg = stage2_config(root, vision_dir, encoder, synth_dir, tmp_path / "small", ["train.batch_size=1000"])
    with pytest.raises(ValueError, match="not enough samples for one batch of 1000"):
        Stage2Recipe(cfg).run()


def test_export_vision_loads_back_with_the_trained_features(tmp_path, stage2_parts, synth_dir, capsys):
    from transformers import AutoImageProcessor, CLIPVisionModel

    from l2c_llava.errors import InputError
    from l2c_llava.stage2.export import export_vision
    from l2c_llava.stage2.model import LLM2CLIPModel

    root, vision_dir, encoder, _ = stage2_parts
    run = tmp_path / "run"
    Stage2Recipe(stage2_config(root, vision_dir, encoder, synth_dir, run, ["train.max_steps=2"])).run()
    assert main(["export", "vision", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    exported, info = CLIPVisionModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    trained = LLM2CLIPModel.from_vision_tower(
        CLIPVisionModel.from_pretrained(vision_dir), text_dim=12, projection_dim=16, num_blocks=2
    )
    trained.load_state_dict(load_file(str(run / "model" / "model.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            exported.eval()(pixel_values=x).pooler_output,
            trained.eval().vision_model(pixel_values=x).pooler_output,
            atol=1e-5,
        )
        base = CLIPVisionModel.from_pretrained(vision_dir).eval()(pixel_values=x).pooler_output
        assert not torch.allclose(
            exported(pixel_values=x).pooler_output, base, atol=1e-4
        )  # it is the trained tower
    proc = AutoImageProcessor.from_pretrained(tmp_path / "export")
    assert proc.crop_size["height"] == 32 and list(proc.image_mean) == pytest.approx(
        [0.48145466, 0.4578275, 0.40821073]
    )
    with pytest.raises(InputError, match="neither an LLM2CLIP export"):
        export_vision(tmp_path, tmp_path / "x")
    assert main(["export", "vision", "--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_resume_refuses_a_changed_config(tmp_path, stage2_parts, synth_dir):
    root, vision_dir, encoder, _ = stage2_parts
    Stage2Recipe(
        stage2_config(root, vision_dir, encoder, synth_dir, tmp_path / "r", ["train.max_steps=2"])
    ).run()
    changed = stage2_config(
        root, vision_dir, encoder, synth_dir, tmp_path / "r", ["train.max_steps=2", "train.lr=5e-4"]
    )
    with pytest.raises(ValueError, match=r"another config \(train.lr: 0.001 -> 0.0005\)"):
        Stage2Recipe(changed).run()
    # logging settings may change; run.resume=false starts over
    Stage2Recipe(
        stage2_config(
            root, vision_dir, encoder, synth_dir, tmp_path / "r", ["train.max_steps=2", "train.log_every=2"]
        )
    ).run()
    assert (
        Stage2Recipe(
            stage2_config(
                root,
                vision_dir,
                encoder,
                synth_dir,
                tmp_path / "r",
                ["train.max_steps=2", "train.lr=5e-4", "run.resume=false"],
            )
        ).run()["steps"]
        == 2
    )


def test_contrastive_accumulation_in_training_matches_the_whole_batch(tmp_path, stage2_parts, synth_dir):
    """batch 4 x 2 accumulated with GradCache = batch 8 in one pass: same loss, same weights."""
    root, vision_dir, encoder, _ = stage2_parts
    one = ["train.max_steps=1", "train.batch_size=8", "train.grad_clip=null"]
    acc = [
        "train.max_steps=1",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.contrastive_accum=true",
        "train.grad_clip=null",
    ]
    Stage2Recipe(stage2_config(root, vision_dir, encoder, synth_dir, tmp_path / "whole", one)).run()
    Stage2Recipe(stage2_config(root, vision_dir, encoder, synth_dir, tmp_path / "accum", acc)).run()
    la = json.loads((tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()[0])
    lb = json.loads((tmp_path / "accum" / "train_log.jsonl").read_text().splitlines()[0])
    assert lb["loss"] == pytest.approx(la["loss"], rel=1e-5)
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "accum" / "model" / "model.safetensors"))
    # AdamW's first step is lr * g / (|g| + eps): where the true gradient is 0 (a key bias: softmax
    # ignores a constant added to every key) the update is float noise, left out of the comparison
    far = [k for k in a if not k.endswith("k_proj.bias") and not torch.allclose(a[k], b[k], atol=1e-5)]
    assert not far, far


def test_export_defaults_to_the_runs_export_dir_and_the_run_reads_as_its_tower(
    tmp_path, stage2_parts, synth_dir, capsys
):
    """Stage paths from one layout: `l2c export vision --run RUN` writes to export.dir/vision and an mllm
    config naming RUN as its vision tower reads that folder."""
    from l2c_llava.models.vision import load_vision_tower

    root, vision_dir, encoder, _ = stage2_parts
    run, shared = tmp_path / "run", tmp_path / "exports"
    Stage2Recipe(
        stage2_config(
            root, vision_dir, encoder, synth_dir, run, ["train.max_steps=1", f"export.dir={shared}"]
        )
    ).run()
    assert main(["export", "vision", "--run", str(run)]) == 0
    assert main(["export", "llm2clip", "--run", str(run)]) == 0
    capsys.readouterr()
    assert (shared / "vision" / "config.json").is_file() and (shared / "llm2clip" / "config.json").is_file()
    a, b = load_vision_tower(str(run)).state_dict(), load_vision_tower(str(shared / "vision")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
