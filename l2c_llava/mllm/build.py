"""Assemble LLaVA-1.5 from a vision encoder folder and an LLM, as transformers'
``LlavaForConditionalGeneration`` + ``LlavaProcessor``.

- vision: a transformers ``CLIPVisionModel`` folder (``l2c export vision``) or a ``CLIPModel`` folder
  (OpenAI CLIP, the demo baseline); penultimate layer, patch tokens only (CLS dropped);
- projector ``mlp2x_gelu``: Linear(vision -> LLM), GELU, Linear(LLM -> LLM); or ``linear``: one
  Linear(vision -> LLM) (held as transformers' two linears, the second a frozen identity);
- LLM: a transformers folder (Vicuna-7B-v1.5), a .gguf file or the embedded SmolLM2;
- tokenizer: ``<image>`` added as a special token; a pad token distinct from end-of-sequence (the
  unknown token where there is one, as LLaVA does for Llama, else ``<pad>``);
- processor: ``patch_size`` and ``num_additional_image_tokens=1`` so ``<image>`` expands to exactly
  the number of patch features; the vicuna_v1 chat template;
- or a ``qformer`` / ``perceiver`` connector (``mllm/connectors.py``): a fixed number of vision tokens
  (``num_queries``); the processor expands ``<image>`` to that many (one "patch" the size of the image
  plus ``num_queries`` additional tokens, minus the CLS the default strategy drops).

Every weight of the tower and the LLM is copied with a strict check: a missing or unexpected key
fails loudly, never a silently random tower.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from l2c_llava.config.schemas import ConnectorSection, LLMSection
from l2c_llava.data.images import llava_image_processor
from l2c_llava.errors import L2CError
from l2c_llava.io import check_output_folder, publish_folder
from l2c_llava.mllm.connectors import CONNECTORS, llava_with_connector_class, make_connector
from l2c_llava.mllm.conversation import IMAGE_TOKEN, VICUNA_SYSTEM
from l2c_llava.models.llm import local_llm_folder
from l2c_llava.models.portable import (
    LLM_TOKENIZER_DIR,
    copy_tokenizer_files,
    llava_vision_keys_for_4x,
    portable_config,
    tokenizer_source,
)
from l2c_llava.models.vision import load_vision_tower

logger = logging.getLogger("l2c_llava.mllm")

META = "l2c_mllm.json"
LLAVA_KIND = "llava model"

VICUNA_CHAT_TEMPLATE = (
    "{{- '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{- c['text'] -}}{%- endfor -%}"
    "{%- endif -%}{{- ' ASSISTANT:' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'] is string -%}{{- ' ' + message['content'] + eos_token -}}{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{- ' ' + c['text'] + eos_token -}}{%- endfor -%}"
    "{%- endif -%}{%- endif -%}{%- endfor -%}"
)


# projector_type -> the activation between transformers' two projector linears. "linear" (LLaVA's
# single nn.Linear) is linear_1 followed by a frozen identity linear_2: the same function, and a
# model transformers' LLaVA class loads as it is.
PROJECTORS = {"mlp2x_gelu": "gelu", "linear": "linear"}


def projector_type_of(config) -> str:
    connector = getattr(config, "l2c_connector", None)
    if connector:
        return connector["type"]
    return "linear" if config.projector_hidden_act == "linear" else "mlp2x_gelu"


def image_tokens_of(config) -> int:
    """How many `<image>` tokens one image takes in a model of this config."""
    connector = getattr(config, "l2c_connector", None)
    if connector:
        return int(connector["num_queries"])
    return num_image_tokens(config.vision_config, config.vision_feature_select_strategy)


def not_transformers_llava(config, what: str, where: str = "") -> None:
    """Refuse, with the reason, a model transformers' LLaVA class (and so lmms-eval's llava_hf, the
    original LLaVA code) cannot hold."""
    kind = projector_type_of(config)
    if kind in CONNECTORS:
        raise BuildError(
            f"{where or 'this model'} uses the {kind} connector; {what} needs transformers' LLaVA "
            "class, which takes only the MLP (mlp2x_gelu / linear) connector. Load it with "
            "l2c_llava.mllm.build.load_llava and evaluate it with `l2c mllm eval-vqa`"
        )


class BuildError(L2CError, ValueError):
    """A vision or LLM folder that cannot make a LLaVA model; the message names it."""


def num_image_tokens(vision_config, strategy: str = "default") -> int:
    n = (vision_config.image_size // vision_config.patch_size) ** 2
    return n + (1 if strategy == "full" else 0)


def prepare_tokenizer(tokenizer) -> tuple[int, int]:
    """Add `<image>` and a pad token distinct from EOS; returns (image token id, tokens added)."""
    added = tokenizer.add_special_tokens(
        {"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
    )
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            added += tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "right"  # training pads on the right (generation sets left itself)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), added


def make_processor(
    tokenizer, vision_config, strategy: str = "default", num_queries: int | None = None, pad: bool = True
):
    """LlavaProcessor whose `<image>` expansion equals the model's image features: one per patch (+ CLS
    with the "full" strategy), or `num_queries` for a connector (one image-sized "patch" + `num_queries`
    additional tokens - the CLS the default strategy drops)."""
    from transformers import LlavaProcessor

    size = vision_config.image_size
    image_processor = llava_image_processor(size, pad)
    if num_queries:
        patch, extra, strategy = size, num_queries, "default"
    else:
        patch, extra = vision_config.patch_size, 1
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
        chat_template=VICUNA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def _check_fit(dst: torch.nn.Module, src_state: dict, what: str) -> None:
    own = dst.state_dict()
    missing, unexpected = sorted(set(own) - set(src_state)), sorted(set(src_state) - set(own))
    wrong = [k for k in own if k in src_state and own[k].shape != src_state[k].shape]
    if missing or unexpected or wrong:
        raise BuildError(
            f"{what}: weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )


def _assign(dst: torch.nn.Module, src: torch.nn.Module, what: str, dtype: torch.dtype) -> None:
    """Put `src`'s weights into the meta-device module `dst` (strict: every key, every shape), in
    `dtype`, without a copy where `src` already is in it; non-persistent buffers (rotary inv_freq,
    position ids) are taken from `src` by name."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in src.state_dict().items()}
    _check_fit(dst, state, what)
    dst.load_state_dict(state, assign=True)
    theirs = dict(src.named_buffers())
    for name, buf in list(dst.named_buffers()):
        if not buf.is_meta:
            continue
        match = theirs.get(name)
        if match is None:
            match = next(
                (b for n, b in theirs.items() if n.endswith("." + name) or name.endswith("." + n)), None
            )
        if match is None:
            raise BuildError(f"{what}: no value for buffer {name}")
        owner, _, leaf = name.rpartition(".")
        dst.get_submodule(owner)._buffers[leaf] = match.clone()


