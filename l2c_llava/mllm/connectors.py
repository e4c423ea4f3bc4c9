"""Connectors beyond LLaVA's MLP: a small fixed number of vision tokens instead of one per patch.

- ``qformer`` (BLIP-2): learned queries; each layer lets the queries attend to each other
  (self-attention), then to the frozen image features (cross-attention), then an MLP. The image
  features are normalised and projected to the Q-Former width first, the queries' output projected
  to the LLM width last.
- ``perceiver`` (Flamingo's perceiver resampler, as BLIP-3 / xGen-MM uses it): learned latents; each
  layer's attention takes its keys and values from the image features *and* the latents together,
  then a feed-forward; a final LayerNorm and a projection to the LLM width.

Both map ``[B, patches, vision_dim] -> [B, num_queries, llm_dim]`` and stand in
``model.model.multi_modal_projector`` of transformers' ``LlavaForConditionalGeneration``
(``LlavaWithConnector`` below), so the training, checkpoint and generation code is the same as for the
MLP. Pre-LayerNorm residual blocks throughout (stable at the MLP's learning rates).

A folder saved with one of them carries ``l2c_connector`` in its ``config.json``; ``load_llava``
reads it back. transformers' own LLaVA class only has the MLP connector and cannot load it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from l2c_llava.errors import InputError

CONNECTORS = ("qformer", "perceiver")


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: int):
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim)
        )


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = _FeedForward(dim, mlp_ratio)

    def forward(self, q: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross_attn(self.norm_cross(q), image, image, need_weights=False)[0]
        return q + self.mlp(q)


class QFormerConnector(nn.Module):
    """BLIP-2-style Q-Former: `num_queries` learned queries read the image features."""

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        num_queries: int = 64,
        hidden_size: int | None = None,
        depth: int = 2,
        heads: int = 8,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        dim = hidden_size or vision_dim
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) / math.sqrt(dim))
        self.image_norm = nn.LayerNorm(vision_dim)
        self.image_proj = nn.Linear(vision_dim, dim)
        self.layers = nn.ModuleList(QFormerLayer(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, llm_dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        image = self.image_proj(self.image_norm(image_features))
        q = self.queries.expand(image.shape[0], -1, -1).to(image.dtype)
        for layer in self.layers:
            q = layer(q, image)
        return self.out_proj(self.norm(q))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = _FeedForward(dim, mlp_ratio)

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        lat = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(media), lat], dim=1)  # Flamingo: keys/values from media + latents
        latents = latents + self.attn(lat, kv, kv, need_weights=False)[0]
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Flamingo / BLIP-3 perceiver resampler: `num_queries` latents, then a projection to the LLM."""

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        num_queries: int = 64,
        hidden_size: int | None = None,
        depth: int = 2,
        heads: int = 8,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        dim = hidden_size or vision_dim
        self.num_queries = num_queries
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / math.sqrt(dim))
        self.media_proj = nn.Linear(vision_dim, dim) if dim != vision_dim else nn.Identity()
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, llm_dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        media = self.media_proj(image_features)
        lat = self.latents.expand(media.shape[0], -1, -1).to(media.dtype)
        for layer in self.layers:
            lat = layer(lat, media)
        return self.out_proj(self.norm(lat))


def make_connector(spec: dict, vision_dim: int, llm_dim: int) -> nn.Module:
    """`spec`: {"type": qformer|perceiver, "num_queries", "hidden_size", "depth", "heads", "mlp_ratio"}."""
    kind = spec.get("type")
    cls = {"qformer": QFormerConnector, "perceiver": PerceiverResampler}.get(kind)
    if cls is None:
        raise InputError(f"connector type {kind!r}: expected one of {', '.join(CONNECTORS)}")
    dim = spec.get("hidden_size") or vision_dim
    heads = int(spec.get("heads", 8))
    if dim % heads:
        raise InputError(f"connector width {dim} is not divisible by its {heads} heads (set connector.heads)")
    return cls(
        vision_dim,
        llm_dim,
        num_queries=int(spec.get("num_queries", 64)),
        hidden_size=spec.get("hidden_size"),
        depth=int(spec.get("depth", 2)),
        heads=heads,
        mlp_ratio=int(spec.get("mlp_ratio", 4)),
    )


def llava_with_connector_class():
    """``LlavaForConditionalGeneration`` whose projector is the connector named in
    ``config.l2c_connector`` (defined lazily: transformers is imported on first use)."""
    global _CLS
    if _CLS is None:
        from transformers import LlavaForConditionalGeneration

        class LlavaWithConnector(LlavaForConditionalGeneration):
            def __init__(self, config):
                super().__init__(config)
                vision_dim = config.vision_config.hidden_size
                if isinstance(config.vision_feature_layer, (list, tuple)):
                    vision_dim *= len(config.vision_feature_layer)
                self.model.multi_modal_projector = make_connector(
                    config.l2c_connector, vision_dim, config.text_config.hidden_size
                )

        _CLS = LlavaWithConnector
    return _CLS


_CLS = None
