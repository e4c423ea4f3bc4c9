from __future__ import annotations

import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from l2c_llava.data.images import EvalTransform, ImageError, TrainTransform, load_rgb, normalize
from l2c_llava.data.readers import DataError, RowProblem, read_caption_pairs
from l2c_llava.data.webdataset import expand_shards, iter_samples, write_shards


def test_eval_transform_is_the_clip_image_processor():
    img = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype("uint8"))
    out = EvalTransform(224)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # our normalisation = the processor's on an image that needs no resize or crop
    square = img.resize((224, 224))
    assert torch.allclose(normalize(square), EvalTransform(224)(square), atol=1e-5)


def test_train_transform_random_resized_crop():
    t = TrainTransform(64, scale=(0.9, 1.0), rng=random.Random(0))
    for w, h in ((120, 80), (80, 120), (100, 100)):
        for _ in range(20):
            x0, y0, x1, y1 = t.crop_box(w, h)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            frac = (x1 - x0) * (y1 - y0) / (w * h)
            assert 0.85 <= frac <= 1.0  # scale 0.9-1.0 (rounding), or the clamped centre crop
    img = Image.new("RGB", (120, 80), (255, 0, 0))
    out = t(img)
    assert out.shape == (3, 64, 64)
    assert torch.allclose(out[0], torch.full((64, 64), (1 - 0.48145466) / 0.26862954), atol=1e-4)
    a, b = TrainTransform(64, rng=random.Random(1)), TrainTransform(64, rng=random.Random(1))
    noisy = Image.fromarray((np.random.default_rng(1).random((90, 130, 3)) * 255).astype("uint8"))
    assert torch.equal(a(noisy), b(noisy))  # seeded: reproducible


def test_load_rgb_names_a_corrupt_image(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ImageError, match="cannot decode image .*bad.jpg"):
        load_rgb(bad)
    with pytest.raises(ImageError, match="cannot decode image shard-3/key-7"):
        load_rgb(b"junk", name="shard-3/key-7")
    Image.new("L", (4, 4)).save(tmp_path / "gray.png")
    assert load_rgb(tmp_path / "gray.png").mode == "RGB"


def test_shards_written_from_caption_pairs_are_streamed(tmp_path, synth_dir):
    pairs = read_caption_pairs(synth_dir / "captions" / "train.jsonl", synth_dir / "images")
    samples = [(f"{i:06d}", p.image_path, p.short, p.long) for i, p in enumerate(pairs)]
    shards = write_shards(samples, tmp_path / "shards", per_shard=16)
    assert [s.name for s in shards] == [f"{i:05d}.tar" for i in range(len(shards))]
    pattern = str(tmp_path / "shards" / f"{{00000..{len(shards) - 1:05d}}}.tar")
    assert expand_shards(pattern) == [str(s) for s in shards]
    got = list(iter_samples(shards))
    assert [s.key for s in got] == [k for k, *_ in samples]
    for s, (_, path, short, long) in zip(got, samples):
        assert s.image == path.read_bytes() and (s.short, s.long) == (short, long)
    assert load_rgb(got[0].image).size == Image.open(samples[0][1]).size
    again = write_shards(samples, tmp_path / "again", per_shard=16)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(shards, again))  # same input, same bytes


def _tar(path, members):
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bad_samples_are_named_by_shard_and_key(tmp_path):
    png = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(png)
    img = png.read_bytes()
    shard = _tar(
        tmp_path / "00000.tar",
        [
            ("a.png", img),
            ("a.json", json.dumps({"short": "s", "long": "l"}).encode()),
            ("b.png", img),  # no captions
            ("c.json", json.dumps({"short": "s", "long": "l"}).encode()),  # no image
            ("d.png", img),
            ("d.json", b"{not json"),
            ("e.png", img),
            ("e.json", json.dumps({"short": "", "long": "l"}).encode()),
            ("f.png", img),
            ("f.json", json.dumps({"short": "s2", "long": "l2"}).encode()),
        ],
    )
    with pytest.raises(DataError, match="sample b: no .json member"):
        list(iter_samples([shard]))
    skipped: list[RowProblem] = []
    good = list(iter_samples([shard], on_bad_row="skip", skipped=skipped))
    assert [s.key for s in good] == ["a", "f"]
    assert [(p.row, p.message.split(" (")[0].split(";")[0]) for p in skipped] == [
        ("sample b", "no .json member with the captions"),
        ("sample c", "no image member"),
        ("sample d", "invalid JSON in d.json: Expecting property name enclosed in double quotes"),
        ("sample e", "caption 'short' is missing or empty in e.json"),
    ]
    (tmp_path / "junk.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(DataError, match="not a readable tar shard"):
        list(iter_samples([tmp_path / "junk.tar"]))
    with pytest.raises(FileNotFoundError, match="shard not found"):
        list(iter_samples([tmp_path / "missing.tar"]))
