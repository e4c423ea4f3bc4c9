"""`l2c data filter`: scores, calibrated threshold, the filtered copy in the input's format, flags,
reuse of the scores, bad rows; measured on a synthetic set with swapped captions."""

from __future__ import annotations

import csv
import hashlib
import json
import random

import pytest
import torch
import torch.nn.functional as F

from l2c_llava.cli import main
from l2c_llava.data.filter import filter_captions
from l2c_llava.data.readers import DataError
from l2c_llava.errors import InputError


def img_key(im) -> str:
    return hashlib.sha256(im.tobytes()).hexdigest()


class KeyedEncoder:
    """Image i -> a fixed random unit vector; a caption -> the vector of the image it was written for
    (+ noise): a perfect matcher, so swapped captions are the only low scores."""

    batch_size = 8
    digest = "k" * 64

    def __init__(self, caption_image: dict[str, str], dim: int = 32):
        self.caption_image, self.dim, self.text_calls = caption_image, dim, 0

    identity = property(lambda self: {"kind": "fake", "path": "keyed", "digest": self.digest})

    def _vec(self, key: str, noise: float = 0.0) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
        v = torch.randn(self.dim, generator=g)
        return v + noise * torch.randn(self.dim, generator=g)

    def embed_images(self, images):
        return F.normalize(torch.stack([self._vec(img_key(im)) for im in images]), dim=-1)

    def embed_texts(self, texts):
        self.text_calls += 1
        return F.normalize(torch.stack([self._vec(self.caption_image[t], noise=0.3) for t in texts]), dim=-1)


def corrupted_copy(synth_dir, tmp_path, share=0.2, seed=0):
    """train.jsonl with `share` of the rows' captions taken from another row; returns (path, corrupted
    images, encoder)."""
    from l2c_llava.data.images import load_rgb

    rows = [json.loads(x) for x in (synth_dir / "captions" / "train.jsonl").read_text().splitlines()]
    keys = {r["image"]: img_key(load_rgb(synth_dir / "images" / r["image"])) for r in rows}
    caption_image = {r[f]: keys[r["image"]] for r in rows for f in ("short", "long")}
    rng = random.Random(seed)
    bad = set(rng.sample(range(len(rows)), int(share * len(rows))))
    out = []
    for i, r in enumerate(rows):
        if i in bad:
            donor = rows[(i + 7) % len(rows)]
            r = {**r, "short": donor["short"], "long": donor["long"]}
        out.append(r)
    path = tmp_path / "noisy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path, {rows[i]["image"] for i in bad}, KeyedEncoder(caption_image), out


def test_swapped_captions_are_removed_and_the_rest_written_as_read(tmp_path, synth_dir):
    path, bad, enc, rows = corrupted_copy(synth_dir, tmp_path)
    out = tmp_path / "clean.jsonl"
    r = filter_captions(
        path, synth_dir / "images", enc, out, progress=False, truth=lambda row: row.image in bad
    )
    m = r["measured"]
    # a swapped caption scores like a shuffled pair: about 5% of them pass the 95% quantile
    assert m["recall"] >= 0.8 and m["precision"] == 1.0 and m["corrupted"] == len(bad) > 5
    written = out.read_text().splitlines()
    dropped = {x["image"] for x in r["flagged_rows"]}
    assert written == [json.dumps(x) for x in rows if x["image"] not in dropped]  # the kept rows, unchanged
    assert r["threshold_from"] == "95% quantile of shuffled pairs"
    assert r["cosine_mean"]["short"] > 0.6 and abs(r["shuffled_cosine_mean"]["short"]) < 0.2
    assert r["score"] == "zscore" and r["score_mean"]["short"] > 2 and abs(r["shuffled_mean"]["short"]) < 0.5
    for suffix in (".report.json", ".report.md", ".scores.png", ".scores.safetensors"):
        assert (tmp_path / f"clean.jsonl{suffix}").stat().st_size > 100
    assert "| line " in (tmp_path / "clean.jsonl.report.md").read_text()
    # dropping a share instead: exactly that many rows, the worst ones (here: the swapped ones)
    r4 = filter_captions(
        path,
        synth_dir / "images",
        enc,
        tmp_path / "share.jsonl",
        drop_share=0.1,
        progress=False,
        truth=lambda row: row.image in bad,
    )
    assert r4["flagged"] == round(0.1 * r4["rows"]) and r4["measured"]["precision"] == 1.0
    with pytest.raises(InputError, match="not both"):
        filter_captions(path, synth_dir / "images", enc, out, drop_share=0.1, threshold=0.5, progress=False)
    # a re-run with another threshold reuses the scores: no caption embedded again
    calls = enc.text_calls
    r2 = filter_captions(
        path, synth_dir / "images", enc, out, threshold=2.0, score_kind="cosine", progress=False
    )
    assert enc.text_calls == calls and r2["flagged"] == r2["rows"]  # nothing reaches a cosine of 2
    # the raw cosine works too on this perfect matcher
    r3 = filter_captions(
        path,
        synth_dir / "images",
        enc,
        tmp_path / "c.jsonl",
        score_kind="cosine",
        progress=False,
        truth=lambda row: row.image in bad,
    )
    assert r3["measured"]["precision"] == 1.0 and r3["measured"]["recall"] >= 0.8


