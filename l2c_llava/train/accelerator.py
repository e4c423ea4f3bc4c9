"""The accelerate side of every training recipe: the Accelerator (mixed precision, seed, trackers), the
values a DeepSpeed engine takes from the training config, a micro-batch's backward and gradient clipping
under every launch (one process, DDP, FSDP, DeepSpeed)."""

from __future__ import annotations

import logging
import os

import torch

from l2c_llava import trackers
from l2c_llava.errors import InputError
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


def launch_environment() -> dict:
    """What the launcher asked for, read from the environment it gives each process (``accelerate
    launch`` or ``torchrun``): world size and, from the accelerate yaml, DeepSpeed or FSDP."""
    flag = lambda name: os.environ.get(name, "false").lower() == "true"  # noqa: E731
    kind = (
        "DEEPSPEED" if flag("ACCELERATE_USE_DEEPSPEED") else "FSDP" if flag("ACCELERATE_USE_FSDP") else None
    )
    return {"world_size": int(os.environ.get("WORLD_SIZE", "1") or 1), "kind": kind}


def make_accelerator(mixed_precision: str, seed: int, report_to=(), run_dir=None):
    """The accelerate Accelerator every recipe runs under, seeded, with the experiment trackers of
    ``train.report_to`` (l2c_llava.trackers; none by default).

    Without a GPU: one process runs on the CPU; under a launcher (``WORLD_SIZE > 1``, or a DeepSpeed /
    FSDP yaml) the processes join over gloo, which accelerate does not pick by itself, and never with
    accelerate's ``cpu=True``, which drops the DeepSpeed and FSDP plugins without a word. The launch is
    then checked: it runs as what the launcher asked for or stops here (:func:`check_launch`), before
    anything is written."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    want = launch_environment()
    launched = want["world_size"] > 1 or want["kind"] is not None
    kwargs: dict = {}
    if want["kind"] == "FSDP" and not torch.cuda.is_available():
        flags = ("FSDP_SYNC_MODULE_STATES", "FSDP_CPU_RAM_EFFICIENT_LOADING")
        if any(os.environ.get(f, "false").lower() == "true" for f in flags):
            raise InputError(
                "FSDP on a machine without a GPU: fsdp_sync_module_states and fsdp_cpu_ram_efficient_loading "
                "need a GPU (accelerate refuses them on the CPU); launch with --fsdp_sync_module_states false "
                "--fsdp_cpu_ram_efficient_loading false (the shipped yamls keep them on for GPUs). Nothing "
                "was written"
            )
    if not torch.cuda.is_available():
        if want["kind"] == "DEEPSPEED":  # DeepSpeed joins its processes itself, over gloo here
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:  # one process, or accelerate's MULTI_CPU (gloo) under a launcher
            kwargs["cpu"] = True
    acc = Accelerator(
        mixed_precision=resolve_mixed_precision(mixed_precision),
        **kwargs,
        **trackers.accelerator_kwargs(report_to, run_dir),
    )
    if want["kind"] == "FSDP" and launched and not torch.cuda.is_available():
        _engage_cpu_fsdp(acc)
    check_launch(acc, want)
    set_seed(seed)
    return acc


def _engage_cpu_fsdp(acc) -> None:
    """accelerate takes an FSDP yaml on GPUs only: on a CPU machine its processes join as MULTI_CPU
    (gloo) and the FSDP plugin is dropped. torch's FSDP itself runs on the CPU over gloo, so the plugin
    the yaml describes (read from the launcher's environment, as accelerate reads it) is put back and
    ``acc.prepare`` wraps the model with it, as on GPUs. Without a process group (one process) there is
    nothing to shard and the launch check refuses the run."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    # both states: accelerate copies the process state into the accelerator state each time it is built
    for state in (PartialState(), acc.state):
        state.distributed_type = DistributedType.FSDP
        # torch's FSDP computes on plain "cpu" and refuses a device_id with an index ("cpu:0")
        state.device = torch.device("cpu")
    acc.state.fsdp_plugin = plugin


def check_launch(acc, want: dict) -> None:
    """Refuse a silent fall-back: DeepSpeed or FSDP asked for and not engaged, or a process alone (or in
    another world) while the launcher started `world_size`."""
    got = acc.distributed_type.name
    problems = []
    if want["kind"] is not None and got != want["kind"]:
        problems.append(f"the launch config asks for {want['kind']} and accelerate runs {got}")
    if acc.num_processes != want["world_size"]:
        problems.append(
            f"the launcher started {want['world_size']} processes and this one sees a world of {acc.num_processes}"
        )
    if problems:
        raise InputError(
            "; ".join(problems)
            + ". Nothing was written. On a machine without a GPU launch with DS_ACCELERATOR=cpu and without "
            "--cpu / use_cpu (it turns DeepSpeed and FSDP off); check that deepspeed is installed "
            "(pip install -e '.[deepspeed]')"
        )


def launch_info(acc) -> dict:
    """What a run records of its launch (train_stats.json, metrics.json): world size, distributed type,
    ZeRO stage or FSDP sharding, mixed precision."""
    info = {
        "world_size": acc.num_processes,
        "distributed_type": acc.distributed_type.name,
        "mixed_precision": str(acc.mixed_precision),
    }
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None:
        info["zero_stage"] = int(plugin.zero_stage)
    fsdp = getattr(acc.state, "fsdp_plugin", None)
    if fsdp is not None and acc.distributed_type.name == "FSDP":
        strategy = getattr(fsdp, "sharding_strategy", None)
        info["fsdp_sharding"] = getattr(strategy, "name", str(strategy))
    return info


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
        raise InputError(
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


def lift_scalar_parameters(model: torch.nn.Module) -> list[str]:
    """Give every 0-dim parameter (CLIP's ``logit_scale``) the shape [1], in place (the same Parameter
    object, so optimizer groups built before still hold it), for DeepSpeed and FSDP: DeepSpeed's engine
    broadcasts each parameter as ``p.data.view(torch.uint8)``, which a 0-dim tensor cannot do on any
    backend, and FSDP refuses scalar parameters. The
    module's ``state_dict`` still gives them 0-dim and ``load_state_dict`` takes 0-dim values, so
    checkpoints and exports keep the shapes of a run without DeepSpeed. Returns the names lifted."""
    lifted = []
    for owner_name, owner in model.named_modules():
        names = [n for n, p in owner.named_parameters(recurse=False) if p.ndim == 0]
        if not names:
            continue
        for n in names:
            p = getattr(owner, n)
            p.data = p.data.reshape(1)
            lifted.append(f"{owner_name}.{n}" if owner_name else n)

        def to_scalar(module, state_dict, prefix, local_metadata, names=tuple(names)):
            for n in names:
                if prefix + n in state_dict and state_dict[prefix + n].shape == (1,):
                    state_dict[prefix + n] = state_dict[prefix + n].reshape(())
            return state_dict

        def from_scalar(state_dict, prefix, *args, names=tuple(names)):
            for n in names:
                if prefix + n in state_dict and state_dict[prefix + n].ndim == 0:
                    state_dict[prefix + n] = state_dict[prefix + n].reshape(1)

        owner._register_state_dict_hook(to_scalar)
        owner._register_load_state_dict_pre_hook(from_scalar)
    model._l2c_lifted = tuple(lifted)
    return lifted
