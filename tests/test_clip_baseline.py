"""The demo CLIP baseline: a small transformers CLIPModel trained from scratch (``l2c clip pretrain``)."""

from __future__ import annotations

import json

import torch

from l2c_llava.cli import main
from l2c_llava.config import load_config

from .recipe_configs import clip_config


def test_pretrain_writes_a_standard_clip_folder(tmp_path, synth_dir, capsys):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path, _ = clip_config(tmp_path, synth_dir, tmp_path / "clip")
    assert main(["clip", "pretrain", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["steps"] == 3
    folder = tmp_path / "clip" / "model"
    model, info = CLIPModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("a red circle")["input_ids"][0] == tok.bos_token_id == 49406  # OpenAI CLIP's BPE
    proc = AutoImageProcessor.from_pretrained(folder)
    assert proc.crop_size["height"] == 32
    # trained, not the initial weights; the log has every step with the logit scale kept <= 100
    log = [json.loads(x) for x in (tmp_path / "clip" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(1 <= r["logit_scale"] <= 100 for r in log)
    ids = tok(
        ["two blue squares", "a long caption " * 30],
        padding=True,
        truncation=True,
        max_length=24,
        return_tensors="pt",
    )
    assert ids["input_ids"].shape[1] == 24
    with torch.no_grad():
        out = model.get_text_features(**ids)
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert feats.shape == (2, 16) and torch.isfinite(feats).all()
    # a re-run finds the finished run, trains no further step and keeps its numbers
    stats = json.loads((tmp_path / "clip" / "train_stats.json").read_text())
    assert main(["clip", "pretrain", "--config", str(path)]) == 0
    assert len((tmp_path / "clip" / "train_log.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "clip" / "train_stats.json").read_text()) == stats


def test_caption_choice_is_reproducible_and_follows_dense_share():
    from l2c_llava.stage2.clip_baseline import pick_caption

    caps = ["a", "b", "c", "d", "e"]
    draws = [pick_caption(1, 0, i, caps, None, 0.5) for i in range(500)]
    assert set(draws) == set(caps)  # every alternative gets drawn; no dense caption was given
    assert draws == [pick_caption(1, 0, i, caps, None, 0.5) for i in range(500)]
    assert draws != [pick_caption(1, 1, i, caps, None, 0.5) for i in range(500)]
    dense = [pick_caption(1, 0, i, ["s"], "LONG", 0.75) == "LONG" for i in range(2000)]
    assert 0.7 < sum(dense) / len(dense) < 0.8


def test_bad_config_and_data(tmp_path, synth_dir, capsys):
    path, _ = clip_config(tmp_path, synth_dir, tmp_path / "bad")
    assert main(["clip", "pretrain", "--config", str(path), "model.patch_size=5", "model.text_heads=3"]) == 2
    err = capsys.readouterr().err
    assert "model.patch_size" in err and "model.text_heads" in err
    bad = tmp_path / "karpathy.json"
    data = json.loads((synth_dir / "retrieval" / "karpathy.json").read_text())
    data["images"][0]["filename"] = "missing.jpg"
    bad.write_text(json.dumps(data))
    assert (
        main(
            [
                "clip",
                "pretrain",
                "--config",
                str(path),
                f"data.train={bad}",
                "data.split=" + data["images"][0]["split"],
            ]
        )
        == 2
    )
    assert "missing.jpg" in capsys.readouterr().err
    # the stage-2 command refuses a clip config and says which command runs it
    assert main(["stage2", "train", "--config", str(path)]) == 2
    assert "recipe: stage2" in capsys.readouterr().err


def test_karpathy_captions_with_dense_captions_from_a_pair_file(tmp_path, synth_dir):
    """data.dense joins each image's dense caption (by image path) to its short alternatives; the
    dense caption is drawn with probability dense_share (what teaches position: it places objects)."""
    from l2c_llava.stage2.clip_baseline import ClipPretrainRecipe

    pairs = synth_dir / "captions" / "train.jsonl"
    path, cfg = clip_config(
        tmp_path, synth_dir, tmp_path / "dense", [f"data.dense={pairs}", "data.dense_share=0.5"]
    )
    recipe = ClipPretrainRecipe(cfg)
    ds, n = recipe.build_data(None)
    longs = {json.loads(x)["long"] for x in pairs.read_text().splitlines()}
    assert n == len(ds) and all(dense in longs for _, _, dense in ds.items)
    assert all(len(short) == 5 for _, short, _ in ds.items)
    drawn = [ds[i][1] for i in range(len(ds))] + [ds[i][1] for i in range(len(ds))]
    assert any(c in longs for c in drawn) and any(c not in longs for c in drawn)
    # a dense_share needs the dense captions, and they go with the karpathy format only
    import pytest

    from l2c_llava.config import ConfigError

    with pytest.raises(ConfigError, match="data.dense_share.*needs data.dense"):
        load_config(path, ["data.dense_share=0.5"])
    with pytest.raises(ConfigError, match="data.dense.*only with data.format=karpathy"):
        load_config(path, [f"data.dense={pairs}", "data.format=jsonl", f"data.train={pairs}"])
