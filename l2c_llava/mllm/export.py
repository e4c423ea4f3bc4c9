"""LLaVA exports and chat.

(a) transformers format: ``run/model`` as the recipe saves it (``LlavaForConditionalGeneration`` +
processor with the chat template); ``export_hf`` copies it to a folder of the user's choice.

(b) the original LLaVA format (haotian-liu/LLaVA), for teams on that code base: ``config.json`` of a
``LlavaLlamaForCausalLM`` (the LLM's own config plus ``mm_vision_tower``, ``mm_projector_type``,
``mm_vision_select_layer``, ``mm_vision_select_feature``, ``mm_hidden_size``, ``image_aspect_ratio``,
``mm_use_im_start_end``, ...), LLM weights under ``model.*`` / ``lm_head``, projector weights under
``model.mm_projector.0`` / ``.2``, the tokenizer, and the vision encoder folder beside it
(``vision_tower/``). The original code rebuilds the tower at load time from ``mm_vision_tower``, and
its ``build_vision_tower`` takes only a path that exists from the working directory or a Hub id
starting with ``openai`` or ``laion`` (or holding ``ShareGPT4V``): so ``mm_vision_tower`` is the
tower's Hub id where the tower is that released model, unchanged; otherwise the absolute path of
``vision_tower/`` as exported (or ``--vision-tower``), which ``l2c export repoint`` re-writes after
the folder moved (``repoint_original``).
The folder name must contain "llava" (its loader checks). Every file is written in the form
transformers 4.37 (LLaVA's pin) reads as well as 5.x (``l2c_llava.models.portable``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from l2c_llava.cards import write_card
from l2c_llava.data.images import pil_image_processor, write_preprocessor_config
from l2c_llava.errors import InputError
from l2c_llava.io import check_output_folder, publish_folder
from l2c_llava.mllm.build import BuildError, load_llava, not_transformers_llava, projector_type_of
from l2c_llava.models.portable import (
    portable_config,
    save_vision_folder,
    tokenizer_source,
    write_portable_tokenizer,
)

# transformers' conversion of an original LLaVA checkpoint to its LLaVA class
# (models/llava/convert_llava_weights_to_hf.py, KEYS_TO_MODIFY_MAPPING, each applied in order where it
# occurs in the key); transformers >= 5 renames that layout on load (its conversion_mapping "llava").
ORIGINAL_TO_HF_KEYS = {
    "model.vision_tower.": "",
    ".vision_resampler": "",
    "model.mm_projector": "multi_modal_projector",
    "model": "model.model",
    "vision_model.model": "vision_model",
    "lm_head": "language_model.lm_head",
    "model.model": "language_model.model",
    "multi_modal_projector.0": "multi_modal_projector.linear_1",
    "multi_modal_projector.2": "multi_modal_projector.linear_2",
}


VISION_DIR = "vision_tower"  # inside the exported folder; mm_vision_tower names it (absolute) or a Hub id
ORIGINAL_KIND = "llava original export"
# LLaVA's build_vision_tower (llava/model/multimodal_encoder/builder.py): a name that is not an existing
# path is taken only when it starts with one of these, or contains "ShareGPT4V"
LLAVA_HUB_PREFIXES = ("openai", "laion")


def load_trained_llava(model_dir: str | os.PathLike, **load_kwargs):
    """(folder, model, processor) of a trained LLaVA: an mllm run folder (its model/) or a transformers
    LLaVA folder; a pretrain run that saved the projector only, or anything else, is refused with why.
    `load_kwargs` go to ``from_pretrained`` (``dtype``, ``device_map``, ``attn_implementation``)."""
    from transformers import AutoProcessor

    folder = Path(model_dir)
    if (folder / "model" / "config.json").is_file():
        folder = folder / "model"
    if (folder / "projector" / "projector.safetensors").is_file() and not (folder / "config.json").is_file():
        raise InputError(
            f"{model_dir} is a pretrain run that saved the projector only (as LLaVA's mm_projector); "
            "use the finetune run, or pretrain with train.save_full_model=true"
        )
    if not (folder / "config.json").is_file():
        raise InputError(
            f"{model_dir}: no LLaVA model (config.json); train one with `l2c mllm pretrain|finetune`"
        )
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "llava":
        raise InputError(f"{folder}: model_type {cfg.get('model_type')!r}, not a transformers LLaVA model")
    processor = AutoProcessor.from_pretrained(folder)
    processor.image_processor = pil_image_processor(processor.image_processor)  # one backend everywhere
    return folder, _loaded(folder, **load_kwargs), processor


def _loaded(folder: Path, **load_kwargs):
    try:
        return load_llava(folder, **load_kwargs)
    except BuildError as e:
        raise InputError(str(e)) from None


def export_hf(model_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    check_output_folder(out_dir, "llava hf export", overwrite, legacy_marker="l2c_mllm.json")
    folder, _, _ = load_trained_llava(model_dir)

    def build(tmp: Path) -> None:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        (tmp / ".l2c_output.json").unlink(missing_ok=True)  # the source's own marker; publish writes ours
        write_card(tmp, "llava", model_dir, name=Path(out_dir).name)

    return publish_folder(out_dir, build, "llava hf export", overwrite, legacy_marker="l2c_mllm.json")


def original_state_dict(model) -> dict[str, torch.Tensor]:
    """The original LLaVA key layout of a transformers LLaVA model (vision tower excluded: it lives in
    its own folder). A ``linear`` projector is one ``model.mm_projector`` Linear."""
    linear = projector_type_of(model.config) == "linear"
    if linear:
        second = model.model.multi_modal_projector.linear_2
        eye = torch.eye(second.weight.shape[0], dtype=second.weight.dtype)
        if not (torch.equal(second.weight, eye) and not second.bias.any()):
            raise InputError(
                "a linear projector whose second layer is not the identity cannot be written "
                "as LLaVA's single mm_projector Linear"
            )
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            out["model." + k.removeprefix("model.language_model.")] = v
        elif k.startswith("model.multi_modal_projector.linear_1."):
            out[("model.mm_projector." if linear else "model.mm_projector.0.") + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.multi_modal_projector.linear_2.") and not linear:
            out["model.mm_projector.2." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("lm_head."):
            out[k] = v
    return out


def original_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original LLaVA state dict (vision tower under ``model.vision_tower.vision_tower.vision_model.*``
    if present) renamed by transformers' conversion rules into its LLaVA checkpoint layout, which
    ``LlavaForConditionalGeneration.from_pretrained`` loads (applying its own renaming on top)."""
    out = {}
    for key, value in state.items():
        new = key
        for old, rep in ORIGINAL_TO_HF_KEYS.items():
            if old in new:
                new = new.replace(old, rep)
        out[new] = value
    return out


