"""The training loop every recipe drives with its own batches and loss: stage 1's contrastive step, stage 2
and the demo CLIP baseline (``stage2/contrastive.py``), LLaVA's pretrain and finetune.

1. :func:`prepare_training`: AdamW on the recipe's parameter groups, the schedule, the launch values
   (DeepSpeed), accelerate's wrapping, the resume from the last intact checkpoint and the training log
   cut back to its step; a run that already finished hands back its saved stats instead;
2. :func:`train_loop`: each step's gradients (the recipe's; most go through
   :func:`accumulate_gradients`, a micro-batch at a time), clipping, the optimizer and schedule steps, a
   log record every ``train.log_every`` steps (``train_log.jsonl`` and the trackers) and a checkpoint
   every ``train.save_every`` steps and at the last one.

The recipe keeps what its method decides: the order of its batches (and where a resumed run picks up
in it), the loss and how its micro-batches accumulate (gradient cache: :mod:`l2c_llava.train.grad_cache`),
what it shows beside loss and lr, the contents of its checkpoints, its model and ``train_stats.json``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from l2c_llava import trackers
from l2c_llava.cpu_threads import follow_share
from l2c_llava.layout import TRAIN_LOG, TRAINED_MODEL
from l2c_llava.train import sharded
from l2c_llava.train.accelerator import (
    clip_gradients,
    configure_launch,
    is_deepspeed,
    launch_info,
    lift_scalar_parameters,
    micro_backward,
)
from l2c_llava.train.optim import make_adamw
from l2c_llava.train.run_dir import append_log, finished_stats, truncate_log
from l2c_llava.train.schedule import make_scheduler


@dataclass
class TrainingState:
    """What a training loop starts from: the model as accelerate wrapped it, the optimizer and the
    schedule (restored from the last checkpoint), the step to start at, the training log, and the saved
    stats of a run that already finished (else None)."""

    wrapped: Any
    opt: Any
    sched: Any
    start: int
    log_path: Path
    finished: dict | None
    launch: dict


def prepare_training(
    acc,
    model,
    groups: list,
    total: int,
    train,
    run_dir: Path,
    *,
    resume: bool,
    load_checkpoint: Callable[[Any, Any, Any], int],
    micro_batch: int,
    accum: int,
    output: str | None = TRAINED_MODEL,
    **adamw,
) -> TrainingState:
    """What every training loop does before its first step: AdamW on `groups` (``train.optimizer``,
    `adamw`: lr, betas, ...), the schedule over `total` steps, the launch values, accelerate's wrapping,
    `load_checkpoint(wrapped, opt, sched) -> step` when `resume` (every process calls it), and the training log cut back to that step.
    `train` is the config's ``train`` section. The run counts as finished when it has trained `total`
    steps and holds ``train_stats.json`` and (unless None) the folder `output`."""
    if is_deepspeed(acc) or acc.distributed_type.name == "FSDP":  # neither takes a 0-dim parameter
        lift_scalar_parameters(model)
    if acc.distributed_type.name == "FSDP":  # its wrappers hide the state dict's names: known before
        sharded.remember_state_keys(model)
    opt = make_adamw(groups, train.optimizer, **adamw)
    sched = make_scheduler(opt, train.schedule, total, train.warmup_steps, train.warmup_ratio)
    configure_launch(
        acc,
        micro_batch=micro_batch,
        accum=accum,
        grad_clip=train.grad_clip,
        contrastive_accum=getattr(train, "contrastive_accum", False),
    )
    wrapped, opt = acc.prepare(model, opt)
    start = load_checkpoint(wrapped, opt, sched) if resume else 0
    log_path = Path(run_dir) / TRAIN_LOG
    finished = finished_stats(run_dir, start, total, output)
    if finished is None and acc.is_main_process:
        truncate_log(log_path, start)
    return TrainingState(wrapped, opt, sched, start, log_path, finished, launch_info(acc))


def accumulate_gradients(
    acc,
    micro_batches: Sequence,
    loss_of: Callable[[Any], torch.Tensor | None],
    accum: int,
    *,
    no_sync=None,
    backward_in_autocast: bool = False,
) -> float:
    """One optimizer step's gradients, a micro-batch at a time: ``loss_of(micro_batch)`` runs under
    ``acc.autocast()`` and gives the micro-batch's loss (None leaves it out: no backward, not counted),
    whose backward is one of `accum` (:func:`~l2c_llava.train.accelerator.micro_backward`; the last
    micro-batch is the DeepSpeed boundary). Returns the step's loss: the sum of loss / `accum`.

    `no_sync`: the wrapped model whose DDP gradient all-reduce waits for the last micro-batch (stage 1;
    the other recipes reduce at each one). `backward_in_autocast`: the backward inside the autocast
    region, where stage 1 has always taken it (kept so that its numbers under mixed precision do not
    move); the other recipes take it outside, as PyTorch recommends."""
    step_loss = 0.0
    for i, micro_batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        defer_sync = no_sync is not None and not last and acc.num_processes > 1
        with acc.no_sync(no_sync) if defer_sync else nullcontext():
            with acc.autocast():
                loss = loss_of(micro_batch)
                if loss is not None and backward_in_autocast:
                    micro_backward(acc, loss, accum, last=last)
            if loss is None:
                continue
            if not backward_in_autocast:
                micro_backward(acc, loss, accum, last=last)
        step_loss += loss.item() / accum
    return step_loss


def mean_over_processes(acc, loss: float) -> float:
    """A step's loss as the run logs it: the mean over every process's share of the global batch (each
    process computed the loss of its own rows); the value itself on one process."""
    if acc.num_processes == 1:
        return loss
    return acc.reduce(torch.tensor(float(loss), device=acc.device), "mean").item()


class StepReport(NamedTuple):
    """What a recipe shows of a step beside its loss and lr: on the progress bar (formatted text), in
    the training-log record (and the trackers), and to the trackers only."""

    bar: dict[str, str]
    log: dict[str, Any]
    trackers_only: dict[str, Any] = {}


def train_loop(
    acc,
    state: TrainingState,
    total: int,
    steps: Iterable[tuple[int, Any]],
    step_gradients: Callable[[Any], float],
    report: Callable[[float], StepReport],
    *,
    params,
    train,
    save_checkpoint: Callable[[int], None],
    desc: str,
) -> float:
    """Train from ``state.start`` to `total` steps; returns the last step's loss (nan when none ran).

    `steps` yields ``(epoch, batch)`` for each step from ``state.start`` on, and is asked for the next
    one only when a step is left to train; ``step_gradients(batch)`` computes that step's gradients and
    returns its loss; ``report(loss)``, called after the optimizer step, says what else to show.
    `params` are clipped to ``train.grad_clip``; ``save_checkpoint(step)`` runs on every process every
    ``train.save_every`` steps and at the last one."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=state.start, desc=desc, unit="step", disable=not acc.is_main_process)
    step, last = state.start, float("nan")
    batches = iter(steps)
    while step < total:
        follow_share()  # under a parallel pipeline: the cores a neighbour left
        epoch, batch = next(batches)
        loss = mean_over_processes(acc, step_gradients(batch))
        clip_gradients(acc, state.wrapped, params, train.grad_clip)
        state.opt.step()
        state.sched.step()
        state.opt.zero_grad(set_to_none=True)
        shown = report(loss)
        step, last = step + 1, loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", **shown.bar)
        if acc.is_main_process and (step % train.log_every == 0 or step == total):
            rec = {
                "step": step,
                "epoch": epoch,
                "loss": round(loss, 6),
                "lr": state.sched.get_last_lr()[0],
                **shown.log,
            }
            append_log(state.log_path, rec)
            trackers.log(acc, {**rec, **shown.trackers_only}, step)
        if step % train.save_every == 0 or step == total:
            save_checkpoint(step)
            _fault_after_checkpoint(acc, step)
    bar.close()
    return last


def _fault_after_checkpoint(acc, step: int) -> None:
    """Fault injection for the resume tests: ``L2C_FAULT_KILL_AFTER_CHECKPOINT=STEP:RANK`` kills process
    RANK with SIGKILL right after the checkpoint of STEP (as a preempted node would die), so that the
    launch fails and its next run resumes from that checkpoint. Nothing happens without it."""
    spec = os.environ.get("L2C_FAULT_KILL_AFTER_CHECKPOINT")
    if not spec:
        return
    at, _, rank = spec.partition(":")
    if int(at) == step and int(rank or 0) == acc.process_index:
        os.kill(os.getpid(), signal.SIGKILL)
