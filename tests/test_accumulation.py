"""Contrastive gradient accumulation (GradCache): k micro-batches give the gradients of the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from l2c_llava.losses import clip_loss
from l2c_llava.train.grad_cache import contrastive_accumulate


class Dual(torch.nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.vis = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(32, 8)
        )
        self.txt = torch.nn.Linear(12, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, batch):
        x, y = batch
        return F.normalize(self.vis(x), dim=-1), F.normalize(self.txt(y), dim=-1), self.logit_scale.exp()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def data(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 16, generator=g), torch.randn(n, 12, generator=g)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_accumulated_gradients_equal_the_whole_batch(k):
    x, y = data()
    full = Dual()
    loss = clip_loss(*full((x, y)))
    loss.backward()
    acc = Dual()
    micro = list(zip(x.chunk(k), y.chunk(k)))
    acc_loss, rows = contrastive_accumulate(acc, micro, clip_loss)
    assert rows == 12 and acc_loss == pytest.approx(loss.item(), rel=1e-6)
    want, got = grads(full), grads(acc)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    # independent micro-batches (plain accumulation) see fewer negatives: different gradients
    plain = Dual()
    for b in micro:
        (clip_loss(*plain(b)) / k).backward()
    assert not torch.allclose(grads(plain)["vis.0.weight"], want["vis.0.weight"], atol=1e-6)


def test_dropout_masks_are_replayed_in_the_second_pass():
    x, y = data()
    micro = list(zip(x.chunk(3), y.chunk(3)))
    acc = Dual(dropout=0.5)
    torch.manual_seed(5)
    contrastive_accumulate(acc, micro, clip_loss)
    # reference: the same masks (same random stream, micro-batch after micro-batch), one backward
    ref = Dual(dropout=0.5)
    torch.manual_seed(5)
    feats = [ref(b) for b in micro]
    img, txt = torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats])
    clip_loss(img, txt, feats[0][2]).backward()
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(acc)[name], g, rtol=1e-5, atol=1e-6)


def test_stage1_style_features_queries_positives_and_hard_negatives():
    """Stage 1's loss (queries against every positive and hard negative of the whole batch): the same
    equality with three per-row tensors and nothing shared."""
    from l2c_llava.losses import hard_negative_nll_loss

    g = torch.Generator().manual_seed(3)
    q, p, n = (torch.randn(12, 10, generator=g) for _ in range(3))

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))

    def loss_fn(a, b, c):
        return hard_negative_nll_loss(a, b, c if c.shape[0] else None, scale=20.0, gather=False)

    full = make()
    loss = loss_fn(full(q), full(p), full(n))
    loss.backward()
    acc = make()
    micro = list(zip(q.chunk(3), p.chunk(3), n.chunk(3)))
    got, rows = contrastive_accumulate(lambda b: tuple(acc(x) for x in b), micro, loss_fn, shared=())
    assert rows == 12 and got == pytest.approx(loss.item(), rel=1e-6)
    for (name, a), (_, b) in zip(full.named_parameters(), acc.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    # without hard negatives (an empty third tensor)
    empty = make()
    got, _ = contrastive_accumulate(
        lambda b: (empty(b[0]), empty(b[1]), empty(b[1])[:0]), micro, loss_fn, shared=()
    )
    assert got == pytest.approx(loss_fn(make()(q), make()(p), torch.empty(0, 8)).item(), rel=1e-6)
