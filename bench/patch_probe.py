"""Do a vision tower's patch tokens say what is where? The patch probe of ``l2c health`` on several
towers side by side, including a random-weight floor.

The demo LLaVA has to answer "Is there a red circle in the image?", "Where is the red circle?" and
"What colour is the square at the top?" from the tower's penultimate-layer patch tokens (the
features LLaVA feeds its projector). ``l2c_llava.stage2.health.patch_probe`` asks the same of a small
reader trained for it, with no LLM in the way (trained on the train split's scenes, scored on the
test split's): if it stays near chance, no LLaVA trained on the same features will do better.

    python bench/patch_probe.py --data runs/demo/data --towers runs/demo/export/vision embedded:demo-clip random

``random`` is a tower of the same shape (the first tower's config) with random weights: the floor a
trained tower should beat. ``--train N`` caps the training scenes (to see what more data buys).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def run(
    data: str,
    towers: list[str],
    train_scenes: int | None = None,
    test_scenes: int | None = 500,
    steps: int = 2000,
) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from l2c_llava.models.reference import resolve_vision_path
    from l2c_llava.stage2.health import encoder_health

    reference = next((t for t in towers if t != "random"), None)
    if reference is None:
        raise SystemExit("--towers: name at least one tower folder (random takes its shape)")
    out = {"towers": {}}
    for tower in towers:
        path = tower
        if tower == "random":
            torch.manual_seed(0)
            path = Path(tempfile.mkdtemp(prefix="random_tower."))
            CLIPVisionModel(CLIPVisionConfig.from_pretrained(resolve_vision_path(reference))).save_pretrained(
                path
            )
        res = encoder_health(
            path, data, train_scenes=train_scenes, test_scenes=test_scenes, probe_steps=steps
        )
        out["towers"][tower] = res
        print(
            tower,
            json.dumps(
                {
                    "probe": res["probe"]["test"],
                    "chance": res["probe"]["chance"],
                    "median_cosine": res["pooled"]["median_cosine"],
                }
            ),
            flush=True,
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="runs/demo/data", help="a synthetic dataset (l2c data synth)")
    p.add_argument(
        "--towers",
        nargs="+",
        required=True,
        help="CLIPVisionModel / CLIPModel folders, embedded:demo-clip, or random",
    )
    p.add_argument("--train", type=int, default=None, help="at most this many training scenes")
    p.add_argument("--test", type=int, default=500, help="at most this many test scenes")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    res = run(a.data, a.towers, a.train, a.test, a.steps)
    if a.json:
        from l2c_llava.io import atomic_write_json

        atomic_write_json(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
