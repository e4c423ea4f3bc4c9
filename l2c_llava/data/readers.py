"""Readers for the real data formats, shared by every stage.

- caption pairs: JSONL or CSV rows with an image path and a short and a long caption
  (CC-3M + ShareGPT4V recaptions; DreamLIP's shortSV/longSV columns through ``short_key``/``long_key``);
- retrieval test sets: Karpathy-style JSON (dataset_coco.json, dataset_flickr30k.json: several
  captions per image); long-caption sets: ShareGPT4V-1K-style JSON, a JSON list of {image, caption},
  or an Urban-1K folder (``image/`` + ``caption/`` with the same stems);
- LLaVA JSON: blip_laion_cc_sbu_558k.json / llava_v1_5_mix665k.json rows.

Every image path resolves under its root and cannot escape it. All problems of a file (malformed
row, missing key, empty caption, missing or unreadable image, escaping path) are collected before
any training starts; then ``on_bad_row="error"`` raises one :class:`DataError` listing them with
file and row, and ``"skip"`` drops those rows and says how many (``.skipped`` keeps the list).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from PIL import Image

from l2c_llava.errors import L2CError, MissingFileError

logger = logging.getLogger(__name__)

OnBadRow = Literal["error", "skip"]
ImageCheck = Literal["none", "exists", "header", "decode"]
T = TypeVar("T")
SHOW = 20  # problems printed in an error message; the full list is on the exception
LONG_CAPTION = 20_000  # characters: a caption this long is almost surely a data error (warned, kept)


@dataclass(frozen=True)
class RowProblem:
    file: str
    row: str  # "line 12" (JSONL/CSV), "item 7" (JSON list), or a file name (folder layouts)
    message: str

    def __str__(self) -> str:
        return f"{self.file}, {self.row}: {self.message}"


class DataError(L2CError, ValueError):
    """Bad rows in a data file, all of them, each with file and row."""

    def __init__(
        self, problems: Sequence[RowProblem], file: str, total: int | None = None, hint: str | None = None
    ):
        self.problems = list(problems)
        self.file = file
        n = len(self.problems)
        head = (
            f"{n} bad row{'s' if n != 1 else ''}"
            + (f" of {total}" if total is not None else "")
            + f" in {file}"
        )
        lines = [f"  - {p.row}: {p.message}" for p in self.problems[:SHOW]]
        if n > SHOW:
            lines.append(f"  ... and {n - SHOW} more (DataError.problems has them all)")
        hint = hint or "Fix the rows, or set on_bad_row: skip (config key data.on_bad_row) to drop them."
        super().__init__(f"{head}:\n" + "\n".join(lines) + f"\n{hint}")


@dataclass
class Loaded(Generic[T]):
    """Rows that passed every check, and the problems of those that did not (when skipping)."""

    items: list[T]
    source: str
    total: int
    skipped: list[RowProblem] = field(default_factory=list)
    warnings: list[str] = field(
        default_factory=list
    )  # kept rows that look wrong (long captions, duplicate ids)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, i: int) -> T:
        return self.items[i]


def resolve_under(root: str | os.PathLike, relpath: str) -> Path:
    """Join `relpath` to `root`, refusing absolute paths and anything (``..``, symlinks) that lands
    outside `root`. Raises ValueError with the reason."""
    if not isinstance(relpath, str):
        kind = {int: "a number", float: "a number", bool: "true/false", list: "a list", dict: "an object"}
        raise ValueError(
            f"image path {relpath!r} is {kind.get(type(relpath), type(relpath).__name__)}, not a string; "
            "write the image's path relative to the image root, in quotes"
        )
    if not relpath.strip():
        raise ValueError("image path is empty")
    if relpath.startswith(("/", "\\")) or os.path.isabs(relpath) or (len(relpath) > 1 and relpath[1] == ":"):
        raise ValueError(f"image path {relpath!r} is absolute; paths must be relative to the image root")
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / relpath).resolve()
    if not candidate.is_relative_to(root_resolved):
        raise ValueError(f"image path {relpath!r} escapes the image root {root_resolved}")
    return candidate


def check_image(path: Path | bytes, level: ImageCheck) -> str | None:
    """None if the image (a file, or the encoded bytes of a webdataset member) passes the check at
    `level`, else the reason it does not."""
    if level == "none":
        return None
    in_memory = isinstance(path, bytes)
    if not in_memory and not path.is_file():
        if path.is_dir():
            return f"image path is a folder, not an image file: {path}"
        if path.exists():
            return f"image path is not a regular file (a pipe, socket or device): {path}"
        return f"image not found: {path}"
    if in_memory and not path:
        return "image member is empty"
    if level == "exists":
        return None
    if in_memory:
        path, label = io.BytesIO(path), "(shard member)"
    try:
        with Image.open(path) as im:
            if level == "header":
                im.verify()
            else:
                im.load()
                if im.width < 1 or im.height < 1:
                    return f"image has no pixels: {path}"
    except Exception as e:  # PIL raises many types for bad files
        return f"image cannot be read ({type(e).__name__}: {e}): {label if in_memory else path}"
    return None


def _check_images(paths: Iterable[Path], level: ImageCheck, threads: int = 8) -> dict[Path, str | None]:
    unique = list(dict.fromkeys(paths))
    if level == "none" or not unique:
        return {p: None for p in unique}
    with ThreadPoolExecutor(max_workers=min(threads, len(unique))) as pool:
        return dict(zip(unique, pool.map(lambda p: check_image(p, level), unique)))


def _drop_bad_images(
    items: list[T], path_of, label_of, file: str, level: ImageCheck, problems: list[RowProblem]
) -> list[T]:
    """Check every item's image (in parallel, each file once); record and drop the failures."""
    verdict = _check_images((p for it in items if (p := path_of(it)) is not None), level)
    kept = []
    for it in items:
        p = path_of(it)
        if p is not None and (why := verdict[p]) is not None:
            problems.append(RowProblem(file, label_of(it), why))
        else:
            kept.append(it)
    return kept