def original_readme(name: str, meta: dict, mm_vision_tower: str = "", why: str = "") -> str:
    """The note written into an original-format export: how to load it and the two conventions."""
    return f"""# {name}: LLaVA-1.5 in the original LLaVA layout (haotian-liu/LLaVA)

Written by `l2c export llava --format original` (l2c-llava). Files: `config.json`
(`LlavaLlamaForCausalLM`: the LLM's config with `rope_theta` / `rope_scaling` at the top level, as
transformers 4.x reads them, plus the `mm_*` fields), `model.safetensors` (LLM under `model.*` /
`lm_head`, projector under `model.mm_projector.*`), the LLM's own tokenizer files (`tokenizer.model`
where the LLM has one) with `<image>` listed as an added token, and `vision_tower/` (a
`CLIPVisionModel` folder, keys under `vision_model.*`, which transformers 4.37+ and 5.x load alike;
image processor included).

## Loading it

`mm_vision_tower` is `{mm_vision_tower}` ({why}). The original code rebuilds the vision tower from
it (`build_vision_tower` takes a path that exists from the working directory, or a Hub id starting
with `openai` or `laion`), so the folder loads from any working directory:

```python
from llava.model.builder import load_pretrained_model
from llava.mm_utils import get_model_name_from_path
path = "/path/to/{name}"
tokenizer, model, image_processor, _ = load_pretrained_model(path, None, get_model_name_from_path(path))
```

```bash
python -m llava.eval.run_llava --model-path /path/to/{name} --conv-mode vicuna_v1 --image-file IMG --query "..."
```

lmms-eval's own `llava` model calls the same `load_pretrained_model`
(`python -m lmms_eval eval --model llava --model_args pretrained=/path/to/{name},conv_template=vicuna_v1
--tasks TASKS --batch_size 1`; on a CPU add `,device_map=auto,device=cpu` to the model_args). l2c-llava's
tests run it (lmms-eval 0.7.3 installed `--no-deps` beside transformers 4.37.2, which LLaVA's code
needs): given the training's prompt ids it answers exactly as the transformers export under lmms-eval;
as it is, its `tokenizer_image_token` adds the one token described under "The token after the image"
below, and the answers differ.

**After moving or copying this folder**, point `mm_vision_tower` at its new place:
`l2c export repoint /new/path/to/{name}` (or `--vision-tower ID_OR_PATH`: the released tower's Hub id,
or another copy of the same tower). Without it, the loader raises `ValueError: Unknown vision tower`
once the old place is gone. Without l2c-llava at hand, the loader also takes the path as a keyword:
`load_pretrained_model(path, None, name, mm_vision_tower=os.path.join(path, "vision_tower"))`.

The folder name must keep "llava" in it (the loader builds a LLaVA model only then).

## Conventions

- **Template: `--conv-mode vicuna_v1`** (template `{meta.get("template", "vicuna_v1")}` in training).
  `run_llava.py` guesses the template from the folder name when `--conv-mode` is not given, and a name
  containing "v1" gives `llava_v1`, whose system prompt differs from vicuna_v1's.
- **The token after the image.** This model was trained with the whole prompt tokenized as one text,
  `<image>` a special token (as transformers' `LlavaProcessor` does). LLaVA's `tokenizer_image_token`
  tokenizes the text after `<image>` as a fresh sequence, so a SentencePiece tokenizer (Llama /
  Vicuna) puts an extra `▁` right after the image tokens (LLaVA-1.5 itself was trained that way).
  The model still answers, but its inputs then differ from the ones it was trained on by that one
  token. For the exact training inputs, tokenize the prompt with the tokenizer (`<image>` is in its
  vocabulary) and replace the `<image>` id by `IMAGE_TOKEN_INDEX` (-200):
  `ids = tokenizer(prompt).input_ids; ids = [-200 if i == tokenizer.convert_tokens_to_ids("<image>") else i for i in ids]`.
- Images: `image_aspect_ratio` `{meta.get("image_aspect_ratio", "pad")}` (padded to a square with the mean
  colour, as `process_images` does), CLIP resize / crop and OpenAI CLIP mean / std.
"""


