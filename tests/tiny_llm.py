"""Tiny random decoder LLMs with a real (word-level) tokenizer, built in code: no downloads."""

from __future__ import annotations

from pathlib import Path

import torch

from l2c_llava.data.captions import NUMBER_WORDS, POSITION_PHRASE
from l2c_llava.data.scenes import BACKGROUNDS, COLOURS, PLURAL, SHAPES

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
_EXTRA = {"gemma": {"head_dim": 8}, "qwen3": {"head_dim": 8}}

WORDS = sorted(
    set(
        " ".join(
            [
                *SHAPES,
                *PLURAL.values(),
                *COLOURS,
                *BACKGROUNDS,
                *NUMBER_WORDS,
                *POSITION_PHRASE.values(),
                "a an the and of on in at to is are there with image picture shows shapes objects small medium large",
                "solid outlined background given caption sentence retrieve detailed relevant short",
                "; . , ! @ # $ % ^ & * ( ) _ - : ? '",
            ]  # fmt: skip
        ).split()
    )
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(family: str, vocab_size: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        family, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False, **_EXTRA.get(family, {}),
    )  # fmt: skip


def save_tiny_llm(folder: Path, family: str = "llama", seed: int = 0, causal_lm: bool = True) -> Path:
    """A random tiny `family` model + tokenizer saved as a transformers folder (safetensors)."""
    from transformers import AutoModel, AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(family, len(tok))
    model = (AutoModelForCausalLM if causal_lm else AutoModel).from_config(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
