"""Uncertainty for every figure the toolkit reports: intervals on proportions and recalls, paired tests
between two models on the same items.

- accuracies (one hit per question): a 95% Wilson score interval; two models on the same questions:
  McNemar's exact test on the questions only one of them gets right (``paired_comparison``);
- retrieval R@K: a 95% interval and a paired test by bootstrap over the test images (the unit that
  was sampled: an image and all its captions are drawn together, so the five captions of one image
  do not count as five independent points), with the same resamples for both models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Z95 = 1.959964


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial (sign) test of ``wins`` against ``losses`` at p = 1/2 (McNemar's exact
    test on the discordant pairs), in log space so that thousands of pairs do not overflow."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    log_half_n = n * math.log(0.5)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n for i in range(k + 1)
    ]
    top = max(terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in terms)
    return min(1.0, 2 * tail)


def paired_comparison(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Two answer sets on the same questions: the accuracy gain of ``a`` over ``b`` and McNemar's
    exact test on the questions only one of them gets right (``wins``: ``a`` only, ``losses``:
    ``b`` only). ``p_value`` is two-sided: how likely a split at least this uneven is when neither
    is better."""
    if len(a) != len(b):
        raise ValueError(
            f"paired comparison of {len(a)} and {len(b)} answers: they must be the same questions"
        )
    wins = sum(bool(x) and not y for x, y in zip(a, b))
    losses = sum(bool(y) and not x for x, y in zip(a, b))
    return {
        "gain": round((sum(map(bool, a)) - sum(map(bool, b))) / max(1, len(a)), 4),
        "wins": wins,
        "losses": losses,
        "p_value": round(sign_test_p(wins, losses), 6),
    }


# ---------------------------------------------------------------------------------------------
# retrieval: ranks, recall with a bootstrap interval, paired bootstrap test
# ---------------------------------------------------------------------------------------------


def _blocks(lo: int, hi: int, width: int) -> list[tuple[int, int]]:
    return [(a, min(a + width, hi)) for a in range(lo, hi, width)]


def retrieval_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: Sequence[int],
    chunk: int = 512,
    text_chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t_rank [I], t2i_rank [T]): for each image the rank of its best-scored own caption, for each
    caption the rank of its image (0 = top; only strictly higher scores count against it). Embeddings are compared by
    dot product: normalise them first for cosine.

    One pass over the similarity matrix, block by block (`chunk` images x `text_chunk` captions, 8 MB:
    a block that stays in the CPU's cache while both directions count in it, and few enough blocks
    that two threads on a shared machine do not wait on each other at every small operator; on one
    thread 512 x 4096 costs what 256 x 2048 does, on a busy machine 4.6x less), each score computed once:
    the captions are taken in image order, so an image block's own captions form one diagonal block;
    the diagonal blocks are computed first (they give every caption's own score and every image's best
    own one), kept, and reused in the counting pass."""
    img, txt = image_emb.float().contiguous(), text_emb.float()
    owner = torch.as_tensor(list(text_image), dtype=torch.long)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if owner.numel() != n_txt:
        raise ValueError(f"text_image has {owner.numel()} entries for {n_txt} captions")
    if n_txt and not (0 <= int(owner.min()) and int(owner.max()) < n_img):
        bad = int(((owner < 0) | (owner >= n_img)).nonzero()[0])
        raise ValueError(f"caption {bad} names image {int(owner[bad])}; there are {n_img} images")
    perm = torch.argsort(owner, stable=True)  # captions in image order
    txt, owner = txt[perm].contiguous(), owner[perm]
    image_blocks = _blocks(0, n_img, chunk)
    edges = torch.searchsorted(owner, torch.tensor([lo for lo, _ in image_blocks] + [n_img])).tolist()
    best = torch.full((n_img,), float("-inf"))  # each image's best own caption score
    own = torch.empty(n_txt)  # each caption's score with its image
    diagonal = []
    for (lo, hi), a, b in zip(image_blocks, edges, edges[1:]):
        sim = img[lo:hi] @ txt[a:b].T
        rows = owner[a:b] - lo
        own[a:b] = sim[rows, torch.arange(b - a)]
        best[lo:hi].scatter_reduce_(0, rows, own[a:b], "amax")
        diagonal.append(sim)
    i2t = torch.zeros(n_img, dtype=torch.long)
    t2i = torch.zeros(n_txt, dtype=torch.long)
    for (lo, hi), a, b, diag in zip(image_blocks, edges, edges[1:], diagonal):
        for t0, t1, kept in [
            *((t0, t1, None) for t0, t1 in _blocks(0, a, text_chunk)),
            (a, b, diag),
            *((t0, t1, None) for t0, t1 in _blocks(b, n_txt, text_chunk)),
        ]:
            sim = kept if kept is not None else img[lo:hi] @ txt[t0:t1].T
            i2t[lo:hi] += (sim > best[lo:hi, None]).sum(dim=1)
            t2i[t0:t1] += (sim > own[None, t0:t1]).sum(dim=0)
    return i2t, t2i[torch.argsort(perm)]


def retrieval_ranks_ties_in_order(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`retrieval_ranks` with ties broken by position, as a stable sort ranks them: an equal score
    of an earlier item counts against the query too. For sets built to tie: the hard long-caption set,
    where a 77-token tower gives a family's captions the same features, and ties counted for the query
    would let every image of the family find "its" caption first. One [I, T] product (small sets)."""
    img, txt = image_emb.float(), text_emb.float()
    owner = torch.as_tensor(list(text_image), dtype=torch.long)
    if owner.numel() != txt.shape[0]:
        raise ValueError(f"text_image has {owner.numel()} entries for {txt.shape[0]} captions")
    sim = img @ txt.T  # [I, T]
    n_img, n_txt = sim.shape
    mine = owner.unsqueeze(0) == torch.arange(n_img).unsqueeze(1)
    own_scores = sim.masked_fill(~mine, float("-inf"))
    best = own_scores.max(dim=1).values
    first = (own_scores == best.unsqueeze(1)).float().argmax(dim=1)  # the earliest best own caption
    before = torch.arange(n_txt).unsqueeze(0) < first.unsqueeze(1)
    i2t = (sim > best.unsqueeze(1)).sum(dim=1) + ((sim == best.unsqueeze(1)) & before & ~mine).sum(dim=1)
    col = sim.T  # [T, I]
    own = col.gather(1, owner.unsqueeze(1))
    earlier = torch.arange(n_img).unsqueeze(0) < owner.unsqueeze(1)
    t2i = (col > own).sum(dim=1) + ((col == own) & earlier).sum(dim=1)
    return i2t, t2i


