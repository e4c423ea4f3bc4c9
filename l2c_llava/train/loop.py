"""The driver every training recipe runs on (:class:`~l2c_llava.train.recipe.Recipe`): stage 1's contrastive
step and its MNTP, stage 2 and the demo CLIP baseline (``stage2/contrastive.py``), LLaVA's pretrain and
finetune.

:func:`run_training`:

1. the recipe's setup (:class:`~l2c_llava.train.recipe.Plan`), then AdamW on its parameter groups, the
   schedule, the launch values (DeepSpeed), accelerate's wrapping, the resume from the last intact
   checkpoint and the training log cut back to its step; a run that already finished hands back its
   saved stats instead;
2. each step: the recipe's gradients (most go through :func:`accumulate_gradients`, a micro-batch at a
   time), clipping, the optimizer and schedule steps, a log record every ``train.log_every`` steps
   (``train_log.jsonl`` and the trackers) and a checkpoint every ``train.save_every`` steps and at the
   last one;
3. the recipe's save: the trained model and its stats.

The recipe keeps what its method decides: the order of its batches (and where a resumed run picks up
in it), the loss and how its micro-batches accumulate (gradient cache: :mod:`l2c_llava.train.grad_cache`),
what it shows beside loss and lr, the contents of its checkpoints, its model and ``train_stats.json``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from l2c_llava import trackers
from l2c_llava.cpu_threads import follow_share
from l2c_llava.layout import TRAIN_LOG
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
from l2c_llava.train.recipe import Plan, Recipe, TrainingState
from l2c_llava.train.run_dir import append_log, finished_stats, truncate_log
from l2c_llava.train.schedule import make_scheduler


def run_training(acc, recipe: Recipe, train, *, resume: bool) -> TrainingState:
    """Run `recipe` to the end of its plan; returns where it ended, ``stats`` its stats (a finished
    run's saved ones). `train` is the config's ``train`` section (optimizer, schedule, warmup,
    grad_clip, log_every, save_every); `resume`: pick up at the last intact checkpoint."""
    plan = recipe.setup(acc)
    state = _prepare(acc, recipe, plan, train, resume)
    if state.finished is not None:  # a re-run of a finished run: keep its model and numbers
        state.stats = state.finished
        return state
    state.started = time.perf_counter()
    last = float("nan")
    if state.start < plan.total:
        with plan.while_training:
            last = _train_steps(acc, recipe, plan, state, train)
    state.stats = recipe.save(state, last)
    return state


def _prepare(acc, recipe: Recipe, plan: Plan, train, resume: bool) -> TrainingState:
    """What every run does before its first step: AdamW on the plan's groups (``train.optimizer``), the
    schedule over its steps, the launch values, accelerate's wrapping, the recipe's
    ``load_checkpoint`` when `resume` (every process calls it), and the training log cut back to that
    step."""
    model = plan.model
    if is_deepspeed(acc) or acc.distributed_type.name == "FSDP":  # neither takes a 0-dim parameter
        lift_scalar_parameters(model)
    if acc.distributed_type.name == "FSDP":  # its wrappers hide the state dict's names: known before
        sharded.remember_state_keys(model)
    opt = make_adamw(plan.groups, train.optimizer, **plan.adamw)
    sched = make_scheduler(opt, train.schedule, plan.total, train.warmup_steps, train.warmup_ratio)
    configure_launch(
        acc,
        micro_batch=plan.micro_batch,
        accum=plan.accum,
        grad_clip=train.grad_clip,
        contrastive_accum=getattr(train, "contrastive_accum", False),
    )
    if getattr(acc, "deepspeed_engine_wrapped", None) is not None or getattr(acc, "_models", None):
        # an earlier training of this process (MNTP before stage 1's contrastive step) left its model
        # on the Accelerator, and under DeepSpeed its engine, which would take this run's backward():
        # let both go first (accelerate's way between two trainings; it also frees that model's memory)
        acc.free_memory()
    wrapped, opt = acc.prepare(model, opt)
    log_path = Path(recipe.run_dir) / TRAIN_LOG
    state = TrainingState(wrapped, opt, sched, 0, log_path, None, launch_info(acc))
    state.start = recipe.load_checkpoint(state) if resume else 0
    if plan.log:
        state.finished = finished_stats(recipe.run_dir, state.start, plan.total, plan.output)
        if state.finished is None and acc.is_main_process:
            truncate_log(log_path, state.start)
    return state


def _train_steps(acc, recipe: Recipe, plan: Plan, state: TrainingState, train) -> float:
    """Train from ``state.start`` to the plan's total; returns the last step's loss.

    The recipe's batches are asked for the next one only when a step is left to train; its ``step``
    computes that step's gradients and returns its loss; its ``report``, called after the optimizer
    step, says what else to show. The plan's parameters are clipped to ``train.grad_clip``; the
    recipe's ``save_checkpoint(state, step)`` runs on every process every ``train.save_every`` steps
    and at the last one."""
    from tqdm.auto import tqdm

    total = plan.total
    bar = tqdm(total=total, initial=state.start, desc=plan.desc, unit="step", disable=not acc.is_main_process)
    step, last = state.start, float("nan")
    batches = iter(recipe.batches(state))
    while step < total:
        follow_share()  # under a parallel pipeline: the cores a neighbour left
        epoch, batch = next(batches)
        loss = mean_over_processes(acc, recipe.step(state, batch))
        clip_gradients(acc, state.wrapped, plan.clip, train.grad_clip)
        state.opt.step()
        state.sched.step()
        state.opt.zero_grad(set_to_none=True)
        shown = recipe.report(state, loss)
        step, last = step + 1, loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", **shown.bar)
        if plan.log and acc.is_main_process and (step % train.log_every == 0 or step == total):
            rec = {
                "step": step,
                "epoch": epoch,
                "loss": round(loss, 6),
                "lr": state.sched.get_last_lr()[0],
                **shown.log,
            }
            append_log(state.log_path, rec)
            trackers.log(acc, {**rec, **shown.trackers_only}, step)
        if plan.checkpoints and (step % train.save_every == 0 or step == total):
            recipe.save_checkpoint(state, step)
            _fault_after_checkpoint(acc, step)
    bar.close()
    return last


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
