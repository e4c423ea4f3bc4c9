"""The text feature cache: the frozen stage-1 encoder embeds every caption once; stage-2 training
reads the features from disk and never loads the LLM.

Layout of a cache folder::

    manifest.json                  format, encoder fingerprint, caption digest, dim, dtype, shards
    shard-00000.safetensors        "features" [n, D] (float16 by default), "keys" [n] int64
    shard-00001.safetensors        ...

Row i of the cache is caption i of the list it was built for (stage 2: short_0, long_0, short_1,
long_1, ...). Each row carries the first 8 bytes of its caption's sha256 ("keys"), so a cache is
checked against the captions a run asks for, row by row, and a cache made for other captions or by
another encoder is refused with the reason, never silently reused.

Building is resumable: shards are written one at a time (temporary file, then rename) and the
manifest lists the finished ones; a killed build continues at the next shard. Reading memory-maps the
shards (safetensors ``safe_open``): only the rows asked for are read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from l2c_llava import layout as L
from l2c_llava.data.readers import read_caption_pairs, read_families, read_karpathy, read_long_captions
from l2c_llava.data.webdataset import expand_shards, scan_shards
from l2c_llava.errors import InputError
from l2c_llava.io import atomic_save, atomic_write_json
from l2c_llava.models.reference import llm_folder, resolve_model_path
from l2c_llava.stage1.encoder import (  # the frozen stage-1 encoder: a model, not its training
    SEPARATOR,
    TextEncoder,
)

logger = logging.getLogger(__name__)

FORMAT = "l2c-llava text feature cache v1"
MANIFEST = L.CACHE_MANIFEST
WINDOW = L.CACHE_LLM_WINDOW
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_WHOLE_FILE_LIMIT = 64 << 20  # files up to 64 MiB are hashed whole; larger ones by size + head + tail
_EDGE = 1 << 20


def caption_keys(captions: Sequence[str]) -> torch.Tensor:
    """int64 key per caption: the first 8 bytes of sha256(utf-8 text)."""
    return torch.tensor(
        [
            int.from_bytes(hashlib.sha256(c.encode("utf-8")).digest()[:8], "little", signed=True)
            for c in captions
        ],
        dtype=torch.int64,
    )


def captions_digest(keys: torch.Tensor) -> str:
    return hashlib.sha256(keys.numpy().tobytes()).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}|{size}|".encode())
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE_LIMIT:
            h.update(f.read())
        else:  # safetensors header + first/last MiB: names, shapes, dtypes and real bytes of the weights
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    keep = (".json", ".safetensors", ".gguf", ".model", ".txt", ".jinja")
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix in keep and not p.name.startswith(".")
    )


def encoder_fingerprint(encoder_path: str | os.PathLike, instruction: str | None = None) -> dict[str, Any]:
    """Identity of a text encoder computed from its files, without loading it: the encoder folder
    (settings, tokenizer, adapter), every adapter it stacks and its base weights (small files whole,
    large ones by size, header and tail), plus the instruction the cache is built with."""
    path = Path(encoder_path)
    parts: dict[str, str] = {}

    def add_folder(tag: str, folder: Path) -> None:
        for f in _folder_files(folder):
            parts[f"{tag}/{f.relative_to(folder).as_posix()}"] = _file_digest(f)

    meta = path / "l2c_encoder.json"
    if meta.is_file():
        add_folder("encoder", path)
        src = json.loads(meta.read_text())["source"]
        if src.get("base") and src["base"] != str(path):
            folder, gguf = llm_folder(src["base"], src.get("gguf_file"), "text encoder base")
            if gguf:
                parts["base/" + gguf] = _file_digest(Path(folder) / gguf)
            else:
                add_folder("base", Path(folder))
        for i, adapter in enumerate(src.get("adapters", [])):
            add_folder(f"adapter{i}", Path(resolve_model_path(adapter, "LoRA adapter")))
    else:
        folder, gguf = llm_folder(str(path), what="text encoder")
        if gguf:
            parts["base/" + gguf] = _file_digest(Path(folder) / gguf)
        elif Path(folder).is_dir():
            add_folder("base", Path(folder))
        else:
            raise InputError(f"text encoder not found: {encoder_path}")
    digest = hashlib.sha256(
        json.dumps({"files": parts, "instruction": instruction}, sort_keys=True).encode()
    ).hexdigest()
    return {"digest": digest, "path": str(encoder_path), "instruction": instruction, "files": len(parts)}


class TextFeatureCache:
    """Read side: memory-mapped features by row, checked against the captions a run needs."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise InputError(
                f"{self.folder} is not a text feature cache (no {MANIFEST}); build it with `l2c stage2 cache`"
            )
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise InputError(
                f"{path}: unknown cache format {self.manifest.get('format')!r} (expected {FORMAT!r})"
            )
        if not self.manifest.get("complete"):
            done = len(self.manifest.get("shards", []))
            raise InputError(
                f"{self.folder}: the cache is incomplete ({done} shards written); run `l2c stage2 cache` again to finish it"
            )
        self._handles = [
            safe_open(str(self.folder / s["file"]), framework="pt") for s in self.manifest["shards"]
        ]
        self._starts = []
        start = 0
        for s in self.manifest["shards"]:
            self._starts.append(start)
            start += s["rows"]
        self._n = start

    def __len__(self) -> int:
        return self._n

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def encoder_digest(self) -> str:
        return self.manifest["encoder"]["digest"]

    def _locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < self._n:
            raise IndexError(f"row {row} is outside the cache ({self._n} rows)")
        lo, hi = 0, len(self._starts) - 1
        while lo < hi:  # last shard whose start <= row
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= row:
                lo = mid
            else:
                hi = mid - 1
        return lo, row - self._starts[lo]

    def feature(self, row: int) -> torch.Tensor:
        """float32 [D] feature of row `row` (unnormalised, as the encoder produced it)."""
        shard, off = self._locate(row)
        return self._handles[shard].get_slice("features")[off : off + 1][0].float()

    def features(self, rows: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.feature(int(r)) for r in rows]) if len(rows) else torch.zeros((0, self.dim))

    def mean_feature(self, max_rows: int = 100_000) -> torch.Tensor:
        """float32 mean feature over the cache (evenly spaced rows when it holds more than `max_rows`)."""
        step = max(1, self._n // max_rows)
        total = torch.zeros(self.dim, dtype=torch.float64)
        rows = list(range(0, self._n, step))
        for lo in range(0, len(rows), 4096):
            total += self.features(rows[lo : lo + 4096]).double().sum(0)
        return (total / len(rows)).float()

    def rows_of(self, captions: Sequence[str], where: str = "") -> torch.Tensor:
        """Cache rows of `captions` found by their keys (sorted-key search: 16 bytes per row, no dict),
        or a InputError naming the first caption with no cached feature."""
        if not hasattr(self, "_sorted"):
            keys = self.keys()
            order = torch.argsort(keys)
            self._sorted, self._order = keys[order], order
        want = caption_keys(captions)
        pos = torch.searchsorted(self._sorted, want).clamp(max=len(self._sorted) - 1)
        found = self._sorted[pos] == want
        if not bool(found.all()):
            i = int((~found).nonzero()[0])
            text = captions[i] if len(captions[i]) <= 60 else captions[i][:57] + "..."
            raise InputError(
                f"{where + ': ' if where else ''}caption {text!r} has no cached feature in {self.folder}; "
                "rebuild the cache for this data: l2c stage2 cache --config ..."
            )
        return self._order[pos]

    def keys(self) -> torch.Tensor:
        return (
            torch.cat([h.get_tensor("keys") for h in self._handles])
            if self._handles
            else torch.zeros(0, dtype=torch.int64)
        )

    def check(
        self,
        captions: Sequence[str],
        *,
        encoder_path: str | os.PathLike | None = None,
        instruction: str | None = None,
        where: str = "",
    ) -> None:
        """Refuse the cache unless it holds exactly `captions` (row by row), made by `encoder_path`
        (if given) with `instruction`. The error names the first caption without its feature."""
        if encoder_path is not None:
            want = encoder_fingerprint(encoder_path, instruction)["digest"]
            if want != self.encoder_digest:
                made = self.manifest["encoder"]
                raise InputError(
                    f"{self.folder} was built by another text encoder or instruction "
                    f"({made.get('path')}, instruction {made.get('instruction')!r}); this run uses {encoder_path} "
                    f"(instruction {instruction!r}). Rebuild it: l2c stage2 cache --config ... (or point cache.dir elsewhere)"
                )
        keys = caption_keys(captions)
        if self.manifest["captions_digest"] == captions_digest(keys):
            return
        have = self.keys()
        for i in range(len(captions)):
            if i >= len(have) or int(have[i]) != int(keys[i]):
                text = captions[i] if len(captions[i]) <= 60 else captions[i][:57] + "..."
                raise InputError(
                    f"{where + ': ' if where else ''}caption {i} ({text!r}) has no cached feature: {self.folder} was "
                    f"built for other captions ({len(have)} rows, this run needs {len(captions)}). "
                    f"Rebuild it: l2c stage2 cache --config ..."
                )
        raise InputError(
            f"{self.folder} holds {len(have)} rows; this run needs {len(captions)} (rebuild the cache)"
        )


def build_cache(
    folder: str | os.PathLike,
    captions: Sequence[str],
    encoder_path: str | os.PathLike,
    *,
    instruction: str | None = None,
    shard_size: int = 8192,
    dtype: str = "float16",
    batch_size: int = 64,
    overwrite: bool = False,
    load_encoder: Callable[[], Any] | None = None,
    progress: bool = True,
    compute_dtype: str = "auto",
    max_length: int | None = None,
) -> TextFeatureCache:
    """Embed `captions` with the encoder at `encoder_path` into a cache at `folder` (resuming a
    partial one made with the same encoder, instruction, captions and layout). ``load_encoder``
    overrides how the encoder is loaded (default: TextEncoder.from_pretrained); it is only called
    when shards remain to be written. ``compute_dtype`` is the dtype the encoder runs in (recorded in
    the manifest: features made in another dtype are neither mixed in on resume nor reused);
    ``max_length`` the token window it was loaded with (None: the encoder's own setting), recorded
    and compared the same way."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not captions:
        raise InputError("no captions to cache")
    for i, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise InputError(f"caption {i} is empty")
    folder = Path(folder)
    keys = caption_keys(captions)
    fp = encoder_fingerprint(encoder_path, instruction)
    wanted = {
        "format": FORMAT,
        "encoder": fp,
        "captions_digest": captions_digest(keys),
        "rows": len(captions),
        "dtype": dtype,
        "shard_size": shard_size,
        "compute_dtype": compute_dtype,
        "max_length": max_length,
    }
    manifest_path = folder / MANIFEST
    manifest: dict[str, Any] | None = (
        json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    )
    if manifest is not None:
        made = manifest | {
            "encoder": manifest.get("encoder", {}).get("digest"),
            "compute_dtype": manifest.get("compute_dtype", "auto"),
            "max_length": manifest.get("max_length"),
        }  # older caches: "auto", the encoder's own window
        differs = [k for k in wanted if made.get(k) != (wanted[k] if k != "encoder" else fp["digest"])]
        if differs and not overwrite:
            raise InputError(
                f"{folder} holds a cache made with other {', '.join(differs)}; it is not reused. "
                f"Pass --overwrite to rebuild it there, or choose another cache.dir"
            )
        if differs:
            for p in folder.glob("shard-*.safetensors"):
                p.unlink()
            manifest = None
    if manifest is None:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = wanted | {"dim": None, "shards": [], "complete": False}
        atomic_write_json(manifest_path, manifest)
    n_shards = -(-len(captions) // shard_size)
    done = len(manifest["shards"])
    if done < n_shards:
        if done:
            logger.info("resuming the cache at shard %d of %d", done + 1, n_shards)
        encoder = load_encoder() if load_encoder else _default_loader(encoder_path)
        for s in tqdm(
            range(done, n_shards),
            desc="text feature cache",
            unit="shard",
            initial=done,
            total=n_shards,
            disable=not progress,
        ):
            lo, hi = s * shard_size, min(len(captions), (s + 1) * shard_size)
            feats = encoder.encode(list(captions[lo:hi]), instruction=instruction, batch_size=batch_size)
            if manifest["dim"] is None:
                manifest["dim"] = int(feats.shape[1])
            elif feats.shape[1] != manifest["dim"]:
                raise InputError(
                    f"shard {s}: feature dimension {feats.shape[1]} differs from the cache's {manifest['dim']}"
                )
            name = f"shard-{s:05d}.safetensors"
            shard = {"features": feats.to(DTYPES[dtype]).contiguous(), "keys": keys[lo:hi].contiguous()}
            atomic_save(folder / name, lambda tmp, shard=shard: save_file(shard, str(tmp)))
            manifest["shards"].append({"file": name, "rows": hi - lo})
            atomic_write_json(manifest_path, manifest)  # the shard counts once the manifest says so
    if not manifest["complete"]:
        manifest["complete"] = True
        atomic_write_json(manifest_path, manifest)
    return TextFeatureCache(folder)


def _default_loader(encoder_path):
    return TextEncoder.from_pretrained(encoder_path)


def pair_captions(pairs) -> list[str]:
    """The stage-2 caption order: short_0, long_0, short_1, long_1, ..., then the rows' other short
    captions (a list under the short key), each distinct caption once (an image's dense caption is
    embedded once however many short ones it has)."""
    out: list[str] = []
    for p in pairs:
        out += [p.short, p.long]
    extra = [c for p in pairs for c in p.more_short]
    if extra:
        out = list(dict.fromkeys(out + extra))
    return out


WEBDATASET_ROWS = (
    "data.max_train_rows reads the first rows of a JSONL/CSV file; with webdataset shards, name fewer "
    "shards in data.train instead"
)


def cache_text_features(cfg, overwrite: bool = False, warn=logger.warning) -> dict:
    """``l2c stage2 cache``: every caption set of a stage-2 config (train; eval_short / eval_long when
    set) embedded once by the frozen encoder (loaded only if a set needs it). A webdataset's bad
    samples are listed in the train cache's bad_samples.json (training leaves them out).
    Returns {set: {rows, dim, shards}}."""
    d, te, c = cfg.data, cfg.text_encoder, cfg.cache
    scan = None
    if d.format == "webdataset":
        if d.max_train_rows is not None:
            raise InputError(WEBDATASET_ROWS)
        scan = scan_shards(
            expand_shards(d.train),
            short_key=d.short_key,
            long_key=d.long_key,
            image_check=d.image_check,
            on_bad_row=d.on_bad_row,
        )
        if scan.bad:  # on_bad_row=skip: training leaves these samples out
            warn(
                f"{len(scan.bad)} bad sample(s) of {scan.samples} skipped "
                f"(listed in {Path(c.dir) / 'train' / 'bad_samples.json'})"
            )
        sets = {"train": scan.captions}
    else:
        pairs = read_caption_pairs(
            d.train,
            None,
            short_key=d.short_key,
            long_key=d.long_key,
            on_bad_row=d.on_bad_row,
            max_rows=d.max_train_rows,
        )
        sets = {"train": pair_captions(pairs)}
    root = d.eval_image_root or "."
    if d.eval_short:
        sets["eval_short"] = read_karpathy(
            d.eval_short, root, split=d.eval_split, image_check="none"
        ).captions
    if d.eval_long:
        sets["eval_long"] = read_long_captions(d.eval_long, root, image_check="none").captions
    hard = None
    if d.eval_long_hard:
        hard = read_long_captions(d.eval_long_hard, root, image_check="none")
        sets["eval_long_hard"] = hard.captions
    encoder = None

    def load():
        nonlocal encoder
        if encoder is None:
            encoder = TextEncoder.from_pretrained(
                te.path, max_length=te.max_length, torch_dtype=te.torch_dtype
            )
        return encoder

    summary = {}
    for name, captions in sets.items():
        cache = build_cache(
            Path(c.dir) / name,
            captions,
            te.path,
            instruction=te.instruction,
            shard_size=c.shard_size,
            dtype=c.dtype,
            batch_size=te.batch_size,
            overwrite=overwrite,
            load_encoder=load,
            compute_dtype=te.torch_dtype,
            max_length=te.max_length,
        )
        summary[name] = {"rows": len(cache), "dim": cache.dim, "shards": len(cache.manifest["shards"])}
        if name == "train" and scan is not None:
            atomic_write_json(cache.folder / "bad_samples.json", scan.bad)
    if hard is not None:
        summary["eval_long_hard"]["llm_window"] = _window_record(
            Path(c.dir) / "eval_long_hard", hard, d.eval_long_hard, te, load, warn
        )
    return summary


def llm_window(
    encoder, captions: Sequence[str], families: Sequence[str], instruction: str | None = None
) -> dict:
    """What `encoder` reads of caption families whose members differ only late (the embedded hard
    long-caption set): the tokens it keeps of each caption (the text as ``encode`` puts it together,
    cut at the encoder's ``max_length``), and the families whose members it keeps the same tokens of,
    their difference cut off. ``first_difference_max``: the latest token at which a family's
    members part, in what the encoder reads (instruction tokens counted)."""
    formatted = [encoder.format_text(c, instruction) for c in captions]
    batch = encoder.tokenize(formatted)
    kept = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    whole = encoder.tokenizer([f.replace(SEPARATOR, "") for f in formatted], verbose=False)["input_ids"]
    window = encoder.settings.max_length
    by_family: dict[str, list[list[int]]] = {}
    for f, ids in zip(families, kept):
        by_family.setdefault(f, []).append(ids)
    alike, parts = [], []
    for f, rows in by_family.items():
        if len(rows) < 2:
            continue
        if len({tuple(r) for r in rows}) == 1:
            alike.append(f)
            continue
        n = 0
        while all(len(r) > n for r in rows) and len({r[n] for r in rows}) == 1:
            n += 1
        parts.append(n)
    return {
        "max_length": window,
        "instruction": instruction,
        "captions": len(captions),
        "captions_cut": sum(len(w) > window for w in whole),
        "tokens_max": max(map(len, whole)) if whole else 0,
        "families": sum(len(r) > 1 for r in by_family.values()),
        "families_read_alike": len(alike),
        "read_alike": alike[:10],
        "first_difference_max": max(parts) if parts else None,
    }


def _window_record(folder: Path, rs, path, te, load, warn) -> dict | None:
    """The LLM window check of the hard set (:func:`llm_window`), kept beside its cache
    (``llm_window.json``; redone when the cache's encoder or instruction, or text_encoder.max_length,
    changed): `l2c stage2 eval` reports it, and families the encoder reads alike are warned of here."""
    families = read_families(path)
    owner = [families.get(rs.image_ids[i]) for i in rs.caption_image]
    if not any(owner):
        return None
    made = {"encoder": TextFeatureCache(folder).encoder_digest, "max_length_setting": te.max_length}
    record = folder / WINDOW
    old = json.loads(record.read_text()) if record.is_file() else {}
    if {k: old.get(k) for k in made} == made:
        return old
    res = made | llm_window(
        load(), rs.captions, [o or f"row {j}" for j, o in enumerate(owner)], te.instruction
    )
    atomic_write_json(record, res)
    if res["families_read_alike"]:
        warn(
            f"{res['families_read_alike']} of {res['families']} families of {path} are read alike by the text "
            f"encoder: its window (max_length {res['max_length']} tokens) ends before their captions differ "
            f"(they hold up to {res['tokens_max']} tokens); LLM2CLIP cannot tell them apart either. Raise "
            "text_encoder.max_length to read them"
        )
    return res
