"""What an exported folder must hold so that every consumer reads it the same: transformers 4.37
(the original LLaVA code's pin), 4.44 (the llm2vec / LLM2CLIP era) and 5.x.

- vision towers: ``model.safetensors`` keys under ``vision_model.*``. transformers 5's
  ``CLIPVisionModel`` is itself the vision transformer (its own keys are ``embeddings.*``), 4.x's
  holds one under ``vision_model``: 4.x loads none of the 5.x keys and leaves a random tower with only
  a warning, while 5.x reads both layouts. So towers are written in the 4.x layout;
- configs: the fields both generations read: ``rope_theta`` / ``rope_scaling`` at the top level (4.x)
  as well as ``rope_parameters`` (5.x), ``torch_dtype`` as well as ``dtype``;
- tokenizers: the LLM's own files (``tokenizer.model`` where it has one), with a
  ``tokenizer_config.json`` naming a class 4.x knows and listing the added tokens (``<image>``) by id,
  and a ``tokenizer.json`` in the form tokenizers 0.15 parses (Metaspace without ``split``, BPE merges
  as "a b" strings).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VISION_PREFIX = "vision_model."

# the files a transformers tokenizer folder may hold
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
# tokenizer classes transformers 5 writes that 4.x does not have
V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend", "SentencePieceBackend", "PythonBackend"}
# the original LLM's tokenizer files, kept inside a saved LLaVA folder
LLM_TOKENIZER_DIR = "llm_tokenizer"


# -- configs -------------------------------------------------------------------------------------


def portable_config(config: dict) -> dict:
    """A config dict with the fields transformers 4.x reads next to the 5.x ones (a copy)."""
    out = dict(config)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")}
        if kind == "default":
            out["rope_scaling"] = None
        elif kind in ("linear", "dynamic") and set(scaling) == {"factor"}:
            out["rope_scaling"] = {"type": kind, "factor": scaling["factor"]}  # the form 4.37 validates
        else:
            out["rope_scaling"] = {"type": kind, "rope_type": kind, **scaling}
    if "dtype" in out and "torch_dtype" not in out:
        out["torch_dtype"] = out["dtype"]
    for key in ("text_config", "vision_config"):
        if isinstance(out.get(key), dict):
            out[key] = portable_config(out[key])
    return out


# -- vision towers -------------------------------------------------------------------------------


def vision_state(tower) -> dict[str, torch.Tensor]:
    """A CLIP vision tower's weights in the ``vision_model.*`` layout (a 5.x ``CLIPVisionModel``, a
    4.x one or a bare ``CLIPVisionTransformer``)."""
    state = tower.state_dict()
    return {
        (k if k.startswith(VISION_PREFIX) else VISION_PREFIX + k): v.detach().cpu().contiguous()
        for k, v in state.items()
    }


def save_vision_folder(tower, out: str | Path) -> Path:
    """A ``CLIPVisionModel`` folder (config.json + model.safetensors) every transformers version loads
    with no missing or unexpected keys."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = portable_config(tower.config.to_dict())
    config["architectures"] = ["CLIPVisionModel"]
    config["model_type"] = "clip_vision_model"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(vision_state(tower), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def llava_vision_keys_for_4x(folder: str | Path) -> int:
    """Rename, in a transformers LLaVA folder saved by transformers 5, the tower's ``vision_tower.*``
    keys to ``vision_tower.vision_model.*``: the layout of 4.x (which otherwise loads the LLaVA with a
    random tower, warning only) and of the llava-hf checkpoints, which 5.x reads as well. Handles
    sharded folders; returns the number of keys renamed."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)

    def rename(key: str) -> str:
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return "vision_tower." + VISION_PREFIX + key.removeprefix("vision_tower.")
        return key

    renamed = 0
    for shard in sorted(folder.glob("*.safetensors")):
        state = load_file(str(shard))
        if any(rename(k) != k for k in state):
            renamed += sum(rename(k) != k for k in state)
            save_file({rename(k): v for k, v in state.items()}, str(shard), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")
    return renamed


# -- tokenizers ----------------------------------------------------------------------------------


def tokenizer_source(tokenizer) -> Path | None:
    """The folder of the LLM's own tokenizer files behind a loaded tokenizer: a saved LLaVA folder's
    ``llm_tokenizer/``, or the LLM folder it was loaded from."""
    name = getattr(tokenizer, "name_or_path", None)
    if not name:
        return None
    folder = Path(name)
    if (folder / LLM_TOKENIZER_DIR).is_dir():
        return folder / LLM_TOKENIZER_DIR
    if folder.is_dir() and ((folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()):
        return folder
    return None


def copy_tokenizer_files(source: Path, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            copied.append(name)
    return copied


def _downgrade_tokenizer_json(node):
    """tokenizers >= 0.19 serialisation -> the form tokenizers 0.15 parses (same tokenization)."""
    if isinstance(node, list):
        return [_downgrade_tokenizer_json(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _downgrade_tokenizer_json(v) for k, v in node.items()}
    if node.get("type") == "Metaspace":
        scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
        node = {
            "type": "Metaspace",
            "replacement": node.get("replacement", "▁"),
            "add_prefix_space": scheme != "never",
            "prepend_scheme": scheme,
        }
    if node.get("type") == "BPE" and isinstance(node.get("merges"), list):
        merges = node["merges"]
        # a merge of tokens that contain a space has no "a b" form: kept as pairs (tokenizers >= 0.20)
        if merges and isinstance(merges[0], list) and not any(" " in a or " " in b for a, b in merges):
            node["merges"] = [f"{a} {b}" for a, b in merges]
            node.pop("ignore_merges", None)
    return node


def _added_token_entry(token) -> dict:
    return {
        "content": str(token),
        "lstrip": bool(getattr(token, "lstrip", False)),
        "normalized": bool(getattr(token, "normalized", False)),
        "rstrip": bool(getattr(token, "rstrip", False)),
        "single_word": bool(getattr(token, "single_word", False)),
        "special": bool(getattr(token, "special", True)),
    }


def _save_tokenizer_json(tokenizer, out: Path, keep_config: bool) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        names = ["tokenizer.json"] if keep_config else ["tokenizer.json", "tokenizer_config.json"]
        for name in names:
            if (Path(tmp) / name).is_file():
                shutil.copyfile(Path(tmp) / name, out / name)


def write_portable_tokenizer(
    tokenizer, out: str | Path, source: str | Path | None = None, model_type: str | None = None
) -> Path:
    """The tokenizer of an exported model: the LLM's own files from `source` (or, without them, the
    files transformers 5 writes, converted), plus the tokens added here (``<image>``, a pad) by id,
    in the forms transformers 4.37+ and tokenizers 0.15+ read. `tokenizer` is the loaded (5.x)
    tokenizer whose ids the model was trained with."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(source) if source else tokenizer_source(tokenizer)
    if source is not None and source.resolve() != out.resolve():
        copy_tokenizer_files(source, out)
    if not (out / "tokenizer.json").is_file():
        # the tokenization the model was trained with, for fast tokenizers (which would otherwise
        # convert tokenizer.model themselves, each transformers version its own way)
        _save_tokenizer_json(tokenizer, out, keep_config=(out / "tokenizer_config.json").is_file())
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    for key in ("backend", "is_local", "local_files_only", "extra_special_tokens"):
        cfg.pop(key, None)
    cls = cfg.get("tokenizer_class")
    if not cls or cls in V5_ONLY_TOKENIZER_CLASSES:
        sentencepiece = (out / "tokenizer.model").is_file() and model_type in (None, "llama", "mistral")
        cfg["tokenizer_class"] = "LlamaTokenizer" if sentencepiece else "PreTrainedTokenizerFast"
    # every added token by id (4.x rebuilds them from here; its length then equals the model's vocabulary)
    decoder = {str(i): _added_token_entry(t) for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    cfg["added_tokens_decoder"] = decoder
    specials = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
    }
    named = {v for v in specials.values() if v}
    extra = [t["content"] for t in decoder.values() if t["special"] and t["content"] not in named]
    for key, value in specials.items():
        if value is not None:
            cfg[key] = value
    cfg["additional_special_tokens"] = extra
    cfg["padding_side"] = "right"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {**{k: v for k, v in specials.items() if v is not None}, "additional_special_tokens": extra},
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )
    (out / "added_tokens.json").unlink(missing_ok=True)  # superseded by added_tokens_decoder
    tj_path = out / "tokenizer.json"
    if tj_path.is_file():
        tj = _downgrade_tokenizer_json(json.loads(tj_path.read_text()))
        have = {t["id"] for t in tj.get("added_tokens", [])}
        for i, t in decoder.items():
            if int(i) not in have:
                tj.setdefault("added_tokens", []).append({"id": int(i), **t})
        tj["added_tokens"] = sorted(tj.get("added_tokens", []), key=lambda t: t["id"])
        tj_path.write_text(json.dumps(tj, indent=2, ensure_ascii=False) + "\n")
    return out