def llm_config_dtype(folder: str | os.PathLike) -> str:
    """The dtype an LLM folder's config.json names (``dtype`` / ``torch_dtype``; Vicuna: float16),
    else float32."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def build_llava(
    vision_tower: str | os.PathLike,
    llm,
    *,
    projector_type: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    torch_dtype: str = "float32",
    connector: dict | None = None,
    allow_pickle: bool = False,
    image_aspect_ratio: str = "pad",
):
    """(LlavaForConditionalGeneration, LlavaProcessor) from a vision folder and an LLMSection-like
    object (name_or_path, gguf_file, attn_implementation, trust_remote_code). With projector_type
    qformer / perceiver, `connector` gives its shape (num_queries, hidden_size, depth, heads, mlp_ratio)
    and the model is a ``LlavaWithConnector``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    if projector_type not in PROJECTORS and projector_type not in CONNECTORS:
        raise BuildError(
            f"projector_type {projector_type!r}: expected one of {', '.join([*PROJECTORS, *CONNECTORS])}"
        )
    try:
        tower = load_vision_tower(str(vision_tower), allow_pickle=allow_pickle)
    except ValueError as e:
        raise BuildError(str(e)) from None
    folder = local_llm_folder(llm.name_or_path, getattr(llm, "gguf_file", None))
    if torch_dtype == "llm":  # `l2c mllm build`'s default: the dtype the LLM was saved in
        torch_dtype = llm_config_dtype(folder)
    dtype = torch.float32 if torch_dtype in ("auto", "float32") else getattr(torch, torch_dtype)
    lm = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, trust_remote_code=getattr(llm, "trust_remote_code", False)
    )
    if (Path(folder) / "tokenizer.model").is_file() and not (Path(folder) / "tokenizer.json").is_file():
        import importlib.util

        if importlib.util.find_spec("sentencepiece") is None:
            raise BuildError(
                f"{folder} has its tokenizer as tokenizer.model only (SentencePiece, like Vicuna): "
                "install sentencepiece (a dependency of l2c-llava: re-run scripts/setup_env.sh)"
            )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_id, added = prepare_tokenizer(tokenizer)
    if added:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    text_config = lm.config
    text_config.pad_token_id = tokenizer.pad_token_id
    extra, cls, num_queries = {}, LlavaForConditionalGeneration, None
    if projector_type in CONNECTORS:
        spec = {**ConnectorSection().model_dump(), **(connector or {})}
        extra["l2c_connector"] = {"type": projector_type, **spec}
        cls, num_queries = llava_with_connector_class(), int(spec["num_queries"])
    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_id,
        projector_hidden_act=PROJECTORS.get(projector_type, "gelu"),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_seq_length=num_queries or num_image_tokens(tower.config, vision_feature_select_strategy),
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
        **extra,
    )
    config._attn_implementation = getattr(llm, "attn_implementation", "sdpa")
    # the LLaVA is made on the meta device (no memory) and takes the loaded tower's and LLM's tensors
    # as they are (in `dtype`): no float32 model beside the LLM, no second copy of its weights
    try:
        with torch.device("meta"):
            model = cls(config)
    except ValueError as e:  # a connector shape that does not fit
        raise BuildError(f"projector_type {projector_type}: {e}") from None
    model.to(dtype)
    torch.manual_seed(0)
    if projector_type in CONNECTORS:
        layers = len(vision_feature_layer) if isinstance(vision_feature_layer, (list, tuple)) else 1
        vision_dim = tower.config.hidden_size * layers
        projector = make_connector(config.l2c_connector, vision_dim, text_config.hidden_size)
    else:
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        projector = LlavaMultiModalProjector(config)
        for module in projector.modules():  # transformers' own initialisation of the projector
            model._init_weights(module)
    model.model.multi_modal_projector = projector.to(dtype)
    _assign(model.model.vision_tower, tower, f"vision tower {vision_tower}", dtype)
    _assign(model.model.language_model, lm.get_decoder(), f"LLM {llm.name_or_path}", dtype)
    model.lm_head.weight = lm.get_output_embeddings().weight
    if projector_type == "linear":  # LLaVA's single Linear: linear_1, then an identity linear_2 (kept frozen)
        with torch.no_grad():
            model.model.multi_modal_projector.linear_2.weight.copy_(torch.eye(text_config.hidden_size))
            model.model.multi_modal_projector.linear_2.bias.zero_()
    if config.tie_word_embeddings:
        model.tie_weights()
    processor = make_processor(
        tokenizer, tower.config, vision_feature_select_strategy, num_queries, pad=image_aspect_ratio == "pad"
    )
    return model, processor


