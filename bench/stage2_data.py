"""What stage 2 trains on, measured: LLM2CLIP's retrieval against the baseline CLIP it starts from,
for stage-2 training sets that differ in size and in caption style, at the same number of steps, on
the same held-out test images.

Each variant is a caption-pair file (``image``, ``short``, ``long``; ``short`` may be a list, e.g.
the synthetic set's five COCO-like ``alternatives``) and the short-caption key stage 2 reads. Every
variant runs the real commands: ``l2c stage2 cache`` (the frozen stage-1 encoder, bf16 here), ``l2c
stage2 train`` for ``--steps`` steps, ``l2c stage2 eval`` (R@1/5/10 both ways with 95% intervals and
a paired bootstrap against the baseline). The test sets' text features are computed once and shared.

    python bench/stage2_data.py --data runs/exp/data4k --encoder runs/demo/stage1/encoder \\
        --variant short-825=captions/train_825.jsonl:short \\
        --variant coco-825=captions/train_825.jsonl:alternatives \\
        --variant coco-3320=captions/train.jsonl:alternatives --steps 258 --out runs/exp/stage2_data

``python bench/stage2_data.py --summarize OUT`` prints the table of finished variants.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_variant(name: str, train: Path, short_key: str, a) -> None:
    out = a.out / name
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    d = a.data
    hard = d / "retrieval" / "long_hard.json"  # datasets of the generator's version 3 on
    splits = ("eval_short", "eval_long", *(("eval_long_hard",) if hard.is_file() else ()))
    for split in splits:  # the test captions' features: computed once, shared
        (a.out / "eval_cache" / split).mkdir(parents=True, exist_ok=True)
        link = cache / split
        if not link.exists():
            os.symlink(a.out / "eval_cache" / split, link)
    ov = [
        f"run.output_dir={out / 'run'}",
        f"text_encoder.path={a.encoder}",
        f"text_encoder.torch_dtype={a.dtype}",
        f"cache.dir={cache}",
        f"data.train={train}",
        f"data.short_key={short_key}",
        f"data.image_root={d / 'images'}",
        f"data.eval_short={d / 'retrieval' / 'karpathy.json'}",
        f"data.eval_long={d / 'retrieval' / 'long_test.json'}",
        f"data.eval_long_hard={hard if hard.is_file() else 'null'}",
        f"data.eval_image_root={d / 'images'}",
        *a.set,
    ]
    l2c = [sys.executable, "-m", "l2c_llava", "stage2"]
    times = {"train_images": sum(1 for line in train.open() if line.strip())}
    for cmd, extra in (
        ("cache", []),
        ("train", [f"train.max_steps={a.steps}", "train.epochs=1000"]),
        ("eval", []),
    ):
        t0 = time.perf_counter()
        subprocess.run([*l2c, cmd, "--config", str(a.config), *ov, *extra], check=True, cwd=ROOT)
        times[cmd] = round(time.perf_counter() - t0, 1)
    (out / "times.json").write_text(json.dumps(times))


def summarize(out: Path) -> str:
    rows = [
        "| variant | training images | set | direction | baseline R@1 | LLM2CLIP R@1 | difference (paired p) "
        "| cache / train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in sorted(p for p in out.iterdir() if (p / "run" / "metrics.json").is_file()):
        m = json.loads((v / "run" / "metrics.json").read_text())
        t = json.loads((v / "times.json").read_text()) if (v / "times.json").is_file() else {}
        images = t.get("train_images", "")
        for s in ("short", "long"):
            for k in ("i2t_R@1", "t2i_R@1"):
                b, l_ = m["baseline"][s][k], m["llm2clip"][s][k]
                bi, li = m["intervals"]["baseline"][s][k], m["intervals"]["llm2clip"][s][k]
                p = m["paired"][s][k]
                rows.append(
                    f"| {v.name} | {images} | {s} ({m['sets'][s]['images']} img) | {k[:3]} | "
                    f"{100 * b:.1f} [{100 * bi[0]:.1f}-{100 * bi[1]:.1f}] | {100 * l_:.1f} [{100 * li[0]:.1f}-{100 * li[1]:.1f}] "
                    f"| {100 * p['diff']:+.1f} (p {p['p_value']:.4g}) | {t.get('cache', '')} / {t.get('train', '')} |"
                )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="an `l2c data synth` folder")
    p.add_argument("--encoder", type=Path, help="the frozen stage-1 encoder (a stage-1 run's encoder/)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=PAIRS:SHORT_KEY",
        help="a training set: caption-pair file (relative to --data) and the short-caption key",
    )
    p.add_argument("--config", type=Path, default=ROOT / "stage2" / "configs" / "demo.yaml")
    p.add_argument(
        "--steps", type=int, default=258, help="optimizer steps for every variant (demo: 10 epochs of 825)"
    )
    p.add_argument("--dtype", default="bfloat16", help="text_encoder.torch_dtype while caching")
    p.add_argument("--set", nargs="*", default=[], help="more overrides of the stage-2 config")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--summarize", action="store_true", help="print the table of finished variants and stop")
    a = p.parse_args()
    if not a.summarize:
        if a.data is None or a.encoder is None or not a.variant:
            p.error("--data, --encoder and at least one --variant are required")
        a.out, a.data, a.encoder = a.out.resolve(), a.data.resolve(), a.encoder.resolve()
        for spec in a.variant:
            name, _, rest = spec.partition("=")
            pairs, _, key = rest.rpartition(":")
            if not name or not pairs or not key:
                p.error(f"--variant {spec!r}: expected NAME=PAIRS:SHORT_KEY")
            if (a.out / name / "run" / "metrics.json").is_file():
                print(f"{name}: done, skipped", flush=True)
                continue
            run_variant(name, a.data / pairs, key, a)
    table = summarize(a.out)
    print(table)
    (a.out / "stage2_data.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
