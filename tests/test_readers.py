from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from l2c_llava.data.readers import (
    DataError,
    read_caption_pairs,
    read_karpathy,
    read_llava_json,
    read_long_captions,
    resolve_under,
)


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "images"
    (r / "a").mkdir(parents=True)
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(r / "a" / name)
    (r / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (tmp_path / "outside.jpg").write_bytes((r / "a" / "1.jpg").read_bytes())
    os.symlink(tmp_path / "outside.jpg", r / "a" / "link.jpg")
    return r


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def pair(image: str, short: str = "a red square", long: str = "A long description of a red square.") -> dict:
    return {"image": image, "short": short, "long": long}


BAD_ROWS = [
    pair("a/1.jpg"),
    '{"image": "a/2.jpg", "short": "unterminated',  # bad JSON
    pair("a/missing.jpg"),  # missing image
    pair("a/corrupt.jpg"),  # unreadable image
    pair("../outside.jpg"),  # escapes the root with ..
    pair("/etc/passwd"),  # absolute
    pair("a/link.jpg"),  # symlink out of the root
    pair("a/2.jpg", short="  "),  # empty caption
    {"image": "a/3.jpg", "short": "x"},  # missing key
    ["not", "an", "object"],
    pair("a/3.jpg"),
]


def test_caption_pairs_every_problem_reported_with_file_and_row(tmp_path, root):
    path = write_jsonl(tmp_path / "pairs.jsonl", BAD_ROWS)
    with pytest.raises(DataError) as ei:
        read_caption_pairs(path, root)
    err = ei.value
    got = {p.row: p.message for p in err.problems}
    assert list(got) == [f"line {i}" for i in range(2, 11)]
    assert got["line 2"].startswith("invalid JSON")
    assert got["line 3"].startswith("image not found")
    assert got["line 4"].startswith("image cannot be read")
    assert "escapes the image root" in got["line 5"]
    assert "is absolute" in got["line 6"]
    assert "escapes the image root" in got["line 7"]
    assert got["line 8"] == "'short' is empty"
    assert got["line 9"] == "key 'long' is missing (row has: image, short)"
    assert "expected a JSON object" in got["line 10"]
    text = str(err)
    assert text.startswith(f"9 bad rows of 11 in {path}") and "on_bad_row: skip" in text


def test_caption_pairs_skip_drops_bad_rows_and_says_how_many(tmp_path, root, caplog):
    path = write_jsonl(tmp_path / "pairs.jsonl", BAD_ROWS)
    res = read_caption_pairs(path, root, on_bad_row="skip")
    assert [p.image for p in res] == ["a/1.jpg", "a/3.jpg"]
    assert res.total == 11 and len(res.skipped) == 9
    assert "skipped 9 of 11 rows" in caplog.text


def test_a_file_with_no_usable_row_is_fatal_even_when_skipping(tmp_path, root):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair("a/missing.jpg")])
    with pytest.raises(DataError, match="image not found"):
        read_caption_pairs(path, root, on_bad_row="skip")


def test_caption_pairs_without_root_read_text_only(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair("anything/not/there.jpg")])
    (res,) = read_caption_pairs(path).items
    assert res.image_path is None and res.short == "a red square"