def llava_class_for(config):
    """transformers' LLaVA class for an MLP connector, ours for a Q-Former / perceiver one."""
    from transformers import LlavaForConditionalGeneration

    return (
        llava_with_connector_class()
        if getattr(config, "l2c_connector", None)
        else LlavaForConditionalGeneration
    )


def load_llava(folder: str | os.PathLike, *, strict: bool = True, **kwargs):
    """A LLaVA folder saved here (either connector) -> model, every weight loaded (strict by default)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "llava":
        raise BuildError(f"{folder}: a {config.model_type!r} model, not a LLaVA folder")
    model, info = llava_class_for(config).from_pretrained(folder, output_loading_info=True, **kwargs)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad and strict:
        raise BuildError(f"{folder}: the weights do not fit the model: {bad}")
    return model


def _plain_image_processor_type(folder: Path) -> None:
    """``LlavaImageProcessorPil`` -> ``LlavaImageProcessor`` in the saved processor files: the name
    AutoProcessor resolves on any machine (the backend is the loader's choice; ours pins PIL)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            text = path.read_text()
            if "LlavaImageProcessorPil" in text:
                path.write_text(text.replace("LlavaImageProcessorPil", "LlavaImageProcessor"))


def save_llava(
    model,
    processor,
    out_dir: str | os.PathLike,
    meta: dict | None = None,
    overwrite: bool = False,
    card: str | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Format (a): a transformers folder that ``LlavaForConditionalGeneration.from_pretrained`` and
    ``AutoProcessor.from_pretrained`` (lmms-eval's llava_hf) load; checked on load-back. The tower's
    weights are stored under ``vision_tower.vision_model.*`` (the llava-hf layout, which transformers
    4.x needs and 5.x reads), the text config carries ``rope_theta`` / ``rope_scaling`` too, and the
    LLM's own tokenizer files are kept in ``llm_tokenizer/`` for the exports to other stacks.
    `state_dict`: the weights to write, where ``model.state_dict()`` cannot give them (FSDP's wrappers:
    :func:`l2c_llava.train.sharded.state_dict`)."""
    source = tokenizer_source(processor.tokenizer)

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        llava_vision_keys_for_4x(tmp)  # else transformers 4.x loads it with a random tower
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps(portable_config(config), indent=2, sort_keys=True) + "\n")
        processor.save_pretrained(tmp)
        _plain_image_processor_type(tmp)
        if source is not None:  # the LLM's own tokenizer files, for the exports to other stacks
            copy_tokenizer_files(source, tmp / LLM_TOKENIZER_DIR)
        (tmp / META).write_text(json.dumps(meta or {}, indent=2) + "\n")
        if card is not None:  # the model card (l2c_llava.cards), README.md
            (tmp / "README.md").write_text(card, encoding="utf-8")
        try:
            load_llava(tmp)
        except BuildError as e:
            raise BuildError(f"the saved LLaVA folder does not load back cleanly: {e}") from None

    return publish_folder(out_dir, build, LLAVA_KIND, overwrite, legacy_marker=META)


def build_and_save(
    vision: str,
    llm: str,
    out: str | os.PathLike,
    *,
    dtype: str = "llm",
    allow_pickle: bool = False,
    overwrite: bool = False,
):
    """``l2c mllm build``: a LLaVA-1.5 (vicuna_v1 template, padded images) from a vision tower and an LLM
    reference, saved to `out` (refused before any model loads if `out` holds something else).
    Returns (model, folder)."""
    check_output_folder(out, LLAVA_KIND, overwrite, legacy_marker=META)
    model, processor = build_llava(
        vision, LLMSection(name_or_path=llm), allow_pickle=allow_pickle, torch_dtype=dtype
    )
    meta = {
        "stage": "built",
        "template": "vicuna_v1",
        "image_aspect_ratio": "pad",
        "vision_tower": vision,
        "llm": llm,
    }
    return model, save_llava(model, processor, out, overwrite=overwrite, meta=meta)
