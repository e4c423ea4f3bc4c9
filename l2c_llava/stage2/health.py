"""Encoder health: does a vision tower keep the image? Read before any number built on top of it.

Two checks, both on the synthetic dataset's ground truth (``scenes.jsonl``):

- **collapse**: the median cosine between the embeddings of two *different* images, and the share of
  the embeddings' variance along their top principal direction. A tower whose images all map to one
  point (median cosine near 1, one direction holding nearly all variance) cannot tell images apart,
  whatever its loss said; measured on the pooled output (the retrieval side) and on the mean of the
  penultimate-layer patch tokens (what a LLaVA reads);
- **patch probe**: a small reader trained on the tower's frozen penultimate-layer patch tokens (the
  LLaVA's own input features) answers what the demo's questions ask: is there a <colour> <shape>
  (existence, against a random absent pair), where is it (which of the 3 x 3 cells), and what colour
  is the <shape> in <cell>. Trained on the train split's scenes, scored on held-out ones, each
  accuracy against its chance (0.5; the most common cell; the most common colour). A reader near
  chance means no LLaVA trained on these features can do better.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from l2c_llava import layout as L
from l2c_llava.cpu_threads import follow_share
from l2c_llava.data.images import llava_image_processor, load_rgb
from l2c_llava.data.scenes import COLOURS, SHAPES
from l2c_llava.errors import InputError, MissingFileError
from l2c_llava.models.vision import load_vision_tower
from l2c_llava.train.optim import make_adamw

CELLS = 9


def embedding_health(emb: torch.Tensor) -> dict:
    """emb [N, D] -> median cosine between different rows, and the variance share of the top
    principal direction (of the L2-normalised rows, centred)."""
    if emb.shape[0] < 3:
        raise InputError(f"embedding health needs at least 3 images, got {emb.shape[0]}")
    e = F.normalize(emb.float(), dim=-1)
    sims = e @ e.T
    off = sims[~torch.eye(len(e), dtype=torch.bool)]
    s = torch.linalg.svdvals(e - e.mean(0))
    return {
        "images": len(e),
        "median_cosine": round(off.median().item(), 4),
        "top_direction_share": round((s[0] ** 2 / (s**2).sum().clamp_min(1e-12)).item(), 4),
    }


def tower_features(
    tower, image_paths: list[Path], batch: int = 64, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled [N, D], patches [N, T, D]) of a CLIP vision tower: its pooled output and its
    penultimate-layer patch tokens (CLS dropped), on the pixels a LLaVA on it gets."""
    from tqdm.auto import tqdm

    proc = llava_image_processor(tower.config.image_size)
    tower.eval()
    pooled, patches = [], []
    with torch.no_grad():
        for lo in tqdm(
            range(0, len(image_paths), batch), desc="tower features", disable=not progress, leave=False
        ):
            follow_share()  # under a parallel pipeline: the cores a neighbour left
            px = proc(images=[load_rgb(p) for p in image_paths[lo : lo + batch]], return_tensors="pt")[
                "pixel_values"
            ]
            out = tower(pixel_values=px, output_hidden_states=True)
            pooled.append(out.pooler_output.float())
            patches.append(out.hidden_states[-2][:, 1:].float())
    return torch.cat(pooled), torch.cat(patches)


# ---------------------------------------------------------------------------------------------
# the patch probe
# ---------------------------------------------------------------------------------------------

# query vocabulary: colours, then shapes, then cells
_SHAPE0, _CELL0 = len(COLOURS), len(COLOURS) + len(SHAPES)


def probe_questions(rows: list[dict], seed: int = 0) -> torch.Tensor:
    """[Q, 6] long: (scene, query a, query b, task, target, _) with task 0 existence (target 1/0),
    1 position (target cell), 2 colour (target colour). One absent colour-shape pair per group, as
    the synthetic questions draw them."""
    colours, rng, out = list(COLOURS), random.Random(seed), []
    for i, r in enumerate(rows):
        present = {(g["colour"], g["shape"]) for g in r["groups"]}
        for g in r["groups"]:
            c, s, cell = (
                colours.index(g["colour"]),
                _SHAPE0 + SHAPES.index(g["shape"]),
                g["row"] * 3 + g["col"],
            )
            out += [(i, c, s, 0, 1, 0), (i, c, s, 1, cell, 0), (i, s, _CELL0 + cell, 2, c, 0)]
            while (pair := (rng.choice(colours), rng.choice(SHAPES))) in present:
                pass
            out.append((i, colours.index(pair[0]), _SHAPE0 + SHAPES.index(pair[1]), 0, 0, 0))
    return torch.tensor(out, dtype=torch.long)


