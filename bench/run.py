"""The benchmark suite in one command: ``python bench/run.py [--only NAME ...] [--quick]``.

Runs each benchmark (every one compares its variants side by side in the same process and run) and
writes ``bench/results/cpu-<host>.json`` plus a table in ``bench/results/cpu-<host>.md``. Run it on an
otherwise idle machine: the figures are ratios because absolute times on a shared machine are noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BENCHES = {
    "stage2_step": ("stage 2 step: cached features vs plain CLIP vs online LLM features", "stage2_step"),
    "text_encode": ("text encoding: TextEncoder.encode vs llm2vec", "text_encode"),
    "llava_data": ("LLaVA data pipeline: collation vs model step; padding waste", "llava_data"),
    "llava_step": ("LLaVA step: LM head on every position vs on the supervised ones", "llava_step"),
    "retrieval": ("retrieval eval, 5K images x 25K captions, vs one matmul", "retrieval"),
    "gemm_limit": ("the GEMM limit and each stage's achieved FLOP/s as a share of it", "gemm_limit"),
}
QUICK = {
    "stage2_step": {"steps": 2, "online": False},
    "text_encode": {"images": 3, "rounds": 1},
    "llava_data": {"batches": 2, "model_steps": 1},
    "retrieval": {"images": 500, "repeats": 1},
    "llava_step": {"batch": 2, "steps": 1},
    "gemm_limit": {"quick": True},
}


def main(argv=None) -> int:
    import importlib

    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that every benchmark runs")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    names = a.only or list(BENCHES)
    results = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": a.quick,
        "benches": {},
    }
    for name in names:
        title, module = BENCHES[name]
        print(f"== {name}: {title}", flush=True)
        t0 = time.perf_counter()
        r = importlib.import_module(module).run(**(QUICK[name] if a.quick else {}))
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        r["date"] = results["date"]
        results["benches"][name] = r
        print(json.dumps(r, indent=2), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu-{'quick-' if a.quick else ''}{results['host']}"
    previous = out / f"{stem}.json"
    if a.only and previous.is_file():  # a partial run updates its benchmarks, keeps the others' figures
        old = json.loads(previous.read_text())
        kept = {k: {**v, "date": v.get("date", old.get("date"))} for k, v in old.get("benches", {}).items()}
        results["benches"] = {**kept, **results["benches"]}
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# CPU benchmarks ({results['host']}, {results['threads']} threads, torch {results['torch']}, {results['date']})",
        "",
    ]
    for name, r in results["benches"].items():
        title = BENCHES[name][0] if name in BENCHES else name
        lines += [f"## {name}: {title}", "", "```json", json.dumps(r, indent=2), "```", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print(f"written {out / stem}.json / .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
