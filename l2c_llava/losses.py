"""Every loss of the method, in one place (open_clip keeps its losses in loss.py the same way).

- :func:`hard_negative_nll_loss` (stage 1): llm2vec's HardNegativeNLLLoss, in-batch (and
  cross-process) negatives plus hard negatives.
- :func:`clip_loss` (stage 2 and the CLIP baseline): symmetric InfoNCE, open_clip's ClipLoss.
- :func:`supervised_loss` (LLaVA): next-token cross-entropy over the supervised tokens only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from l2c_llava.distributed import (
    all_gather_keep_local_grad,
    all_gather_with_grad,
    is_distributed,
    rank_offset,
)

IGNORE_INDEX = -100  # a label the LLaVA loss skips (image tokens, prompt, padding), as in transformers


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


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    local_loss: bool = True,
    gather_with_grad: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE over image/text pairs (row i of each is a pair), open_clip's ClipLoss: with
    several processes the features of all ranks are the negatives; ``local_loss`` scores only this
    rank's rows against everything (memory O(local x global)); ``gather_with_grad`` lets gradients
    flow into the other ranks' rows too."""
    if is_distributed():
        gather = all_gather_with_grad if gather_with_grad else all_gather_keep_local_grad
        all_image, all_text = gather(image), gather(text)
        if local_loss:
            lo, _ = rank_offset(image.shape[0], image.device)
            logits_image = logit_scale * image @ all_text.T
            logits_text = logit_scale * text @ all_image.T
            labels = torch.arange(image.shape[0], device=image.device) + lo
        else:
            logits_image = logit_scale * all_image @ all_text.T
            logits_text = logits_image.T
            labels = torch.arange(all_image.shape[0], device=image.device)
    else:
        logits_image = logit_scale * image @ text.T
        logits_text = logits_image.T
        labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits_image.float(), labels) + F.cross_entropy(logits_text.float(), labels)) / 2


@functools.cache
def _mask_slicing() -> bool:
    """Whether this transformers slices hidden states with a boolean ``logits_to_keep`` mask (the
    LM head then runs on the kept positions only); older 5.x releases keep all of them."""
    try:
        from transformers.models.llava.modeling_llava import slice_logits_to_keep
    except ImportError:
        return False
    keep = torch.tensor([[True, False, False], [False, True, True]])
    try:
        return tuple(slice_logits_to_keep(torch.zeros(2, 3, 1), keep).shape) == (3, 1)
    except Exception:  # noqa: BLE001 - any failure means: not supported, use the full logits
        return False


def supervised_loss(model, batch: dict, only_supervised: bool = True, **forward) -> torch.Tensor:
    """Next-token cross-entropy, the mean over the supervised tokens: transformers' causal-LM loss.

    With ``only_supervised`` the LM head (and the float32 logits of the loss) runs only on the
    positions whose next token carries a label: a LLaVA row supervises its caption or answers, not
    its 576 image tokens, prompt and padding, so most of the vocabulary projection is skipped
    (``bench/llava_step.py`` measures it). NaN when no token is supervised, as transformers gives.
    ``forward`` goes to the model's forward as is (``use_cache=False`` for packed rows)."""
    labels = batch["labels"]
    if not (only_supervised and _mask_slicing()):
        return model(**batch, **forward).loss
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, **forward, logits_to_keep=keep).logits  # (kept positions, vocab)
    return torch.nn.functional.cross_entropy(
        logits.float(), labels[:, 1:][keep[:, :-1]], ignore_index=IGNORE_INDEX
    )
