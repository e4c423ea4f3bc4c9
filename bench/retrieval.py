"""Retrieval evaluation at Flickr/COCO-test size: 5K images x 25K captions (5 per image), dim 256.

Times our ``recall_at_k`` (image->text and text->image R@1/5/10: one blocked pass over the similarity
matrix, both directions counted in each block) against one matrix product of the same size
([5K x 256] @ [256 x 25K]), the floor of any exact evaluation. Side by side, alternating, median of
the repeats. Target: at most 2x the product.
"""

from __future__ import annotations

import statistics
import time

import torch


def run(images: int = 5000, per_image: int = 5, dim: int = 256, repeats: int = 5) -> dict:
    from l2c_llava.stage2.retrieval import recall_at_k

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(images, dim, generator=g), dim=-1)
    owner = torch.arange(images).repeat_interleave(per_image)
    txt = torch.nn.functional.normalize(img[owner] + 0.9 * torch.randn(len(owner), dim, generator=g), dim=-1)
    t_eval, t_mm = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = recall_at_k(img, txt, owner.tolist())
        t_eval.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sim = img @ txt.T
        t_mm.append(time.perf_counter() - t0)
        del sim
    e, m = statistics.median(t_eval), statistics.median(t_mm)
    return {
        "images": images,
        "captions": len(owner),
        "dim": dim,
        "recall_at_k_s": round(e, 3),
        "one_matmul_s": round(m, 3),
        "ratio": round(e / m, 2),
        "recalls": {k: round(v, 4) for k, v in r.items()},
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
