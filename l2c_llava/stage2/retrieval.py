"""Image <-> text retrieval recall@K (Flickr30k / COCO Karpathy protocol, long-caption sets alike)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from l2c_llava.stats import retrieval_ranks


def recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 512,
) -> dict[str, float]:
    """image_emb [I, D], text_emb [T, D] (compared by dot product: normalise them first for cosine);
    text_image[j] = the image of caption j. image->text: an image is a hit at K when any of its
    captions ranks in the top K; text->image: a caption is a hit when its image ranks in the top K.
    Ties count in the query's favour only if strictly nothing scores higher. Computed in blocks
    of `chunk` images (:func:`l2c_llava.stats.retrieval_ranks`)."""
    i2t_rank, t2i_rank = retrieval_ranks(image_emb, text_emb, text_image, chunk)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t_rank < k).float().mean())
        out[f"t2i_R@{k}"] = float((t2i_rank < k).float().mean())
    return out
