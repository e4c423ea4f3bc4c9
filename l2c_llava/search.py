"""Encoder-vs-encoder similarity search (``l2c search index`` / ``l2c search query``), with faiss.

An index folder holds, for one image folder and one encoder:

- ``index.json``: the encoder that made it (kind, path, sha256 of its weights and config), the
  dimension, the faiss index kind and its parameters, the image root, the measured recall of an
  approximate index against exact search, the images skipped as unreadable;
- ``items.json``: one entry per indexed image (path relative to the root, size, mtime);
- ``embeddings.safetensors``: the L2-normalised image embeddings (float32), the source of truth;
- ``index.faiss`` (approximate kinds): the IVF / HNSW index built from them.

Search is by inner product of normalised embeddings (cosine). ``flat`` (exact, the default) is a faiss
``IndexFlatIP``; ``ivf`` (``IndexIVFFlat``, ``nlist`` cells, ``nprobe`` searched) and ``hnsw``
(``IndexHNSWFlat``, ``M`` links, ``efSearch``) are for large collections. Re-indexing the same folder
embeds only new or changed files; removed files drop out. The index refuses vectors from any other
encoder than the one recorded (the embedding spaces of two encoders are not comparable).

Encoders: an LLM2CLIP model (``l2c export llm2clip``, a released checkpoint folder or a stage-2 run),
queried by text through its LLM text encoder + adapter; or a CLIP model folder (OpenAI CLIP, the demo
baseline) through its own text tower. Queries by image go through the image side of either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from l2c_llava.data.images import ImageError, load_rgb
from l2c_llava.errors import L2CError
from l2c_llava.io import (
    atomic_save,
    atomic_write_json,
    check_output_folder,
    output_problem,
    publish_folder,
    sha256_file,
)
from l2c_llava.stage2.evaluate import BaselineCLIP
from l2c_llava.stage2.llm2clip import LLM2CLIP

logger = logging.getLogger("l2c_llava.search")

FORMAT = "l2c-llava search v1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KINDS = ("flat", "ivf", "hnsw")

INDEX_KIND = "search index"


class SearchError(L2CError, ValueError):
    """A bad index, encoder or query; the message names it and says what to do."""


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise SearchError(
            f"faiss is not installed ({e}); install the search extra: pip install -e '.[search]' "
            "(bash scripts/setup_env.sh does)"
        ) from None
    return faiss


# -- encoders --------------------------------------------------------------------------------------


def _weights_digest(folder: Path) -> str:
    """sha256 over the folder's config.json and weight files (names and contents)."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix == ".safetensors" or p.name in ("config.json", "llm2clip_config.json")
    )
    if not any(p.suffix == ".safetensors" for p in files):
        raise SearchError(f"{folder}: no *.safetensors weights")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def model_kind(path: str | os.PathLike) -> tuple[str, Path]:
    """("llm2clip" | "clip", the folder holding the weights) of an encoder path."""
    folder = Path(path)
    for candidate in (folder, folder / "model"):
        if (candidate / "llm2clip_config.json").is_file():
            return "llm2clip", candidate
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SearchError(
            f"encoder {folder}: no config.json; give an LLM2CLIP model (l2c export llm2clip, a "
            "stage-2 run) or a CLIP model folder"
        )
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "clip":
        raise SearchError(
            f"encoder {config_path}: model_type {config.get('model_type')!r}; a CLIP or LLM2CLIP "
            "model is needed (both have a text and an image side)"
        )
    if "llm2clip" in config or "LLM2CLIPModel" in (config.get("architectures") or []):
        return "llm2clip", folder
    return "clip", folder


