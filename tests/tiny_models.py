"""Tiny models built in code (no downloads) that several test modules use: a random CLIP vision tower and a
fake text encoder (the LLMs and their tokenizers: tiny_llm.py)."""

from __future__ import annotations

import hashlib

import torch


def tiny_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPVisionModel(cfg)


class FakeEncoder:
    """Deterministic features from the text hash; counts calls; can die on a given call."""

    def __init__(self, dim: int = 6, die_on_call: int | None = None):
        self.dim, self.calls, self.die_on_call = dim, 0, die_on_call

    def encode(self, texts, instruction=None, batch_size=32):
        self.calls += 1
        if self.calls == self.die_on_call:
            raise KeyboardInterrupt("killed")
        rows = [
            torch.tensor(
                list(hashlib.sha256(f"{instruction}|{t}".encode()).digest()[: self.dim]), dtype=torch.float32
            )
            for t in texts
        ]
        return torch.stack(rows)