def llava_takes_hub_id(name: str) -> bool:
    """Whether LLaVA's ``build_vision_tower`` takes `name` when no such path exists."""
    return name.startswith(LLAVA_HUB_PREFIXES) or "ShareGPT4V" in name


def _same_tower(folder: str, tower) -> str | None:
    """Why the CLIP vision weights in `folder` (a CLIPVisionModel or CLIPModel folder) are not `tower`'s
    (None: they are, bit for bit once cast to the tower's dtype, as LLaVA's loader casts them)."""
    from transformers import CLIPVisionModel

    try:
        other = CLIPVisionModel.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - any reason it is not a CLIP vision folder, told as it is
        return f"it does not load as a CLIPVisionModel ({type(e).__name__}: {str(e).splitlines()[0][:200]})"

    def keys(module) -> dict:  # transformers 4.x keeps vision_model.*, 5.x not
        return {k.removeprefix("vision_model."): v for k, v in module.state_dict().items()}

    mine, theirs = keys(tower), keys(other)
    if mine.keys() != theirs.keys():
        return "its vision tower has other weights (other keys)"
    bad = [
        k
        for k, v in mine.items()
        if v.shape != theirs[k].shape or not torch.equal(v, theirs[k].to(v.dtype))  # in the model's dtype
    ]
    return f"its vision weights differ from the model's ({', '.join(bad[:3])})" if bad else None


