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


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """[n_rank, ...] on each rank -> [sum n_rank, ...] in rank order; identity on one process."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    if t.shape[0] < longest:
        t = torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    parts = all_gather(t)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])
