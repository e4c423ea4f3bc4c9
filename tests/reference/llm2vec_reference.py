"""Runs INSIDE the llm2vec reference environment (scripts/setup_llm2vec_env.sh): transformers 4.44.2,
llm2vec 0.2.3. Builds a tiny random Llama with the SmolLM2 tokenizer (read from the embedded GGUF by
transformers 4.44, whose tokenizer files both transformers versions load), saves it, and writes
llm2vec's embeddings of the given texts for each pooling x instruction to reference.safetensors.

usage: python llm2vec_reference.py OUT_DIR GGUF_PATH TEXTS_JSON
"""

import json
import sys
from pathlib import Path

import torch
from llm2vec import LLM2Vec
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

out, gguf, texts_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
texts = json.loads(texts_path.read_text())
tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
cfg = LlamaConfig(
    vocab_size=len(tok),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
    tie_word_embeddings=False,
)
torch.manual_seed(0)
model_dir = out / "model"
LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
tok.save_pretrained(model_dir)

results = {}
for pooling in ("mean", "weighted_mean", "eos_token", "last_token"):
    for attn in ("eager", "sdpa"):
        l2v = LLM2Vec.from_pretrained(
            str(model_dir),
            pooling_mode=pooling,
            max_length=64,
            doc_max_length=48,
            torch_dtype=torch.float32,
            attn_implementation=attn,
        )
        for key, instruction in (
            ("none", ""),
            ("instr", "Given a caption, retrieve a detailed relevant caption"),
        ):
            sentences = [[instruction, t] for t in texts]
            emb = l2v.encode(sentences, batch_size=3, show_progress_bar=False, device="cpu")
            results[f"{pooling}|{attn}|{key}"] = emb.float().contiguous()
save_file(results, str(out / "reference.safetensors"))
print(
    json.dumps(
        {
            "versions": {
                "transformers": __import__("transformers").__version__,
                "llm2vec": __import__("llm2vec").__version__
                if hasattr(__import__("llm2vec"), "__version__")
                else "0.2.3",
            },
            "keys": sorted(results),
        }
    )
)
