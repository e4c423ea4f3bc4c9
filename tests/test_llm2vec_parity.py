"""llm2vec is the specification of the text encoder: same checkpoint, pooling, instruction and max
length -> the same embeddings (cosine >= 0.9999 per row) as llm2vec.LLM2Vec.encode, which runs in its
own environment (it does not import next to transformers 5)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from l2c_llava.embedded import smollm2_gguf_path
from l2c_llava.stage1.encoder import TextEncoder

from .conftest import ROOT, env_setup

TEXTS = [
    "a red circle",
    "Two blue squares and a large green star on a beige background.",
    "   padded text with spaces   ",
    "The image shows seven flat geometric shapes arranged on a plain dark navy background. "
    * 4,  # > doc_max_length
    "x",
    "In the top left corner, there is a medium solid yellow star, tilted slightly to one side.",
]


@pytest.mark.slow
def test_text_encoder_matches_llm2vec(tmp_path):
    setup = env_setup("setup_llm2vec_env.sh")  # (built in the background while the other tests ran)
    assert setup.returncode == 0, setup.stderr[-3000:]
    ref_python = setup.stdout.strip().splitlines()[-1]
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TEXTS))
    run = subprocess.run(
        [
            ref_python,
            str(ROOT / "tests" / "reference" / "llm2vec_reference.py"),
            str(tmp_path),
            str(smollm2_gguf_path()),
            str(texts),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reference = load_file(str(tmp_path / "reference.safetensors"))
    assert len(reference) == 16
    worst = 1.0
    for key, want in reference.items():
        pooling, attn, instr = key.split("|")
        enc = TextEncoder.from_pretrained(
            tmp_path / "model",
            pooling=pooling,
            max_length=64,
            doc_max_length=48,
            attn_implementation=attn,
            device="cpu",
        )
        instruction = "Given a caption, retrieve a detailed relevant caption" if instr == "instr" else None
        got = enc.encode(TEXTS, instruction=instruction, batch_size=2)
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        worst = min(worst, float(cos.min()))
        assert bool((cos >= 0.9999).all()), (key, cos.tolist())
    print(
        f"llm2vec parity: worst per-row cosine {worst:.6f} over {len(reference)} settings x {len(TEXTS)} texts"
    )