def _image_resamples(n_images: int, n_boot: int, seed: int) -> torch.Tensor:
    """[n_boot, n_images] counts: how often each image is drawn in each bootstrap resample."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_images, (n_boot, n_images), generator=g)
    return torch.zeros(n_boot, n_images).scatter_add_(1, draws, torch.ones(n_boot, n_images))


def _recall_samples(
    i2t: torch.Tensor, t2i: torch.Tensor, owner: torch.Tensor, k: int, weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    """R@K in each resample (weights [B, I]): image queries weighted by their draw count, caption
    queries by their image's."""
    n_img = i2t.shape[0]
    hits_img = (i2t < k).float()
    per_image_t2i = torch.zeros(n_img).index_add_(0, owner, (t2i < k).float())
    captions_per_image = torch.bincount(owner, minlength=n_img).float()
    return {
        f"i2t_R@{k}": weights @ hits_img / weights.sum(1),
        f"t2i_R@{k}": weights @ per_image_t2i / (weights @ captions_per_image).clamp_min(1),
    }


def recall_with_ci(
    i2t: torch.Tensor,
    t2i: torch.Tensor,
    text_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """{metric: {"value", "ci95": [lo, hi]}} for i2t / t2i R@K, the interval a percentile bootstrap
    over images."""
    owner = torch.as_tensor(list(text_image), dtype=torch.long)
    weights = _image_resamples(i2t.shape[0], n_boot, seed)
    out = {}
    for k in ks:
        point = _recall_samples(i2t, t2i, owner, k, torch.ones(1, i2t.shape[0]))
        for name, samples in _recall_samples(i2t, t2i, owner, k, weights).items():
            lo, hi = torch.quantile(samples, torch.tensor([0.025, 0.975])).tolist()
            out[name] = {"value": round(point[name].item(), 4), "ci95": [round(lo, 4), round(hi, 4)]}
    return out


def paired_recall_test(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    text_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict]:
    """Model a against model b on the same images and captions ((i2t, t2i) ranks of each): for every
    R@K the difference a - b, its 95% paired-bootstrap interval (the same image resamples for both),
    and a two-sided p-value (twice the share of resamples on the far side of zero, at least 1/n_boot)."""
    owner = torch.as_tensor(list(text_image), dtype=torch.long)
    if a[0].shape != b[0].shape or a[1].shape != b[1].shape:
        raise ValueError("paired retrieval test: both models must be ranked on the same images and captions")
    weights = _image_resamples(a[0].shape[0], n_boot, seed)
    ones = torch.ones(1, a[0].shape[0])
    out = {}
    for k in ks:
        pa, pb = _recall_samples(*a, owner, k, ones), _recall_samples(*b, owner, k, ones)
        sa, sb = _recall_samples(*a, owner, k, weights), _recall_samples(*b, owner, k, weights)
        for name in sa:
            diff = sa[name] - sb[name]
            lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975])).tolist()
            far = min((diff <= 0).float().mean().item(), (diff >= 0).float().mean().item())
            out[name] = {
                "diff": round((pa[name] - pb[name]).item(), 4),
                "ci95": [round(lo, 4), round(hi, 4)],
                "p_value": round(max(min(1.0, 2 * far), 1 / n_boot), 6),
            }
    return out
