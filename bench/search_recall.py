"""Text-to-image search measured: index a run's held-out test images with each encoder through
``l2c search`` and query each image's dense caption; R@1 / R@5 with 95% Wilson intervals and McNemar's
test between the encoders on the same queries.

    python bench/search_recall.py --run runs/demo [--k 5] [--kind flat]

The baseline is the run's baseline tower (its CLIP folder, or the shipped demo CLIP); LLM2CLIP is the
run's stage-2 model with its frozen stage-1 text encoder. The test images are hard-linked (or copied)
into a folder of their own so the index holds nothing else. Writes RUN/search/search_recall.json and .md
and a copy in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def baseline_tower(run: Path, given: str | None) -> str:
    """The run's baseline tower: the CLIP it trained (run/clip/model), else `given` or the shipped one."""
    from l2c_llava.layout import PipelineRun
    from l2c_llava.models.reference import resolve_vision_path

    clip = PipelineRun(run).clip_model
    if given is None and (clip / "config.json").is_file():
        return str(clip)
    return resolve_vision_path(given or "embedded:demo-clip")


def _p(p: float) -> str:
    """A p-value as printed: stats rounds to 6 decimals, so 0 means below 1e-6."""
    return "< 1e-6" if p < 1e-6 else f"{p:.2g}"


def _link_images(rows: list[dict], image_root: Path, dest: Path) -> list[str]:
    names = []
    for r in rows:
        src = image_root / r["image"]
        dst = dest / r["image"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        names.append(r["image"])
    return names


def run(
    run_dir: str = "runs/demo",
    k: int = 5,
    kind: str = "flat",
    limit: int | None = None,
    baseline: str | None = None,
) -> dict:
    from l2c_llava import layout as L
    from l2c_llava.search import Encoder, SearchIndex, build_index
    from l2c_llava.stats import paired_comparison, wilson_interval

    run = Path(run_dir)
    data = L.PipelineRun(run).data
    rows = [json.loads(x) for x in (data / L.CAPTION_PAIRS["test"]).read_text().splitlines() if x.strip()]
    rows = rows[:limit] if limit else rows
    encoders = {"baseline": baseline_tower(run, baseline), "llm2clip": str(L.PipelineRun(run).stage2)}
    out: dict = {
        "run": str(run),
        "images": len(rows),
        "queries": "each test image's dense caption",
        "k": k,
        "index": kind,
        "host": socket.gethostname(),
        "date": time.strftime("%Y-%m-%d"),
    }
    hits: dict[str, dict[int, list[bool]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        names = _link_images(rows, data / L.IMAGES, images)
        for name, path in encoders.items():
            t0 = time.perf_counter()
            enc = Encoder(path)
            build_index(images, enc, Path(tmp) / f"index-{name}", kind=kind, progress=False)
            index = SearchIndex(Path(tmp) / f"index-{name}")
            t_index = time.perf_counter() - t0
            t0 = time.perf_counter()
            found = index.search(enc.embed_texts([r["long"] for r in rows]), k, enc.identity)
            t_query = time.perf_counter() - t0
            ranks = [next((h.rank for h in got if h.path == want), None) for want, got in zip(names, found)]
            hits[name] = {1: [r == 1 for r in ranks], k: [r is not None for r in ranks]}
            row = {"encoder": path, "index_seconds": round(t_index, 1), "query_seconds": round(t_query, 1)}
            for kk, h in hits[name].items():
                row[f"R@{kk}"] = round(sum(h) / len(h), 4)
                row[f"R@{kk}_ci95"] = [round(x, 4) for x in wilson_interval(sum(h), len(h))]
            out[name] = row
    out["llm2clip_vs_baseline"] = {
        f"R@{kk}": paired_comparison(hits["llm2clip"][kk], hits["baseline"][kk]) for kk in (1, k)
    }
    return out


def to_markdown(res: dict) -> str:
    k = res["k"]
    lines = [
        f"# Text-to-image search, {res['images']} held-out images, {res['queries']} ({res['index']} index)",
        "",
        f"| encoder | R@1 [95% CI] | R@{k} [95% CI] | index s | query s |",
        "|---|---|---|---|---|",
    ]
    for name in ("baseline", "llm2clip"):
        r = res[name]
        cells = [
            f"{r[f'R@{kk}']:.3f} [{r[f'R@{kk}_ci95'][0]:.3f}-{r[f'R@{kk}_ci95'][1]:.3f}]" for kk in (1, k)
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {r['index_seconds']} | {r['query_seconds']} |")
    lines.append("")
    for m, t in res["llm2clip_vs_baseline"].items():
        lines.append(
            f"LLM2CLIP - baseline, {m}: {t['gain']:+.3f} (only LLM2CLIP right {t['wins']}, only the "
            f"baseline {t['losses']}, McNemar p {_p(t['p_value'])})."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="a pipeline run folder (data/, stage2/)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--kind", default="flat", choices=["flat", "ivf", "hnsw"])
    p.add_argument("--limit", type=int, default=None, help="first N test images only")
    p.add_argument(
        "--baseline", default=None, help="baseline CLIP folder (default: RUN/clip/model or the shipped one)"
    )
    args = p.parse_args(argv)
    res = run(args.run, args.k, args.kind, args.limit, args.baseline)
    md = to_markdown(res)
    from l2c_llava.io import atomic_write_json, atomic_write_text
    from l2c_llava.layout import PipelineRun

    for folder, stem in (
        (PipelineRun(Path(args.run)).search, "search_recall"),
        (HERE / "results", f"search_recall-{res['host']}"),
    ):
        atomic_write_json(folder / f"{stem}.json", res)
        atomic_write_text(folder / f"{stem}.md", md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