class Encoder:
    """Both sides of a CLIP-like model, giving L2-normalised float32 embeddings."""

    def __init__(
        self, path: str | os.PathLike, text_encoder: str | os.PathLike | None = None, batch_size: int = 32
    ):
        self.kind, self.folder = model_kind(path)
        self.path = str(Path(path).resolve())
        self.batch_size = batch_size
        if self.kind == "llm2clip":
            self.model = LLM2CLIP.from_pretrained(self.folder, text_encoder=text_encoder)
        else:
            self.model = BaselineCLIP(self.folder)
        self.digest = _weights_digest(self.folder)

    @property
    def identity(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "digest": self.digest}

    def _image_vectors(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.kind == "llm2clip":
                return self.model.get_image_features(pixels)
            return self.model.embed_images(pixels)

    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> [N, D] normalised."""
        out = []
        for lo in range(0, len(images), self.batch_size):
            pixels = self.model.preprocess(list(images[lo : lo + self.batch_size]))
            out.append(F.normalize(self._image_vectors(pixels).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, 0)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if self.kind == "llm2clip":
            feats = self.model.get_text_features(list(texts), batch_size=self.batch_size)
            return F.normalize(feats.float(), dim=-1)
        return self.model.embed_texts(list(texts), self.batch_size)[0]


# -- the index -------------------------------------------------------------------------------------


def list_images(root: Path) -> list[str]:
    """Image files under `root` (recursive, symlinks leaving the root ignored), relative, sorted."""
    root_resolved = root.resolve()
    out = []
    for p in root.rglob("*"):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            if not p.resolve().is_relative_to(root_resolved):
                logger.warning("%s: leads outside the image root %s; skipped", p, root)
                continue
            out.append(p.relative_to(root).as_posix())
    return sorted(out)


def _stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_faiss(vectors: torch.Tensor, kind: str, params: dict[str, int]):
    faiss = _faiss()
    x = vectors.contiguous().numpy()
    n, dim = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = min(int(params["nlist"]), n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(int(params["nprobe"]), nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, int(params["ef_search"]))
        index.hnsw.efSearch = int(params["ef_search"])
    else:
        raise SearchError(f"index kind {kind!r}: expected one of {', '.join(KINDS)}")
    if n:
        index.add(x)
    return index


def default_params(
    kind: str,
    n: int,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 64,
) -> dict[str, int]:
    if kind == "ivf":
        cells = nlist or max(1, int(round(4 * n**0.5)))
        return {"nlist": cells, "nprobe": nprobe or max(1, cells // 8)}
    if kind == "hnsw":
        return {"hnsw_m": hnsw_m, "ef_search": ef_search}
    return {}


def recall_vs_exact(vectors: torch.Tensor, index, k: int = 10, queries: int = 500, seed: int = 0) -> dict:
    """Mean share of the exact top-k that the index finds, over up to `queries` indexed vectors used
    as queries (each query's own vector included on both sides)."""
    n = vectors.shape[0]
    if n == 0:
        return {"k": k, "queries": 0, "recall": None}
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n, generator=g)[: min(queries, n)]
    q = vectors[pick]
    kk = min(k, n)
    exact = (q @ vectors.T).topk(kk, dim=1).indices
    _, approx = index.search(q.contiguous().numpy(), kk)
    hits = [len(set(a.tolist()) & set(e.tolist())) / kk for a, e in zip(approx, exact)]
    return {"k": kk, "queries": len(hits), "recall": sum(hits) / len(hits)}


@dataclass
class Hit:
    rank: int
    score: float
    path: str  # relative to the image root

    def as_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6), "path": self.path}


