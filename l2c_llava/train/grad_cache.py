"""Gradient-cache accumulation (GradCache, Gao et al. 2021; open_clip's ``accum_freq``): the gradients of
a contrastive loss over a whole batch, computed one micro-batch of activations at a time. Stage 1,
stage 2 and the CLIP baseline accumulate through it (``train.contrastive_accum``)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def contrastive_accumulate(
    embed: Callable,
    batches: list,
    loss_fn: Callable,
    backward: Callable | None = None,
    shared: tuple[int, ...] = (2,),
) -> tuple[float, int]:
    """One optimizer step's gradients over several micro-batches with the loss of the whole batch
    (every row a negative of every other), in two passes as GradCache (Gao et al. 2021) and open_clip's
    ``accum_freq`` do:

    1. embed every micro-batch without gradient (keeping the random state of each);
    2. the loss on the concatenated features, backward to the features only;
    3. embed each micro-batch again with gradient (same random state, so the same features) and
       backpropagate the cached feature gradients through it.

    `embed(batch)` returns a tuple of tensors: per-row features (concatenated over the micro-batches;
    e.g. image and text features in stage 2, queries, positives and hard negatives in stage 1) and,
    at the positions in `shared`, values common to every micro-batch (the CLIP logit scale: its
    gradient is counted once). `loss_fn(*tensors) -> loss`. The gradients equal those of one pass over
    the whole batch; memory is one micro-batch's activations plus the features. Returns (loss, rows
    of the first per-row tensor)."""
    backward = backward or (lambda t: t.backward())
    states, outs = [], []
    with torch.no_grad():
        for b in batches:
            states.append(_rng_state())
            outs.append([x.detach() for x in embed(b)])
    width = len(outs[0])
    full = [
        (outs[0][j].clone() if j in shared else torch.cat([o[j] for o in outs])).requires_grad_()
        for j in range(width)
    ]
    loss = loss_fn(*full)
    grads = torch.autograd.grad(loss, full, allow_unused=True)
    after = _rng_state()
    offsets = [0] * width
    for m, (b, st) in enumerate(zip(batches, states)):
        _set_rng_state(st)
        surrogate = None
        for j, x in enumerate(embed(b)):
            g = grads[j]
            if j in shared:
                part = (x.float() * g).sum() if (m == 0 and g is not None) else None
            else:
                n = x.shape[0]
                part = (x.float() * g[offsets[j] : offsets[j] + n]).sum() if g is not None and n else None
                offsets[j] += n
            if part is not None:
                surrogate = part if surrogate is None else surrogate + part
        if surrogate is not None:
            backward(surrogate)
    _set_rng_state(after)
    first = next(j for j in range(width) if j not in shared)
    return loss.item(), offsets[first]
