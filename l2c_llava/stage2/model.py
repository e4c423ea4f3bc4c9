"""The LLM2CLIP model: a CLIP vision tower with a new projection, and the paper's adapter on the
cached LLM caption feature, meeting in a shared space under the CLIP loss.

Names follow the released checkpoints (microsoft/LLM2CLIP-Openai-L-14-336): ``vision_model.*``
(transformers' CLIP vision transformer), ``visual_projection``, ``text_adapter.*``, ``logit_scale``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearBlock(nn.Module):
    """Pre-LN residual MLP: x + W2 GELU(W1 LN(x)), hidden width `expansion` x dim. Parameter names as
    in the released checkpoints: ``ln``, ``fn.0`` (W1), ``fn.3`` (W2)."""

    def __init__(self, dim: int, expansion: int = 2):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fn = nn.Sequential(
            nn.Linear(dim, dim * expansion), nn.GELU(), nn.Dropout(0.0), nn.Linear(dim * expansion, dim)
        )

    @property
    def fc1(self) -> nn.Linear:
        return self.fn[0]

    @property
    def fc2(self) -> nn.Linear:
        return self.fn[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.ln(x))


class TextAdapter(nn.Module):
    """The text side on a cached LLM feature [B, in_dim] -> [B, out_dim]: L2 normalisation, residual
    LinearBlocks, LayerNorm, Linear with bias (the public code's TextProj; ~273M parameters at 4096).
    Held in one ``adaptor`` Sequential so the keys match the released checkpoints
    (``text_adapter.adaptor.{i}.*``: blocks, then the LayerNorm, then the projection)."""

    def __init__(
        self, in_dim: int, out_dim: int = 1280, num_blocks: int = 4, expansion: int = 2, center: bool = False
    ):
        super().__init__()
        if center:  # optional, not in the paper: subtract the mean caption feature before normalising
            self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.adaptor = nn.Sequential(
            *[LinearBlock(in_dim, expansion) for _ in range(num_blocks)],
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, out_dim),
        )

    @property
    def blocks(self) -> list[LinearBlock]:
        return list(self.adaptor)[:-2]

    @property
    def norm(self) -> nn.LayerNorm:
        return self.adaptor[-2]

    @property
    def proj(self) -> nn.Linear:
        return self.adaptor[-1]

    @property
    def centered(self) -> bool:
        return hasattr(self, "feature_mean")

    def forward(self, llm_features: torch.Tensor) -> torch.Tensor:
        if self.centered:
            llm_features = llm_features - self.feature_mean
        return self.adaptor(F.normalize(llm_features, dim=-1))


def clamped_scale(logit_scale: torch.Tensor, max_scale: float | None) -> torch.Tensor:
    """exp(s) with s in [0, ln max_scale] (no clamp without a max)."""
    if max_scale is None:
        return logit_scale.exp()
    return logit_scale.clamp(0, math.log(max_scale)).exp()


class LLM2CLIPModel(nn.Module):
    """vision_model (CLIP ViT) -> visual_projection; cached LLM feature -> text_adapter; logit_scale."""

    def __init__(
        self,
        vision_model: nn.Module,
        vision_hidden: int,
        text_dim: int,
        projection_dim: int = 1280,
        num_blocks: int = 4,
        expansion: int = 2,
        logit_scale_init: float = 1 / 0.07,
        center_text: bool = False,
    ):
        super().__init__()
        self.vision_model = vision_model  # transformers CLIP vision transformer
        self.visual_projection = nn.Linear(vision_hidden, projection_dim, bias=False)  # new, not OpenAI's
        self.text_adapter = TextAdapter(text_dim, projection_dim, num_blocks, expansion, center_text)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        # the clamp the forward applies too (exp(s) <= max): a no-op where the clamp after each step
        # runs, and the one that holds where the optimizer keeps its own copy of s (DeepSpeed)
        self.max_logit_scale: float | None = None

    @classmethod
    def from_vision_tower(cls, vision, text_dim: int, **kwargs) -> LLM2CLIPModel:
        """Wrap a transformers CLIPVisionModel (or CLIPModel: its vision side is taken). On
        transformers 5 a CLIPVisionModel is itself the vision transformer; a CLIPModel holds one."""
        tower = getattr(vision, "vision_model", vision)
        config = getattr(tower, "config", None) or vision.config.vision_config
        hidden = getattr(config, "hidden_size", None) or vision.config.vision_config.hidden_size
        return cls(tower, hidden, text_dim, **kwargs)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, projection_dim] (pooled CLS after the tower's post-LayerNorm, projected)."""
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)

    def get_text_features(self, llm_features: torch.Tensor) -> torch.Tensor:
        """Cached LLM caption features [B, text_dim] -> [B, projection_dim]."""
        return self.text_adapter(llm_features)

    def forward(self, pixel_values: torch.Tensor, llm_features: torch.Tensor):
        """Normalised image and text embeddings and the logit scale exp(s)."""
        img = F.normalize(self.get_image_features(pixel_values), dim=-1)
        txt = F.normalize(self.get_text_features(llm_features), dim=-1)
        return img, txt, clamped_scale(self.logit_scale, self.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """Keep exp(s) in [1, max_scale] (the paper clamps s to [0, ln 100] after each step)."""
        self.logit_scale.clamp_(0, math.log(max_scale))
