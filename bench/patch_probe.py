"""Do a vision tower's patch tokens say where each object is? A trained reader on frozen features.

The demo LLaVA has to answer "Is there a red circle in the image?" and "Where is the red circle?"
from the tower's penultimate-layer patch tokens (the features LLaVA feeds its projector). This asks
the same of a small reader trained for it, with no LLM in the way: a learned query per colour and
shape attends over the patch tokens (plus a learned position embedding), and two heads answer
existence (present vs a random absent colour-shape pair, as the synthetic questions draw them) and
position (which of the 3 x 3 cells holds the object). Trained on the train split's scenes, scored on
the test split's: if the reader stays near chance, no LLaVA trained on the same features will do
better, and the encoder (or the data it was trained on) is what to change.

    python bench/patch_probe.py --data runs/demo/data --towers runs/demo/export/vision \
        runs/demo/clip/model random

``random`` is a tower of the same shape (the first tower's config) with random weights: the floor a
trained tower should beat. ``--train N`` caps the training scenes (to see what more data buys).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch


def tower_features(
    tower: str, data: Path, rows: list[dict], reference: str, batch: int = 100
) -> torch.Tensor:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from l2c_llava.data.images import load_rgb
    from l2c_llava.mllm.build import clip_image_processor

    if tower == "random":
        torch.manual_seed(0)
        model = CLIPVisionModel(CLIPVisionConfig.from_pretrained(reference))
    else:  # a CLIPModel folder loads its vision half (the text keys are reported unused: quiet them)
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = CLIPVisionModel.from_pretrained(tower)
        finally:
            hf_logging.set_verbosity(level)
    proc = clip_image_processor(model.config.image_size)  # the one `l2c mllm build` gives the LLaVA
    model.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(rows), batch):
            images = [load_rgb(data / "images" / r["image"]) for r in rows[lo : lo + batch]]
            px = proc(images=images, return_tensors="pt")["pixel_values"]
            out.append(model(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:])
    feats = torch.cat(out)
    return (feats - feats.mean((0, 1))) / feats.std((0, 1)).clamp_min(1e-6)


def questions(rows: list[dict], split: str, seed: int = 0) -> torch.Tensor:
    """(scene, colour, shape, present, cell) per group, and one absent pair per group."""
    from l2c_llava.data.scenes import COLOURS, SHAPES

    colours, rng, out = list(COLOURS), random.Random(seed), []
    for i, r in enumerate(rows):
        if r["split"] != split:
            continue
        present = {(g["colour"], g["shape"]) for g in r["groups"]}
        for g in r["groups"]:
            out.append((i, colours.index(g["colour"]), SHAPES.index(g["shape"]), 1, g["row"] * 3 + g["col"]))
            while (pair := (rng.choice(colours), rng.choice(SHAPES))) in present:
                pass
            out.append((i, colours.index(pair[0]), SHAPES.index(pair[1]), 0, -1))
    return torch.tensor(out, dtype=torch.long)


class Reader(torch.nn.Module):
    def __init__(self, dim: int, tokens: int, colours: int, shapes: int, hidden: int = 128):
        super().__init__()
        self.colours = colours
        self.query = torch.nn.Embedding(colours + shapes, hidden)
        self.key, self.value = torch.nn.Linear(dim, hidden), torch.nn.Linear(dim, hidden)
        self.pos = torch.nn.Parameter(torch.zeros(tokens, hidden))
        self.head = torch.nn.Sequential(
            torch.nn.Linear(2 * hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1 + 9)
        )

    def forward(self, feats: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        q = self.query(colour) + self.query(self.colours + shape)
        k = self.key(feats) + self.pos
        attn = torch.softmax((k @ q[:, :, None]).squeeze(-1) / q.shape[-1] ** 0.5, dim=-1)
        read = (attn[:, :, None] * self.value(feats)).sum(1)
        return self.head(torch.cat([read, q], -1))  # [existence logit, 9 cell logits]


def probe(
    feats: torch.Tensor, train: torch.Tensor, test: torch.Tensor, steps: int = 3000, seed: int = 0
) -> dict:
    from l2c_llava.data.scenes import COLOURS, SHAPES

    torch.manual_seed(seed)
    reader = Reader(feats.shape[-1], feats.shape[1], len(COLOURS), len(SHAPES))
    opt = torch.optim.AdamW(reader.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(steps):
        b = train[torch.randint(len(train), (128,))]
        out = reader(feats[b[:, 0]], b[:, 1], b[:, 2])
        present = b[:, 3] == 1
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], b[:, 3].float())
        loss = loss + torch.nn.functional.cross_entropy(out[present, 1:], b[present, 4])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    scores = {}
    with torch.no_grad():
        for name, q in (("train", train), ("test", test)):
            out, present = reader(feats[q[:, 0]], q[:, 1], q[:, 2]), q[:, 3] == 1
            scores[name] = {
                "existence": round(((out[:, 0] > 0).long() == q[:, 3]).float().mean().item(), 3),
                "position": round((out[present, 1:].argmax(-1) == q[present, 4]).float().mean().item(), 3),
            }
    return scores


def run(data: str, towers: list[str], train_scenes: int | None = None, steps: int = 3000) -> dict:
    root = Path(data)
    rows = [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines() if line.strip()]
    train_ids = [i for i, r in enumerate(rows) if r["split"] == "train"][:train_scenes]
    keep = set(train_ids) | {i for i, r in enumerate(rows) if r["split"] == "test"}
    rows = [r for i, r in enumerate(rows) if i in keep]
    train, test = questions(rows, "train"), questions(rows, "test")
    if not len(train) or not len(test):
        raise SystemExit(f"{root / 'scenes.jsonl'}: needs scenes in both the train and the test split")
    reference = next((t for t in towers if t != "random"), None)
    if reference is None:
        raise SystemExit("--towers: name at least one tower folder (random takes its shape)")
    cells = test[test[:, 3] == 1][:, 4]
    out = {"train_scenes": sum(r["split"] == "train" for r in rows), "test_scenes": sum(r["split"] == "test" for r in rows),
           "chance": {"existence": 0.5, "position_majority_cell": round(cells.bincount().max().item() / len(cells), 3)},
           "towers": {}}  # fmt: skip
    for tower in towers:
        feats = tower_features(tower, root, rows, reference)
        out["towers"][tower] = probe(feats, train, test, steps=steps)
        print(tower, json.dumps(out["towers"][tower]), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="runs/demo/data", help="a synthetic dataset (l2c data synth)")
    p.add_argument(
        "--towers", nargs="+", required=True, help="CLIPVisionModel / CLIPModel folders, or random"
    )
    p.add_argument("--train", type=int, default=None, help="at most this many training scenes")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    res = run(a.data, a.towers, a.train, a.steps)
    print(json.dumps(res, indent=2))
    if a.json:
        from l2c_llava.io import atomic_write_json

        atomic_write_json(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