class SearchIndex:
    """An index folder, opened for queries."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        meta_path = self.folder / "index.json"
        if not meta_path.is_file():
            raise SearchError(
                f"{self.folder}: not a search index (no index.json); make one with l2c search index"
            )
        reading = meta_path
        try:  # files this tool wrote, read back as carefully as the user's own
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
                got = self.meta.get("format") if isinstance(self.meta, dict) else None
                raise SearchError(f"{meta_path}: format {got!r}, expected {FORMAT!r}")
            reading = self.folder / "items.json"
            self.items: list[dict] = json.loads(reading.read_text(encoding="utf-8"))
            reading = self.folder / "embeddings.safetensors"
            self.vectors = load_file(str(reading))["embeddings"]
        except SearchError:
            raise
        except Exception as e:  # noqa: BLE001 - JSON, UTF-8, safetensors, a missing key: the file is damaged
            raise SearchError(
                f"{reading} cannot be read ({type(e).__name__}: {str(e)[:160]}); the index is damaged: "
                "rebuild it (l2c search index ... --overwrite)"
            ) from None
        for it in self.items:  # every path stays under the image root, as when it was indexed
            rel = it.get("path") if isinstance(it, dict) else None
            parts = Path(rel).parts if isinstance(rel, str) else ()
            if not parts or Path(rel).is_absolute() or ".." in parts:
                raise SearchError(
                    f"{self.folder / 'items.json'}: item {rel!r} is not a path under the image root; the "
                    "index is damaged or was edited: rebuild it (l2c search index ... --overwrite)"
                )
        if self.vectors.shape[0] != len(self.items):
            raise SearchError(
                f"{self.folder}: {self.vectors.shape[0]} embeddings for {len(self.items)} items; "
                "re-run l2c search index"
            )
        kind = self.meta["kind"]
        if kind == "flat":
            self.index = build_faiss(self.vectors, "flat", {})
        else:
            self.index = _faiss().read_index(str(self.folder / "index.faiss"))

    @property
    def encoder(self) -> dict[str, str]:
        return self.meta["encoder"]

    @property
    def image_root(self) -> Path:
        return Path(self.meta["image_root"])

    def __len__(self) -> int:
        return len(self.items)

    def check_encoder(self, identity: dict[str, str]) -> None:
        mine = self.encoder
        if identity.get("digest") != mine["digest"]:
            raise SearchError(
                f"{self.folder} was made by the {mine['kind']} encoder {mine['path']} "
                f"(weights {mine['digest'][:12]}); this query comes from the {identity.get('kind')} "
                f"encoder {identity.get('path')} (weights {str(identity.get('digest'))[:12]}). "
                "Embeddings of two encoders are not comparable: query with the index's own encoder, "
                "or index the images again with this one (another --out)"
            )

    def search(self, queries: torch.Tensor, k: int, encoder: dict[str, str]) -> list[list[Hit]]:
        """Top-k of each (normalised) query vector; `encoder` must be the index's own."""
        self.check_encoder(encoder)
        if queries.shape[-1] != self.vectors.shape[1]:
            raise SearchError(
                f"queries of dimension {queries.shape[-1]}; {self.folder} holds {self.vectors.shape[1]}"
            )
        k = min(k, len(self))
        if k == 0:
            return [[] for _ in range(queries.shape[0])]
        scores, ids = self.index.search(F.normalize(queries.float(), dim=-1).contiguous().numpy(), k)
        return [
            [
                Hit(r + 1, float(s), self.items[i]["path"])
                for r, (s, i) in enumerate(zip(srow, irow))
                if i >= 0
            ]
            for srow, irow in zip(scores, ids)
        ]


