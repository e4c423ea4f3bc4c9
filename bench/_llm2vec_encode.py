"""Runs INSIDE llm2vec's environment (scripts/setup_llm2vec_env.sh: transformers 4.44.2, llm2vec 0.2.3).

usage: python _llm2vec_encode.py MODEL_DIR GGUF_PATH TEXTS_JSON BATCH [--build [WEIGHTS_DIR]]
       [--max-length N] [--dtype float32|bfloat16] [--save EMB.safetensors]

--build writes MODEL_DIR first: a Llama of SmolLM2-135M's shape with SmolLM2's tokenizer (read from the
GGUF by transformers 4.44, whose files both transformers versions load); with WEIGHTS_DIR (a transformers
5 folder of SmolLM2-135M: its config.json and model.safetensors) the real weights, else random ones.
Then times llm2vec's ``LLM2Vec.encode`` (bidirectional, mean pooling) on the texts; prints JSON, and
with --save writes the embeddings.
"""

import json
import sys
import time
from pathlib import Path

import torch


def _opt(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


model_dir, gguf, texts_path, batch = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
if "--build" in sys.argv:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    i = sys.argv.index("--build")
    weights = (
        Path(sys.argv[i + 1]) if i + 1 < len(sys.argv) and not sys.argv[i + 1].startswith("--") else None
    )
    shape = {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
    }
    if weights is not None:  # transformers 5 writes rope_theta under rope_parameters
        src = json.loads((weights / "config.json").read_text())
        shape = {k: src[k] for k in shape if k in src} | {
            "rope_theta": src.get("rope_parameters", {}).get("rope_theta", src.get("rope_theta", 10000.0))
        }
    cfg = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        **shape,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if weights is not None:
        from safetensors.torch import load_file

        state = load_file(str(weights / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise SystemExit(
                f"weights of {weights} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    print(json.dumps({"built": str(model_dir), "weights": str(weights) if weights else "random"}))
    sys.exit(0)

from llm2vec import LLM2Vec  # noqa: E402

texts = json.loads(texts_path.read_text())
dtype = getattr(torch, _opt("--dtype", "float32"))
l2v = LLM2Vec.from_pretrained(
    str(model_dir),
    pooling_mode="mean",
    max_length=int(_opt("--max-length", 512)),
    torch_dtype=dtype,
    attn_implementation="sdpa",
)
l2v.encode([["", texts[0]]], batch_size=1, show_progress_bar=False, device="cpu")  # warm-up
t0 = time.perf_counter()
emb = l2v.encode([["", t] for t in texts], batch_size=batch, show_progress_bar=False, device="cpu")
seconds = time.perf_counter() - t0
if "--save" in sys.argv:
    from safetensors.torch import save_file

    save_file({"embeddings": emb.float().contiguous()}, _opt("--save", None))
print(json.dumps({"seconds": seconds, "rows": int(emb.shape[0]), "dim": int(emb.shape[1])}))