def _row_order(p: RowProblem) -> tuple[int, str]:
    digits = re.findall(r"\d+", p.row)
    return (int(digits[-1]) if digits else -1, p.row)


def _no_rows(file: str) -> DataError:
    return DataError(
        [RowProblem(file, "file", "it holds no rows (the file is empty)")],
        file,
        None,
        hint="Point the config (or the command) at the data file that holds the rows.",
    )


def data_warnings(
    file: str,
    captions: Iterable[tuple[str, str]] = (),
    ids: Iterable[tuple[str, str]] = (),
    id_name: str = "id",
) -> list[str]:
    """Warnings (not errors) for rows that load but look wrong: captions over LONG_CAPTION characters
    and repeated ids, each with a count and the first rows. Logged, and returned for ``l2c data check``."""
    out = []
    long = [(row, n) for row, text in captions if (n := len(text)) > LONG_CAPTION]
    if long:
        first = ", ".join(f"{row} ({n:,} chars)" for row, n in long[:3])
        out.append(
            f"{file}: {len(long)} caption(s) longer than {LONG_CAPTION:,} characters (first: {first}); "
            "they are truncated to the model's max length - check the file"
        )
    seen: dict[str, str] = {}
    dups = []
    for row, key in ids:
        if key in seen:
            dups.append(f"{row} repeats {seen[key]} ({key!r})")
        else:
            seen[key] = row
    if dups:
        out.append(
            f"{file}: {len(dups)} row(s) with a duplicate {id_name} (first: {'; '.join(dups[:3])}); "
            "a repeated row counts twice in training and evaluation"
        )
    for w in out:
        logger.warning("%s", w)
    return out


