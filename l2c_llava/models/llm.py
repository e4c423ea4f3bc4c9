"""Decoder LLMs as the whole method uses them: a folder, a Hub id, a .gguf file or the embedded model
made into a checked transformers folder (:func:`local_llm_folder`), loaded with a chosen attention
direction, dtype and optional 4-bit base (:func:`load_llm`), and a chain of LoRA adapters merged in
(:func:`merge_adapters`). Stage 1's text encoder and the LLaVA builder both load their LLM here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from l2c_llava.embedded import EMBEDDED_LLM, materialize_gguf
from l2c_llava.errors import InputError
from l2c_llava.models.reference import llm_folder
from l2c_llava.quantization import bnb_4bit_config, require_bitsandbytes

logger = logging.getLogger(__name__)

# model_type -> GGUF general.architecture
SUPPORTED_FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "phi3": "phi3",
}
GGUF_DECODERS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}


@dataclass
class EncoderSource:
    """Where the weights come from: a base (folder / GGUF) and LoRA adapters merged in turn."""

    base: str
    gguf_file: str | None = None
    adapters: list[str] = field(default_factory=list)


def _check_gguf(path: Path) -> str:
    """The GGUF file's architecture, or an InputError saying why it is not a decoder LLM."""
    if not path.is_file():
        raise InputError(f"GGUF file not found: {path}")
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a core dependency
        raise InputError("loading GGUF files needs the `gguf` package (pip install gguf)") from e
    try:
        reader = gguf.GGUFReader(str(path))
        field_ = reader.fields["general.architecture"]
        arch = bytes(field_.parts[field_.data[0]]).decode()
    except KeyError:
        raise InputError(
            f"{path}: GGUF file without general.architecture; cannot tell what model it holds"
        ) from None
    except Exception as e:  # not a GGUF file at all
        raise InputError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    if arch not in GGUF_DECODERS:
        raise InputError(
            f"{path} holds a {arch!r} model, not a supported decoder LLM; "
            f"supported GGUF architectures: {', '.join(sorted(GGUF_DECODERS))}"
        )
    return arch


def _check_family(model_type: str, where: str) -> None:
    if model_type not in SUPPORTED_FAMILIES:
        raise InputError(
            f"{where}: model family {model_type!r} is not supported as a bidirectional text encoder; "
            f"supported: {', '.join(sorted(SUPPORTED_FAMILIES))}"
        )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX): there bf16 runs about
    1.8x faster than float32 (SmolLM2-135M's forward on 2 Zen 4 cores, 1,280 against 700 tokens/s);
    elsewhere it is emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def warn_if_slow_bf16(what: str, device: str = "cpu") -> None:
    """A warning when `what` asks for bf16 on a CPU that emulates it (the run is right, only slow)."""
    if not device.startswith("cuda") and not cpu_has_native_bf16():
        logger.warning(
            "%s: bf16 on this CPU is emulated (no AVX512-BF16 / AMX) and slower than float32; "
            'set it to float32 / "no" here',
            what,
        )


def resolve_dtype(torch_dtype: str | torch.dtype, device: str) -> Any:
    """A config's dtype name as a torch dtype; "auto" is the checkpoint's on a GPU and float32 on the
    CPU (bf16 is fast only on CPUs with native bf16: :func:`cpu_has_native_bf16`)."""
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        return "auto" if device.startswith("cuda") else torch.float32
    if torch_dtype == "bfloat16":
        warn_if_slow_bf16("torch_dtype bfloat16", device)
    return getattr(torch, torch_dtype)


def local_llm_folder(name_or_path: str, gguf_file: str | None = None) -> str:
    """A transformers folder for an LLM reference: a folder (checked: config.json and safetensors
    weights), a .gguf file or the embedded model (converted once into a cached folder)."""
    folder, gguf_file = llm_folder(name_or_path, gguf_file)
    if gguf_file:
        _check_gguf(Path(folder) / gguf_file)
        return str(materialize_gguf(folder, gguf_file))  # converted once, cached as safetensors
    p = Path(folder)
    if not p.is_dir():
        raise InputError(
            f"model folder not found: {folder} (a transformers folder, a .gguf file or {EMBEDDED_LLM!r})"
        )
    if not (p / "config.json").is_file():
        raise InputError(f"{folder} has no config.json: not a transformers model folder")
    if not any(p.glob("*.safetensors")):
        found = ", ".join(sorted(x.name for x in p.iterdir())) or "nothing"
        raise InputError(
            f"{name_or_path} has no *.safetensors weights (found: {found}); pickled .bin weights (Vicuna-7B-v1.5 "
            f"ships them) are not loaded: `l2c convert weights {name_or_path} OUT` writes a safetensors copy"
        )
    return folder


def load_llm(
    source: EncoderSource,
    *,
    bidirectional: bool,
    torch_dtype,
    attn_implementation: str,
    trust_remote_code: bool,
    causal_lm: bool = False,
    load_in_4bit: bool = False,
):
    """(model, tokenizer, model_type, name_or_path) for a folder or a GGUF file; `load_in_4bit`: NF4
    base weights on the GPU through bitsandbytes (QLoRA), or a clear error where that cannot run."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    quant: dict[str, Any] = {}
    if load_in_4bit:
        require_bitsandbytes("QLoRA (4-bit base weights)", "model.load_in_4bit")
        compute = (
            torch_dtype
            if isinstance(torch_dtype, torch.dtype) and torch_dtype != torch.float32
            else torch.bfloat16
        )
        quant = {
            "quantization_config": bnb_4bit_config(compute),
            "device_map": {"": torch.cuda.current_device()},
        }
    folder = local_llm_folder(source.base, source.gguf_file)
    config = AutoConfig.from_pretrained(folder, **kwargs)
    _check_family(config.model_type, source.base)
    config.is_causal = not bidirectional
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_pretrained(
        folder, config=config, dtype=torch_dtype, attn_implementation=attn_implementation, **kwargs, **quant
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: no usable tokenizer ({e})") from None
    name = getattr(config, "_name_or_path", "") or ""
    return model, tokenizer, config.model_type, name


def merge_adapters(model, adapters: Sequence[str]):
    """`model` with each peft LoRA folder of `adapters` merged in, in turn (llm2vec's MNTP then
    supervised adapters, for one)."""
    from peft import PeftModel

    for adapter in adapters:
        p = Path(adapter)
        if not (p / "adapter_config.json").is_file():
            raise InputError(
                f"adapter folder {adapter} has no adapter_config.json (a peft LoRA folder is expected)"
            )
        if not (p / "adapter_model.safetensors").is_file():
            other = [x.name for x in p.glob("adapter_model.*")]
            raise InputError(
                f"adapter folder {adapter} has no adapter_model.safetensors"
                + (f" (found {', '.join(other)}: convert it to safetensors)" if other else "")
            )
        model = PeftModel.from_pretrained(model, str(p)).merge_and_unload()
    return model