def build_index(
    image_root: str | os.PathLike,
    encoder: Encoder,
    out: str | os.PathLike,
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 64,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Index (or update the index of) every image under `image_root`. Returns a summary. `out` is a new
    or empty folder or a previous index (anything else only with `overwrite`), checked before any work."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if kind not in KINDS:
        raise SearchError(f"index kind {kind!r}: expected one of {', '.join(KINDS)}")
    root = Path(image_root)
    if not root.is_dir():
        raise SearchError(f"image folder {root} does not exist")
    out = Path(out)
    check_output_folder(out, INDEX_KIND, overwrite, legacy_marker="index.json")
    if out.resolve() == root.resolve() or root.resolve().is_relative_to(out.resolve()):
        raise SearchError(
            f"--out {out} is the image folder (or holds it); the index needs a folder of its own"
        )
    old_items: dict[str, tuple[dict, torch.Tensor]] = {}
    damaged = output_problem(out) if (out / "index.json").is_file() else None
    if damaged:  # our own index, damaged: embedded again from the images rather than reused
        logger.warning("%s: %s; indexing every image again", out, damaged)
    if (out / "index.json").is_file() and not damaged:
        old = SearchIndex(out)
        if old.encoder["digest"] != encoder.digest:
            raise SearchError(
                f"{out} was made by the encoder {old.encoder['path']} ({old.encoder['digest'][:12]}); "
                f"{encoder.path} is another ({encoder.digest[:12]}). Index into another folder "
                "(--out), or delete this one to rebuild it"
            )
        if Path(old.meta["image_root"]).resolve() != root.resolve():
            raise SearchError(f"{out} indexes {old.meta['image_root']}, not {root}; use another --out")
        old_items = {it["path"]: (it, old.vectors[i]) for i, it in enumerate(old.items)}
    t0 = time.perf_counter()
    paths = list_images(root)
    keep, todo = [], []
    for rel in paths:
        prev = old_items.get(rel)
        stat = _stat(root / rel)
        if prev and prev[0]["size"] == stat["size"] and prev[0]["mtime_ns"] == stat["mtime_ns"]:
            keep.append((prev[0], prev[1]))
        else:
            todo.append({"path": rel, **stat})
    removed = len(set(old_items) - set(paths))
    new_vecs, new_items, skipped = [], [], []
    bs = encoder.batch_size
    for lo in tqdm(range(0, len(todo), bs), desc="embedding images", unit="batch", disable=not progress):
        chunk, images = [], []
        for it in todo[lo : lo + bs]:
            try:
                images.append(load_rgb(root / it["path"]))
                chunk.append(it)
            except ImageError as e:
                skipped.append({"path": it["path"], "error": str(e)})
                logger.warning("%s: %s (skipped)", root / it["path"], e)
        if images:
            new_vecs.append(encoder.embed_images(images))
            new_items.extend(chunk)
    items = [it for it, _ in keep] + new_items
    vec_list = [v for _, v in keep] + ([torch.cat(new_vecs)] if new_vecs else [])
    if not items:
        raise SearchError(f"{root}: no readable image ({len(skipped)} skipped); nothing to index")
    vectors = torch.cat([v.unsqueeze(0) if v.dim() == 1 else v for v in vec_list]).float().contiguous()
    order = sorted(range(len(items)), key=lambda i: items[i]["path"])
    items, vectors = [items[i] for i in order], vectors[order].contiguous()
    params = default_params(kind, len(items), nlist, nprobe, hnsw_m, ef_search)
    index = build_faiss(vectors, kind, params)
    recall = recall_vs_exact(vectors, index) if kind != "flat" else {"recall": 1.0, "exact": True}
    meta = {
        "format": FORMAT,
        "encoder": encoder.identity,
        "dim": int(vectors.shape[1]),
        "metric": "inner_product",
        "normalized": True,
        "kind": kind,
        "params": params,
        "count": len(items),
        "image_root": str(root.resolve()),
        "recall_vs_exact": recall,
        "skipped": skipped,
    }

    def write(tmp: Path) -> None:
        save_file({"embeddings": vectors}, str(tmp / "embeddings.safetensors"), metadata={"format": "pt"})
        (tmp / "items.json").write_text(json.dumps(items) + "\n")
        if kind != "flat":
            _faiss().write_index(index, str(tmp / "index.faiss"))
        atomic_write_json(tmp / "index.json", meta)

    publish_folder(out, write, INDEX_KIND, overwrite, legacy_marker="index.json")
    return {
        "count": len(items),
        "embedded": len(new_items),
        "reused": len(keep),
        "removed": removed,
        "skipped": len(skipped),
        "kind": kind,
        "params": params,
        "recall_vs_exact": recall["recall"],
        "seconds": round(time.perf_counter() - t0, 2),
    }


# -- queries and the contact sheet -----------------------------------------------------------------


def run_queries(
    index: SearchIndex, encoder: Encoder, texts: Sequence[str] = (), images: Sequence[str] = (), k: int = 5
) -> list[dict]:
    """[{"query": ..., "type": "text"|"image", "hits": [Hit]}] for every text, then every image."""
    index.check_encoder(encoder.identity)
    out = []
    if texts:
        for q, hits in zip(texts, index.search(encoder.embed_texts(texts), k, encoder.identity)):
            out.append({"query": q, "type": "text", "hits": hits})
    if images:
        pics = []
        for p in images:
            try:
                pics.append(load_rgb(p))
            except ImageError as e:
                raise SearchError(f"query image {p}: {e}") from None
        for q, hits in zip(images, index.search(encoder.embed_images(pics), k, encoder.identity)):
            out.append({"query": str(q), "type": "image", "hits": hits})
    return out


def contact_sheet(
    panels: list[tuple[str, SearchIndex, list[dict]]], out: str | os.PathLike, thumb: int = 112
) -> Path:
    """A PNG grid: for each query, one row per index (its name, then its top-k thumbnails with the
    rank and score under each); the query itself (text, or the image) in the first column."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    n_queries = len(panels[0][2])
    k = max((len(r["hits"]) for _, _, res in panels for r in res), default=1)
    label_w, pad, text_h = 180, 6, 14
    cell_w, cell_h = thumb + pad, thumb + pad + text_h
    width = label_w + k * cell_w + pad
    height = pad + n_queries * (len(panels) * cell_h + text_h + pad)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for qi in range(n_queries):
        query = panels[0][2][qi]
        head = f"query {qi + 1} ({query['type']}): {query['query']}"
        draw.text((pad, y), head[:160], fill=(0, 0, 0), font=font)
        y += text_h
        for p_i, (name, index, results) in enumerate(panels):
            draw.text((pad, y + 4), name[:28], fill=(0, 0, 120), font=font)
            if query["type"] == "image" and p_i == 0:
                q_img = load_rgb(query["query"]).copy()
                q_img.thumbnail((thumb // 2 + 20, thumb // 2 + 20))
                sheet.paste(q_img, (pad, y + 20))
            for h in results[qi]["hits"]:
                x = label_w + (h.rank - 1) * cell_w
                try:
                    img = load_rgb(index.image_root / h.path).copy()
                    img.thumbnail((thumb, thumb))
                    sheet.paste(img, (x, y))
                except ImageError:
                    draw.rectangle([x, y, x + thumb, y + thumb], outline=(200, 0, 0))
                draw.text((x, y + thumb + 1), f"#{h.rank} {h.score:.4f}", fill=(0, 0, 0), font=font)
            y += cell_h
        y += pad
        draw.line([(0, y - pad // 2), (width, y - pad // 2)], fill=(200, 200, 200))
    return atomic_save(out, sheet.save)


def hits_table(panels: list[tuple[str, SearchIndex, list[dict]]]) -> str:
    """Markdown: per query, rank by rank, each index's hit and score side by side."""
    lines = []
    for qi, query in enumerate(panels[0][2]):
        lines.append(f"query {qi + 1} ({query['type']}): {query['query']}")
        head = ["rank"] + [name for name, _, _ in panels]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        k = max(len(res[qi]["hits"]) for _, _, res in panels)
        for r in range(k):
            cells = []
            for _, _, res in panels:
                hits = res[qi]["hits"]
                cells.append(f"{hits[r].path} ({hits[r].score:.4f})" if r < len(hits) else "")
            lines.append(f"| {r + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def query_indexes(
    index: str | os.PathLike,
    texts: Sequence[str] = (),
    images: Sequence[str] = (),
    k: int = 5,
    compare: Sequence[str] = (),
    encoder: str | None = None,
    text_encoder: str | None = None,
) -> list[tuple[str, SearchIndex, list[dict]]]:
    """``l2c search query``: the same queries on `index` and on each `compare` index, each through the
    encoder it records (`encoder` / `text_encoder` override the first one's). One panel per index:
    (title, index, results)."""
    panels = []
    for i, folder in enumerate([index, *compare]):
        idx = SearchIndex(folder)
        path = (encoder if i == 0 else None) or idx.encoder["path"]
        enc = Encoder(path, text_encoder=text_encoder if i == 0 else None)
        panels.append((f"{enc.kind}: {Path(folder).name}", idx, run_queries(idx, enc, texts, images, k=k)))
    return panels
