"""Text encoding throughput: our ``TextEncoder.encode`` vs llm2vec's ``LLM2Vec.encode``, same model
(a random Llama of SmolLM2-135M's shape, built in llm2vec's environment), same texts (half short
captions, half dense ones), same batch size, mean pooling, bidirectional attention, float32 on the
CPU. The two alternate (ours, llm2vec, ours, llm2vec) and each side reports its best round: texts/s
and tokens/s (tokens counted once, with the shared tokenizer). Target: at least as fast.

llm2vec does not import next to transformers 5, so it runs in its own environment
(scripts/setup_llm2vec_env.sh, about 80 s the first time).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from stage2_step import LONG, SHORT  # noqa: E402


def run(n: int = 128, batch: int = 32, rounds: int = 2) -> dict:
    from l2c_llava.embedded import smollm2_gguf_path
    from l2c_llava.stage1.encoder import TextEncoder

    setup = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_llm2vec_env.sh")], capture_output=True, text=True
    )
    if setup.returncode != 0:
        raise RuntimeError(f"llm2vec environment: {setup.stderr[-2000:]}")
    ref_python = setup.stdout.strip().splitlines()[-1]
    texts = [(SHORT if i % 2 else LONG) + f" ({i})" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        model, tfile = Path(tmp) / "model", Path(tmp) / "texts.json"
        tfile.write_text(json.dumps(texts))
        helper = [
            ref_python,
            str(ROOT / "bench" / "_llm2vec_encode.py"),
            str(model),
            str(smollm2_gguf_path()),
            str(tfile),
            str(batch),
        ]
        subprocess.run(helper + ["--build"], check=True, capture_output=True, text=True)
        enc = TextEncoder.from_pretrained(
            model,
            pooling="mean",
            max_length=512,
            torch_dtype="float32",
            attn_implementation="sdpa",
            device="cpu",
        )
        tokens = sum(len(enc.tokenizer(t)["input_ids"]) for t in texts)
        enc.encode(texts[:1], batch_size=1)  # warm-up
        ours, theirs = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            enc.encode(texts, batch_size=batch, show_progress=False)
            ours.append(time.perf_counter() - t0)
            out = subprocess.run(helper, check=True, capture_output=True, text=True)
            theirs.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    a, b = min(ours), min(theirs)
    return {
        "texts": n,
        "tokens": tokens,
        "batch": batch,
        "ours": {"texts_per_s": round(n / a, 1), "tokens_per_s": round(tokens / a, 1)},
        "llm2vec": {"texts_per_s": round(n / b, 1), "tokens_per_s": round(tokens / b, 1)},
        "speedup_ours_over_llm2vec": round(b / a, 3),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