def _cached_hub_tower(hub_id: str) -> str | None:
    """The local Hub-cache snapshot of `hub_id`, or None when it is not cached (never downloads)."""
    from huggingface_hub import snapshot_download

    from l2c_llava.models.hub import hub_cache_dir

    repo_id, _, revision = hub_id.partition("@")
    try:
        return snapshot_download(
            repo_id, revision=revision or None, cache_dir=hub_cache_dir(), local_files_only=True
        )
    except Exception:  # noqa: BLE001 - not cached, in whatever way huggingface_hub says it
        return None


def choose_vision_tower(out: Path, tower, meta: dict, asked: str | None) -> tuple[str, str]:
    """(``mm_vision_tower``, why) for an original-format export written to `out`.

    `asked` (``--vision-tower``): an existing folder (made absolute; its weights must be the model's
    tower) or a Hub id LLaVA's loader takes (compared with the model's tower where it is in the local
    Hub cache). Not asked: the run's own tower when it was a Hub id that LLaVA takes, the tower was not
    trained, and the cached snapshot holds exactly these weights; otherwise the absolute path of the
    exported ``vision_tower/``."""
    from l2c_llava.models.reference import is_hub_id

    if asked:
        path = Path(asked).expanduser()
        if path.exists():
            why = _same_tower(str(path), tower)
            if why:
                raise InputError(
                    f"--vision-tower {asked}: {why}; give the folder of this model's tower (or leave "
                    "--vision-tower out: the export's own vision_tower/ is then used)"
                )
            return str(path.resolve()), "the folder given with --vision-tower (same weights)"
        if not is_hub_id(asked):
            raise InputError(
                f"--vision-tower {asked}: no such folder, and not a Hub id (org/name); give an existing "
                "CLIP vision folder or the Hub id of the released tower"
            )
        if not llava_takes_hub_id(asked):
            raise InputError(
                f"--vision-tower {asked}: LLaVA's build_vision_tower takes a Hub id only when it starts "
                f"with {' or '.join(LLAVA_HUB_PREFIXES)} (or holds ShareGPT4V), and raises 'Unknown "
                "vision tower' for any other. Download it (`hf download "
                f"{asked.partition('@')[0]} --local-dir DIR`) and give DIR, or leave --vision-tower out"
            )
        cached = _cached_hub_tower(asked)
        if cached is not None:
            why = _same_tower(cached, tower)
            if why:
                raise InputError(
                    f"--vision-tower {asked}: the cached snapshot ({cached}): {why}; this model's tower "
                    "is not that release (trained further?): leave --vision-tower out"
                )
            return asked, "the Hub id given with --vision-tower (same weights as the cached snapshot)"
        return (
            asked,
            "the Hub id given with --vision-tower (not in the local Hub cache: weights not compared)",
        )
    own = str(meta.get("vision_tower") or "")
    if (
        own
        and is_hub_id(own)
        and llava_takes_hub_id(own)
        and not meta.get("vision_tower_trained", False)
        and (cached := _cached_hub_tower(own)) is not None
        and _same_tower(cached, tower) is None
    ):
        return own, "the released tower the model was built on (Hub id; same weights as its cached snapshot)"
    return str(out.resolve() / VISION_DIR), "the exported vision_tower/ folder, absolute"