def test_caption_pairs_with_several_short_captions(tmp_path):
    """A list under the short key (COCO's five captions of an image): the first is `short`, every one
    is in `shorts`; an empty list or a non-string item is a row problem naming the key and index."""
    rows = [
        pair("a.jpg") | {"alternatives": ["one", "two", "three"]},
        pair("b.jsonl") | {"alternatives": []},
        pair("c.jpg") | {"alternatives": ["fine", ""]},
        pair("d.jpg") | {"alternatives": ["x", 3]},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as ei:
        read_caption_pairs(path, short_key="alternatives")
    got = {p.row: p.message for p in ei.value.problems}
    assert got == {
        "line 2": "'alternatives' is an empty list; give at least one caption",
        "line 3": "'alternatives'[1] must be a non-empty string, got ''",
        "line 4": "'alternatives'[1] must be a non-empty string, got 3",
    }
    (first,) = read_caption_pairs(path, short_key="alternatives", on_bad_row="skip").items
    assert first.short == "one" and first.shorts == ("one", "two", "three")
    (plain,) = read_caption_pairs(write_jsonl(tmp_path / "p.jsonl", [pair("a.jpg")])).items
    assert plain.shorts == (plain.short,) and plain.more_short == ()


def test_caption_pairs_csv_with_other_column_names(tmp_path, root):
    path = tmp_path / "pairs.csv"
    path.write_text('image,shortSV,longSV\na/1.jpg,a red square,"A red square, drawn large."\na/2.jpg,,x\n')
    with pytest.raises(DataError) as ei:
        read_caption_pairs(path, root, short_key="shortSV", long_key="longSV")
    assert [(p.row, p.message) for p in ei.value.problems] == [("line 3", "'shortSV' is empty")]
    res = read_caption_pairs(path, root, short_key="shortSV", long_key="longSV", on_bad_row="skip")
    assert res[0].long == "A red square, drawn large."


def test_resolve_under_refuses_escapes(root):
    assert resolve_under(root, "a/1.jpg") == (root / "a" / "1.jpg").resolve()
    assert resolve_under(root, "a/../a/1.jpg") == (root / "a" / "1.jpg").resolve()
    for bad in ("../x.jpg", "a/../../x.jpg", "/abs.jpg", "a/link.jpg", "", "C:\\x.jpg"):
        with pytest.raises(ValueError):
            resolve_under(root, bad)


def test_invalid_json_file_names_line(tmp_path, root):
    path = tmp_path / "k.json"
    path.write_text('{"images": [\n {"filename": "1.jpg",}\n]}')
    with pytest.raises(DataError, match=r"k.json:\n  - line 2: invalid JSON"):
        read_karpathy(path, root)


def karpathy(images: list[dict]) -> dict:
    return {"images": images, "dataset": "coco"}


def kimg(filename, split="test", sentences=("a red square", "red box on white"), filepath="a"):
    return {
        "filepath": filepath,
        "filename": filename,
        "split": split,
        "sentences": [{"raw": s} for s in sentences],
    }


def test_karpathy_reads_split_and_reports_bad_entries(tmp_path, root):
    path = tmp_path / "k.json"
    path.write_text(
        json.dumps(
            karpathy(
                [
                    kimg("1.jpg"),
                    kimg("2.jpg", split="train"),
                    kimg("3.jpg", sentences=()),
                    kimg("missing.jpg"),
                    kimg("2.jpg", sentences=("ok", " ")),
                ]
            )
        )
    )
    with pytest.raises(DataError) as ei:
        read_karpathy(path, root, split="test")
    got = {p.row: p.message for p in ei.value.problems}
    assert got == {
        "images[2]": "'sentences' must be a non-empty list",
        "images[4]": "sentences[1]: 'raw' is empty",
        "images[3]": got["images[3]"],
    }
    assert got["images[3]"].startswith("image not found")
    rs = read_karpathy(path, root, split="test", on_bad_row="skip")
    assert rs.image_ids == ["a/1.jpg"] and rs.captions == ["a red square", "red box on white"]
    assert rs.caption_image == [0, 0]
    assert read_karpathy(path, root, split="train").image_ids == ["a/2.jpg"]


def test_karpathy_unknown_split_lists_the_splits(tmp_path, root):
    path = tmp_path / "k.json"
    path.write_text(json.dumps(karpathy([kimg("1.jpg", split="val")])))
    with pytest.raises(DataError, match=r"no image has split 'test' \(splits here: val\)"):
        read_karpathy(path, root, split="test")


def test_long_captions_in_every_published_layout(tmp_path, root):
    share4v = tmp_path / "share4v.json"
    share4v.write_text(
        json.dumps(
            [
                {
                    "id": "1",
                    "image": "a/1.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe."},
                        {"from": "gpt", "value": "A very long caption."},
                    ],
                },
                {"id": "2", "image": "a/2.jpg", "conversations": [{"from": "human", "value": "<image>"}]},
            ]
        )
    )
    with pytest.raises(DataError, match="item 1: no non-empty gpt turn"):
        read_long_captions(share4v, root)
    plain = tmp_path / "plain.json"
    plain.write_text(
        json.dumps([{"image": "a/1.jpg", "caption": "Long one."}, {"image": "a/2.jpg", "caption": "Two."}])
    )
    assert read_long_captions(plain, root).captions == ["Long one.", "Two."]
    urban = tmp_path / "urban1k"
    (urban / "image").mkdir(parents=True)
    (urban / "caption").mkdir()
    for k in (1, 2):
        Image.new("RGB", (4, 4)).save(urban / "image" / f"{k}.jpg")
    (urban / "caption" / "1.txt").write_text("An urban scene, described at length.\n")
    with pytest.raises(DataError, match="2.jpg: no caption file 2.txt"):
        read_long_captions(urban)
    rs = read_long_captions(urban, on_bad_row="skip")
    assert rs.captions == ["An urban scene, described at length."] and rs.image_ids == ["image/1.jpg"]


def conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


def test_llava_rows_checked_like_llava_expects(tmp_path, root):
    rows = [
        {"id": "ok", "image": "a/1.jpg", "conversations": conv(("human", "<image>\nWhat?"), ("gpt", "red"))},
        {
            "id": "text",
            "conversations": conv(("human", "Hi"), ("gpt", "Hello"), ("human", "2+2?"), ("gpt", "4")),
        },
        {
            "id": "two-images",
            "image": "a/1.jpg",
            "conversations": conv(("human", "<image> <image>"), ("gpt", "x")),
        },
        {"id": "no-token", "image": "a/1.jpg", "conversations": conv(("human", "What?"), ("gpt", "x"))},
        {"id": "text-with-token", "conversations": conv(("human", "<image>\nWhat?"), ("gpt", "x"))},
        {"id": "order", "image": "a/1.jpg", "conversations": conv(("gpt", "<image>"), ("human", "x"))},
        {"id": "unanswered", "image": "a/1.jpg", "conversations": conv(("human", "<image>\nq"))},
        {
            "id": "late-token",
            "image": "a/1.jpg",
            "conversations": conv(("human", "q"), ("gpt", "a"), ("human", "<image>"), ("gpt", "b")),
        },
        {
            "id": "missing-img",
            "image": "a/missing.jpg",
            "conversations": conv(("human", "<image>\nq"), ("gpt", "a")),
        },
        {
            "id": "escape",
            "image": "../outside.jpg",
            "conversations": conv(("human", "<image>\nq"), ("gpt", "a")),
        },
        {"id": "empty", "image": "a/2.jpg", "conversations": conv(("human", "<image>\nq"), ("gpt", " "))},
    ]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError) as ei:
        read_llava_json(path, root)
    got = {p.row: p.message for p in ei.value.problems}
    assert sorted(got) == sorted(f"item {i}" for i in range(2, 11))
    assert "exactly one <image>" in got["item 2"] and "found 2" in got["item 2"]
    assert "found 0" in got["item 3"]
    assert "text-only row" in got["item 4"]
    assert "expected 'human'" in got["item 5"]
    assert "every question needs a 'gpt' answer" in got["item 6"]
    assert "only the first human turn may" in got["item 7"]
    assert got["item 8"].startswith("image not found")
    assert "escapes the image root" in got["item 9"]
    assert "empty value" in got["item 10"]
    ok = read_llava_json(path, root, on_bad_row="skip")
    assert [r.id for r in ok] == ["ok", "text"] and ok[1].image_path is None


def test_llava_image_row_without_root_is_reported(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            [{"id": "1", "image": "a/1.jpg", "conversations": conv(("human", "<image>"), ("gpt", "x"))}]
        )
    )
    with pytest.raises(DataError, match="no image root was given"):
        read_llava_json(path, None)


def test_image_check_levels(tmp_path, root):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair("a/1.jpg"), pair("a/corrupt.jpg")])
    assert len(read_caption_pairs(path, root, image_check="exists")) == 2  # only existence checked
    assert len(read_caption_pairs(path, root, image_check="header", on_bad_row="skip")) == 1
    truncated = root / "a" / "trunc.jpg"
    data = (root / "a" / "1.jpg").read_bytes()
    big = root / "a" / "big.jpg"
    Image.effect_noise((256, 256), 60).convert("RGB").save(big, quality=95)
    data = big.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    path2 = write_jsonl(tmp_path / "p2.jsonl", [pair("a/trunc.jpg"), pair("a/1.jpg")])
    decoded = read_caption_pairs(path2, root, image_check="decode", on_bad_row="skip")
    assert [p.image for p in decoded] == ["a/1.jpg"]
    assert "cannot be read" in decoded.skipped[0].message
