"""What a model name in a config means, decided in one place.

A config names a model (vision tower, LLM, ``baseline.vision``, stage-1 base and adapters, text encoder,
an LLM2CLIP model) in one of five ways; :func:`model_ref` tells which, by looking at the name and the
path alone (nothing is downloaded or loaded):

- ``embedded``: ``embedded:NAME``, a model shipped with the package (``l2c_llava.embedded``: the
  SmolLM2 GGUF, the demo CLIP);
- ``gguf``: a ``.gguf`` file (``x/y.gguf``; a folder and ``gguf_file`` is a folder);
- ``stage2_run``: a stage-2 run folder of ours, whose vision tower is its export
  (``l2c_llava.layout.exported_tower``);
- ``hub``: a Hugging Face Hub id, ``org/name[@revision]`` that is not an existing path: its snapshot in
  the Hub cache (``l2c_llava.models.hub``; downloaded where allowed);
- ``folder``: anything else, a local folder as it is.

Every loader turns a name into a local folder here: :func:`resolve_model_path` (any model),
:func:`llm_folder` (an LLM: a folder and a GGUF file name) and :func:`resolve_vision_path` (a CLIP tower).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from l2c_llava.embedded import EMBEDDED_CLIP, EMBEDDED_LLM, demo_clip_path, smollm2_gguf_path
from l2c_llava.errors import InputError
from l2c_llava.layout import exported_tower, is_stage2_run
from l2c_llava.models.hub import WEIGHTS_SAFE, hub_snapshot

EMBEDDED_PREFIX = "embedded:"
# org/name[@revision]: the Hub's own rules (letters, digits, - _ . ; no leading/trailing - or .)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(@[\w./-]+)?$")

Kind = Literal["embedded", "gguf", "stage2_run", "hub", "folder"]


@dataclass(frozen=True)
class ModelRef:
    """A config's model name and what it means (see the module docstring for the kinds)."""

    name: str
    kind: Kind


def is_hub_id(name_or_path: str | os.PathLike) -> bool:
    """True for ``org/name`` (or ``org/name@rev``) that is not an existing local path."""
    s = str(name_or_path)
    if s.startswith((EMBEDDED_PREFIX, "/", "./", "../", "~")) or Path(s).exists():
        return False
    return bool(_HUB_ID.match(s))


def model_ref(name_or_path: str | os.PathLike) -> ModelRef:
    """What `name_or_path` names: shipped, a GGUF file, a stage-2 run of ours, a Hub id or a folder."""
    s = str(name_or_path)
    if s.startswith(EMBEDDED_PREFIX):
        return ModelRef(s, "embedded")
    if Path(s).suffix == ".gguf":
        return ModelRef(s, "gguf")
    if is_stage2_run(s):
        return ModelRef(s, "stage2_run")
    return ModelRef(s, "hub" if is_hub_id(s) else "folder")


def resolve_model_path(
    name_or_path: str | os.PathLike, what: str = "model", patterns: tuple[str, ...] = WEIGHTS_SAFE
) -> str:
    """A Hub id -> its snapshot folder (:func:`l2c_llava.models.hub.hub_snapshot`, files matching
    `patterns`); any other name as it is (``embedded:`` names and GGUF files: :func:`llm_folder`, stage-2
    runs: :func:`resolve_vision_path`)."""
    ref = model_ref(name_or_path)
    return hub_snapshot(ref.name, what, patterns) if ref.kind == "hub" else ref.name


def resolve_llm_path(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map a config's LLM reference to (folder, gguf file name or None) for ``from_pretrained``.

    ``embedded:smollm2-135m-instruct`` -> the shipped GGUF; ``x/y.gguf`` -> (x, y.gguf); a folder
    stays a folder (as does a Hub id: :func:`llm_folder` resolves it).
    """
    ref = model_ref(name_or_path)
    if ref.kind == "embedded":
        if ref.name != EMBEDDED_LLM:
            raise InputError(f"unknown embedded model {ref.name!r}; the only one is {EMBEDDED_LLM!r}")
        p = smollm2_gguf_path()
        return str(p.parent), p.name
    if ref.kind == "gguf":
        p = Path(ref.name)
        return str(p.parent), p.name
    return ref.name, gguf_file


def llm_folder(name_or_path: str, gguf_file: str | None = None, what: str = "LLM") -> tuple[str, str | None]:
    """:func:`resolve_llm_path`, then a Hub id (``org/name``) -> its snapshot in the Hugging Face cache
    (downloaded where allowed): a local folder to read files from, and the GGUF file in it (or None)."""
    folder, gguf = resolve_llm_path(name_or_path, gguf_file)
    patterns = ("*.json", "*.model", "*.txt", gguf) if gguf else WEIGHTS_SAFE
    return resolve_model_path(folder, what, patterns), gguf


def resolve_vision_path(name_or_path: str) -> str:
    """A config's CLIP reference -> a folder: ``embedded:demo-clip`` is the shipped demo CLIP; a Hub id
    (``openai/clip-vit-large-patch14-336``) its snapshot in the Hugging Face cache; a stage-2 run
    folder its exported tower (``l2c_llava.layout.exported_tower``); a folder stays."""
    ref = model_ref(name_or_path)
    if ref.kind == "embedded":
        if ref.name != EMBEDDED_CLIP:
            raise InputError(f"unknown embedded vision model {ref.name!r}; the only one is {EMBEDDED_CLIP!r}")
        return str(demo_clip_path())
    if ref.kind == "stage2_run":  # a stage-2 run folder: its exported tower, by the one layout
        return str(exported_tower(ref.name))
    return resolve_model_path(ref.name, "vision model")
