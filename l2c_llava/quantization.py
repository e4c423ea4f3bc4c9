"""Memory savers for smaller GPUs, as config switches: QLoRA (4-bit NF4 base weights through
bitsandbytes, LoRA adapters trained on top) and 8-bit AdamW (built by train/optim.py). Gradient checkpointing is a switch of
each stage already (``model.gradient_checkpointing`` / ``train.gradient_checkpointing`` /
``vision.gradient_checkpointing``).

bitsandbytes' 4-bit and 8-bit kernels need a CUDA GPU. Where they cannot run (no bitsandbytes, no
GPU: this CPU machine) a switch fails before any work with a message naming the config key; it never
falls back silently to full precision or plain AdamW, which would change memory use and numbers
without a word.
"""

from __future__ import annotations

import torch

from l2c_llava.errors import CannotRunError


def require_bitsandbytes(what: str, key: str, off: str | None = None):
    """The bitsandbytes module, on a machine where its CUDA kernels can run, or a clear error naming
    `key` and the setting that turns the switch off (`off`, default `key=false`)."""
    off = off or f"{key}=false"
    try:
        import bitsandbytes
    except ImportError as e:
        raise CannotRunError(
            f"{key}: {what} needs bitsandbytes ({e}); install the gpu extra "
            f"(pip install -e '.[gpu]') on a CUDA machine, or set {off}"
        ) from None
    if not torch.cuda.is_available():
        raise CannotRunError(
            f"{key}: {what} runs bitsandbytes' CUDA kernels and this machine has no CUDA GPU; "
            f"set {off} here, or run on a GPU"
        )
    return bitsandbytes


def bnb_4bit_config(compute_dtype: torch.dtype = torch.bfloat16):
    """QLoRA's quantization: NF4 with double quantization, matmuls in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def prepare_for_qlora(model, gradient_checkpointing: bool):
    """QLoRA's preparation of a 4-bit model before LoRA: norms in fp32, base frozen, inputs that carry
    gradients (peft's ``prepare_model_for_kbit_training``)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def quantize_linears_4bit_(
    module: torch.nn.Module, compute_dtype: torch.dtype, key: str, skip: tuple[str, ...] = ()
) -> int:
    """Replace every nn.Linear under `module` (but names containing one of `skip`) by a bitsandbytes
    NF4 Linear4bit holding the same weights, quantized on the GPU. Returns how many were replaced."""
    bnb = require_bitsandbytes("QLoRA (4-bit base weights)", key)
    device = torch.device("cuda", torch.cuda.current_device())
    n = 0
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if type(sub) is not torch.nn.Linear or any(s in full for s in skip):
                continue
            q = bnb.nn.Linear4bit(
                sub.in_features,
                sub.out_features,
                bias=sub.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                compress_statistics=True,
            )
            q.weight = bnb.nn.Params4bit(
                sub.weight.data.to(compute_dtype).cpu(),
                requires_grad=False,
                quant_type="nf4",
                compress_statistics=True,
            )
            if sub.bias is not None:
                q.bias = torch.nn.Parameter(sub.bias.data.to(compute_dtype), requires_grad=False)
            setattr(child, attr, q.to(device))  # moving a Params4bit to CUDA quantizes it
            n += 1
    return n
