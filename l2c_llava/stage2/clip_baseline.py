"""The demo CLIP baseline (``l2c clip pretrain``): a small transformers ``CLIPModel`` (ViT image
tower + its own causal text tower over OpenAI's CLIP BPE, 77-token context) trained from scratch on
image-caption data with the CLIP loss.

At real scale the baseline is OpenAI CLIP as downloaded. No pretrained CLIP can be fetched here, so
the demo trains one, saves it as a standard CLIP folder (``CLIPModel`` weights and config, the
tokenizer, ``preprocessor_config.json``), and stage 2 starts from its vision tower exactly as the
real recipe starts from OpenAI's. ``l2c stage2 eval`` then compares the two: this CLIP through its
own text tower, LLM2CLIP through the LLM features and the adapter.

By default it trains on Karpathy-style data: one of an image's short captions per epoch (the
alt-text-like captions OpenAI CLIP saw), dense captions truncated at 77 tokens only if asked for.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from l2c_llava.config import ClipConfig
from l2c_llava.data.images import TrainTransform, load_rgb, write_preprocessor_config
from l2c_llava.data.readers import read_caption_pairs, read_karpathy
from l2c_llava.embedded import clip_tokenizer
from l2c_llava.errors import InputError
from l2c_llava.io import atomic_write_json, publish_folder, run_lock
from l2c_llava.stage2.contrastive import ContrastiveRecipe
from l2c_llava.stage2.model import clamped_scale
from l2c_llava.train.sharded import clamp_scale

logger = logging.getLogger("l2c_llava.clip")


def build_clip(m, tokenizer):
    """A randomly initialised transformers CLIPModel of the configured size for `tokenizer`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=m.text_width,
        intermediate_size=m.text_width * m.mlp_ratio,
        num_hidden_layers=m.text_layers,
        num_attention_heads=m.text_heads,
        max_position_embeddings=m.context_length,
        projection_dim=m.projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    vision = CLIPVisionConfig(
        image_size=m.image_size,
        patch_size=m.patch_size,
        hidden_size=m.vision_width,
        intermediate_size=m.vision_width * m.mlp_ratio,
        num_hidden_layers=m.vision_layers,
        num_attention_heads=m.vision_heads,
        projection_dim=m.projection_dim,
        hidden_act="gelu",
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=m.projection_dim
    )
    config._attn_implementation = m.attn_implementation
    return CLIPModel(config)


