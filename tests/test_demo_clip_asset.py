"""The shipped pretrained demo-world CLIP (l2c_llava/assets/demo_clip): intact, a standard CLIP folder
for stock transformers, and as good on fresh held-out images as its card says."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from l2c_llava.embedded import DEMO_CLIP_SHA256, demo_clip_path

# fresh scenes drawn with a seed neither the asset's corpus (7001) nor the demo (0) uses
HELDOUT_SEED, HELDOUT_IMAGES = 424242, 200
# R@1 over the 100 test images of these scenes, long captions: 0.97 (text->image) and 0.94
# (image->text) when the asset was packed; the floors leave room for other CPUs' arithmetic
FLOORS = {"long_t2i_R@1": 0.8, "long_i2t_R@1": 0.8}  # chance: 0.01


def test_the_asset_is_intact_and_described():
    folder = demo_clip_path(verify=False)
    weights = folder / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == DEMO_CLIP_SHA256
    sums = dict(reversed(line.split("  ")) for line in (folder / "SHA256SUMS").read_text().splitlines())
    for name, digest in sums.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert weights.stat().st_size < 60 * 2**20  # a small asset: float16 weights
    card = (folder / "README.md").read_text()
    assert "bash scripts/pretrain_demo_clip.sh" in card and "--seed 7001" in card
    heldout = json.loads((folder / "heldout_metrics.json").read_text())
    assert heldout["sets"]["long"]["images"] >= 500 and "health" in heldout
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"]


def test_a_damaged_asset_is_refused(tmp_path, monkeypatch):
    import l2c_llava.embedded as E

    monkeypatch.setattr(E, "DEMO_CLIP_SHA256", "0" * 64)
    E._check_digest.cache_clear()
    with pytest.raises(ValueError, match="sha256"):
        E.demo_clip_path()
    E._check_digest.cache_clear()


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from l2c_llava.data.synthetic import SynthOptions, generate

    out = tmp_path_factory.mktemp("heldout") / "data"
    generate(
        out,
        SynthOptions(images=HELDOUT_IMAGES, seed=HELDOUT_SEED, test_fraction=0.5),
        workers=1,
        progress=False,
    )
    return out


def test_stock_transformers_loads_it_and_it_retrieves_held_out_images(heldout):
    from transformers import AutoProcessor, CLIPModel

    from l2c_llava.data.images import load_rgb
    from l2c_llava.data.readers import read_long_captions
    from l2c_llava.stats import retrieval_ranks

    folder = demo_clip_path()
    model, info = CLIPModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.float32  # stored in float16, computed in float32
    processor = AutoProcessor.from_pretrained(folder)
    rs = read_long_captions(heldout / "retrieval" / "long_test.json", heldout / "images")
    assert len(rs.images) >= 90
    with torch.no_grad():
        px = processor(images=[load_rgb(p) for p in rs.images], return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=px)
        tok = processor(text=rs.captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    img = torch.nn.functional.normalize(getattr(img, "pooler_output", img), dim=-1)
    txt = torch.nn.functional.normalize(getattr(txt, "pooler_output", txt), dim=-1)
    i2t, t2i = retrieval_ranks(img, txt, rs.caption_image)
    figures = {
        "long_t2i_R@1": (t2i < 1).float().mean().item(),
        "long_i2t_R@1": (i2t < 1).float().mean().item(),
    }
    for name, floor in FLOORS.items():
        assert figures[name] >= floor, (name, figures)
    # not collapsed: two different images are far apart
    sims = img @ img.T
    assert sims[~torch.eye(len(img), dtype=torch.bool)].median() < 0.8


def test_configs_reach_it_by_name():
    from l2c_llava.models.vision import load_vision_tower
    from l2c_llava.stage2.evaluate import BaselineCLIP

    tower = load_vision_tower("embedded:demo-clip")
    assert tower.config.image_size == 224 and tower.config.patch_size == 32
    assert BaselineCLIP("embedded:demo-clip").context == 77
    with pytest.raises(ValueError, match="unknown embedded vision model"):
        load_vision_tower("embedded:other")
