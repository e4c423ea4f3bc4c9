"""Export the upgraded vision encoder: a transformers ``CLIPVisionModel`` folder (safetensors,
config, ``preprocessor_config.json`` at the tower's resolution) that LLaVA and any VLM builder load,
with its keys under ``vision_model.*`` (the layout transformers 4.x and 5.x both load; 5.x's own
``save_pretrained`` drops the prefix, which 4.x does not read); or, with ``--format open_clip|timm``,
the same tower as an open_clip or timm folder (``l2c_llava.models.vision_formats``), LLM2CLIP's image
projection included where the source has one.
The folder is built in a temporary place, loaded back and checked (no missing or unexpected keys,
same features / the same weights as the trained tower) before it is moved into place."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from l2c_llava.cards import model_card, write_card
from l2c_llava.data.images import write_preprocessor_config
from l2c_llava.errors import InputError
from l2c_llava.io import check_output_folder, publish_folder
from l2c_llava.models.portable import save_vision_folder
from l2c_llava.models.vision_formats import FORMATS, VisionFormatError
from l2c_llava.stage2.llm2clip import LLM2CLIP, LLM2CLIPLoadError

KIND_OF_FORMAT = {
    "hf": "vision encoder",
    "open_clip": "open_clip vision encoder",
    "timm": "timm vision encoder",
}


def export_vision(
    source: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False, format: str = "hf"
) -> Path:
    """Write the tower of a stage-2 run (or its model/ folder, an LLM2CLIP export or release) as a
    CLIPVisionModel folder (`format` hf), or as an open_clip / timm folder with LLM2CLIP's image
    projection (``encode_image`` / the timm head give the LLM2CLIP image embedding)."""
    if format not in FORMATS:
        raise InputError(f"unknown vision export format {format!r}; choose one of {', '.join(FORMATS)}")
    check_output_folder(out_dir, KIND_OF_FORMAT[format], overwrite)  # before any model loads
    try:
        model = LLM2CLIP.from_pretrained(source).model
    except LLM2CLIPLoadError as e:
        raise InputError(
            f"{e}; train one with `l2c stage2 train` or import a release with `l2c import llm2clip`"
        ) from None
    if format == "hf":
        return export_vision_tower(model.vision_model, out_dir, overwrite, card_source=source)
    return export_vision_library(
        model.vision_model,
        out_dir,
        format,
        projection=model.visual_projection.weight,
        logit_scale=float(model.logit_scale.detach()),
        overwrite=overwrite,
        card_source=source,
    )


def export_vision_library(
    trained,
    out_dir: str | os.PathLike,
    format: str,
    projection: torch.Tensor | None = None,
    logit_scale: float | None = None,
    overwrite: bool = False,
    card_source: str | os.PathLike | None = None,
) -> Path:
    """A transformers CLIP vision transformer (`trained`) as an open_clip or timm folder, with the
    image `projection` ([E, D]) where given; checked on load-back: the written weights, mapped back,
    are exactly the tower's (the libraries themselves read it in tests/test_vision_consumers.py)."""
    from safetensors.torch import load_file

    from l2c_llava.models import vision_formats as vf

    try:
        vf.check_expressible(trained.config, format)
    except VisionFormatError as e:
        raise InputError(str(e)) from None
    want = vf._hf_vision_state(trained)
    layers = int(trained.config.num_hidden_layers)

    def build(tmp: Path) -> None:
        if format == "open_clip":
            vf.write_open_clip_folder(trained, tmp, projection, logit_scale)
            state = load_file(str(tmp / vf.OPEN_CLIP_WEIGHTS))
            back, proj = vf.hf_from_open_clip(state, layers), state["visual.proj"].T
        else:
            vf.write_timm_folder(trained, tmp, projection)
            state = load_file(str(tmp / vf.TIMM_WEIGHTS))
            back, proj = vf.hf_from_timm(state, layers), state.get("head.weight")
        if back.keys() != want.keys() or any(not torch.equal(back[k], want[k]) for k in want):
            bad = sorted(k for k in want if k not in back or not torch.equal(back[k], want[k]))
            raise InputError(f"the {format} folder does not hold the tower's weights: {bad[:5]}")
        if projection is not None and not torch.equal(proj, projection.detach().float()):
            raise InputError(f"the {format} folder does not hold the image projection")
        write_card(tmp, f"vision-{format}", card_source, name=Path(out_dir).name)

    return publish_folder(out_dir, build, KIND_OF_FORMAT[format], overwrite)


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
        raise InputError(
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
            raise InputError(f"the exported folder does not load back cleanly: {bad}")
        probe = torch.randn(
            2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            if not torch.allclose(
                trained.eval()(pixel_values=probe).pooler_output,
                again.eval()(pixel_values=probe).pooler_output,
                atol=1e-5,
            ):
                raise InputError("the exported tower's features differ from the trained tower's")

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
        raise InputError(str(e)) from None


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
        raise InputError(f"{out} is an existing file, not a folder; choose another output folder")
    for part, kind in (("llm2clip", "llm2clip model"), ("vision", "vision encoder")):  # before any work
        check_output_folder(out / part, kind, overwrite)
    whole = export_llm2clip(source, out / "llm2clip", text_encoder, overwrite)
    vision = export_vision(whole, out / "vision", overwrite)
    return {"vision": str(vision), "llm2clip": str(whole)}