def _finish(items: list, problems: list[RowProblem], file: str, total: int, on_bad_row: OnBadRow) -> Loaded:
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if total == 0:
        raise _no_rows(file)
    problems = sorted(problems, key=_row_order)
    if problems and on_bad_row == "error":
        raise DataError(problems, file, total)
    if problems:
        logger.warning("skipped %d of %d rows of %s (first: %s)", len(problems), total, file, problems[0])
    if not items:
        raise DataError(problems or [RowProblem(file, "file", "no usable rows")], file, total)
    return Loaded(items, file, total, problems)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path}")
    raw = path.read_bytes()
    if not raw.strip():
        raise _no_rows(str(path))
    try:
        return json.loads(_decode(raw, str(path)))
    except json.JSONDecodeError as e:
        raise DataError(
            [RowProblem(str(path), f"line {e.lineno}", f"invalid JSON: {e.msg} (column {e.colno})")],
            str(path),
        ) from None


def nonempty_strs(row: dict, key: str) -> list[str]:
    """A string, or a non-empty JSON list of strings (e.g. COCO's five captions of an image)."""
    if isinstance(row.get(key), list):
        values = row[key]
        if not values:
            raise ValueError(f"{key!r} is an empty list; give at least one caption")
        for k, v in enumerate(values):
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{key!r}[{k}] must be a non-empty string, got {v!r}")
        return list(values)
    return [nonempty_str(row, key)]


def nonempty_str(row: dict, key: str) -> str:
    if key not in row:
        raise ValueError(f"key {key!r} is missing (row has: {', '.join(map(str, row)) or 'nothing'})")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key!r} is empty")
    return value


# ---------------------------------------------------------------------------------------------
# caption pairs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionPair:
    image: str  # as written in the file (relative to the image root)
    short: str
    long: str
    row: str
    image_path: Path | None = None  # resolved under the root; None when no root was given
    more_short: tuple[str, ...] = ()  # the row's other short captions (a list under the short key)

    @property
    def shorts(self) -> tuple[str, ...]:
        """Every short caption of the row: stage 2 draws one per visit; stage 1 pairs the first."""
        return (self.short, *self.more_short)


def _decode(raw: bytes, file: str) -> str:
    """UTF-8 text of a whole file, or a DataError naming the line and byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            [RowProblem(file, f"line {line}", f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col})")],
            file,
            hint="Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`).",
        ) from None


def iter_rows(path: Path) -> Iterable[tuple[str, dict | None, str | None]]:
    """(row label, row dict or None, problem) for JSONL or CSV files. A JSONL line that is not UTF-8
    is a bad row like any other; a CSV file that is not UTF-8 is refused with the line."""
    if path.suffix.lower() == ".csv" or path.suffix.lower() == ".tsv":
        text = _decode(path.read_bytes(), str(path))
        reader = csv.DictReader(
            io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ","
        )
        for i, row in enumerate(reader, start=2):
            if None in row:
                yield f"line {i}", None, "more fields than the header has columns"
            else:
                yield f"line {i}", row, None
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield (
                    f"line {i}",
                    None,
                    f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8",
                )
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {i}", None, f"invalid JSON: {e.msg} (column {e.colno})"
                continue
            if not isinstance(row, dict):
                yield f"line {i}", None, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield f"line {i}", row, None


def read_caption_pairs(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    short_key: str = "short",
    long_key: str = "long",
    image_key: str = "image",
    on_bad_row: OnBadRow = "error",
    image_check: ImageCheck = "header",
    max_rows: int | None = None,
) -> Loaded[CaptionPair]:
    """Read caption pairs from JSONL or CSV/TSV. Without `image_root` images are not resolved or
    checked (stage 1 needs only the text)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"caption-pair file not found: {path}")
    problems: list[RowProblem] = []
    pending: list[CaptionPair] = []
    total = 0
    for label, row, problem in iter_rows(path):
        if max_rows is not None and total >= max_rows:
            break
        total += 1
        if problem:
            problems.append(RowProblem(str(path), label, problem))
            continue
        try:
            image = nonempty_str(row, image_key)
            short, *more_short = nonempty_strs(row, short_key)
            long = nonempty_str(row, long_key)
            image_path = resolve_under(image_root, image) if image_root is not None else None
        except ValueError as e:
            problems.append(RowProblem(str(path), label, str(e)))
            continue
        pending.append(CaptionPair(image, short, long, label, image_path, tuple(more_short)))
    pending = _drop_bad_images(
        pending, lambda p: p.image_path, lambda p: p.row, str(path), image_check, problems
    )
    loaded = _finish(pending, problems, str(path), total, on_bad_row)
    loaded.warnings = data_warnings(
        str(path),
        [(p.row, t) for p in pending for t in (*p.shorts, p.long)],
        [(p.row, p.image) for p in pending],
        id_name="image",
    )
    return loaded


