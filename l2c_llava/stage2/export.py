"""Export the upgraded vision encoder: a transformers ``CLIPVisionModel`` folder (safetensors,
config, ``preprocessor_config.json`` at the tower's resolution) that LLaVA and any VLM builder load.
The folder is built in a temporary place, loaded back and checked (no missing or unexpected keys,
same features as the trained tower) before it is moved into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from l2c_llava.data.images import clip_image_processor


class ExportError(ValueError):
    """A folder that is not a stage-2 model, or an export that does not load back cleanly."""


def _model_folder(path: Path) -> Path:
    for candidate in (path, path / "model"):
        if (candidate / "llm2clip_config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise ExportError(f"{path} is not a stage-2 model (no llm2clip_config.json + model.safetensors, "
                      f"nor a model/ folder holding them); train one with `l2c stage2 train`")  # fmt: skip


def export_vision(run_or_model: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the trained tower of a stage-2 run (or its model/ folder) as a CLIPVisionModel folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    src = _model_folder(Path(run_or_model))
    meta = json.loads((src / "llm2clip_config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    prefix = "vision_model."
    tower_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not tower_state:
        raise ExportError(f"{src / 'model.safetensors'} holds no vision_model.* tensors")
    config = CLIPVisionConfig.from_dict(meta["vision_config"])
    tower = CLIPVisionModel(config).eval()
    missing, unexpected = tower.load_state_dict(tower_state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"the trained tower does not fit CLIPVisionModel: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tower.save_pretrained(tmp, safe_serialization=True)
        processor = clip_image_processor(config.image_size).to_dict()
        processor["image_processor_type"] = "CLIPImageProcessor"  # the class every loader knows
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
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
                tower(pixel_values=probe).pooler_output,
                again.eval()(pixel_values=probe).pooler_output,
                atol=1e-5,
            ):
                raise ExportError("the exported tower's features differ from the trained tower's")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
