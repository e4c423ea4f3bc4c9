"""Collectives for contrastive losses: features of every process, gradients flowing back.

``all_gather_with_grad`` is what llm2vec's ``mismatched_sizes_all_gather`` and open_clip's
``gather_features(gather_with_grad=True)`` do: every rank sees the whole global batch, and the
backward pass returns to each rank the gradient of its own rows. Ranks may hold different numbers of
rows (the last batch of an epoch): they are padded for the collective and trimmed after.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_offset(n: int, device=None) -> tuple[int, int]:
    """(rows on the ranks before this one, rows on all ranks) for a local batch of `n` rows."""
    if not is_distributed():
        return 0, n
    sizes = _sizes(torch.tensor([n], device=device, dtype=torch.long))
    r = dist.get_rank()
    return sum(sizes[:r]), sum(sizes)


def _sizes(n: torch.Tensor) -> list[int]:
    out = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(out, n)
    return [int(s.item()) for s in out]


def all_gather_keep_local_grad(t: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_with_grad`, but the other ranks' rows come without gradient (open_clip's
    ``gather_with_grad=False``): cheaper, each rank's gradient flows through its own rows only."""
    if not is_distributed():
        return t
    with torch.no_grad():
        gathered = all_gather_with_grad(t.detach())
    lo, _ = rank_offset(t.shape[0], t.device)
    return torch.cat([gathered[:lo], t, gathered[lo + t.shape[0] :]])


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """[n_rank, ...] on each rank -> [sum n_rank, ...] in rank order; identity on one process."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    sizes = _sizes(torch.tensor([t.shape[0]], device=t.device, dtype=torch.long))
    longest = max(sizes)
    if t.shape[0] < longest:
        t = torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    parts = all_gather(t)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])