# ---------------------------------------------------------------------------------------------
# retrieval test sets
# ---------------------------------------------------------------------------------------------


@dataclass
class RetrievalSet:
    """Images and captions of a retrieval test set; ``caption_image[j]`` is the image of caption j."""

    images: list[Path]
    image_ids: list[str]
    captions: list[str]
    caption_image: list[int]
    source: str = ""
    skipped: list[RowProblem] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.caption_image):
            raise ValueError("captions and caption_image differ in length")

    def captions_of(self, i: int) -> list[str]:
        """The captions of image i (an index built once: a per-call scan made a 38k-image set quadratic)."""
        key = (id(self.captions), len(self.captions), id(self.caption_image), len(self.caption_image))
        if getattr(self, "_by_image", (None,))[0] != key:
            by_image: dict[int, list[str]] = {}
            for c, k in zip(self.captions, self.caption_image):
                by_image.setdefault(k, []).append(c)
            self._by_image = (key, by_image)
        return list(self._by_image[1].get(i, []))


def _build_retrieval(
    entries: list[tuple[str, str, list[str]]],
    image_root,
    path: str,
    total: int,
    on_bad_row: OnBadRow,
    image_check: ImageCheck,
    problems: list[RowProblem],
) -> RetrievalSet:
    """entries: (row label, relative image path, captions)."""
    resolved = []
    for label, rel, caps in entries:
        try:
            resolved.append((label, rel, resolve_under(image_root, rel), caps))
        except ValueError as e:
            problems.append(RowProblem(path, label, str(e)))
    resolved = _drop_bad_images(resolved, lambda r: r[2], lambda r: r[0], path, image_check, problems)
    kept = [(rel, p, caps) for _, rel, p, caps in resolved]
    loaded = _finish(kept, problems, path, total, on_bad_row)
    rs = RetrievalSet([], [], [], [], source=path, skipped=loaded.skipped)
    for i, (rel, p, caps) in enumerate(loaded.items):
        rs.images.append(p)
        rs.image_ids.append(rel)
        rs.captions.extend(caps)
        rs.caption_image.extend([i] * len(caps))
    return rs


