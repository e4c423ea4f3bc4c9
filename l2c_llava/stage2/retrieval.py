"""Image <-> text retrieval recall@K (Flickr30k / COCO Karpathy protocol, long-caption sets alike)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: Sequence[int],
                ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:  # fmt: skip
    """image_emb [I, D], text_emb [T, D] (compared by dot product: normalise them first for cosine);
    text_image[j] = the image of caption j. image->text: an image is a hit at K when any of its
    captions ranks in the top K; text->image: a caption is a hit when its image ranks in the top K.
    Ties count in the query's favour only if strictly nothing scores higher. Computed in chunks."""
    img, txt = image_emb.float(), text_emb.float()
    owner = torch.as_tensor(list(text_image), dtype=torch.long)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if owner.numel() != n_txt:
        raise ValueError(f"text_image has {owner.numel()} entries for {n_txt} captions")
    i2t_rank = torch.empty(n_img, dtype=torch.long)
    for lo in range(0, n_img, chunk):
        sim = img[lo : lo + chunk] @ txt.T  # [c, T]
        mine = owner.unsqueeze(0) == torch.arange(lo, lo + sim.shape[0]).unsqueeze(1)
        best = sim.masked_fill(~mine, float("-inf")).max(dim=1).values  # best-scored correct caption
        i2t_rank[lo : lo + sim.shape[0]] = (sim > best.unsqueeze(1)).sum(dim=1)
    t2i_rank = torch.empty(n_txt, dtype=torch.long)
    for lo in range(0, n_txt, chunk):
        sim = txt[lo : lo + chunk] @ img.T  # [c, I]
        own = sim.gather(1, owner[lo : lo + sim.shape[0]].unsqueeze(1))
        t2i_rank[lo : lo + sim.shape[0]] = (sim > own).sum(dim=1)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t_rank < k).float().mean())
        out[f"t2i_R@{k}"] = float((t2i_rank < k).float().mean())
    return out
