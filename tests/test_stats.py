"""Intervals and paired tests (l2c_llava.stats), checked against hand-computed or brute-force values."""

from __future__ import annotations

import pytest
import torch

from l2c_llava.stage2.retrieval import recall_at_k
from l2c_llava.stats import paired_recall_test, recall_with_ci, retrieval_ranks


def _setup(n_img=200, per=5, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, 16, generator=g), dim=-1)
    owner = torch.arange(n_img).repeat_interleave(per)
    txt = torch.nn.functional.normalize(img[owner] + noise * torch.randn(len(owner), 16, generator=g), dim=-1)
    return img, txt, owner.tolist()


def test_ranks_give_the_recall_of_recall_at_k_and_count_ties_for_the_query():
    img, txt, owner = _setup()
    i2t, t2i = retrieval_ranks(img, txt, owner)
    r = recall_at_k(img, txt, owner)
    assert r["i2t_R@1"] == pytest.approx((i2t < 1).float().mean().item())
    assert r["t2i_R@5"] == pytest.approx((t2i < 5).float().mean().item())
    # brute force on a few queries
    for j in (0, 7, 123):
        sims = txt[j] @ img.T
        assert t2i[j] == (sims > sims[owner[j]]).sum()
    same = torch.ones(3, 4)  # every score tied: each query counts as a hit at 1
    i2t, t2i = retrieval_ranks(same, same, [0, 1, 2])
    assert i2t.tolist() == t2i.tolist() == [0, 0, 0]


def _reference_ranks(img, txt, owner):
    """The definition, on the whole similarity matrix at once."""
    sim = img @ txt.T
    owner = torch.as_tensor(owner)
    mine = owner[None, :] == torch.arange(img.shape[0])[:, None]
    best = sim.masked_fill(~mine, float("-inf")).max(dim=1).values
    own = sim[owner, torch.arange(len(owner))]
    return (sim > best[:, None]).sum(dim=1), (sim > own[None, :]).sum(dim=0)


@pytest.mark.parametrize("chunk,text_chunk", [(1, 1), (3, 5), (7, 2), (256, 2048)])
def test_blocked_ranks_equal_the_whole_matrix_with_ties_and_uneven_captions(chunk, text_chunk):
    g = torch.Generator().manual_seed(chunk)
    for _ in range(12):
        n_img, n_txt = (
            int(torch.randint(1, 30, (1,), generator=g)),
            int(torch.randint(1, 90, (1,), generator=g)),
        )
        # small integers: every score exact, many ties (duplicate images and captions among them);
        # captions in no order, 0 to many per image
        img = torch.randint(-2, 3, (n_img, 6), generator=g).float()
        txt = torch.randint(-2, 3, (n_txt, 6), generator=g).float()
        owner = torch.randint(0, n_img, (n_txt,), generator=g).tolist()
        got = retrieval_ranks(img, txt, owner, chunk=chunk, text_chunk=text_chunk)
        want = _reference_ranks(img, txt, owner)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # real-valued, normalised, five captions per image in shuffled order (exact ties are the integer
    # case's: a real-valued tie holds only as far as two matrix products round alike)
    img, txt, owner = _setup(n_img=60, noise=0.5, seed=chunk)
    perm = torch.randperm(len(owner), generator=g)
    txt, owner = txt[perm], torch.as_tensor(owner)[perm].tolist()
    got = retrieval_ranks(img, txt, owner, chunk=chunk, text_chunk=text_chunk)
    want = _reference_ranks(img, txt, owner)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="caption 1 names image 9"):
        retrieval_ranks(img[:3], txt[:2], [0, 9])


def test_recall_interval_covers_the_value_and_narrows_with_more_images():
    img, txt, owner = _setup(n_img=100)
    r_small = recall_with_ci(*retrieval_ranks(img, txt, owner), owner, ks=(1,))
    img, txt, owner = _setup(n_img=1600)
    r_big = recall_with_ci(*retrieval_ranks(img, txt, owner), owner, ks=(1,))
    for r in (r_small, r_big):
        for m in r.values():
            assert m["ci95"][0] <= m["value"] <= m["ci95"][1]
    width = lambda r: r["t2i_R@1"]["ci95"][1] - r["t2i_R@1"]["ci95"][0]  # noqa: E731
    assert width(r_big) < width(r_small) / 2.5  # about 1/sqrt(16) of it
    # the image is the unit: 5 identical copies of every caption do not narrow the interval
    img, txt, owner = _setup(n_img=100, per=1)
    one = recall_with_ci(*retrieval_ranks(img, txt, owner), owner, ks=(1,))
    five = [o for o in owner for _ in range(5)]
    copies = recall_with_ci(*retrieval_ranks(img, txt.repeat_interleave(5, 0), five), five, ks=(1,))
    assert copies["t2i_R@1"] == one["t2i_R@1"]


def test_paired_test_finds_a_real_gain_and_not_a_null_one():
    img, txt, owner = _setup(n_img=600, noise=1.0)
    better = torch.nn.functional.normalize(img[torch.tensor(owner)] * 0.6 + txt * 0.4, dim=-1)
    a = retrieval_ranks(img, better, owner)
    b = retrieval_ranks(img, txt, owner)
    res = paired_recall_test(a, b, owner, ks=(1,))
    assert res["t2i_R@1"]["diff"] > 0 and res["t2i_R@1"]["p_value"] < 0.01
    assert res["t2i_R@1"]["ci95"][0] > 0
    # the same model against itself: no difference, p = 1
    same = paired_recall_test(b, b, owner, ks=(1,))
    assert same["i2t_R@1"]["diff"] == 0 and same["i2t_R@1"]["p_value"] == 1.0
    # two equally good, independent models: rarely "significant"
    c = retrieval_ranks(
        img, torch.nn.functional.normalize(img[torch.tensor(owner)] + torch.randn_like(txt), dim=-1), owner
    )
    assert paired_recall_test(c, b, owner, ks=(5,))["t2i_R@5"]["p_value"] > 0.001
    with pytest.raises(ValueError, match="same images"):
        paired_recall_test(a, retrieval_ranks(img[:10], txt[:50], owner[:50]), owner)
