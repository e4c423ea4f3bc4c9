"""The whole LLM2CLIP model for retrieval users: the upgraded vision tower with its projection, the
adapter on the LLM caption feature, and a reference to the text encoder that makes those features.

``LLM2CLIP.from_pretrained(folder)`` reads, without executing any code from the folder:

- an exported model (``l2c export llm2clip``), in the released checkpoints' layout
  (microsoft/LLM2CLIP-Openai-L-14-336): ``config.json`` with ``model_type: clip``, ``vision_config``
  and ``projection_dim``; ``model.safetensors`` with ``vision_model.*`` (transformers' CLIP vision
  transformer), ``visual_projection.weight``, ``text_adapter.adaptor.*`` and ``logit_scale``; plus
  our ``llm2clip`` block (adapter shape, text encoder reference) and ``preprocessor_config.json``;
- a released checkpoint folder itself (adapter shape read from the tensors; pass the text encoder);
- a stage-2 run folder or its ``model/`` folder.

``get_image_features(pixel_values)`` and ``get_text_features(texts)`` give the projected (not yet
normalised) embeddings, like transformers' CLIPModel. Text goes through the stage-1 encoder (loaded
on first use, checked against the fingerprint the model was trained with) and the adapter.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from l2c_llava.data.images import clip_image_processor, write_preprocessor_config
from l2c_llava.errors import L2CError
from l2c_llava.io import publish_folder
from l2c_llava.models.portable import portable_config
from l2c_llava.models.reference import resolve_model_path
from l2c_llava.stage1.encoder import TextEncoder
from l2c_llava.stage2.cache import encoder_fingerprint
from l2c_llava.stage2.model import LLM2CLIPModel

logger = logging.getLogger(__name__)

FORMAT = "l2c-llava llm2clip v1"
ADAPTER = re.compile(r"^text_adapter\.adaptor\.(\d+)\.")


class LLM2CLIPLoadError(L2CError, ValueError):
    """A folder that is not an LLM2CLIP model, or one whose weights do not fit; names the file."""


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(folder / f)))
        return state
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise LLM2CLIPLoadError(
            f"{folder}: only pickle weights (*.bin); convert them to safetensors first "
            "(pickle files can run code when loaded, so they are not read here)"
        )
    raise LLM2CLIPLoadError(f"{folder}: no model.safetensors (or model.safetensors.index.json)")


def adapter_shape(state: dict[str, torch.Tensor], where: str = "") -> dict[str, int]:
    """text_dim, num_blocks, expansion and projection_dim read from the adapter's tensors."""
    idx = sorted({int(m.group(1)) for k in state if (m := ADAPTER.match(k))})
    if not idx:
        raise LLM2CLIPLoadError(f"{where}: no text_adapter.adaptor.* tensors (not an LLM2CLIP checkpoint)")
    blocks = [i for i in idx if f"text_adapter.adaptor.{i}.fn.0.weight" in state]
    if blocks != list(range(len(blocks))) or idx[-2:] != [len(blocks), len(blocks) + 1]:
        raise LLM2CLIPLoadError(
            f"{where}: unexpected adapter layout (indices {idx}); expected blocks 0..n-1, "
            "then a LayerNorm and the projection"
        )
    fc1 = state["text_adapter.adaptor.0.fn.0.weight"]
    proj = state[f"text_adapter.adaptor.{len(blocks) + 1}.weight"]
    return {
        "text_dim": int(fc1.shape[1]),
        "num_blocks": len(blocks),
        "expansion": int(fc1.shape[0] // fc1.shape[1]),
        "projection_dim": int(proj.shape[0]),
        "center_text": "text_adapter.feature_mean" in state,
    }


def build_model(vision_config: dict, shape: dict[str, int]) -> LLM2CLIPModel:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig.from_dict({k: v for k, v in vision_config.items() if k != "model_type"})
    tower = CLIPVisionModel(config)
    return LLM2CLIPModel.from_vision_tower(
        tower,
        shape["text_dim"],
        projection_dim=shape["projection_dim"],
        num_blocks=shape["num_blocks"],
        expansion=shape["expansion"],
        center_text=shape.get("center_text", False),
    )


def load_weights(model: LLM2CLIPModel, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load: every tensor of the model present with its shape, nothing left over."""
    state = dict(state)
    if "logit_scale" not in state:  # some releases keep it only in the config
        state["logit_scale"] = model.logit_scale.detach().clone()
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        raise LLM2CLIPLoadError(
            f"{where}: the weights do not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


class LLM2CLIP:
    """The upgraded CLIP: images through the trained tower, texts through the LLM encoder + adapter."""

    def __init__(
        self,
        model: LLM2CLIPModel,
        text_encoder: dict[str, Any] | None = None,
        image_size: int | None = None,
        source: str = "",
    ):
        self.model = model.eval()
        self.text_encoder_ref = text_encoder or {}
        self.image_size = image_size or int(model.vision_model.config.image_size)
        self.source = source
        self._encoder = None

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, text_encoder: str | os.PathLike | Any | None = None
    ) -> LLM2CLIP:
        """An exported model, a released checkpoint folder, or a stage-2 run (or its model/ folder).
        `text_encoder` (a folder or a loaded TextEncoder) overrides the recorded reference. A Hub id
        (microsoft/LLM2CLIP-Openai-L-14-336) is read from the Hugging Face cache (downloaded if allowed)."""
        folder = Path(resolve_model_path(path, "LLM2CLIP model"))
        for candidate in (folder, folder / "model"):
            meta_path = candidate / "llm2clip_config.json"
            if meta_path.is_file():  # a stage-2 run's model folder
                meta = json.loads(meta_path.read_text())
                state = _read_state(candidate)
                shape = adapter_shape(state, str(candidate))
                model = build_model(meta["vision_config"], shape)
                load_weights(model, state, str(candidate / "model.safetensors"))
                ref = {
                    "path": meta.get("text_encoder"),
                    "digest": meta.get("text_encoder_digest"),
                    "instruction": meta.get("instruction"),
                    "torch_dtype": meta.get("text_encoder_dtype", "auto"),
                }
                return cls._with_encoder(model, ref, text_encoder, str(candidate))
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise LLM2CLIPLoadError(
                f"{folder}: neither an LLM2CLIP export/release (config.json) nor a stage-2 run "
                "(model/llm2clip_config.json)"
            )
        config = json.loads(config_path.read_text())
        if config.get("model_type") != "clip" or not isinstance(config.get("vision_config"), dict):
            raise LLM2CLIPLoadError(
                f"{config_path}: expected model_type 'clip' with a vision_config (the LLM2CLIP "
                f"release layout), found model_type {config.get('model_type')!r}"
            )
        state = _read_state(folder)
        if not any(k.startswith("vision_model.") for k in state):
            raise LLM2CLIPLoadError(f"{folder}: no vision_model.* tensors")
        shape = adapter_shape(state, str(folder))
        model = build_model(config["vision_config"], shape)
        load_weights(model, state, str(folder))
        ref = (config.get("llm2clip") or {}).get("text_encoder") or {}
        return cls._with_encoder(model, ref, text_encoder, str(folder))

    @classmethod
    def _with_encoder(cls, model, ref: dict, text_encoder, source: str) -> LLM2CLIP:
        out = cls(model, dict(ref), source=source)
        if text_encoder is not None and not isinstance(text_encoder, (str, os.PathLike)):
            out._encoder = text_encoder
        elif text_encoder is not None:
            out.text_encoder_ref = {**out.text_encoder_ref, "path": str(text_encoder), "digest": None}
        return out

    # -- features ----------------------------------------------------------------------------------

    @property
    def text_dim(self) -> int:
        return self.model.text_adapter.norm.normalized_shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> LLM2CLIP:
        self.model.to(device)
        return self

    @property
    def image_processor(self):
        return clip_image_processor(self.image_size)

    def preprocess(self, images) -> torch.Tensor:
        """PIL images -> pixel_values [B, 3, S, S] (CLIP resize + centre crop + OpenAI mean/std)."""
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(
            pixel_values.to(self.device, next(self.model.parameters()).dtype)
        )

    @torch.no_grad()
    def get_text_features_from_llm(self, llm_features: torch.Tensor) -> torch.Tensor:
        """Adapter on LLM caption features (e.g. from a text feature cache) -> [B, projection_dim]."""
        if llm_features.shape[-1] != self.text_dim:
            raise LLM2CLIPLoadError(
                f"text features of dimension {llm_features.shape[-1]}; the adapter of {self.source} "
                f"takes {self.text_dim} (features of the text encoder it was trained with: "
                f"{self.text_encoder_ref.get('path')})"
            )
        return self.model.get_text_features(llm_features.to(self.device, torch.float32))

    def text_encoder(self):
        """The stage-1 encoder, loaded on first use and checked against the recorded fingerprint."""
        if self._encoder is None:
            path = self.text_encoder_ref.get("path")
            if not path:
                raise LLM2CLIPLoadError(
                    f"{self.source}: no text encoder recorded; pass text_encoder=PATH (the "
                    "caption-contrastive LLM this model was trained with)"
                )
            want = self.text_encoder_ref.get("digest")
            if want:
                got = encoder_fingerprint(path, self.text_encoder_ref.get("instruction"))["digest"]
                if got != want:
                    raise LLM2CLIPLoadError(
                        f"{self.source}: the text encoder at {path} is not the one this model "
                        "was trained with (fingerprint differs); pass the right one with "
                        "text_encoder=PATH"
                    )
            # in the dtype its training features were computed in (recorded by stage 2; "auto" before)
            dtype = self.text_encoder_ref.get("torch_dtype") or "auto"
            self._encoder = TextEncoder.from_pretrained(path, torch_dtype=dtype)
        return self._encoder

    @torch.no_grad()
    def get_text_features(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        feats = self.text_encoder().encode(
            list(texts), instruction=self.text_encoder_ref.get("instruction"), batch_size=batch_size
        )
        return self.get_text_features_from_llm(feats)

    # -- saving ------------------------------------------------------------------------------------

    def save_pretrained(
        self, out_dir: str | os.PathLike, overwrite: bool = False, card: str | None = None
    ) -> Path:
        """The whole model in the release layout (+ our llm2clip block and preprocessor config, and
        `card` as its README.md), written to a temporary folder, loaded back and compared, then moved
        into place."""
        m = self.model
        shape = adapter_shape(dict(m.state_dict()), "model")

        def build(tmp: Path) -> None:
            state = {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            config = {
                "architectures": ["LLM2CLIPModel"],
                "model_type": "clip",
                "projection_dim": shape["projection_dim"],
                "logit_scale_init_value": float(m.logit_scale.item()),
                "vision_config": portable_config(m.vision_model.config.to_dict()),
                "llm2clip": {
                    "format": FORMAT,
                    **shape,
                    "normalize_text_input": True,
                    "text_encoder": self.text_encoder_ref,
                },
            }
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            write_preprocessor_config(tmp, self.image_size)
            if card is not None:
                (tmp / "README.md").write_text(card, encoding="utf-8")
            again = LLM2CLIP.from_pretrained(tmp)
            probe = torch.randn(
                2, 3, self.image_size, self.image_size, generator=torch.Generator().manual_seed(0)
            )
            text = torch.randn(2, shape["text_dim"], generator=torch.Generator().manual_seed(1))
            same_img = torch.allclose(
                self.get_image_features(probe), again.get_image_features(probe), atol=1e-5
            )
            same_txt = torch.allclose(
                self.get_text_features_from_llm(text), again.get_text_features_from_llm(text), atol=1e-5
            )
            if not (same_img and same_txt):
                raise LLM2CLIPLoadError("the exported model's features differ from the model's own")

        return publish_folder(out_dir, build, "llm2clip model", overwrite)
