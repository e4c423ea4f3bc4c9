"""The hard long-caption set (issue 33, the demo's Urban-1K): families of test scenes whose captions are
the same for CLIP's 77 tokens and differ after, what the generator checks of them, that the baseline's
text tower reads a family alike and the LLM does not, and that the stage-2 eval and the report score it
for both encoders."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from l2c_llava.data.scenes import POSITIONS
from l2c_llava.data.synthetic import CLIP_CONTEXT, HARD_FAMILY_SIZE, HardSetError, check_hard_family
from l2c_llava.embedded import demo_clip_path, demo_clip_tokenizer

from .tiny_llm import save_tiny_llm


def families_of(data: Path) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for row in json.loads((data / "retrieval" / "long_hard.json").read_text()):
        out[row["family"]].append(row)
    return dict(out)


def printed_json(out: str) -> dict:
    """The JSON a command printed (a library may have logged a line before it)."""
    return json.loads(out[out.index("\n{") + 1 :] if not out.startswith("{") else out)


def caption(row: dict) -> str:
    return row["conversations"][-1]["value"]


def test_families_share_clips_77_tokens_and_differ_after_in_what_the_images_show(synth_dir):
    fams = families_of(synth_dir)
    test = {
        r["image"] for r in map(json.loads, (synth_dir / "captions" / "test.jsonl").read_text().splitlines())
    }
    manifest = json.loads((synth_dir / "manifest.json").read_text())["stats"]["long_hard"]
    assert 0 < len(fams) == manifest["families"] <= len(test)
    assert manifest["family_sizes"] == {str(HARD_FAMILY_SIZE): len(fams)}
    tok = demo_clip_tokenizer()
    for fam, rows in fams.items():
        texts = [caption(r) for r in rows]
        full = tok(texts, verbose=False)["input_ids"]
        cut = tok(texts, truncation=True, max_length=CLIP_CONTEXT)["input_ids"]
        # start token + 76 caption tokens the same; what the tower reads (start, 75, end) the same
        assert len({tuple(ids[:CLIP_CONTEXT]) for ids in full}) == 1, fam
        assert len({tuple(ids) for ids in cut}) == 1 and len(cut[0]) == CLIP_CONTEXT, fam
        assert len({tuple(ids) for ids in full}) == len(rows), fam
        # the words after CLIP's window name what differs: the member's colour or shape
        for r, ids in zip(rows, full):
            assert r["differs"]["value"] in tok.decode(ids[CLIP_CONTEXT:]), (fam, r["differs"])
        # member 0 is the test image itself, the others are redrawn beside it: held-out scenes only
        assert rows[0]["image"] in test and all(r["image"].startswith("hard/") for r in rows[1:])
        # the images differ, and where the group the captions tell apart stands (its cell of the 3x3 grid)
        pix = [np.asarray(Image.open(synth_dir / "images" / r["image"]), dtype=np.float32) for r in rows]
        side = pix[0].shape[0]
        row_, col = next(rc for rc, name in POSITIONS.items() if name == rows[0]["differs"]["position"])
        cell = np.zeros((side, side), dtype=bool)
        cell[row_ * side // 3 : (row_ + 1) * side // 3, col * side // 3 : (col + 1) * side // 3] = True
        for other in pix[1:]:
            diff = np.abs(pix[0] - other).sum(axis=2)
            assert diff[cell].mean() > 5 * max(diff[~cell].mean(), 0.1), fam
    assert manifest["shared_clip_tokens_min"] >= CLIP_CONTEXT
    assert manifest["clip_tokens_max"] == max(
        len(ids) for ids in tok([caption(r) for rs in fams.values() for r in rs], verbose=False)["input_ids"]
    )


def test_the_check_names_the_family_and_what_fails():
    tok = demo_clip_tokenizer()
    shared = " ".join(["The image shows a red circle on a plain beige background."] * 8)
    check_hard_family("f", [f"{shared} It is blue.", f"{shared} It is green."], tok)  # differs after 77
    with pytest.raises(HardSetError, match=r"family f1: the members differ at token 2 .*within the first 77"):
        check_hard_family("f1", [f"A red {shared}", f"A blue {shared}"], tok)
    with pytest.raises(HardSetError, match=r"family f2: member\(s\) \[0, 1\] have at most 77 tokens"):
        check_hard_family("f2", ["a red circle", "a blue circle"], tok)
    with pytest.raises(HardSetError, match="family f3: two members have the same caption"):
        check_hard_family("f3", [shared, shared], tok)


def test_ties_are_broken_by_position_on_the_hard_set():
    """A tower that reads a family alike ties its captions: counted for the query (the other sets' rule),
    every image of the family would find its caption first; broken by position, one of them does."""
    from l2c_llava.stats import retrieval_ranks, retrieval_ranks_ties_in_order

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    base[1:3] = base[0]  # images 0-2: one scene, a little changed each
    img = torch.nn.functional.normalize(base + 0.05 * torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(base, dim=-1)  # captions 0-2: one feature
    owner = list(range(6))
    assert retrieval_ranks(img, txt, owner)[0][:3].tolist() == [0, 0, 0]
    i2t, t2i = retrieval_ranks_ties_in_order(img, txt, owner)
    assert i2t[:3].tolist() == [0, 1, 2] and torch.equal(t2i, retrieval_ranks(img, txt, owner)[1])
    noisy = torch.nn.functional.normalize(img + 0.5 * torch.randn(6, 8, generator=g), dim=-1)  # no ties
    for a, b in zip(retrieval_ranks(img, noisy, owner), retrieval_ranks_ties_in_order(img, noisy, owner)):
        assert torch.equal(a, b)


def test_the_demo_clips_text_tower_reads_a_family_alike(synth_dir):
    """The shipped demo CLIP (the demo's baseline): the members of a family get the same text features,
    while their captions' last sentences alone, which fit its window, do not."""
    from l2c_llava.stage2.evaluate import BaselineCLIP, evaluate_clip_folder

    clip = BaselineCLIP(demo_clip_path())
    assert clip.context == CLIP_CONTEXT
    for rows in list(families_of(synth_dir).values())[:2]:
        texts = [caption(r) for r in rows]
        feats, cut = clip.embed_texts(texts, batch_size=8)
        assert cut == 1.0
        assert torch.allclose(feats[0], feats[1:], atol=1e-6), texts
        endings, _ = clip.embed_texts([t.rsplit(". ", 1)[-1] for t in texts], batch_size=8)
        assert (endings[0] @ endings[1:].T).max() < 0.999
    # `l2c clip eval` scores it too: every family read alike, at most one right caption per family
    res = evaluate_clip_folder(demo_clip_path(), synth_dir, batch_size=16)["sets"]["long_hard"]
    n = len(families_of(synth_dir))
    assert res["families"] == n and res["text_identical_families"] == 1.0 and res["captions_truncated"] == 1.0
    assert res["t2i_within_family_R@1"]["value"] <= 1 / 3 + 1e-6 and res["chance"] == pytest.approx(
        1 / 3, abs=1e-4
    )


def test_stage2_cache_records_what_the_llm_window_keeps(tmp_path, synth_dir, capsys):
    from l2c_llava.cli import main

    encoder = save_tiny_llm(tmp_path / "llm")
    cfg = tmp_path / "s2.yaml"
    cfg.write_text(f"""recipe: stage2
run: {{output_dir: {tmp_path}/run}}
text_encoder: {{path: {encoder}, batch_size: 8}}
cache: {{dir: {tmp_path}/cache, shard_size: 64, dtype: float32}}
vision: {{name_or_path: unused}}
data:
  train: {synth_dir}/captions/val.jsonl
  image_root: {synth_dir}/images
  eval_long_hard: {synth_dir}/retrieval/long_hard.json
  eval_image_root: {synth_dir}/images
""")
    n = len(families_of(synth_dir))
    assert main(["stage2", "cache", "--config", str(cfg)]) == 0
    window = printed_json(capsys.readouterr().out)["eval_long_hard"]["llm_window"]
    assert window["families"] == n and window["families_read_alike"] == 0 and window["captions_cut"] == 0
    assert window["first_difference_max"] < window["tokens_max"] <= window["max_length"]
    kept = tmp_path / "cache" / "eval_long_hard" / "llm_window.json"
    assert json.loads(kept.read_text()) == window
    # a window that ends before the captions differ: every family read alike, and said so
    args = [
        "stage2",
        "cache",
        "--config",
        str(cfg),
        "text_encoder.max_length=40",
        f"cache.dir={tmp_path}/c40",
    ]
    assert main(args) == 0
    out = capsys.readouterr()
    short = printed_json(out.out)["eval_long_hard"]["llm_window"]
    assert short["families_read_alike"] == n and short["captions_cut"] == 3 * n and short["max_length"] == 40
    assert f"{n} of {n} families" in out.err and "text_encoder.max_length" in out.err


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, synth_dir):
    """A toy stage-2 run (CLIP from scratch, 1 step of stage 2 on a fake LLM's features) scored on the
    hard set beside the long one."""
    from l2c_llava.cli import main
    from l2c_llava.config import load_config
    from l2c_llava.data.readers import read_caption_pairs, read_long_captions
    from l2c_llava.stage2.cache import build_cache, pair_captions
    from l2c_llava.stage2.train import Stage2Recipe

    from .recipe_configs import clip_config
    from .tiny_models import FakeEncoder

    root = tmp_path_factory.mktemp("hard_eval")
    path, _ = clip_config(root, synth_dir, root / "clip", ["train.max_steps=1"])
    assert main(["clip", "pretrain", "--config", str(path), "train.max_steps=1"]) == 0
    encoder = root / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    pairs = read_caption_pairs(synth_dir / "captions" / "train.jsonl", synth_dir / "images")
    caches = {"train": pair_captions(pairs)}
    for name, file in (("eval_long", "long_test.json"), ("eval_long_hard", "long_hard.json")):
        rs = read_long_captions(synth_dir / "retrieval" / file, synth_dir / "images", image_check="none")
        caches[name] = rs.captions
    for name, caps in caches.items():
        build_cache(
            root / "cache" / name, caps, encoder, load_encoder=lambda: FakeEncoder(dim=12), progress=False
        )
    cfg_path = root / "s2.yaml"
    cfg_path.write_text(f"""recipe: stage2
run: {{output_dir: {root / "s2"}, seed: 1}}
text_encoder: {{path: {encoder}}}
cache: {{dir: {root / "cache"}}}
vision: {{name_or_path: {root / "clip" / "model"}, image_size: 32, gradient_checkpointing: false}}
adapter: {{num_blocks: 1, projection_dim: 16}}
data: {{train: {synth_dir}/captions/train.jsonl, image_root: {synth_dir}/images, num_workers: 0,
        eval_long: {synth_dir}/retrieval/long_test.json, eval_long_hard: {synth_dir}/retrieval/long_hard.json,
        eval_image_root: {synth_dir}/images}}
train: {{lr: 1.0e-3, batch_size: 4, max_steps: 1, mixed_precision: "no"}}
eval: {{batch_size: 8}}
""")
    Stage2Recipe(load_config(cfg_path)).run()
    assert main(["stage2", "eval", "--config", str(cfg_path)]) == 0
    return root, json.loads((root / "s2" / "metrics.json").read_text())


def test_eval_scores_the_hard_set_for_both_encoders_within_families(evaluated, synth_dir):
    root, m = evaluated
    n = len(families_of(synth_dir))
    info = m["sets"]["long_hard"]
    assert info["images"] == info["captions"] == 3 * n and info["families"] == n
    assert info["within_family_chance"] == pytest.approx(1 / 3, abs=1e-4)
    for enc in ("baseline", "llm2clip"):
        r = m[enc]["long_hard"]
        lo, hi = m["intervals"][enc]["long_hard"]["t2i_within_family_R@1"]
        assert lo <= r["t2i_within_family_R@1"] <= hi and "t2i_R@1" in m["intervals"][enc]["long_hard"]
        assert r["t2i_R@1"] <= r["t2i_within_family_R@1"]  # top of the whole set is top of its family
    # the baseline's 24-token tower reads every member alike: at most one right caption per family
    base = m["baseline"]["long_hard"]
    assert base["captions_truncated"] == 1.0 and base["text_identical_families"] == 1.0
    assert base["text_cosine_within_family"] == pytest.approx(1.0, abs=1e-5)
    assert base["t2i_within_family_R@1"] <= 1 / 3 + 1e-6
    # the LLM's features of the members differ (the fake LLM hashes the whole caption)
    assert m["llm2clip"]["long_hard"]["text_identical_families"] == 0.0
    assert m["paired"]["long_hard"]["t2i_R@1"]["p_value"] > 0
    t = m["paired_within_family"]["long_hard"]
    assert t["gain"] == pytest.approx(
        m["llm2clip"]["long_hard"]["t2i_within_family_R@1"] - base["t2i_within_family_R@1"], abs=1e-3
    )
    table = (root / "s2" / "retrieval.md").read_text()
    assert f"long_hard ({3 * n} img, {3 * n} capt)" in table and f"within each of its {n} families" in table


def test_the_report_shows_the_hard_set_and_reads_it(evaluated, tmp_path):
    from l2c_llava.layout import PipelineRun
    from l2c_llava.report import write_report

    _, m = evaluated
    run = PipelineRun(tmp_path / "run")
    run.retrieval_metrics.parent.mkdir(parents=True)
    run.retrieval_metrics.write_text(json.dumps(m))
    text = write_report(run.root).read_text()
    assert "| long_hard | text->image |" in text and "### The hard long-caption set" in text
    assert "R@1 within its family [95% CI] (chance 33.3)" in text and "McNemar's exact p" in text
    assert "The baseline is at chance or below within families" in text
    assert ("LLM2CLIP is above chance" in text) or ("LLM2CLIP is not above chance" in text)
    # the LLM's window, once the cache step recorded it
    m["sets"]["long_hard"]["llm_window"] = {
        "max_length": 192,
        "tokens_max": 124,
        "first_difference_max": 103,
        "families": 6,
        "families_read_alike": 0,
    }
    run.retrieval_metrics.write_text(json.dumps(m))
    assert "its window: 192 tokens" in write_report(run.root).read_text()


def test_the_pipeline_scores_the_hard_set_where_its_data_has_one(tmp_path):
    from l2c_llava.pipeline import load_pipeline

    quick = str(Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "quick.yaml")
    pipe = load_pipeline(quick, [f"run.output_dir={tmp_path / 'q'}"])
    for name in ("text_cache", "retrieval"):  # the data step writes it: cached and scored
        cfg = next(s for s in pipe.steps if s.name == name).config
        assert cfg.data.eval_long_hard == str(tmp_path / "q" / "data" / "retrieval" / "long_hard.json")
    data = next(s for s in pipe.steps if s.name == "data")
    old = tmp_path / "old"  # a dataset of an earlier generator: no hard set, scored without one
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    args = [f"run.output_dir={tmp_path / 'o'}", "data.synth_images=null", f"data.dir={old}"]
    cfg = next(s for s in load_pipeline(quick, args).steps if s.name == "retrieval").config
    assert cfg.data.eval_long_hard is None and cfg.data.eval_long == str(old / "retrieval" / "long_test.json")
    (old / "retrieval").mkdir()
    (old / "retrieval" / "long_hard.json").write_text("[]")
    cfg = next(s for s in load_pipeline(quick, args).steps if s.name == "retrieval").config
    assert cfg.data.eval_long_hard == str(old / "retrieval" / "long_hard.json")
    # the generator's version is part of the data step's fingerprint: an older dataset is made again
    import l2c_llava.data.synthetic as synthetic

    version = synthetic.GENERATOR_VERSION
    try:
        synthetic.GENERATOR_VERSION = version + 1
        again = next(
            s for s in load_pipeline(quick, [f"run.output_dir={tmp_path / 'q'}"]).steps if s.name == "data"
        )
    finally:
        synthetic.GENERATOR_VERSION = version
    assert again.fingerprint != data.fingerprint
