"""Webdataset tar shards (how CC-3M / CC-12M are distributed by img2dataset): per sample an image
(`KEY.jpg` / `.png` / `.webp`) and `KEY.json` with its captions, members of a sample adjacent in the
tar. Streamed member by member (``tarfile`` stream mode): a shard is never loaded whole.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from l2c_llava.data.readers import DataError, RowProblem, check_image
from l2c_llava.errors import MissingFileError
from l2c_llava.io import atomic_save

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class WebSample:
    key: str
    image: bytes
    short: str
    long: str
    shard: str


def expand_shards(pattern: str) -> list[str]:
    """``data/{00000..00012}.tar`` -> the 13 paths (webdataset's brace notation); a plain path or a
    comma-separated list passes through."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [p for p in pattern.split(",") if p]
    lo, hi, width = int(m[1]), int(m[2]), len(m[1])
    return [pattern[: m.start()] + f"{i:0{width}d}" + pattern[m.end() :] for i in range(lo, hi + 1)]


def write_shards(
    samples: Sequence[tuple[str, Path, str, str]], out_dir: str | os.PathLike, per_shard: int = 1000
) -> list[Path]:
    """Write (key, image path, short, long) samples into ``out_dir/NNNNN.tar`` shards, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, lo in enumerate(range(0, len(samples), per_shard)):
        final = out / f"{s:05d}.tar"

        def write(tmp: Path, rows=samples[lo : lo + per_shard]) -> None:
            with tarfile.open(tmp, "w") as tar:
                for key, image, short, long in rows:
                    _add(tar, f"{key}{Path(image).suffix.lower()}", Path(image).read_bytes())
                    _add(tar, f"{key}.json", json.dumps({"key": key, "short": short, "long": long}).encode())

        atomic_save(final, write)
        paths.append(final)
    return paths


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # same input, same bytes
    tar.addfile(info, io.BytesIO(data))


def iter_samples(
    shards: Sequence[str | os.PathLike],
    *,
    short_key: str = "short",
    long_key: str = "long",
    on_bad_row: str = "error",
    skipped: list[RowProblem] | None = None,
) -> Iterator[WebSample]:
    """Stream the samples of `shards` in order. A bad sample (no image, no or bad json, missing or
    empty caption) raises a DataError naming shard and key, or with ``on_bad_row="skip"`` is
    appended to `skipped` and left out."""
    for shard in shards:
        shard = str(shard)
        if not Path(shard).is_file():
            raise MissingFileError(f"webdataset shard not found: {shard}")
        group_key, members = None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    base = info.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    if key != group_key and group_key is not None:
                        yield from _emit(shard, group_key, members, short_key, long_key, on_bad_row, skipped)
                        members = {}
                    group_key = key
                    members["." + ext.lower()] = tar.extractfile(info).read()
        except tarfile.TarError as e:
            raise DataError([RowProblem(shard, "archive", f"not a readable tar shard: {e}")], shard) from None
        if group_key is not None:
            yield from _emit(shard, group_key, members, short_key, long_key, on_bad_row, skipped)


def _emit(shard, key, members, short_key, long_key, on_bad_row, skipped) -> Iterator[WebSample]:
    try:
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is None:
            raise ValueError(
                f"no image member ({', '.join(IMAGE_EXTS)}); members: {', '.join(sorted(members))}"
            )
        if ".json" not in members:
            raise ValueError("no .json member with the captions")
        try:
            meta = json.loads(members[".json"])
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON in {key}.json: {e.msg}") from None
        caps = []
        for k in (short_key, long_key):
            v = meta.get(k) if isinstance(meta, dict) else None
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"caption {k!r} is missing or empty in {key}.json")
            caps.append(v)
    except ValueError as e:
        problem = RowProblem(shard, f"sample {key}", str(e))
        if on_bad_row == "skip":
            if skipped is not None:
                skipped.append(problem)
            return
        raise DataError([problem], shard) from None
    yield WebSample(key, image, caps[0], caps[1], shard)


@dataclass
class ShardScan:
    """What one pass over the shards found: the captions of the good samples in order (short_0,
    long_0, short_1, ...), the number of samples seen, and the bad ones ("shard/key": reason)."""

    captions: list[str]
    samples: int
    bad: dict[str, str]


def sample_id(shard: str, key: str) -> str:
    return f"{Path(shard).name}/{key}"


def scan_shards(
    shards: Sequence[str | os.PathLike],
    *,
    short_key: str = "short",
    long_key: str = "long",
    image_check: str = "header",
    on_bad_row: str = "error",
    progress: bool = True,
) -> ShardScan:
    """Stream every sample once: collect the captions and check each image at `image_check` level
    (the up-front check JSONL data gets, done while the captions are read anyway). With
    ``on_bad_row="error"`` every bad sample is listed in one DataError; with ``"skip"`` they are
    returned so training leaves them out."""
    from tqdm.auto import tqdm

    skipped: list[RowProblem] = []  # samples iter_samples could not form (no image, bad json, ...)
    captions: list[str] = []
    bad: dict[str, str] = {}
    n = 0
    samples = iter_samples(shards, short_key=short_key, long_key=long_key, on_bad_row="skip", skipped=skipped)
    for s in tqdm(samples, desc="scanning shards", unit="sample", disable=not progress):
        n += 1
        reason = check_image(s.image, image_check)
        if reason:
            bad[sample_id(s.shard, s.key)] = reason
            continue
        captions += [s.short, s.long]
    for p in skipped:
        bad[sample_id(p.file, p.row.removeprefix("sample "))] = p.message
    if bad and on_bad_row == "error":
        problems = [RowProblem(str(Path(shards[0]).parent), k, v) for k, v in sorted(bad.items())]
        raise DataError(problems, f"webdataset shards in {Path(shards[0]).parent}", total=n + len(skipped))
    return ShardScan(captions, n + len(skipped), bad)
