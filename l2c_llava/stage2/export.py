"""Export the upgraded vision encoder: a transformers ``CLIPVisionModel`` folder (safetensors,
config, ``preprocessor_config.json`` at the tower's resolution) that LLaVA and any VLM builder load,
with its keys under ``vision_model.*`` (the layout transformers 4.x and 5.x both load; 5.x's own
``save_pretrained`` drops the prefix, which 4.x does not read).
The folder is built in a temporary place, loaded back and checked (no missing or unexpected keys,
same features as the trained tower) before it is moved into place."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from l2c_llava.cards import model_card, write_card
from l2c_llava.data.images import write_preprocessor_config
from l2c_llava.errors import L2CError
from l2c_llava.io import check_output_folder, publish_folder
from l2c_llava.layout import export_dir, exported_tower, is_stage2_run  # noqa: F401 (re-exported)
from l2c_llava.models.portable import save_vision_folder
from l2c_llava.stage2.llm2clip import LLM2CLIP, LLM2CLIPLoadError


class ExportError(L2CError, ValueError):
    """A folder that is not a stage-2 model, or an export that does not load back cleanly."""


def export_vision(source: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the tower of a stage-2 run (or its model/ folder, an LLM2CLIP export or release) as a
    CLIPVisionModel folder."""
    check_output_folder(out_dir, "vision encoder", overwrite)  # before any model loads
    try:
        model = LLM2CLIP.from_pretrained(source).model
    except LLM2CLIPLoadError as e:
        raise ExportError(
            f"{e}; train one with `l2c stage2 train` or import a release with `l2c import llm2clip`"
        ) from None
    return export_vision_tower(model.vision_model, out_dir, overwrite, card_source=source)


def export_vision_tower(
    trained, out_dir: str | os.PathLike, overwrite: bool = False, card_source: str | os.PathLike | None = None
) -> Path:
    """Save a CLIP vision transformer as a CLIPVisionModel folder, verified on load-back, with its
    model card (made from the run `card_source`, when given)."""
    from transformers import CLIPVisionModel

    config = trained.config
    tower = CLIPVisionModel(config).eval()
    missing, unexpected = tower.load_state_dict(trained.state_dict(), strict=False)
    if missing or unexpected:
        raise ExportError(
            f"the trained tower does not fit CLIPVisionModel: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )

    def build(tmp: Path) -> None:
        save_vision_folder(tower, tmp)  # keys under vision_model.*: transformers 4.x and 5.x load them
        write_preprocessor_config(tmp, config.image_size)
        write_card(tmp, "vision", card_source, name=Path(out_dir).name)
        again, info = CLIPVisionModel.from_pretrained(tmp, output_loading_info=True)
        bad = {
            k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
        }
        if bad:
            raise ExportError(f"the exported folder does not load back cleanly: {bad}")
        probe = torch.randn(
            2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            if not torch.allclose(
                trained.eval()(pixel_values=probe).pooler_output,
                again.eval()(pixel_values=probe).pooler_output,
                atol=1e-5,
            ):
                raise ExportError("the exported tower's features differ from the trained tower's")

    return publish_folder(out_dir, build, "vision encoder", overwrite)


def export_llm2clip(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    text_encoder: str | None = None,
    overwrite: bool = False,
) -> Path:
    """The whole model (vision + projection + adapter + text encoder reference), release layout."""
    check_output_folder(out_dir, "llm2clip model", overwrite)  # before any model loads
    try:
        return LLM2CLIP.from_pretrained(source, text_encoder=text_encoder).save_pretrained(
            out_dir, overwrite=overwrite, card=model_card("llm2clip", Path(out_dir).name, source)
        )
    except LLM2CLIPLoadError as e:
        raise ExportError(str(e)) from None


def import_llm2clip(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    text_encoder: str | None = None,
    overwrite: bool = False,
) -> dict:
    """A released LLM2CLIP checkpoint folder (read as data: its remote code is never run) -> OUT/vision
    (CLIPVisionModel for LLaVA) and OUT/llm2clip (the whole model)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is an existing file, not a folder; choose another output folder")
    for part, kind in (("llm2clip", "llm2clip model"), ("vision", "vision encoder")):  # before any work
        check_output_folder(out / part, kind, overwrite)
    whole = export_llm2clip(source, out / "llm2clip", text_encoder, overwrite)
    vision = export_vision(whole, out / "vision", overwrite)
    return {"vision": str(vision), "llm2clip": str(whole)}