def read_karpathy(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str | None = "test",
    *,
    max_captions: int | None = None,
    on_bad_row: OnBadRow = "error",
    image_check: ImageCheck = "header",
) -> RetrievalSet:
    """Karpathy-style JSON ({"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}).
    `max_captions` keeps the first k captions per image (MS-COCO images have 5-7; the usual is 5)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(
            [
                RowProblem(
                    str(path), "top level", "expected an object with an 'images' list (Karpathy format)"
                )
            ],
            str(path),
        )
    problems: list[RowProblem] = []
    entries = []
    total = 0
    for i, img in enumerate(data["images"]):
        label = f"images[{i}]"
        if not isinstance(img, dict):
            problems.append(RowProblem(str(path), label, "expected an object"))
            total += 1
            continue
        if split is not None and img.get("split") != split:
            continue
        total += 1
        try:
            filename = nonempty_str(img, "filename")
            rel = f"{img['filepath']}/{filename}" if img.get("filepath") else filename
            sents = img.get("sentences")
            if not isinstance(sents, list) or not sents:
                raise ValueError("'sentences' must be a non-empty list")
            caps = []
            for k, s in enumerate(sents[:max_captions] if max_captions else sents):
                if not isinstance(s, dict):
                    raise ValueError(f"sentences[{k}] must be an object with 'raw'")
                try:
                    caps.append(nonempty_str(s, "raw").strip())
                except ValueError as e:
                    raise ValueError(f"sentences[{k}]: {e}") from None
        except ValueError as e:
            problems.append(RowProblem(str(path), label, str(e)))
            continue
        entries.append((label, rel, caps))
    if total == 0:
        splits = sorted({str(x.get("split")) for x in data["images"] if isinstance(x, dict)})
        raise DataError(
            [
                RowProblem(
                    str(path), "images", f"no image has split {split!r} (splits here: {', '.join(splits)})"
                )
            ],
            str(path),
        )
    return _build_retrieval(entries, image_root, str(path), total, on_bad_row, image_check, problems)


def read_long_captions(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    on_bad_row: OnBadRow = "error",
    image_check: ImageCheck = "header",
) -> RetrievalSet:
    """A long-caption test set, one caption per image, in any of the layouts it is published in:
    ShareGPT4V-1K-style JSON (image + conversations, the caption is the last gpt turn), a JSON list of
    {"image", "caption"}, a Karpathy-style JSON, or an Urban-1K folder (image/ and caption/*.txt)."""
    path = Path(path)
    if path.is_dir():
        return _read_caption_folder(path, on_bad_row, image_check)
    data = _read_json(path)
    if isinstance(data, dict) and "images" in data:
        return read_karpathy(
            path,
            image_root if image_root is not None else path.parent,
            split=None,
            on_bad_row=on_bad_row,
            image_check=image_check,
        )
    if not isinstance(data, list):
        raise DataError(
            [RowProblem(str(path), "top level", "expected a JSON list of rows or a Karpathy-style object")],
            str(path),
        )
    root = image_root if image_root is not None else path.parent
    problems, entries = [], []
    for i, row in enumerate(data):
        label = f"item {i}"
        try:
            if not isinstance(row, dict):
                raise ValueError("expected an object")
            rel = nonempty_str(row, "image")
            if "conversations" in row:
                turns = row["conversations"]
                answers = (
                    [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
                    if isinstance(turns, list)
                    else []
                )
                if not answers or not isinstance(answers[-1], str) or not answers[-1].strip():
                    raise ValueError("no non-empty gpt turn holding the caption")
                caption = answers[-1]
            else:
                caption = nonempty_str(row, "caption")
        except ValueError as e:
            problems.append(RowProblem(str(path), label, str(e)))
            continue
        entries.append((label, rel, [caption.strip()]))
    return _build_retrieval(entries, root, str(path), len(data), on_bad_row, image_check, problems)


def read_families(path: str | os.PathLike) -> dict[str, str]:
    """{image path: family} of a long-caption JSON list whose rows carry a "family" (the embedded hard
    long-caption set: images whose captions differ only after CLIP's 77 tokens); {} for a set without
    families (a folder, a Karpathy-style file, rows without the key)."""
    path = Path(path)
    if path.is_dir():
        return {}
    data = _read_json(path)
    if not isinstance(data, list):
        return {}
    return {
        row["image"]: str(row["family"])
        for row in data
        if isinstance(row, dict) and isinstance(row.get("image"), str) and row.get("family") is not None
    }


def _read_caption_folder(root: Path, on_bad_row: OnBadRow, image_check: ImageCheck) -> RetrievalSet:
    image_dir, caption_dir = root / "image", root / "caption"
    if not image_dir.is_dir() or not caption_dir.is_dir():
        raise DataError(
            [RowProblem(str(root), "folder", "expected image/ and caption/ sub-folders (Urban-1K layout)")],
            str(root),
        )
    problems, entries = [], []
    images = sorted(p for p in image_dir.iterdir() if p.is_file())
    for img in images:
        label = img.name
        txt = caption_dir / (img.stem + ".txt")
        if not txt.is_file():
            problems.append(RowProblem(str(root), label, f"no caption file {txt.name} in caption/"))
            continue
        caption = _decode(txt.read_bytes(), str(txt)).strip()
        if not caption:
            problems.append(RowProblem(str(root), label, f"caption file {txt.name} is empty"))
            continue
        entries.append((label, f"image/{img.name}", [caption]))
    return _build_retrieval(entries, root, str(root), len(images), on_bad_row, image_check, problems)


# ---------------------------------------------------------------------------------------------
# LLaVA JSON
# ---------------------------------------------------------------------------------------------

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class LlavaRow:
    id: str
    conversations: list[dict]  # [{"from": "human"|"gpt", "value": str}, ...], as in the file
    image: str | None = None  # as written in the file
    image_path: Path | None = None
    row: str = ""

    @property
    def has_image(self) -> bool:
        return self.image is not None


def _check_conversations(conv: Any, has_image: bool) -> None:
    if not isinstance(conv, list) or not conv:
        raise ValueError("'conversations' must be a non-empty list")
    n_image_tokens = 0
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversations[{k}] must be an object with 'from' and 'value'")
        expected = "human" if k % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ValueError(
                f"conversations[{k}] is from {turn['from']!r}, expected {expected!r} (turns alternate, human first)"
            )
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            raise ValueError(f"conversations[{k}] has an empty value")
        n_image_tokens += turn["value"].count(IMAGE_TOKEN)
        if k > 0 and IMAGE_TOKEN in turn["value"]:
            raise ValueError(f"conversations[{k}] holds {IMAGE_TOKEN}; only the first human turn may")
    if len(conv) % 2:
        raise ValueError("the last turn is from 'human': every question needs a 'gpt' answer")
    if has_image and n_image_tokens != 1:
        raise ValueError(
            f"a row with an image needs exactly one {IMAGE_TOKEN} in its first human turn, found {n_image_tokens}"
        )
    if not has_image and n_image_tokens:
        raise ValueError(f"a text-only row (no 'image' key) must not contain {IMAGE_TOKEN}")


def read_llava_json(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None,
    *,
    on_bad_row: OnBadRow = "error",
    image_check: ImageCheck = "header",
) -> Loaded[LlavaRow]:
    """LLaVA training rows (558K pretrain / 665K instruction style). Text-only rows (no ``image``)
    are kept; rows with an image need `image_root`."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(
            [RowProblem(str(path), "top level", "expected a JSON list of rows (LLaVA format)")], str(path)
        )
    problems: list[RowProblem] = []
    pending: list[LlavaRow] = []
    for i, row in enumerate(data):
        label = f"item {i}"
        try:
            if not isinstance(row, dict):
                raise ValueError("expected an object")
            rid = str(row.get("id", i))
            image = row.get("image")
            if image is not None:
                if image_root is None:
                    raise ValueError("row has an image but no image root was given")
                image_path = resolve_under(image_root, image)
            else:
                image_path = None
            _check_conversations(row.get("conversations"), image is not None)
        except ValueError as e:
            problems.append(RowProblem(str(path), label, str(e)))
            continue
        pending.append(LlavaRow(rid, row["conversations"], image, image_path, label))
    kept = _drop_bad_images(
        pending, lambda r: r.image_path, lambda r: r.row, str(path), image_check, problems
    )
    loaded = _finish(kept, problems, str(path), len(data), on_bad_row)
    loaded.warnings = data_warnings(
        str(path),
        [(r.row, t["value"]) for r in kept for t in r.conversations],
        [
            (r.row, r.id)
            for r in kept
            if isinstance(data[int(r.row.split()[-1])], dict) and "id" in data[int(r.row.split()[-1])]
        ],
    )
    return loaded


def check_file(
    path: str | os.PathLike,
    fmt: str,
    image_root: str | os.PathLike | None = None,
    split: str = "test",
    image_check: str = "decode",
) -> tuple[int, list, int, list[str]]:
    """``l2c data check``: read a data file of format pairs / karpathy / long / llava skipping bad rows.
    Returns (good rows, the bad rows' problems, rows in all, warnings)."""
    if fmt in ("pairs", "llava"):
        read = read_caption_pairs if fmt == "pairs" else read_llava_json
        res = read(path, image_root, on_bad_row="skip", image_check=image_check)
        return len(res), res.skipped, res.total, list(getattr(res, "warnings", []))
    if fmt == "karpathy":
        rs = read_karpathy(path, image_root, split=split, on_bad_row="skip", image_check=image_check)
    else:
        rs = read_long_captions(path, image_root, on_bad_row="skip", image_check=image_check)
    return len(rs.images), rs.skipped, len(rs.images) + len(rs.skipped), []
