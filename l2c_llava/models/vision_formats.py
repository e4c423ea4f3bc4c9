"""The upgraded CLIP vision encoder in the formats of the two libraries VLM code bases build on:
open_clip (OpenFlamingo-style: ``open_clip.create_model_from_pretrained('local-dir:PATH')``, then
``model.visual``) and timm (prismatic-style: ``timm.create_model('local-dir:PATH', pretrained=True)``).

Both are written from a transformers ``CLIPVisionTransformer`` (the tower ``l2c export vision`` writes
as a ``CLIPVisionModel``) by renaming and fusing its weights, nothing retrained, nothing imported from
either library (neither imports without torchvision, which has no CPU build next to this project's
torch); each library's own loader reads the folders in ``tests/test_vision_consumers.py``.

The mapping, per transformer block ``i`` (HF -> open_clip ``visual.*`` / timm):
``embeddings.class_embedding`` -> ``class_embedding`` / ``cls_token`` ([1, 1, D]);
``embeddings.position_embedding.weight`` -> ``positional_embedding`` / ``pos_embed`` ([1, N+1, D]);
``embeddings.patch_embedding.weight`` -> ``conv1.weight`` / ``patch_embed.proj.weight`` (no bias in
either); ``pre_layrnorm`` -> ``ln_pre`` / ``norm_pre``; ``layer_norm1|2`` -> ``ln_1|2`` / ``norm1|2``;
``q_proj, k_proj, v_proj`` -> one ``attn.in_proj_weight|bias`` / ``attn.qkv.weight|bias`` (q, k, v
stacked in that order); ``out_proj`` -> ``attn.out_proj`` / ``attn.proj``; ``mlp.fc1|fc2`` ->
``mlp.c_fc|c_proj`` / ``mlp.fc1|fc2``; ``post_layernorm`` -> ``ln_post`` / ``norm`` (open_clip and timm
apply it to every token, transformers to the class token only: the pooled feature is the same).
LLM2CLIP's image projection (``visual_projection.weight`` [E, D], no bias), where the source has one,
-> ``visual.proj`` ([D, E]: open_clip multiplies on the right) / ``head.weight`` with a zero
``head.bias`` (what timm's own OpenAI-CLIP conversion writes); without one, open_clip gets the identity
(``encode_image`` = the pooled feature) and timm no head (``num_classes`` 0).

open_clip's loader builds a whole CLIP and loads it strictly, so the folder also holds a text tower:
the text side of LLM2CLIP is an LLM with an adapter, which open_clip cannot express, so that tower is
the smallest open_clip accepts (1 layer, width 8) with every weight zero: ``encode_text`` returns
zeros, visibly not a text encoder. The LLM2CLIP text side is ``l2c export llm2clip``.

Preprocessing is the one the encoder was evaluated and trained around (``l2c_llava.data.images``):
shortest side resized to the tower's size (bicubic), centre crop, OpenAI CLIP mean / std: open_clip
``resize_mode: shortest``, timm ``crop_pct: 1.0, crop_mode: center``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from l2c_llava.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from l2c_llava.errors import L2CError

FORMATS = ("hf", "open_clip", "timm")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"
# the smallest text tower open_clip builds (it divides by its layer count), all zeros
NULL_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 1, "layers": 1}
# timm's registered OpenAI-CLIP ViTs by (width, depth, heads, patch, size, quick_gelu): the same
# weights under the name a timm user knows; any other shape uses the base name with its model_args
TIMM_NAMES = {
    (1024, 24, 16, 14, 336, True): "vit_large_patch14_clip_quickgelu_336",
    (1024, 24, 16, 14, 224, True): "vit_large_patch14_clip_quickgelu_224",
    (768, 12, 12, 16, 224, True): "vit_base_patch16_clip_quickgelu_224",
    (768, 12, 12, 32, 224, True): "vit_base_patch32_clip_quickgelu_224",
    (1024, 24, 16, 14, 336, False): "vit_large_patch14_clip_336",
    (1024, 24, 16, 14, 224, False): "vit_large_patch14_clip_224",
    (768, 12, 12, 16, 224, False): "vit_base_patch16_clip_224",
    (768, 12, 12, 32, 224, False): "vit_base_patch32_clip_224",
}


class VisionFormatError(L2CError, ValueError):
    """A tower that open_clip's or timm's ViT cannot express exactly (activation, norm eps, sizes)."""


def _shape(config) -> dict:
    """What both libraries need of a transformers CLIPVisionConfig, refused where they would compute
    something else."""
    act = config.hidden_act
    if act not in ("quick_gelu", "gelu"):
        raise VisionFormatError(
            f"the tower's hidden_act is {act!r}: open_clip and timm CLIP ViTs use quick_gelu (OpenAI CLIP) "
            "or exact gelu; export it with --format hf"
        )
    eps = float(getattr(config, "layer_norm_eps", 1e-5))
    d, ffn = int(config.hidden_size), int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    if d % heads:
        raise VisionFormatError(f"hidden_size {d} is not a multiple of num_attention_heads {heads}")
    if int(d * (ffn / d)) != ffn:  # timm sizes its MLP as int(dim * mlp_ratio)
        raise VisionFormatError(f"intermediate_size {ffn} is not int(hidden_size * ratio) for hidden {d}")
    if getattr(config, "num_channels", 3) != 3:
        raise VisionFormatError(f"num_channels {config.num_channels}: both libraries expect RGB")
    return {
        "width": d,
        "layers": int(config.num_hidden_layers),
        "heads": heads,
        "mlp_ratio": ffn / d,
        "patch": int(config.patch_size),
        "size": int(config.image_size),
        "quick_gelu": act == "quick_gelu",
        "eps": eps,
    }


def check_expressible(config, format: str) -> None:
    """Raise VisionFormatError, before anything is written, where `format` cannot hold the tower."""
    s = _shape(config)
    if format == "timm" and s["eps"] != 1e-5:
        raise VisionFormatError(
            f"layer_norm_eps {s['eps']}: timm's CLIP ViTs use LayerNorm's 1e-5 (and a config.json cannot "
            "name another); use --format open_clip or hf"
        )


def _hf_vision_state(tower) -> dict[str, torch.Tensor]:
    """The CLIPVisionTransformer's own keys (``embeddings.*``, ``encoder.layers.*`` ...), whether given
    a CLIPVisionModel (``vision_model.*``) or the transformer itself."""
    state = tower.state_dict()
    if any(k.startswith("vision_model.") for k in state):
        state = {
            k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")
        }
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def _blocks(state: dict, layers: int):
    for i in range(layers):
        p = f"encoder.layers.{i}."
        qkv_w = torch.cat([state[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], 0)
        qkv_b = torch.cat([state[p + f"self_attn.{n}_proj.bias"] for n in "qkv"], 0)
        yield i, p, qkv_w, qkv_b


def open_clip_state(tower, projection: torch.Tensor | None = None, logit_scale: float | None = None):
    """(state dict, model_cfg) of an open_clip ``CLIP`` whose ``visual`` is `tower` (a transformers
    CLIP vision tower) and whose ``visual.proj`` is `projection` ([E, D], LLM2CLIP's
    visual_projection.weight) or the identity; the text tower is the zero one (module docstring)."""
    s = _shape(tower.config)
    st = _hf_vision_state(tower)
    d = s["width"]
    proj = projection.detach().to(torch.float32).T.contiguous() if projection is not None else torch.eye(d)
    out = {
        "visual.class_embedding": st["embeddings.class_embedding"],
        "visual.positional_embedding": st["embeddings.position_embedding.weight"],
        "visual.conv1.weight": st["embeddings.patch_embedding.weight"],
        "visual.ln_pre.weight": st["pre_layrnorm.weight"],
        "visual.ln_pre.bias": st["pre_layrnorm.bias"],
        "visual.ln_post.weight": st["post_layernorm.weight"],
        "visual.ln_post.bias": st["post_layernorm.bias"],
        "visual.proj": proj,
    }
    for i, p, qkv_w, qkv_b in _blocks(st, s["layers"]):
        o = f"visual.transformer.resblocks.{i}."
        out |= {
            o + "ln_1.weight": st[p + "layer_norm1.weight"],
            o + "ln_1.bias": st[p + "layer_norm1.bias"],
            o + "attn.in_proj_weight": qkv_w,
            o + "attn.in_proj_bias": qkv_b,
            o + "attn.out_proj.weight": st[p + "self_attn.out_proj.weight"],
            o + "attn.out_proj.bias": st[p + "self_attn.out_proj.bias"],
            o + "ln_2.weight": st[p + "layer_norm2.weight"],
            o + "ln_2.bias": st[p + "layer_norm2.bias"],
            o + "mlp.c_fc.weight": st[p + "mlp.fc1.weight"],
            o + "mlp.c_fc.bias": st[p + "mlp.fc1.bias"],
            o + "mlp.c_proj.weight": st[p + "mlp.fc2.weight"],
            o + "mlp.c_proj.bias": st[p + "mlp.fc2.bias"],
        }
    embed_dim = proj.shape[1]
    w, n = NULL_TEXT["width"], NULL_TEXT["context_length"]
    out |= {
        "positional_embedding": torch.zeros(n, w),
        "text_projection": torch.zeros(w, embed_dim),
        "token_embedding.weight": torch.zeros(NULL_TEXT["vocab_size"], w),
        "ln_final.weight": torch.zeros(w),
        "ln_final.bias": torch.zeros(w),
        "logit_scale": torch.tensor(math.log(1 / 0.07) if logit_scale is None else float(logit_scale)),
    }
    t = "transformer.resblocks.0."
    out |= {
        t + "ln_1.weight": torch.zeros(w),
        t + "ln_1.bias": torch.zeros(w),
        t + "attn.in_proj_weight": torch.zeros(3 * w, w),
        t + "attn.in_proj_bias": torch.zeros(3 * w),
        t + "attn.out_proj.weight": torch.zeros(w, w),
        t + "attn.out_proj.bias": torch.zeros(w),
        t + "ln_2.weight": torch.zeros(w),
        t + "ln_2.bias": torch.zeros(w),
        t + "mlp.c_fc.weight": torch.zeros(4 * w, w),
        t + "mlp.c_fc.bias": torch.zeros(4 * w),
        t + "mlp.c_proj.weight": torch.zeros(w, 4 * w),
        t + "mlp.c_proj.bias": torch.zeros(w),
    }
    norm = {"eps": s["eps"]} if s["eps"] != 1e-5 else None
    vision_cfg = {
        "image_size": s["size"],
        "patch_size": s["patch"],
        "width": d,
        "layers": s["layers"],
        "head_width": d // s["heads"],
        "mlp_ratio": s["mlp_ratio"],
        "pool_type": "tok",
    }
    if norm:
        vision_cfg["norm_kwargs"] = norm
    model_cfg = {
        "embed_dim": int(embed_dim),
        "quick_gelu": s["quick_gelu"],
        "vision_cfg": vision_cfg,
        "text_cfg": dict(NULL_TEXT),
    }
    return out, model_cfg


def open_clip_preprocess_cfg(size: int) -> dict:
    return {
        "size": size,
        "mode": "RGB",
        "mean": list(OPENAI_CLIP_MEAN),
        "std": list(OPENAI_CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }


def timm_state(tower, projection: torch.Tensor | None = None):
    """(state dict, config.json) of a timm ``VisionTransformer`` (CLIP variant: pre-norm, class token,
    ``global_pool='token'``) equal to `tower`, with LLM2CLIP's projection as its head when given."""
    check_expressible(tower.config, "timm")
    s = _shape(tower.config)
    st = _hf_vision_state(tower)
    d = s["width"]
    out = {
        "cls_token": st["embeddings.class_embedding"].reshape(1, 1, d),
        "pos_embed": st["embeddings.position_embedding.weight"].unsqueeze(0),
        "patch_embed.proj.weight": st["embeddings.patch_embedding.weight"],
        "norm_pre.weight": st["pre_layrnorm.weight"],
        "norm_pre.bias": st["pre_layrnorm.bias"],
        "norm.weight": st["post_layernorm.weight"],
        "norm.bias": st["post_layernorm.bias"],
    }
    for i, p, qkv_w, qkv_b in _blocks(st, s["layers"]):
        o = f"blocks.{i}."
        out |= {
            o + "norm1.weight": st[p + "layer_norm1.weight"],
            o + "norm1.bias": st[p + "layer_norm1.bias"],
            o + "attn.qkv.weight": qkv_w,
            o + "attn.qkv.bias": qkv_b,
            o + "attn.proj.weight": st[p + "self_attn.out_proj.weight"],
            o + "attn.proj.bias": st[p + "self_attn.out_proj.bias"],
            o + "norm2.weight": st[p + "layer_norm2.weight"],
            o + "norm2.bias": st[p + "layer_norm2.bias"],
            o + "mlp.fc1.weight": st[p + "mlp.fc1.weight"],
            o + "mlp.fc1.bias": st[p + "mlp.fc1.bias"],
            o + "mlp.fc2.weight": st[p + "mlp.fc2.weight"],
            o + "mlp.fc2.bias": st[p + "mlp.fc2.bias"],
        }
    num_classes = 0
    if projection is not None:
        w = projection.detach().to(torch.float32).contiguous()
        out["head.weight"], out["head.bias"] = w, torch.zeros(w.shape[0])
        num_classes = int(w.shape[0])
    key = (d, s["layers"], s["heads"], s["patch"], s["size"], s["quick_gelu"])
    arch = TIMM_NAMES.get(
        key, "vit_base_patch16_clip_quickgelu_224" if s["quick_gelu"] else "vit_base_patch16_clip_224"
    )
    size = s["size"]
    config = {
        "architecture": arch,
        "num_classes": num_classes,
        "num_features": d,
        "global_pool": "token",
        # the exact shape, whatever the registered name's defaults (timm passes these to the model)
        "model_args": {
            "img_size": size,
            "patch_size": s["patch"],
            "embed_dim": d,
            "depth": s["layers"],
            "num_heads": s["heads"],
            "mlp_ratio": s["mlp_ratio"],
            "pre_norm": True,
            "class_token": True,
            "global_pool": "token",
            "act_layer": "quick_gelu" if s["quick_gelu"] else "gelu",
        },
        "pretrained_cfg": {
            "tag": "l2c_llava",
            "custom_load": False,
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(OPENAI_CLIP_MEAN),
            "std": list(OPENAI_CLIP_STD),
            "num_classes": num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    return out, config


def hf_from_open_clip(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`open_clip_state` on the vision tower (transformer keys without
    ``vision_model.``): the export's load-back check."""
    out = {
        "embeddings.class_embedding": state["visual.class_embedding"],
        "embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "post_layernorm.weight": state["visual.ln_post.weight"],
        "post_layernorm.bias": state["visual.ln_post.bias"],
    }
    for i in range(layers):
        o, p = f"visual.transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for n, w, b in zip(
            "qkv", state[o + "attn.in_proj_weight"].chunk(3), state[o + "attn.in_proj_bias"].chunk(3)
        ):
            out[p + f"self_attn.{n}_proj.weight"], out[p + f"self_attn.{n}_proj.bias"] = w, b
        for hf, oc in (
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("self_attn.out_proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            out[p + hf + ".weight"], out[p + hf + ".bias"] = (
                state[o + oc + ".weight"],
                state[o + oc + ".bias"],
            )
    return out


def hf_from_timm(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`timm_state` on the vision tower: the export's load-back check."""
    d = state["cls_token"].shape[-1]
    out = {
        "embeddings.class_embedding": state["cls_token"].reshape(d),
        "embeddings.position_embedding.weight": state["pos_embed"][0],
        "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
        "pre_layrnorm.weight": state["norm_pre.weight"],
        "pre_layrnorm.bias": state["norm_pre.bias"],
        "post_layernorm.weight": state["norm.weight"],
        "post_layernorm.bias": state["norm.bias"],
    }
    for i in range(layers):
        o, p = f"blocks.{i}.", f"encoder.layers.{i}."
        for n, w, b in zip("qkv", state[o + "attn.qkv.weight"].chunk(3), state[o + "attn.qkv.bias"].chunk(3)):
            out[p + f"self_attn.{n}_proj.weight"], out[p + f"self_attn.{n}_proj.bias"] = w, b
        for hf, tm in (
            ("layer_norm1", "norm1"),
            ("layer_norm2", "norm2"),
            ("self_attn.out_proj", "attn.proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            out[p + hf + ".weight"], out[p + hf + ".bias"] = (
                state[o + tm + ".weight"],
                state[o + tm + ".bias"],
            )
    return out


def write_open_clip_folder(
    tower, folder: str | Path, projection: torch.Tensor | None = None, logit_scale: float | None = None
) -> Path:
    """``open_clip_config.json`` (model_cfg + preprocess_cfg) and ``open_clip_model.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, model_cfg = open_clip_state(tower, projection, logit_scale)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": open_clip_preprocess_cfg(int(tower.config.image_size)),
    }
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(folder / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
    return folder


def write_timm_folder(tower, folder: str | Path, projection: torch.Tensor | None = None) -> Path:
    """timm's Hub layout: ``config.json`` (architecture, model_args, pretrained_cfg) and
    ``model.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, config = timm_state(tower, projection)
    (folder / TIMM_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(folder / TIMM_WEIGHTS), metadata={"format": "pt"})
    return folder
