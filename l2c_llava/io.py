"""Atomic file writes and small JSON helpers shared by every stage.

Every file a run writes goes through these helpers: the content lands in a temporary file in the
same folder, is flushed and fsynced, then `os.replace`d over the target, so a killed process leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Deterministic JSON text (sorted keys are NOT forced: callers control field order)."""
    return json.dumps(obj, ensure_ascii=False, indent=indent) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, dumps_json(obj, indent=indent))


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_results(folders: Iterable[tuple[str | os.PathLike, str]], obj: Any, markdown: str) -> None:
    """`obj` as STEM.json and `markdown` as STEM.md in each (folder, stem), atomically."""
    for folder, stem in folders:
        atomic_write_json(Path(folder) / f"{stem}.json", obj)
        atomic_write_text(Path(folder) / f"{stem}.md", markdown)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_digest(root: str | os.PathLike, exclude: Iterable[str] = ()) -> str:
    """One sha256 over every file under `root` (relative path + content), in sorted order.

    Used as the fingerprint of a data folder: equal digests mean byte-identical trees.
    """
    root = Path(root)
    skip = set(exclude)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel in skip:
            continue
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
        h.update(b"\n")
    return h.hexdigest()


def publish_folder(out: str | os.PathLike, build) -> Path:
    """Build a folder in a temporary sibling (``build(tmp)`` writes and checks it), then move it into
    place, replacing `out`: a failed or killed build leaves the previous folder untouched."""
    import shutil
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
