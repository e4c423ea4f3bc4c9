"""A Hugging Face Hub id (``org/name``, optionally ``org/name@revision``) -> its snapshot folder in the Hub
cache (:func:`hub_snapshot`).

Every place a config names a model asks ``l2c_llava.models.reference`` what the name means; a Hub id
comes here, so it works wherever a folder does and the checks that follow (config.json, safetensors
weights, no pickles) are the same.

Order: the cache first (no network when the snapshot is there, complete); then a download when the
Hub may be reached; offline (``HF_HUB_OFFLINE=1``) and not cached: one error naming the id and
``HF_HUB_OFFLINE``. Downloads take the config, tokenizer and ``*.safetensors`` files only: pickled
``.bin`` weights are fetched only by ``l2c convert weights``, which turns them into safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

from l2c_llava.errors import InputError

# what a model folder needs; pickled weights are left out on purpose (see module docstring)
WEIGHTS_SAFE = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")
WEIGHTS_PICKLE = ("*.json", "*.bin", "*.model", "*.txt", "*.tiktoken", "*.jinja")
_MARKERS = ("config.json", "adapter_config.json", "llm2clip_config.json", "l2c_encoder.json")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """``HF_HUB_CACHE`` (or ``HF_HOME``/hub) as set now, else huggingface_hub's default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _complete(folder: Path, patterns: tuple[str, ...]) -> bool:
    """A snapshot holds a model: a marker file and, where the patterns ask for weights, weights."""
    if not any((folder / m).is_file() for m in _MARKERS):
        return False
    if (folder / "adapter_config.json").is_file() or (folder / "l2c_encoder.json").is_file():
        return True
    weights = [p for p in patterns if p in ("*.safetensors", "*.bin")]
    return not weights or any(any(folder.glob(p)) for p in weights)


def hub_snapshot(hub_id: str, what: str = "model", patterns: tuple[str, ...] = WEIGHTS_SAFE) -> str:
    """The local snapshot folder of `hub_id` (``org/name[@revision]``): cache first, then download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = hub_id.partition("@")
    revision = revision or None
    cache = hub_cache_dir()
    try:
        cached = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        cached = None
    if cached is not None:
        if _complete(cached, patterns):
            return str(cached)
        if (
            "*.safetensors" in patterns
            and any(cached.glob("*.bin"))
            and not any(cached.glob("*.safetensors"))
        ):
            raise InputError(
                f"{what} {hub_id}: the cached snapshot holds pickled .bin weights only ({cached}); "
                f"`l2c convert weights {hub_id} OUT` writes a safetensors copy to use instead"
            )
    if hub_offline():
        state = "only partly in" if cached is not None else "not in"
        raise InputError(
            f"{what} {hub_id}: HF_HUB_OFFLINE=1 and the model is {state} the Hugging Face cache "
            f"({cache}). Download it on a machine with network (`hf download {repo_id}`, same "
            "HF_HUB_CACHE), unset HF_HUB_OFFLINE, or give a local folder"
        ) from None
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=list(patterns))
        )
    except Exception as e:  # noqa: BLE001 - network, gated, not found: all told the same way, with the cause
        hint = (
            "log in (`hf auth login` or HF_TOKEN) and accept the model's licence on its page"
            if "gated" in type(e).__name__.lower() or "401" in str(e) or "403" in str(e)
            else "check the id and the network, or set HF_HUB_OFFLINE=1 to use the cache only"
        )
        raise InputError(
            f"{what} {hub_id}: cannot download it from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {hint}"
        ) from None
    if not any((folder / m).is_file() for m in _MARKERS):
        raise InputError(
            f"{what} {hub_id}: the Hub repository has no config.json (nor adapter_config.json): "
            "not a transformers model"
        )
    if not _complete(folder, patterns):  # e.g. pickled .bin weights only (lmsys/vicuna-7b-v1.5)
        raise InputError(
            f"{what} {hub_id}: the Hub repository has no safetensors weights (pickled .bin only?): "
            f"`l2c convert weights {hub_id} OUT` downloads and converts them; then give OUT"
        )
    return str(folder)
