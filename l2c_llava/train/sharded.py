"""The whole model and optimizer state under every launch: one process, DDP, FSDP and DeepSpeed ZeRO-1/2/3.

Under FSDP and ZeRO-3 each process holds a shard of every parameter; under ZeRO-1/2 (and FSDP) a
shard of the optimizer state. What the recipes read or write as a whole goes through here:

- :func:`unsharded`: a context in which the recipe's own (unwrapped) model holds its full parameters
  on the main process (ZeRO-3: gathered on every process; FSDP: on GPUs on the main one only, offloaded
  to the CPU, on a CPU machine on every process), for the checkpoint's weights and the final save;
  every process enters it. Nothing runs the model's forward inside it (a model evaluated by one process
  is built whole: :func:`whole_models`). With ``writeback=True`` what is written into the parameters
  there is kept (ZeRO-3: process 0's values): the resume.
- :func:`save_optimizer_state` / :func:`load_optimizer_state`: one process and DDP keep the optimizer
  state in ``trainer_state.pt``; FSDP and DeepSpeed keep it per process (FSDP: each process's shard,
  ``optimizer-rankNNNNN.pt``; DeepSpeed: the engine's own files, read back with ``weights_only``
  loading), so a sharded run resumes on the launch and world size that wrote it
  (:func:`check_optimizer_layout` says so otherwise).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
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


def world_size(acc) -> int:
    return int(getattr(acc, "num_processes", 1))


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


@contextmanager
def whole_models(acc):
    """Models built inside are whole on this process: under ZeRO-3 with ``zero3_init_flag``,
    transformers otherwise builds them partitioned (``deepspeed.zero.Init``), each process holding a
    shard; a model that one process evaluates alone must be whole."""
    if zero_stage(acc) != 3:
        yield
        return
    # accelerate's zero3_init_context_manager(enable=False) keeps a stage-3 config registered, which
    # transformers 5 still builds under zero.Init: the registration itself is set aside
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def remember_state_keys(model: torch.nn.Module) -> None:
    """Before FSDP wraps `model`: the names its ``state_dict`` has (persistent buffers included), for
    :func:`state_dict` inside :func:`unsharded`."""
    model._l2c_state_keys = frozenset(model.state_dict().keys())


def is_fsdp_wrapped(model: torch.nn.Module) -> bool:
    """Some of `model`'s modules are FSDP units."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return any(isinstance(m, FSDP) for m in model.modules())


def state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``, also inside :func:`unsharded` under FSDP, where the wrappers' own
    state-dict hooks give nothing of use: there the full tensors are read from the parameters and
    buffers by their plain names (buffers: the persistent ones :func:`remember_state_keys` saw, where it
    ran on `model`), 0-dim parameters in their original shape."""
    if not is_fsdp_wrapped(model):
        return model.state_dict()
    keys = getattr(model, "_l2c_state_keys", None)
    scalars = set(getattr(model, "_l2c_lifted", ()))
    out = {clean_name(n): t for n, t in model.named_parameters()}
    for name, t in model.named_buffers():  # persistent ones only, where known
        if keys is None or clean_name(name) in keys:
            out[clean_name(name)] = t
    return {k: t.reshape(()) if k in scalars and t.shape == (1,) else t for k, t in out.items()}


@torch.no_grad()
def load_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state, strict=False)``, also inside :func:`unsharded` under FSDP (written
    back to the shards when it exits): there each tensor is copied into the parameter or buffer of its
    plain name. A name the model lacks is an error."""
    if not is_fsdp_wrapped(model):
        model.load_state_dict(state, strict=False)
        return
    own = {clean_name(n): t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"tensors the model lacks: {unknown[:4]}")
    for key, value in state.items():
        own[key].data.copy_(value.reshape(own[key].shape))


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


def optimizer_file(rank: int) -> str:
    return f"optimizer-rank{rank:05d}.pt"


def save_optimizer_state(acc, wrapped, opt, folder: Path) -> dict | None:
    """Every process calls, `folder` being the checkpoint being written. Returns the optimizer state the
    main process keeps in ``trainer_state.pt``: one process and DDP, its own (every process holds the
    whole). Under FSDP each process writes the state of its own shards (``optimizer-rankNNNNN.pt``,
    tensors and plain types); under DeepSpeed the engine writes its shards
    (:func:`save_engine_state`). Both resume on the same number of processes."""
    k = kind(acc)
    if k == "deepspeed":
        save_engine_state(wrapped, folder / ENGINE_DIR)
        return None
    if k == "fsdp":
        torch.save(_inner(opt).state_dict(), folder / optimizer_file(acc.process_index))
        return None
    return opt.state_dict()


def check_optimizer_layout(acc, ck: Path, trainer_state: dict) -> None:
    """A checkpoint resumes under the launch kind and world size that wrote it where its optimizer state
    is sharded (FSDP, DeepSpeed); a clear refusal otherwise."""
    from l2c_llava.errors import InputError

    wrote = trainer_state.get("launch") or {"kind": "plain", "world_size": None}
    now = {"kind": kind(acc), "world_size": world_size(acc)}
    sharded_state = {wrote["kind"], now["kind"]} != {"plain"}
    if sharded_state and (wrote["kind"] != now["kind"] or wrote["world_size"] != now["world_size"]):
        raise InputError(
            f"{ck} was written by a {wrote['kind']} launch of {wrote['world_size']} process(es) and this is a "
            f"{now['kind']} launch of {now['world_size']}: its optimizer state is kept per process, so it "
            "resumes under the launch that wrote it; launch it so, or set run.resume=false to start over"
        )


def load_optimizer_state(acc, wrapped, opt, ck: Path, state: dict | None) -> None:
    """Every process: the optimizer state back from checkpoint `ck` (`state`: the one in its
    ``trainer_state.pt``, one process and DDP)."""
    k = kind(acc)
    if k == "deepspeed":
        load_engine_state(wrapped, ck / ENGINE_DIR)
    elif k == "fsdp":
        own = torch.load(ck / optimizer_file(acc.process_index), weights_only=True, map_location="cpu")
        _inner(opt).load_state_dict(own)
    else:
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
