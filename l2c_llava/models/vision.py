"""CLIP vision towers as every stage uses them: stage 2 fine-tunes one, the LLaVA builder plugs one in,
the health checks and search read one. :func:`load_vision_tower` takes a CLIPVisionModel or CLIPModel
folder, a Hub id or the embedded demo CLIP, and refuses anything else with a message saying why.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors import safe_open

from l2c_llava.errors import InputError
from l2c_llava.models.reference import resolve_vision_path

logger = logging.getLogger(__name__)


def load_vision_tower(path: str, attn_implementation: str = "sdpa", allow_pickle: bool = False):
    """A transformers CLIP vision tower from a CLIPVisionModel or CLIPModel folder, refusing others.
    Weights are read from safetensors only; a folder holding only ``pytorch_model.bin`` (a pickle,
    which can run code when loaded) needs `allow_pickle`, and is then loaded with ``weights_only=True``.
    A damaged weight file is reported with its name."""
    from transformers import AutoConfig, CLIPVisionModel

    path = resolve_vision_path(str(path))
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise InputError(
            f"vision tower {path}: no config.json (a transformers CLIPVisionModel / CLIPModel folder is expected)"
        )
    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type not in ("clip", "clip_vision_model"):
        raise InputError(
            f"vision tower {path} is a {cfg.model_type!r} model, not a CLIP vision model "
            "(clip / clip_vision_model)"
        )
    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if not safetensors and pickles and not allow_pickle:
        raise InputError(
            f"vision tower {path} holds its weights as {pickles[0]} (a pickle, which can run code "
            "when loaded) and no .safetensors file. Convert it (`l2c convert weights FOLDER OUT`), or pass "
            "--allow-pickle if you trust where the file comes from"
        )
    if not safetensors and not pickles:
        raise InputError(
            f"vision tower {path}: no weights (*.safetensors); a model shipped as pickled .bin "
            "weights only is converted by `l2c convert weights SOURCE OUT`"
        )
    if safetensors:
        for f in safetensors:  # a clear message instead of the loader's SafetensorError
            try:
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file is damaged
                raise InputError(
                    f"vision tower {path}: {f.name} cannot be read ({type(e).__name__}: {e}); the file "
                    "is damaged or not safetensors: export or download it again"
                ) from None
    elif pickles:
        logger.warning(
            "vision tower %s: loading %s (pickle, --allow-pickle) with weights_only=True", path, pickles[0]
        )
        import torch

        for name in pickles:  # tensors and plain containers only: anything else is refused, never run
            try:
                torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - UnpicklingError (code or other objects), a damaged file
                raise InputError(
                    f"vision tower {path}: {name} cannot be loaded as plain tensors ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); it holds code or other objects, or is damaged. Nothing "
                    "in it was run. Use safetensors weights from a source you trust"
                ) from None
    # a CLIPModel folder (OpenAI's layout): its vision side only, as LLaVA loads it; the text tower and
    # logit_scale are never built (memory; a 0-dim parameter that DeepSpeed's ZeRO-3 cannot partition)
    from transformers.utils import logging as hf_logging

    quiet = cfg.model_type == "clip"  # its text-side weights are left out on purpose: no load report
    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        return CLIPVisionModel.from_pretrained(
            path, attn_implementation=attn_implementation, use_safetensors=bool(safetensors)
        )
    finally:
        if quiet:
            hf_logging.set_verbosity(level)