def pooled(out) -> torch.Tensor:
    """transformers >= 5 returns model outputs from get_*_features; older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEmbedder(nn.Module):
    """CLIPModel -> (normalised image embeddings, normalised text embeddings, exp(logit scale)) in one
    forward, so DDP sees every parameter used."""

    def __init__(self, clip, max_logit_scale: float | None = None):
        super().__init__()
        self.clip = clip
        self.max_logit_scale = max_logit_scale

    def forward(self, pixel_values, input_ids, attention_mask):
        img = pooled(self.clip.get_image_features(pixel_values=pixel_values))
        txt = pooled(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        scale = clamped_scale(self.clip.logit_scale, self.max_logit_scale)
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale


def pick_caption(
    seed: int, epoch: int, sample: int, captions: list[str], dense: str | None, dense_share: float
) -> str:
    """The caption of one sample in one epoch: reproducible whatever worker or process draws it."""
    rng = random.Random(f"{seed}-{epoch}-{sample}-caption")
    if dense is not None and rng.random() < dense_share:
        return dense
    return captions[rng.randrange(len(captions))]


class CaptionedImages(Dataset):
    """(pixel_values, caption) with the caption drawn per (seed, epoch, sample)."""

    def __init__(
        self, items: list[tuple[Path, list[str], str | None]], transform, seed: int, dense_share: float
    ):
        self.items, self.transform, self.seed, self.dense_share, self.epoch = (
            items,
            transform,
            seed,
            dense_share,
            0,
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, captions, dense = self.items[i]
        caption = pick_caption(self.seed, self.epoch, i, captions, dense, self.dense_share)
        self.transform.rng = random.Random(f"{self.seed}-{self.epoch}-{i}-crop")
        return self.transform(load_rgb(path)), caption


class Collate:
    """Stack images, tokenize captions (truncated at the context length, padded to the longest)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, batch):
        pixels = torch.stack([b[0] for b in batch])
        tok = self.tokenizer(
            [b[1] for b in batch],
            padding=True,
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return pixels, tok["input_ids"], tok["attention_mask"]


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters (norms, biases), embeddings' positions nor the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "position_embedding" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]


class ClipPretrainRecipe(ContrastiveRecipe):
    name = "clip pretrain"

    def __init__(self, cfg: ClipConfig, source: str | None = None, overrides: tuple[str, ...] = ()):
        super().__init__(cfg, source, overrides)
        self.tokenizer = clip_tokenizer()
        self.collate = Collate(self.tokenizer, cfg.model.context_length)

    def build_data(self, acc):
        d, seed = self.cfg.data, self.cfg.run.seed
        if d.format == "karpathy":
            rs = read_karpathy(
                d.train, d.image_root, split=d.split, on_bad_row=d.on_bad_row, image_check=d.image_check
            )
            dense: dict[Path, str] = {}
            if d.dense is not None:
                pairs = read_caption_pairs(
                    d.dense,
                    d.image_root,
                    short_key=d.short_key,
                    long_key=d.long_key,
                    on_bad_row=d.on_bad_row,
                    image_check="none",
                )
                dense = {p.image_path: p.long for p in pairs}
                covered = sum(p in dense for p in rs.images)
                logger.info("dense captions for %d of %d images from %s", covered, len(rs.images), d.dense)
                if not covered:
                    raise InputError(
                        f"{d.dense}: none of its images is in the {d.split} split of {d.train} "
                        "(data.dense must name the same images, relative to data.image_root)"
                    )
            items = [(p, rs.captions_of(i), dense.get(p)) for i, p in enumerate(rs.images)]
        else:
            pairs = read_caption_pairs(
                d.train,
                d.image_root,
                short_key=d.short_key,
                long_key=d.long_key,
                on_bad_row=d.on_bad_row,
                image_check=d.image_check,
            )
            items = [(p.image_path, [p.short], p.long) for p in pairs]
        transform = TrainTransform(self.cfg.model.image_size, tuple(d.rrc_scale), rng=random.Random(seed))
        ds = CaptionedImages(items, transform, seed, d.dense_share)
        return ds, len(ds)

    def build_model(self, acc):
        return ClipEmbedder(build_clip(self.cfg.model, self.tokenizer), self.cfg.train.logit_scale_max)

    def param_groups(self, model):
        return param_groups(model, self.cfg.train.lr, self.cfg.train.weight_decay)

    def embed(self, wrapped, batch, acc):
        pixels, ids, mask = (x.to(acc.device) for x in batch)
        return wrapped(pixels, ids, mask)

    def after_step(self, acc, model) -> float:
        return clamp_scale(acc, model.clip.logit_scale, self.cfg.train.logit_scale_max)

    def save_model(self, model) -> Path:
        """A standard CLIP folder (what OpenAI CLIP is on disk): CLIPModel, tokenizer, image processor."""

        def build(tmp: Path) -> None:
            model.clip.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            write_preprocessor_config(tmp, self.cfg.model.image_size)

        out = publish_folder(self.run_dir / "model", build, "clip model", overwrite=True)  # the run's own
        atomic_write_json(
            self.run_dir / "model_info.json",
            {
                "model": str(out),
                "parameters": sum(p.numel() for p in model.parameters()),
                "context_length": self.cfg.model.context_length,
                "image_size": self.cfg.model.image_size,
            },
        )
        return out


def run_clip_pretrain(cfg: ClipConfig, source: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    with run_lock(cfg.run.output_dir, "clip pretrain run"):  # one writer per run folder
        return ClipPretrainRecipe(cfg, source, overrides).run()
