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
            ]
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
        family,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        **_EXTRA.get(family, {}),
    )


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


SP_TEXTS_SEED = 0


def train_sentencepiece(vocab_size: int = 400) -> bytes:
    """A tiny Llama-style SentencePiece model (BPE, byte fallback, digits split, dummy prefix,
    whitespace kept) trained in memory on sentences of the synthetic vocabulary: no downloads."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(SP_TEXTS_SEED)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    return buf.getvalue()


def _added(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def save_tiny_sp_llama(
    folder: Path, seed: int = 0, rope_theta: float = 100000.0, rope_scaling: dict | None = None
) -> Path:
    """A random tiny Llama in the layout of lmsys/vicuna-7b-v1.5: config.json + safetensors weights and
    the tokenizer as `tokenizer.model` only (SentencePiece; no tokenizer.json), `tokenizer_config.json`
    and `special_tokens_map.json` as Vicuna ships them. A RoPE base other than 10000 (and optionally a
    scaling) so that a consumer that misses it gives other logits."""
    import json

    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_proto = train_sentencepiece()
    (folder / "tokenizer.model").write_bytes(model_proto)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": _added("<s>"),
                "clean_up_tokenization_spaces": False,
                "eos_token": _added("</s>"),
                "legacy": False,
                "model_max_length": 4096,
                "pad_token": None,
                "padding_side": "right",
                "sp_model_kwargs": {},
                "tokenizer_class": "LlamaTokenizer",
                "unk_token": _added("<unk>"),
            },
            indent=2,
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": _added("<s>"), "eos_token": _added("</s>"), "unk_token": _added("<unk>")}, indent=2
        )
    )
    cfg = tiny_config("llama", 400)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})}
    if rope_scaling:
        cfg.rope_parameters["rope_type"] = rope_scaling.get("rope_type", "linear")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
