"""Caption filtering measured: corrupt a share of the demo's caption pairs on purpose, filter them with
the trained LLM2CLIP model and with the baseline CLIP, and report precision / recall of what is dropped.

    python bench/caption_filter.py --run runs/demo [--rows 300] [--share 0.2]

Two corruptions, each on its own copy: ``swap`` (the row gets another image's short and long captions:
the usual web-data mismatch) and ``colour`` (every colour word of both captions replaced by another
colour: a subtle error). Writes RUN/filter/filter.json and .md and a copy in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket
import sys
import time
from pathlib import Path

from search_recall import baseline_tower

HERE = Path(__file__).resolve().parent


def corrupt(rows: list[dict], kind: str, share: float, seed: int) -> tuple[list[dict], set[str]]:
    from l2c_llava.data.scenes import COLOURS

    rng = random.Random(f"{seed}-{kind}")
    pick = set(rng.sample(range(len(rows)), int(round(share * len(rows)))))
    words = sorted(COLOURS, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b")
    out, bad = [], set()
    for i, r in enumerate(rows):
        r = dict(r)
        if i in pick:
            if kind == "swap":
                donor = rows[(i + rng.randrange(1, len(rows))) % len(rows)]
                r["short"], r["long"] = donor["short"], donor["long"]
            else:
                swap = {c: rng.choice([d for d in words if d != c]) for c in words}
                new = {k: pattern.sub(lambda m, swap=swap: swap[m.group(1)], r[k]) for k in ("short", "long")}
                if new["short"] == r["short"] and new["long"] == r["long"]:
                    out.append(r)
                    continue
                r.update(new)
            bad.add(r["image"])
        out.append(r)
    return out, bad


def main(argv=None) -> int:
    from l2c_llava import layout as L
    from l2c_llava.data.filter import filter_captions
    from l2c_llava.io import write_results
    from l2c_llava.search import Encoder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="caption pairs to corrupt: test (held out from stage 2, the default) or train (seen by it)",
    )
    p.add_argument("--rows", type=int, default=300, help="first N pairs of the split")
    p.add_argument(
        "--baseline",
        default=None,
        help="baseline CLIP folder (default: the run's clip/model if it trained one, else embedded:demo-clip)",
    )
    p.add_argument("--share", type=float, default=0.2, help="share of rows corrupted")
    p.add_argument("--null-quantile", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    # AUC: P(a clean row scores above a corrupted one), how well the model separates them whatever the threshold
    a = p.parse_args(argv)
    run = Path(a.run).resolve()
    R = L.PipelineRun(run)
    data = R.data
    models = {"baseline CLIP": Path(baseline_tower(run, a.baseline)), "LLM2CLIP": R.export("llm2clip")}
    for m in models.values():
        if not (m / "config.json").is_file():
            sys.exit(f"{m} is missing: run the demo pipeline first (bash scripts/demo.sh)")
    rows = [json.loads(x) for x in (data / L.CAPTION_PAIRS[a.split]).read_text().splitlines()][: a.rows]
    out = R.caption_filter
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, folder in models.items():
        enc = Encoder(folder, batch_size=16)
        # cosine first: the z-score run reuses its cached scores and leaves its own files (the default)
        runs = [
            ("swap", "cosine", None),
            ("colour", "cosine", None),
            ("swap", "zscore", a.share),
            ("colour", "zscore", a.share),
            ("swap", "zscore", None),
            ("colour", "zscore", None),
        ]
        for kind, score, share in runs:
            noisy, bad = corrupt(rows, kind, a.share, a.seed)
            src = out / f"noisy_{kind}.jsonl"
            src.write_text("".join(json.dumps(r) + "\n" for r in noisy))
            tag = "llm2clip" if name == "LLM2CLIP" else "clip"
            t0 = time.perf_counter()
            r = filter_captions(
                src,
                data / L.IMAGES,
                enc,
                out / f"clean_{kind}_{tag}.jsonl",
                score_kind=score,
                drop_share=share,
                null_quantile=a.null_quantile,
                truth=lambda row, bad=bad: row.image in bad,
            )
            m = r["measured"]
            results.append(
                {
                    "model": name,
                    "corruption": kind,
                    "score": score,
                    "auc": m["auc"],
                    "rows": r["rows"],
                    "rule": f"drop lowest {share:.0%}" if share else f"{a.null_quantile:.0%} of shuffled",
                    "corrupted": m["corrupted"],
                    "dropped": r["flagged"],
                    "precision": m["precision"],
                    "recall": m["recall"],
                    "clean_dropped_share": m["clean_dropped_share"],
                    "threshold": r["threshold"],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    lines = [
        f"# Caption filtering on corrupted demo pairs ({len(rows)} {a.split} rows, {a.share:.0%} corrupted, "
        "the rule: under the 95% quantile of shuffled pairs, or the lowest-scoring share)",
        "",
        "| model | corruption | score | AUC | rule | dropped | precision | recall | clean rows dropped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        prec = "n/a" if r["precision"] is None else f"{r['precision']:.3f}"
        lines.append(
            f"| {r['model']} | {r['corruption']} | {r['score']} | {r['auc']:.3f} | {r['rule']} | "
            f"{r['dropped']} of {r['rows']} | {prec} | "
            f"{r['recall']:.3f} | {r['clean_dropped_share']:.1%} |"
        )
    md = "\n".join(lines) + "\n"
    res = {
        "host": socket.gethostname(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "run": str(run),
        "split": a.split,
        "models": {k: str(v) for k, v in models.items()},
        "results": results,
    }
    write_results([(out, "filter"), (HERE / "results", f"caption_filter-{res['host']}")], res, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
