"""Caption retrieval accuracy (CRA, the LLM2CLIP paper's measure of a caption encoder) and
short <-> long caption retrieval.

CRA: on a Karpathy-style test split, the first two captions of each image are mutual positives; every
caption retrieves its top-1 neighbour by cosine among all the others; correct when that neighbour
belongs to the same image. short->long (long->short): every short (dense) caption of the held-out
pairs retrieves among all dense (short) captions; correct when it finds its own image's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from l2c_llava.data.readers import CaptionPair, RetrievalSet
from l2c_llava.errors import InputError


def top1_accuracy(
    queries: torch.Tensor,
    docs: torch.Tensor,
    query_group: Sequence[int],
    doc_group: Sequence[int],
    exclude_self: bool = False,
) -> float:
    """Share of queries whose most similar doc (cosine) has the query's group."""
    q, d = F.normalize(queries.float(), dim=-1), F.normalize(docs.float(), dim=-1)
    sim = q @ d.T
    if exclude_self:
        sim.fill_diagonal_(float("-inf"))
    best = sim.argmax(dim=1)
    dg = torch.as_tensor(list(doc_group))
    qg = torch.as_tensor(list(query_group))
    return float((dg[best] == qg).float().mean())


def cra_captions(test: RetrievalSet, max_images: int | None = None) -> tuple[list[str], list[int]]:
    """The first two captions of each image (images with fewer are skipped)."""
    texts, groups = [], []
    for i in range(len(test.images) if max_images is None else min(max_images, len(test.images))):
        caps = test.captions_of(i)
        if len(caps) >= 2:
            texts += caps[:2]
            groups += [i, i]
    if len(groups) < 4:
        raise InputError(f"{test.source}: CRA needs at least two images with two captions each")
    return texts, groups


def evaluate_caption_retrieval(
    encoder,
    test: RetrievalSet | None,
    pairs: Sequence[CaptionPair] | None,
    short_to_long: str | None,
    long_to_short: str | None,
    batch_size: int = 32,
    max_images: int | None = None,
    desc: str | None = None,
) -> dict[str, float]:
    """CRA (no instruction: both sides are captions of the same kind) and, with held-out pairs,
    short->long / long->short top-1 (queries carry the instruction of their direction, as trained).
    `desc`: one progress bar over every text encoded, under that name (none without)."""
    from tqdm.auto import tqdm

    texts, groups = cra_captions(test, max_images) if test is not None else ([], [])
    pairs = (list(pairs)[:max_images] if max_images else list(pairs)) if pairs else []
    total = len(texts) + len(pairs) * (2 + bool(short_to_long) + bool(long_to_short))
    bar = tqdm(total=total, desc=desc, unit="text", disable=desc is None or not total)

    def enc(t: list[str], instruction: str | None = None) -> torch.Tensor:
        return encoder.encode(t, instruction=instruction, batch_size=batch_size, progress=bar)

    out: dict[str, float] = {}
    try:
        if test is not None:
            emb = enc(texts)
            out["cra"] = top1_accuracy(emb, emb, groups, groups, exclude_self=True)
            out["cra_captions"] = len(texts)
        if pairs:
            shorts, longs = [p.short for p in pairs], [p.long for p in pairs]
            ids = list(range(len(pairs)))
            long_docs, short_docs = enc(longs), enc(shorts)
            short_q = enc(shorts, short_to_long) if short_to_long else short_docs
            long_q = enc(longs, long_to_short) if long_to_short else long_docs
            out["short_to_long_top1"] = top1_accuracy(short_q, long_docs, ids, ids)
            out["long_to_short_top1"] = top1_accuracy(long_q, short_docs, ids, ids)
            out["pairs"] = len(pairs)
    finally:
        bar.close()
    return out
