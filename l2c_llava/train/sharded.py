"""The whole model and optimizer state under every launch: one process, DDP, FSDP and DeepSpeed ZeRO-1/2/3.

Under FSDP and ZeRO-3 each process holds a shard of every parameter; under ZeRO-1/2 (and FSDP) a
shard of the optimizer state. What the recipes read or write as a whole goes through here:

- :func:`unsharded`: a context in which the recipe's own (unwrapped) model holds its full parameters
  on the main process (ZeRO-3: gathered on every process; FSDP: on the main one, on the CPU), for the
  checkpoint's weights, the evaluation after training and the exports; every process enters it.
  With ``writeback=True`` what the main process (ZeRO-3: process 0) writes into it is kept: the resume.
- :func:`optimizer_state` / :func:`load_optimizer_state`: FSDP's full optimizer state (gathered on the
  main process, loaded on every one); DeepSpeed's is the engine's own per-process files
  (:func:`save_engine_state` / :func:`load_engine_state`), read back with ``weights_only`` loading.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENGINE_DIR = "deepspeed"  # inside a checkpoint folder: the DeepSpeed engine's per-process state
ENGINE_TAG = "engine"


def kind(acc) -> str:
    """'deepspeed', 'fsdp' or 'plain' (one process, DDP)."""
    if getattr(getattr(acc, "state", None), "deepspeed_plugin", None) is not None:
        return "deepspeed"
    return "fsdp" if getattr(getattr(acc, "distributed_type", None), "name", None) == "FSDP" else "plain"


def zero_stage(acc) -> int:
    plugin = getattr(getattr(acc, "state", None), "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def is_partitioned(acc) -> bool:
    """Each process holds a shard of the parameters (ZeRO-3 or FSDP)."""
    return zero_stage(acc) == 3 or kind(acc) == "fsdp"


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter's name as the model's ``state_dict`` spells it (FSDP's wrappers left out)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _fsdp_root(acc, wrapped):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(wrapped, FSDP):
        return wrapped
    for m in acc._models:
        if isinstance(m, FSDP):
            return m
    raise RuntimeError("FSDP launch without an FSDP-wrapped model")


@contextmanager
def unsharded(acc, wrapped, model, *, writeback: bool = False):
    """Every process enters; inside, `model` (the recipe's unwrapped model) holds its full parameters on
    the main process. `writeback`: what is written into them there is kept (ZeRO-3: process 0's values
    go to every shard; FSDP: every process must write the same values)."""
    if zero_stage(acc) == 3:
        import deepspeed

        params = [p for p in model.parameters() if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if writeback else None):
            yield model
    elif kind(acc) == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = _fsdp_root(acc, wrapped)
        on_gpu = acc.device.type == "cuda"
        ctx = (
            FSDP.summon_full_params(root, writeback=True, rank0_only=False)
            if writeback
            # offloaded to the CPU on GPUs, for the main process only (torch's FSDP crashes on both on
            # a CPU machine)
            else FSDP.summon_full_params(root, writeback=False, rank0_only=on_gpu, offload_to_cpu=on_gpu)
        )
        with ctx:
            yield model
    else:
        with nullcontext():
            yield model


@torch.no_grad()
def clamp_scale(acc, logit_scale: torch.Tensor, max_scale: float) -> float:
    """CLIP's clamp after each step (s in [0, ln max_scale]) and exp(s), under every launch: in place
    where the parameter is the optimizer's own (one process, DDP; FSDP on the process holding it); under
    DeepSpeed the optimizer keeps its own copy, and the model's forward clamps (``max_logit_scale``).
    Every process calls; all get the value."""
    import math

    local = logit_scale.data.reshape(-1)
    if zero_stage(acc) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([logit_scale]):
            return math.exp(min(max(float(logit_scale.data.reshape(-1)[0]), 0.0), math.log(max_scale)))
    if kind(acc) == "fsdp":  # one process holds the element, the others an empty shard
        local.clamp_(0, math.log(max_scale))
        total = torch.tensor([float(local.sum()) if local.numel() else 0.0], device=acc.device)
        torch.distributed.all_reduce(total)
        return math.exp(float(total[0]))
    local.clamp_(0, math.log(max_scale))
    return math.exp(min(float(local[0]), math.log(max_scale)))


def optimizer_state(acc, wrapped, opt) -> dict | None:
    """Every process calls. The optimizer state the main process writes into ``trainer_state.pt``:
    plain and DDP its own (every process holds the whole), FSDP the full one gathered on the main
    process, DeepSpeed None (the engine writes its shards itself: :func:`save_engine_state`)."""
    k = kind(acc)
    if k == "deepspeed":
        return None
    if k == "fsdp":
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = _fsdp_root(acc, wrapped)
        with FSDP.state_dict_type(
            root,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True),
        ):
            return FSDP.optim_state_dict(root, _inner(opt))
    return opt.state_dict()


def load_optimizer_state(acc, wrapped, opt, state: dict | None) -> None:
    """Every process calls, each with the state read from the checkpoint (DeepSpeed: ignored, see
    :func:`load_engine_state`)."""
    k = kind(acc)
    if k == "deepspeed":
        return
    if k == "fsdp":
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = _fsdp_root(acc, wrapped)
        with FSDP.state_dict_type(
            root,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(rank0_only=False),
            FullOptimStateDictConfig(rank0_only=False),
        ):
            _inner(opt).load_state_dict(FSDP.optim_state_dict_to_load(root, _inner(opt), state))
        return
    opt.load_state_dict(state)


def _inner(opt):
    return getattr(opt, "optimizer", opt)


# -- DeepSpeed's own checkpoint files -------------------------------------------------------------


def save_engine_state(wrapped, folder: Path) -> None:
    """Every process writes its shard of the optimizer (and, ZeRO-3, parameter) state into `folder`
    (the engine's own format), trainable parameters only."""
    wrapped.save_checkpoint(str(folder), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)


def load_engine_state(wrapped, folder: Path) -> None:
    """Every process reads its shard back: module (trainable parameters), optimizer; the schedule
    and the step are the checkpoint's ``trainer_state.pt``. The engine's files are read with
    ``torch.load(weights_only=True)`` and the few DeepSpeed classes they hold allowed by name."""
    engine = wrapped
    previous = engine.checkpoint_engine
    engine.checkpoint_engine = _SafeLoad(previous)
    try:
        path, _ = engine.load_checkpoint(
            str(folder),
            tag=ENGINE_TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    finally:
        engine.checkpoint_engine = previous
    if path is None:
        raise FileNotFoundError(f"{folder}: no DeepSpeed engine state (tag {ENGINE_TAG})")


def _engine_globals() -> list:
    """The classes DeepSpeed 0.19 pickles into its checkpoint files besides tensors and plain types."""
    import argparse
    import collections

    found = [argparse.Namespace, collections.OrderedDict]
    for module, names in (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
        ("deepspeed.runtime.base_optimizer", ()),
    ):
        try:
            mod = __import__(module, fromlist=list(names) or ["_"])
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


class _SafeLoad:
    """The engine's checkpoint engine, its ``load`` with ``weights_only=True``."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        with torch.serialization.safe_globals(_engine_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
