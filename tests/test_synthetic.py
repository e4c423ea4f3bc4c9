from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from l2c_llava.data import readers
from l2c_llava.data.scenes import COLOURS
from l2c_llava.data.synthetic import SynthOptions, assign_splits, generate
from l2c_llava.embedded import clip_tokenizer
from l2c_llava.io import tree_digest

from .conftest import SMALL


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def scenes(d: Path) -> list[dict]:
    return jsonl(d / "scenes.jsonl")


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, synth_dir):
    again = tmp_path / "again"
    generate(again, SMALL, workers=2, progress=False)  # other worker count: must not matter
    assert tree_digest(again) == tree_digest(synth_dir)
    other = tmp_path / "other"
    generate(other, replace(SMALL, seed=SMALL.seed + 1), workers=1, progress=False)
    assert tree_digest(other) != tree_digest(synth_dir)


def test_same_bytes_whatever_the_hash_seed(tmp_path):
    """Two processes with other PYTHONHASHSEEDs write the same dataset (POPE's popular objects were
    ranked in set order once)."""
    code = (
        "import sys; from l2c_llava.data.synthetic import SynthOptions, generate; "
        "generate(sys.argv[1], SynthOptions(images=40, seed=3, size=64, test_fraction=0.5), "
        "workers=1, progress=False)"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], check=True, env=env)
    assert tree_digest(tmp_path / "1") == tree_digest(tmp_path / "2")


def test_manifest_records_options_and_content_digest(synth_dir):
    m = json.loads((synth_dir / "manifest.json").read_text())
    assert m["options"]["seed"] == SMALL.seed and m["options"]["images"] == SMALL.images
    assert m["content_sha256"] == tree_digest(synth_dir, exclude=["manifest.json"])