def test_flag_mode_on_csv_and_the_llava_format(tmp_path, synth_dir):
    path, bad, enc, rows = corrupted_copy(synth_dir, tmp_path)
    csv_path = tmp_path / "noisy.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "short", "long"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    r = filter_captions(
        csv_path, synth_dir / "images", enc, tmp_path / "flagged.csv", mode="flag", progress=False
    )
    with open(tmp_path / "flagged.csv", newline="") as f:
        out = list(csv.DictReader(f))
    assert len(out) == len(rows) == r["kept"]
    flagged = {o["image"] for o in out if json.loads(o["l2c_filter"])["flagged"]}
    assert (
        flagged == {x["image"] for x in r["flagged_rows"]}
        and flagged <= bad
        and len(flagged) >= 0.8 * len(bad)
    )
    # LCS-558K-style JSON: the gpt turn is the caption
    pre = json.loads((synth_dir / "llava" / "pretrain.json").read_text())
    noisy = [dict(x) for x in pre]
    swapped = set()
    for i in range(0, len(noisy), 4):
        donor = pre[(i + 3) % len(pre)]
        noisy[i] = {**noisy[i], "conversations": [noisy[i]["conversations"][0], donor["conversations"][1]]}
        swapped.add(noisy[i]["id"])
    from l2c_llava.data.images import load_rgb

    for x in pre:  # captions of the 558K rows -> their own image
        enc.caption_image[x["conversations"][1]["value"]] = img_key(
            load_rgb(synth_dir / "images" / x["image"])
        )
    (tmp_path / "pre.json").write_text(json.dumps(noisy))
    r = filter_captions(
        tmp_path / "pre.json",
        synth_dir / "images",
        enc,
        tmp_path / "pre_clean.json",
        fmt="llava",
        progress=False,
        truth=lambda row: row.raw["id"] in swapped,
    )
    kept = json.loads((tmp_path / "pre_clean.json").read_text())
    assert {x["id"] for x in kept} <= {x["id"] for x in noisy} - swapped | {
        x["id"] for x in noisy if x["id"] in swapped
    }
    assert len(kept) == len(noisy) - r["flagged"] and r["measured"]["precision"] == 1.0
    assert r["measured"]["recall"] >= 0.8 and r["fields"] == ["caption"]


