from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from l2c_llava.losses import clip_loss
from l2c_llava.stage2.model import LinearBlock, LLM2CLIPModel, TextAdapter
from l2c_llava.stage2.retrieval import recall_at_k

from .tiny_models import tiny_vision


def test_adapter_shapes_and_residual_structure():
    adapter = TextAdapter(in_dim=48, out_dim=20, num_blocks=4, expansion=2)
    assert len(adapter.blocks) == 4
    b = adapter.blocks[0]
    assert (b.fc1.in_features, b.fc1.out_features, b.fc2.out_features) == (48, 96, 48)
    assert adapter.proj.bias is not None and adapter.proj.out_features == 20
    x = torch.randn(5, 48)
    assert adapter(x).shape == (5, 20)
    # input is L2-normalised: the scale of the LLM feature does not matter
    assert torch.allclose(adapter(x), adapter(7.0 * x), atol=1e-5)
    # each block is residual: with its second linear at zero it is the identity
    block = LinearBlock(8, expansion=4)
    torch.nn.init.zeros_(block.fc2.weight)
    torch.nn.init.zeros_(block.fc2.bias)
    y = torch.randn(3, 8)
    assert torch.equal(block(y), y)
    # the parameter count of the paper's adapter at d=4096: ~273M
    n = sum(p.numel() for p in TextAdapter(4096, 1280, 4, 2).parameters())
    assert 270e6 < n < 276e6
    # parameter names of the released checkpoints (microsoft/LLM2CLIP-Openai-L-14-336)
    names = set(TextAdapter(8, 4, num_blocks=2).state_dict())
    assert {
        "adaptor.0.ln.weight",
        "adaptor.0.fn.0.weight",
        "adaptor.1.fn.3.bias",
        "adaptor.2.weight",
        "adaptor.3.weight",
        "adaptor.3.bias",
    } <= names


def test_model_features_and_logit_scale():
    vision = tiny_vision()
    model = LLM2CLIPModel.from_vision_tower(vision, text_dim=24, projection_dim=16, num_blocks=2)
    tower_keys = {f"vision_model.{k}" for k in vision.state_dict()}
    assert tower_keys <= set(model.state_dict())
    names = {k.split(".")[0] for k in model.state_dict()}
    assert names == {
        "vision_model",
        "visual_projection",
        "text_adapter",
        "logit_scale",
    }  # the release's layout
    img, txt, scale = model(torch.randn(3, 3, 32, 32), torch.randn(3, 24))
    assert img.shape == txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and scale.item() == pytest.approx(
        1 / 0.07, rel=1e-5
    )
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale(100.0)
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def reference_clip_loss(img, txt, scale):
    n = img.shape[0]
    total = 0.0
    for i in range(n):  # image i against every text, and text i against every image
        for logits in (
            [scale * float(img[i] @ txt[j]) for j in range(n)],
            [scale * float(txt[i] @ img[j]) for j in range(n)],
        ):
            m = max(logits)
            total += -(logits[i] - m - math.log(sum(math.exp(v - m) for v in logits))) / 2
    return total / n


def test_clip_loss_matches_reference():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    assert clip_loss(img, txt, torch.tensor(14.0)).item() == pytest.approx(
        reference_clip_loss(img, txt, 14.0), rel=1e-5
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, img, txt, sizes, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    res = {}
    for local in (True, False):
        for with_grad in (True, False):
            res[(local, with_grad)] = clip_loss(
                img[lo:hi], txt[lo:hi], torch.tensor(10.0), local_loss=local, gather_with_grad=with_grad
            ).item()
    out[rank] = res
    dist.destroy_process_group()


def test_clip_loss_across_two_processes():
    """Global loss: every rank computes the whole batch's loss. Local loss: each rank scores its own
    rows against all; the row-weighted mean over ranks is the whole batch's loss."""
    torch.manual_seed(2)
    img = torch.nn.functional.normalize(torch.randn(7, 5), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(7, 5), dim=-1)
    whole = clip_loss(img, txt, torch.tensor(10.0)).item()
    sizes = [4, 3]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), img, txt, sizes, out), nprocs=2, join=True)
    for with_grad in (True, False):
        assert out[0][(False, with_grad)] == pytest.approx(whole, rel=1e-6)
        assert out[1][(False, with_grad)] == pytest.approx(whole, rel=1e-6)
        weighted = (out[0][(True, with_grad)] * 4 + out[1][(True, with_grad)] * 3) / 7
        assert weighted == pytest.approx(whole, rel=1e-6)


def brute_force_recall(sim, owner, k):
    n_img, n_txt = sim.shape
    i2t = (
        sum(
            any(owner[j] == i for j in sorted(range(n_txt), key=lambda j: -sim[i, j])[:k])
            for i in range(n_img)
        )
        / n_img
    )
    t2i = sum(owner[j] in sorted(range(n_img), key=lambda i: -sim[i, j])[:k] for j in range(n_txt)) / n_txt
    return i2t, t2i


def test_recall_at_k_on_a_hand_made_matrix_and_against_brute_force():
    # 3 images, 6 captions (2 each). sim[i, j] = image i vs caption j, made by hand:
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.0, 0.2, 0.3],  # image 0: best caption 0 (its own) -> i2t rank 0
            [0.5, 0.4, 0.1, 0.2, 0.6, 0.0],  # image 1: own captions 2,3 score 0.1,0.2 -> rank 4
            [0.1, 0.2, 0.3, 0.9, 0.7, 0.8],
        ]
    )  # image 2: own 4,5 score .7/.8, caption 3 .9 above -> rank 1
    owner = [0, 0, 1, 1, 2, 2]
    img = torch.eye(3)  # image_emb @ text_emb.T == sim with these embeddings
    r = recall_at_k(img, sim.T.contiguous(), owner, ks=(1, 2, 5))
    assert (
        r["i2t_R@1"] == pytest.approx(1 / 3) and r["i2t_R@2"] == pytest.approx(2 / 3) and r["i2t_R@5"] == 1.0
    )
    # text->image, per caption (column): 0 -> own image 0 is best (hit); 1 -> own 0.1 < 0.4, 0.2 (rank 2);
    # 2 -> own 0.1 < 0.8, 0.3 (rank 2); 3 -> own 0.2 < 0.9 (rank 1); 4 -> own 0.7 > 0.6 (hit); 5 -> own 0.8 (hit)
    assert (
        r["t2i_R@1"] == pytest.approx(3 / 6) and r["t2i_R@2"] == pytest.approx(4 / 6) and r["t2i_R@5"] == 1.0
    )
    torch.manual_seed(3)
    for _ in range(5):
        ie, te = torch.randn(7, 4), torch.randn(20, 4)
        own = torch.randint(0, 7, (20,)).tolist()
        own[:7] = list(range(7))  # every image has a caption
        got = recall_at_k(ie, te, own, ks=(1, 3, 5), chunk=3)
        s = ie @ te.T
        for k in (1, 3, 5):
            i2t, t2i = brute_force_recall(s, own, k)
            assert got[f"i2t_R@{k}"] == pytest.approx(i2t) and got[f"t2i_R@{k}"] == pytest.approx(t2i)