def test_rerun_skips_and_other_options_are_refused_without_overwrite(tmp_path):
    out = tmp_path / "d"
    opts = SynthOptions(images=6, seed=1, size=64)
    generate(out, opts, workers=1, progress=False)
    before = tree_digest(out)
    assert generate(out, opts, workers=1, progress=False).get("skipped") is True
    assert tree_digest(out) == before
    with pytest.raises(FileExistsError, match="other options"):
        generate(out, replace(opts, images=7), workers=1, progress=False)
    m = generate(out, replace(opts, images=7), workers=1, progress=False, overwrite=True)
    assert m["stats"]["splits"] == dict(Counter(assign_splits(7, 1, 0.1, 0.1)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary or set-aside folder left


def test_bad_options_are_refused_with_every_reason():
    with pytest.raises(ValueError) as ei:
        generate("/nonexistent/never", SynthOptions(images=2, size=8, val_fraction=0.6, test_fraction=0.6))
    text = str(ei.value)
    assert "--images must be >= 3" in text and "--size" in text and "--val-fraction" in text


# --- splits -----------------------------------------------------------------------------------


def test_splits_are_disjoint_and_cover_every_image(synth_dir):
    by_split = {
        s: {r["image"] for r in jsonl(synth_dir / "captions" / f"{s}.jsonl")}
        for s in ("train", "val", "test")
    }
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    assert sum(map(len, by_split.values())) == SMALL.images
    for r in scenes(synth_dir):
        assert r["image"] in by_split[r["split"]]
    karpathy = json.loads((synth_dir / "retrieval" / "karpathy.json").read_text())
    for img in karpathy["images"]:
        assert f"{img['filepath']}/{img['filename']}" in by_split[img["split"]]
    # evaluation files only use held-out images
    for name in ("vqa_test.jsonl", "pope_test.jsonl"):
        assert {r["image"] for r in jsonl(synth_dir / "eval" / name)} <= by_split["test"]
    assert {r["image"] for r in jsonl(synth_dir / "eval" / "vqa_val.jsonl")} <= by_split["val"]
    for name in ("pretrain.json", "instruct.json"):
        rows = json.loads((synth_dir / "llava" / name).read_text())
        assert {r["image"] for r in rows if "image" in r} <= by_split["train"]


def test_split_sizes_follow_the_fractions():
    split = assign_splits(1000, 0, 0.1, 0.1)
    assert Counter(split) == {"train": 800, "val": 100, "test": 100}


# --- formats parse with the readers -----------------------------------------------------------


def test_every_file_parses_with_the_readers(synth_dir):
    root = synth_dir / "images"
    pairs = readers.read_caption_pairs(synth_dir / "captions" / "train.jsonl", root, image_check="decode")
    assert len(pairs) == pairs.total and not pairs.skipped
    test = readers.read_karpathy(synth_dir / "retrieval" / "karpathy.json", root, split="test")
    assert len(test.captions) == 5 * len(test.images)
    assert all(len(test.captions_of(i)) == 5 for i in range(len(test.images)))
    long = readers.read_long_captions(synth_dir / "retrieval" / "long_test.json", root)
    assert long.images == test.images and len(long.captions) == len(long.images)
    pre = readers.read_llava_json(synth_dir / "llava" / "pretrain.json", root)
    assert all(r.has_image and len(r.conversations) == 2 for r in pre)
    ins = readers.read_llava_json(synth_dir / "llava" / "instruct.json", root)
    assert any(not r.has_image for r in ins) and any(len(r.conversations) > 2 for r in ins)
    for img in {p.image_path for p in pairs}:
        with Image.open(img) as im:
            assert im.size == (SMALL.size, SMALL.size) and im.mode == "RGB"


def test_llava_rows_look_like_the_originals(synth_dir):
    pre = json.loads((synth_dir / "llava" / "pretrain.json").read_text())
    for r in pre:
        assert set(r) == {"id", "image", "conversations"}
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") or human["value"].endswith("\n<image>")
    ins = json.loads((synth_dir / "llava" / "instruct.json").read_text())
    text_only = [r for r in ins if "image" not in r]
    assert 0 < len(text_only) < 0.15 * len(ins)
    assert all("<image>" not in t["value"] for r in text_only for t in r["conversations"])
    short_answer = [t for r in ins for t in r["conversations"] if "single word or phrase" in t["value"]]
    assert short_answer, "VQA-style rows carry LLaVA's short-answer instruction"


# --- captions -----------------------------------------------------------------------------


def test_dense_captions_exceed_clip_context_for_most_images(synth_dir):
    tok = clip_tokenizer()
    rows = jsonl(synth_dir / "captions" / "train.jsonl")
    lengths = [len(tok(r["long"], verbose=False)["input_ids"]) for r in rows]
    share = sum(n > 77 for n in lengths) / len(lengths)
    assert share >= 0.9, f"only {share:.0%} of dense captions exceed 77 CLIP tokens"
    short = [len(tok(r["short"])["input_ids"]) for r in rows]
    assert max(short) <= 77  # short captions fit in CLIP's window


def test_short_captions_are_about_a_dozen_words_and_alternatives_differ(synth_dir):
    karpathy = {
        f"{i['filepath']}/{i['filename']}": i
        for i in json.loads((synth_dir / "retrieval" / "karpathy.json").read_text())["images"]
    }
    words = []
    for r in jsonl(synth_dir / "captions" / "train.jsonl"):
        words.append(len(r["short"].split()))
        alts = [s["raw"] for s in karpathy[r["image"]]["sentences"]]
        assert len(alts) >= 4 and len(set(alts)) == len(alts) and r["short"] not in alts
        starts = {a.split()[0] for a in alts}
        assert len(starts) >= 3, f"alternatives should be worded differently: {alts}"
    assert 8 <= sum(words) / len(words) <= 18


def test_captions_and_answers_are_true_of_the_scene(synth_dir):
    pairs = {r["image"]: r for r in jsonl(synth_dir / "captions" / "train.jsonl")}
    pairs |= {r["image"]: r for r in jsonl(synth_dir / "captions" / "test.jsonl")}
    vqa = jsonl(synth_dir / "eval" / "vqa_test.jsonl")
    by_image = {}
    for s in scenes(synth_dir):
        by_image[s["image"]] = s
        if s["image"] not in pairs:
            continue
        dense = pairs[s["image"]]["long"]
        for g in s["groups"]:
            assert g["colour"] in dense and g["shape"] in dense and g["size"] in dense and g["style"] in dense
        total = sum(g["count"] for g in s["groups"])
        assert f"In total there {'is' if total == 1 else 'are'}" in dense
    for q in vqa:
        groups = by_image[q["image"]]["groups"]
        present = {f"{g['colour']} {g['shape']}" for g in groups}
        if q["question"] == "How many objects are there in total?":
            assert int(q["answer"]) == sum(g["count"] for g in groups)
        elif m := re.fullmatch(r"How many (\w+) (\w+) are there\?", q["question"]):
            g = next(g for g in groups if g["colour"] == m[1] and m[2].startswith(g["shape"][:4]))
            assert int(q["answer"]) == g["count"]
        elif m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q["question"]):
            assert q["answer"] == ("yes" if f"{m[1]} {m[2]}" in present else "no")
        elif m := re.fullmatch(r"Where (?:is|are) the (\w+) (\w+)\?", q["question"]):
            g = next(g for g in groups if g["colour"] == m[1] and m[2].startswith(g["shape"][:4]))
            assert q["answer"] == g["position"]
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", q["question"]):
            assert q["answer"] in {g["shape"] for g in groups if g["colour"] == m[1]}
        assert q["answer"] in q["answers"]
    assert {q["type"] for q in vqa} == {"color", "count", "shape", "position", "existence"}


def test_pope_is_balanced_per_category_and_adversarial_negatives_are_near(synth_dir):
    rows = jsonl(synth_dir / "eval" / "pope_test.jsonl")
    by_image = {s["image"]: s for s in scenes(synth_dir)}
    for cat in ("random", "popular", "adversarial"):
        sub = [r for r in rows if r["category"] == cat]
        counts = Counter(r["answer"] for r in sub)
        assert counts["yes"] > 0 and abs(counts["yes"] - counts["no"]) <= 0.1 * len(sub), (cat, counts)
    for r in rows:
        groups = by_image[r["image"]]["groups"]
        present = {f"{g['colour']} {g['shape']}" for g in groups}
        assert (r["object"] in present) == (r["answer"] == "yes")
        if r["category"] == "adversarial" and r["answer"] == "no":
            colour, shape = r["object"].split(" ", 1)
            assert any(g["colour"] == colour or g["shape"] == shape for g in groups)


# --- pixels -----------------------------------------------------------------------------------


def test_objects_are_drawn_where_the_scene_says(tmp_path):
    out = tmp_path / "d"
    generate(out, SynthOptions(images=12, seed=3, size=224), workers=1, progress=False)
    checked = 0
    for s in scenes(out):
        with Image.open(out / "images" / s["image"]) as im:
            rgb = im.convert("RGB")
            for g in s["groups"]:
                if g["style"] != "solid" or g["size"] == "small":
                    continue
                for x0, y0, x1, y1 in g["boxes"]:
                    assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
                    pixel = rgb.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
                    assert math.dist(pixel, COLOURS[g["colour"]]) < 70, (s["image"], g, pixel)
                    checked += 1
    assert checked > 10
