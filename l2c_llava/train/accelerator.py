"""The accelerate side of every training recipe: the Accelerator (mixed precision, seed, trackers), the
values a DeepSpeed engine takes from the training config, a micro-batch's backward and gradient clipping
under every launch (one process, DDP, FSDP, DeepSpeed)."""

from __future__ import annotations

import logging

import torch

from l2c_llava import trackers
from l2c_llava.errors import L2CError
from l2c_llava.models.llm import warn_if_slow_bf16

logger = logging.getLogger(__name__)


def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, else no mixed precision. bf16 on the CPU is autocast
    (1.4-1.5x faster LLaVA steps on a CPU with native bf16: bench/RESULTS.md); a warning where the CPU
    emulates it."""
    if choice == "bf16":
        warn_if_slow_bf16("train.mixed_precision bf16", "cuda" if torch.cuda.is_available() else "cpu")
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(mixed_precision: str, seed: int, report_to=(), run_dir=None):
    """The accelerate Accelerator every recipe runs under (CPU when there is no GPU), seeded, with the
    experiment trackers of ``train.report_to`` (l2c_llava.trackers; none by default)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = Accelerator(
        mixed_precision=resolve_mixed_precision(mixed_precision),
        cpu=not torch.cuda.is_available(),
        **trackers.accelerator_kwargs(report_to, run_dir),
    )
    set_seed(seed)
    return acc


class LaunchError(L2CError, ValueError):
    """A launch (accelerate / DeepSpeed / FSDP) that cannot run the recipe as configured."""


# what the training config decides under DeepSpeed (the accelerate yaml decides ZeRO stage, offload,
# topology); accelerate fills these from a prepared DataLoader, else raises, and fills
# gradient_clipping with 1.0 whatever the recipe asked
DEEPSPEED_FROM_TRAINING = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "train_batch_size",
)


def deepspeed_values(
    ds_config: dict, *, micro_batch: int, accum: int, grad_clip: float | None, world: int
) -> dict:
    """Write the training config's micro batch, accumulation and clipping into a DeepSpeed config
    (in place; returned). The recipes draw their own per-rank batches, so no DataLoader goes through
    ``accelerator.prepare``: these values are set here instead. A value the launcher put there that
    differs (``gradient_accumulation_steps: 1`` is what ``accelerate launch`` writes when the yaml says
    nothing) is replaced, with a log line; clipping 0 means none, as DeepSpeed reads it."""
    want = {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(accum),
        "gradient_clipping": float(grad_clip or 0.0),
        "train_batch_size": int(micro_batch * accum * world),
    }
    for key in DEEPSPEED_FROM_TRAINING:
        have = ds_config.get(key)
        if have not in (None, "auto") and have != want[key]:
            logger.warning(
                "DeepSpeed %s: %s from the launch config replaced by %s from the training config",
                key,
                have,
                want[key],
            )
        ds_config[key] = want[key]
    return ds_config


def configure_launch(
    acc, *, micro_batch: int, accum: int, grad_clip: float | None, contrastive_accum: bool = False
) -> dict | None:
    """Before ``acc.prepare``: under DeepSpeed, set the engine's batch sizes, accumulation and clipping
    from the training config (:func:`deepspeed_values`); returns the DeepSpeed config, or None."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    if contrastive_accum and accum > 1:
        raise LaunchError(
            "train.contrastive_accum (GradCache) backpropagates each micro-batch twice, which "
            "DeepSpeed's accumulation does not allow: launch with the DDP or FSDP config, or set "
            "train.contrastive_accum=false"
        )
    deepspeed_values(
        plugin.deepspeed_config,
        micro_batch=micro_batch,
        accum=accum,
        grad_clip=grad_clip,
        world=acc.num_processes,
    )
    plugin.gradient_accumulation_steps, plugin.gradient_clipping = accum, float(grad_clip or 0.0)
    acc.gradient_accumulation_steps = accum  # else accelerate warns of a mismatch and takes DeepSpeed's
    return plugin.deepspeed_config


def is_deepspeed(acc) -> bool:
    return getattr(acc.state, "deepspeed_plugin", None) is not None


def micro_backward(acc, loss: torch.Tensor, accum: int, last: bool) -> None:
    """The backward of one of `accum` micro-batches of a step. DDP / FSDP / one process: ``loss /
    accum``. DeepSpeed: the engine divides by its ``gradient_accumulation_steps`` (= accum, set by
    :func:`configure_launch`) itself and steps (clipping with the config's value) at the last
    micro-batch only; ``opt.step()`` after it is accelerate's no-op."""
    if not is_deepspeed(acc):
        acc.backward(loss / accum)
        return
    acc.gradient_state._set_sync_gradients(last)  # accelerate's own switch for the engine's boundary
    try:
        acc.backward(loss)
    finally:
        acc.gradient_state._set_sync_gradients(True)


def clip_gradients(acc, wrapped, params, max_norm: float | None):
    """Clip to the config's `max_norm` under every launch: DeepSpeed clips inside its step
    (``gradient_clipping``, set from the config), FSDP (v1) through the wrapped model's own
    ``clip_grad_norm_`` (the global norm over every rank's shard: accelerate's call falls back to each
    rank's local shard when `params` is not the wrapped model's full list, e.g. only the trainable
    ones), anything else through ``acc.clip_grad_norm_``."""
    if not max_norm or is_deepspeed(acc):
        return None
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP and not getattr(acc, "is_fsdp2", False):
        acc.unscale_gradients()
        return wrapped.clip_grad_norm_(max_norm)
    return acc.clip_grad_norm_(params, max_norm)
