from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from l2c_llava.losses import hard_negative_nll_loss
from l2c_llava.stage1.cra import cra_captions, top1_accuracy


def reference_loss(q, p, n, scale):
    """Per query: -log softmax over [cos(q, all positives), cos(q, all negatives)] at its positive."""
    total = 0.0
    docs = list(p) + (list(n) if n is not None else [])
    for i, qi in enumerate(q):
        logits = [scale * float(torch.dot(qi, d) / (qi.norm() * d.norm())) for d in docs]
        m = max(logits)
        total += -(logits[i] - m - math.log(sum(math.exp(x - m) for x in logits)))
    return total / len(q)


@pytest.mark.parametrize("with_negatives", [True, False])
def test_loss_matches_reference(with_negatives):
    torch.manual_seed(0)
    q, p, n = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8) if with_negatives else None
    got = hard_negative_nll_loss(q, p, n, scale=50.0)
    assert got.item() == pytest.approx(reference_loss(q, p, n, 50.0), rel=1e-5)
    # a perfect encoder (positive == query, far from the rest) has near-zero loss
    eye = torch.eye(5, 8)
    assert hard_negative_nll_loss(eye, eye, -eye if with_negatives else None, scale=50.0).item() < 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, q, p, n, sizes, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])  # ranks hold different numbers of rows
    mine = [t[lo:hi].clone().requires_grad_(True) for t in (q, p, n)]
    loss = hard_negative_nll_loss(*mine, scale=20.0, gather=True)
    loss.backward()
    out[rank] = (loss.item(), [t.grad for t in mine])
    dist.destroy_process_group()


def test_loss_across_two_processes_equals_one_process_on_the_whole_batch():
    """Features gathered with gradient (llm2vec semantics): each rank's loss is the global-batch loss,
    and the summed gradients equal the single-process gradients (what DDP's averaging then yields)."""
    torch.manual_seed(1)
    q, p, n = (torch.randn(7, 6) for _ in range(3))
    whole = [t.clone().requires_grad_(True) for t in (q, p, n)]
    ref = hard_negative_nll_loss(*whole, scale=20.0)
    ref.backward()
    sizes = [4, 3]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), q, p, n, sizes, out), nprocs=2, join=True)
    for rank in range(2):
        assert out[rank][0] == pytest.approx(ref.item(), rel=1e-6)
    for k in range(3):
        # each rank's autograd all_gather returns world x d(loss)/d(own rows): DDP divides by world
        got = torch.cat([out[0][1][k][:4], out[1][1][k]]) / 2
        assert torch.allclose(got, whole[k].grad, atol=1e-6), k


def test_top1_accuracy_and_cra_pairs():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 0.05]])
    groups = [0, 0, 1, 1, 2]
    # excluding itself: row 0 -> 4 (cos 0.9988 > 0.9939 with row 1, wrong), row 1 -> 4 (0.9982 > 0.9939,
    # wrong), row 2 -> 3 and row 3 -> 2 (right), row 4 -> 0 (wrong: its image has one caption)
    acc = top1_accuracy(emb, emb, groups, groups, exclude_self=True)
    assert acc == pytest.approx(2 / 5)
    assert top1_accuracy(emb, emb, groups, groups) == 1.0  # without excluding itself every row finds itself

    class RS:
        images = [0, 1, 2]
        source = "x"

        def captions_of(self, i):
            return [["a", "b", "c"], ["d"], ["f"]][i]  # only one image has two captions

    with pytest.raises(ValueError, match="at least two images"):
        cra_captions(RS())
    RS.images = [0, 1, 2]
    RS.captions_of = lambda self, i: [["a", "b", "c"], ["d", "e"], ["f", "g"]][i]
    assert cra_captions(RS()) == (["a", "b", "d", "e", "f", "g"], [0, 0, 1, 1, 2, 2])