def test_bad_rows_and_paths_are_named(tmp_path, synth_dir):
    path, _, enc, rows = corrupted_copy(synth_dir, tmp_path)
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"image": rows[2]["image"], "short": "x"})  # no long caption
    lines[4] = json.dumps({**rows[4], "image": "../../etc/passwd"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        filter_captions(path, synth_dir / "images", enc, tmp_path / "o.jsonl", progress=False)
    text = str(e.value)
    assert "line 3: missing or empty long" in text and "line 5" in text and "escapes" in text
    r = filter_captions(
        path, synth_dir / "images", enc, tmp_path / "o.jsonl", on_bad_row="skip", progress=False
    )
    assert r["rows"] == len(rows) - 2 and len(r["bad_rows_skipped"]) == 2
    with pytest.raises(InputError, match="is the input file"):
        filter_captions(path, synth_dir / "images", enc, path, progress=False)


def test_cli_with_a_clip_model(tmp_path, synth_dir, capsys):
    from .test_search import save_tiny_clip

    save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "f.jsonl"
    rc = main(
        [
            "data",
            "filter",
            str(synth_dir / "captions" / "train.jsonl"),
            "--format",
            "pairs",
            "--image-root",
            str(synth_dir / "images"),
            "--model",
            str(tmp_path / "clip"),
            "--out",
            str(out),
            "--null-quantile",
            "0.5",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "f.jsonl.report.json").read_text())
    assert (
        report["encoder"]["kind"] == "clip"
        and report["rows"] == len(out.read_text().splitlines()) + report["flagged"]
    )
    assert (
        main(
            [
                "data",
                "filter",
                str(out),
                "--format",
                "pairs",
                "--image-root",
                str(synth_dir / "images"),
                "--model",
                str(tmp_path / "clip"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "is the input file" in capsys.readouterr().err


def test_zscore_separates_matched_pairs_where_hubs_blur_the_cosine():
    """Rows that share a strong common direction at different strengths ("hubs"): the raw cosine of a
    matched pair is often lower than a mismatched one; against each row's own level it is not."""
    from l2c_llava.data.filter import pair_scores

    g = torch.Generator().manual_seed(0)
    n, d = 400, 32
    hub = F.normalize(torch.randn(d, generator=g), dim=0)
    level = torch.rand(n, 1, generator=g) * 10
    own = torch.randn(n, d, generator=g)
    img = F.normalize(level * hub + own, dim=-1)
    txt = F.normalize(level * hub + own + 1.5 * torch.randn(n, d, generator=g), dim=-1)
    s = pair_scores(img, txt)

    def auc(kind):  # P(a matched pair scores above a shuffled one)
        a, b = s["own"][kind], s["shuffled"][kind][:n]
        return float((a[:, None] > b[None, :]).float().mean())

    assert auc("zscore") > 0.99 and auc("cosine") < 0.95  # measured: 0.996 and 0.944


def test_a_threshold_dropping_most_rows_warns_with_the_scores_spread(tmp_path, synth_dir, capsys):
    """Issue 19: a weak (random) model with a threshold dropped 31 of 32 clean rows in silence."""
    from .test_search import save_tiny_clip

    save_tiny_clip(tmp_path / "clip")  # random weights: own pairs score like shuffled ones
    out = tmp_path / "weak.jsonl"
    rc = main(
        [
            "data",
            "filter",
            str(synth_dir / "captions" / "train.jsonl"),
            "--format",
            "pairs",
            "--image-root",
            str(synth_dir / "images"),
            "--model",
            str(tmp_path / "clip"),
            "--out",
            str(out),
            "--threshold",
            "1.0",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "weak.jsonl.report.json").read_text())
    assert report["flagged"] > report["scored"] / 2
    assert f"WARNING  the threshold drops {report['flagged']} of {report['scored']} scored rows" in err
    assert (
        "own pairs q00 " in err and " q50 " in err and "shuffled pairs q00" in err and "--drop-share" in err
    )
    q = report["score_quantiles"]["short"]
    assert list(q) == ["q00", "q05", "q25", "q50", "q75", "q95", "q100"] and q["q00"] <= q["q50"] <= q["q100"]
    assert "WARNING" in (tmp_path / "weak.jsonl.report.md").read_text()
    # a model that tells the pairs apart, default threshold: no warning
    path, _, enc, _ = corrupted_copy(synth_dir, tmp_path)
    r = filter_captions(path, synth_dir / "images", enc, tmp_path / "good.jsonl", progress=False)
    assert r["warnings"] == [] and r["flagged"] < r["scored"] / 2
