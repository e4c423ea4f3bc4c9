"""Encoder health (l2c_llava.stage2.health): collapse figures and the patch probe, on features whose
content is known."""

from __future__ import annotations

import json

import pytest
import torch

from l2c_llava.data.scenes import COLOURS, SHAPES
from l2c_llava.stage2.health import embedding_health, encoder_health, patch_probe, probe_questions


def test_embedding_health_tells_a_collapsed_encoder_from_a_healthy_one():
    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(300, 64, generator=g)
    collapsed = torch.randn(64, generator=g) * 10 + 0.1 * torch.randn(300, 64, generator=g)
    one_direction = torch.randn(300, 1, generator=g) * torch.randn(1, 64, generator=g) + 0.01 * healthy
    h, c, d = embedding_health(healthy), embedding_health(collapsed), embedding_health(one_direction)
    assert abs(h["median_cosine"]) < 0.1 and h["top_direction_share"] < 0.1
    assert c["median_cosine"] > 0.99
    assert d["top_direction_share"] > 0.95
    with pytest.raises(ValueError, match="at least 3"):
        embedding_health(healthy[:2])


def _scenes(n=400, seed=0):
    import random

    from l2c_llava.data.scenes import sample_scene

    rng = random.Random(seed)
    return [json.loads(json.dumps(sample_scene(rng, i).to_json())) for i in range(n)]


def _oracle_features(rows):
    """One token per cell holding one-hot colour and shape of the group there: the answer is in the
    features, and a reader must find it at the right token."""
    feats = torch.zeros(len(rows), 9, len(COLOURS) + len(SHAPES))
    for i, r in enumerate(rows):
        for gr in r["groups"]:
            cell = gr["row"] * 3 + gr["col"]
            feats[i, cell, list(COLOURS).index(gr["colour"])] = 1
            feats[i, cell, len(COLOURS) + SHAPES.index(gr["shape"])] = 1
    return feats + 0.05 * torch.randn_like(feats)


def test_the_patch_probe_reads_what_the_features_hold_and_nothing_else():
    rows = _scenes()
    train, test = rows[:300], rows[300:]
    tq, eq = probe_questions(train), probe_questions(test, seed=1)
    eq[:, 0] += len(train)
    good = patch_probe(_oracle_features(rows), tq, eq, steps=600)
    for task in ("existence", "position", "colour"):
        assert good["test"][task] > good["chance"][task] + 0.3, (task, good)
    blind = patch_probe(torch.randn(len(rows), 9, 20), tq, eq, steps=600)
    for task in ("existence", "position", "colour"):
        assert blind["test"][task] < blind["chance"][task] + 0.12, (task, blind)
    # a feature set that keeps colour but not position: position falls to chance, colour of a cell too
    no_pos = _oracle_features(rows).sum(1, keepdim=True).repeat(1, 9, 1)
    mixed = patch_probe(no_pos, tq, eq, steps=600)
    assert mixed["test"]["existence"] > 0.8 and mixed["test"]["position"] < mixed["chance"]["position"] + 0.15


def test_encoder_health_of_a_tower_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from l2c_llava.data.synthetic import SynthOptions, generate

    synth_dir = tmp_path / "data"
    generate(
        synth_dir, SynthOptions(images=60, seed=5, size=64, test_fraction=0.3), workers=1, progress=False
    )

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        image_size=32,
        patch_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "tower")
    res = encoder_health(tmp_path / "tower", synth_dir, probe_steps=20, progress=False)
    assert res["probe"]["tokens"] == 4 and res["pooled"]["images"] == res["probe"]["test_scenes"]
    assert set(res["probe"]["test"]) == {"existence", "position", "colour"}
    assert -1 <= res["pooled"]["median_cosine"] <= 1 and 0 < res["pooled"]["top_direction_share"] <= 1
    with pytest.raises(FileNotFoundError, match="scenes.jsonl"):
        encoder_health(tmp_path / "tower", tmp_path)
