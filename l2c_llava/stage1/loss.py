"""llm2vec's HardNegativeNLLLoss: in-batch (and cross-process) negatives plus hard negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from l2c_llava.distributed import all_gather_with_grad


def cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, d] x [m, d] -> [n, m] cosine similarities."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def hard_negative_nll_loss(
    q: torch.Tensor,
    d_pos: torch.Tensor,
    d_neg: torch.Tensor | None = None,
    scale: float = 50.0,
    gather: bool = True,
) -> torch.Tensor:
    """Cross-entropy of each query over [all positives; all hard negatives], its own positive the
    target. q, d_pos: [B, D]; d_neg: [B', D] or None. With ``gather`` and several processes the
    features of every process take part (with gradient), as in llm2vec; the loss is then that of the
    global batch on every rank."""
    if d_neg is None:
        d_neg = d_pos[:0]
    if gather:
        q, d_pos, d_neg = all_gather_with_grad(q), all_gather_with_grad(d_pos), all_gather_with_grad(d_neg)
    docs = torch.cat([d_pos, d_neg], dim=0)
    scores = cos_sim(q, docs) * scale
    labels = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(scores.float(), labels)