def repoint_original(folder: str | os.PathLike, vision_tower: str | None = None) -> tuple[str, str]:
    """Re-write ``mm_vision_tower`` of an original-format export after it moved: the absolute path of
    its own ``vision_tower/`` as it is now, or `vision_tower` (a folder or Hub id, checked as at export).
    The folder's output record (``.l2c_output.json``) is updated, so it stays a previous output of
    ``l2c export llava``. Returns (old, new)."""
    from transformers import CLIPVisionModel

    from l2c_llava.io import OUTPUT_MARKER, atomic_write_json, atomic_write_text, file_record, run_lock

    folder = Path(folder)
    cfg_path = folder / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(
            f"{folder}: no readable config.json ({type(e).__name__}); give the folder written by "
            "`l2c export llava --format original`"
        ) from None
    if config.get("model_type") != "llava_llama" or "mm_vision_tower" not in config:
        raise InputError(
            f"{cfg_path}: model_type {config.get('model_type')!r} without mm_vision_tower: not an "
            "original-format LLaVA export (`l2c export llava --format original`)"
        )
    own = folder / VISION_DIR
    if not (own / "model.safetensors").is_file():
        raise InputError(
            f"{folder}: no {VISION_DIR}/model.safetensors, the tower the export carries; re-export the "
            "model with `l2c export llava --format original`"
        )
    tower = None
    if vision_tower:  # compared with the tower the export carries
        tower = CLIPVisionModel.from_pretrained(own)
    new, _ = choose_vision_tower(folder, tower, {}, vision_tower)
    old = config["mm_vision_tower"]
    with run_lock(folder, ORIGINAL_KIND):
        config["mm_vision_tower"] = new
        atomic_write_text(cfg_path, json.dumps(config, indent=2) + "\n")
        marker = folder / OUTPUT_MARKER
        if marker.is_file():
            record = json.loads(marker.read_text())
            if isinstance(record.get("content"), dict) and "config.json" in record["content"]:
                record["content"]["config.json"] = file_record(cfg_path)
                atomic_write_json(marker, record)
    return old, new


def export_original(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    vision_tower: str | None = None,
) -> Path:
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    out = Path(out_dir)
    if "llava" not in out.name.lower():
        raise InputError(
            f"{out}: the original LLaVA loader only builds a LLaVA model when the folder name "
            "contains 'llava'; choose a name like llava-v1.5-7b-llm2clip"
        )
    check_output_folder(out, ORIGINAL_KIND, overwrite)  # before any model loads
    folder, model, processor = load_trained_llava(model_dir)
    try:
        not_transformers_llava(model.config, "the original LLaVA format", str(folder))
    except ValueError as e:
        raise InputError(str(e)) from None
    meta = json.loads((folder / "l2c_mllm.json").read_text()) if (folder / "l2c_mllm.json").is_file() else {}
    vc, tc = model.config.vision_config, model.config.text_config
    mm_vision_tower, why = choose_vision_tower(out, model.model.vision_tower, meta, vision_tower)

    def build(tmp: Path) -> None:
        tower = CLIPVisionModel(vc)
        tower.load_state_dict(model.model.vision_tower.state_dict())
        save_vision_folder(tower, tmp / VISION_DIR)
        # the original LLaVA code pads itself (image_aspect_ratio: pad) and loads a CLIPImageProcessor
        write_preprocessor_config(tmp / VISION_DIR, int(vc.image_size))
        state = {k: v.contiguous() for k, v in original_state_dict(model).items()}
        if getattr(tc, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = portable_config(tc.to_dict())
        config.update(
            {
                "architectures": ["LlavaLlamaForCausalLM"],
                "model_type": "llava_llama",
                "mm_vision_tower": mm_vision_tower,
                "mm_projector_type": projector_type_of(model.config),
                "mm_vision_select_layer": model.config.vision_feature_layer,
                "mm_vision_select_feature": "patch"
                if model.config.vision_feature_select_strategy == "default"
                else "cls_patch",
                "mm_hidden_size": vc.hidden_size,
                "image_aspect_ratio": meta.get("image_aspect_ratio", "pad"),
                "mm_use_im_start_end": False,
                "mm_use_im_patch_token": False,
                "mm_patch_merge_type": "flat",
                "tune_mm_mlp_adapter": False,
                "freeze_mm_mlp_adapter": False,
                "use_mm_proj": True,
                "image_token_index": model.config.image_token_id,
                "tokenizer_model_max_length": 2048,
            }
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_portable_tokenizer(
            processor.tokenizer, tmp, tokenizer_source(processor.tokenizer), getattr(tc, "model_type", None)
        )
        body = original_readme(out.name, meta, mm_vision_tower, why)
        write_card(tmp, "llava-original", model_dir, name=out.name, body=body)

    return publish_folder(out, build, ORIGINAL_KIND, overwrite)
