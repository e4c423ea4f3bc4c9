"""Runs INSIDE llm2vec's environment (scripts/setup_llm2vec_env.sh: transformers 4.44.2, llm2vec 0.2.3).

usage: python _llm2vec_encode.py MODEL_DIR GGUF_PATH TEXTS_JSON BATCH [--build]

--build writes MODEL_DIR first: a random Llama of SmolLM2-135M's shape with SmolLM2's tokenizer (read
from the GGUF by transformers 4.44, whose files both transformers versions load). Then times
llm2vec's ``LLM2Vec.encode`` (bidirectional, mean pooling) on the texts; prints JSON.
"""

import json
import sys
import time
from pathlib import Path

import torch

model_dir, gguf, texts_path, batch = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
if "--build" in sys.argv:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    print(json.dumps({"built": str(model_dir)}))
    sys.exit(0)

from llm2vec import LLM2Vec  # noqa: E402

texts = json.loads(texts_path.read_text())
l2v = LLM2Vec.from_pretrained(
    str(model_dir), pooling_mode="mean", max_length=512, torch_dtype=torch.float32, attn_implementation="sdpa"
)
l2v.encode([["", texts[0]]], batch_size=1, show_progress_bar=False, device="cpu")  # warm-up
t0 = time.perf_counter()
emb = l2v.encode([["", t] for t in texts], batch_size=batch, show_progress_bar=False, device="cpu")
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rows": int(emb.shape[0]), "dim": int(emb.shape[1])}))