class PatchReader(torch.nn.Module):
    """A query (the sum of two learned word vectors) attends over the patch tokens, each with a learned
    vector for its place in the grid (in the keys and in what is read, as a LLaVA knows the order of
    its image tokens); three heads read the result: existence, cell, colour."""

    def __init__(self, dim: int, tokens: int, hidden: int = 128):
        super().__init__()
        self.query = torch.nn.Embedding(_CELL0 + CELLS, hidden)
        self.key, self.value = torch.nn.Linear(dim, hidden), torch.nn.Linear(dim, hidden)
        self.pos = torch.nn.Parameter(torch.zeros(tokens, hidden))
        self.head = torch.nn.Sequential(
            torch.nn.Linear(2 * hidden, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, 1 + CELLS + len(COLOURS)),
        )

    def forward(self, feats: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        q = self.query(a) + self.query(b)
        k = self.key(feats) + self.pos
        attn = torch.softmax((k @ q[:, :, None]).squeeze(-1) / q.shape[-1] ** 0.5, dim=-1)
        # the token's place goes into what is read too: a LLaVA knows the order of its image tokens
        read = (attn[:, :, None] * (self.value(feats) + self.pos)).sum(1)
        return self.head(torch.cat([read, q], -1))  # [existence, 9 cells, 12 colours]


def _task_loss(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    loss = out.new_zeros(())
    for task, sl, fn in (
        (0, slice(0, 1), None),
        (1, slice(1, 1 + CELLS), F.cross_entropy),
        (2, slice(1 + CELLS, None), F.cross_entropy),
    ):
        m = q[:, 3] == task
        if m.any():
            logits = out[m, sl]
            loss = loss + (
                F.binary_cross_entropy_with_logits(logits[:, 0], q[m, 4].float())
                if fn is None
                else fn(logits, q[m, 4])
            )
    return loss


def _task_accuracy(out: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
    res = {}
    for task, name in enumerate(("existence", "position", "colour")):
        m = q[:, 3] == task
        if task == 0:
            pred = (out[m, 0] > 0).long()
        elif task == 1:
            pred = out[m, 1 : 1 + CELLS].argmax(-1)
        else:
            pred = out[m, 1 + CELLS :].argmax(-1)
        res[name] = round((pred == q[m, 4]).float().mean().item(), 4) if m.any() else float("nan")
    return res


def patch_probe(
    feats: torch.Tensor, train_q: torch.Tensor, test_q: torch.Tensor, steps: int = 2000, seed: int = 0
) -> dict:
    """Train a PatchReader on `train_q` over frozen `feats` [N, T, D] (standardised here), score it on
    `test_q`. Returns {"train": {...}, "test": {...}, "chance": {...}}; chance is each task's
    majority answer among the test questions."""
    feats = (feats - feats.mean((0, 1))) / feats.std((0, 1)).clamp_min(1e-6)
    torch.manual_seed(seed)
    reader = PatchReader(feats.shape[-1], feats.shape[1])
    opt = make_adamw(reader.parameters(), "adamw", lr=1e-3, weight_decay=0.05)
    for _ in range(steps):
        follow_share()  # under a parallel pipeline: the cores a neighbour left
        b = train_q[torch.randint(len(train_q), (128,))]
        loss = _task_loss(reader(feats[b[:, 0]], b[:, 1], b[:, 2]), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out: dict = {}
    reader.eval()
    with torch.no_grad():
        for name, q in (("train", train_q), ("test", test_q)):
            out[name] = _task_accuracy(
                torch.cat([reader(feats[c[:, 0]], c[:, 1], c[:, 2]) for c in q.split(4096)]), q
            )
    chance = {}
    for task, name in enumerate(("existence", "position", "colour")):
        t = test_q[test_q[:, 3] == task, 4]
        chance[name] = round(t.bincount().max().item() / len(t), 4) if len(t) else float("nan")
    out["chance"] = chance
    return out


# ---------------------------------------------------------------------------------------------
# the whole check on a synthetic dataset
# ---------------------------------------------------------------------------------------------


def health_summary(h: dict) -> str:
    """One line: the collapse figures and the probe against chance (what `l2c health` prints)."""
    p = h["probe"]
    probe = ", ".join(f"{t} {p['test'][t]:.3f} (chance {p['chance'][t]:.3f})" for t in p["test"])
    return (
        f"median cosine {h['pooled']['median_cosine']} (mean patch token {h['patch_mean']['median_cosine']}), "
        f"top direction {h['pooled']['top_direction_share']}; probe: {probe}"
    )


def read_scenes(data: str | os.PathLike) -> list[dict]:
    path = Path(data) / L.SCENES
    if not path.is_file():
        raise MissingFileError(
            f"{path}: not found; encoder health needs a synthetic dataset's ground truth (l2c data synth)"
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def encoder_health(
    tower_path: str | os.PathLike,
    data: str | os.PathLike,
    train_scenes: int | None = 2000,
    test_scenes: int | None = 500,
    probe_steps: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Collapse figures on the test split's images and the patch probe (trained on up to
    `train_scenes` of the train split, scored on up to `test_scenes` of the test split) of the CLIP
    vision tower at `tower_path` (a CLIPVisionModel or CLIPModel folder)."""
    rows = read_scenes(data)
    train = [r for r in rows if r["split"] == "train"][:train_scenes]
    test = [r for r in rows if r["split"] == "test"][:test_scenes]
    if len(train) < 10 or len(test) < 10:
        raise InputError(
            f"{data}: encoder health needs at least 10 train and 10 test scenes "
            f"(has {len(train)} and {len(test)})"
        )
    tower = load_vision_tower(str(tower_path))
    images = [Path(data) / "images" / r["image"] for r in train + test]
    pooled, patches = tower_features(tower, images, progress=progress)
    n_train = len(train)
    train_q, test_q = probe_questions(train, seed), probe_questions(test, seed + 1)
    test_q[:, 0] += n_train
    return {
        "tower": str(tower_path),
        "pooled": embedding_health(pooled[n_train:]),
        "patch_mean": embedding_health(patches[n_train:].mean(1)),
        "probe": patch_probe(patches, train_q, test_q, steps=probe_steps, seed=seed)
        | {"train_scenes": n_train, "test_scenes": len(test), "tokens": patches.shape[1]},
    }
