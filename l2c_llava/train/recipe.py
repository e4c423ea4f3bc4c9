"""What a training recipe is to the shared driver (:func:`l2c_llava.train.loop.run_training`), in the spirit
of torchtune's recipes: the recipe decides its method, the driver runs every recipe's steps the same way.

A recipe (stage 1's contrastive step and its MNTP, stage 2 and the demo CLIP baseline, LLaVA's pretrain
and finetune) gives:

1. ``setup(acc) -> Plan``: its model and data built, what to train (parameter groups, AdamW's settings,
   the number of steps, the micro-batch and accumulation);
2. ``batches(state)``: ``(epoch, batch)`` for each step from ``state.start`` on (where a resumed run picks
   up in its data is the recipe's);
3. ``step(state, batch) -> loss``: one step's gradients (the loss and how its micro-batches accumulate);
4. ``report(state, loss) -> StepReport``: what it shows of a step beside the loss and the lr;
5. ``save_checkpoint(state, step)`` / ``load_checkpoint(state) -> step``: what a checkpoint holds;
6. ``save(state, last_loss) -> stats``: the trained model and ``train_stats.json``.

The driver owns the rest: AdamW and the schedule, the launch values and accelerate's wrapping, the
resume (one rule for every recipe: :mod:`l2c_llava.train.resume`) and the training log cut back to its
step, a finished run's saved stats, clipping, the optimizer and schedule steps, the log records and the
checkpoints' steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from l2c_llava.layout import TRAINED_MODEL


@dataclass
class Plan:
    """What a recipe's setup hands the driver. `groups`: AdamW's parameter groups (or a list of
    parameters), with `adamw` (lr, betas, ...); `total` steps of `accum` micro-batches of `micro_batch`
    rows per process; `clip`: the parameters clipped to ``train.grad_clip``. The run counts as finished
    when it trained `total` steps and holds ``train_stats.json`` and (unless None) the folder `output`.
    `while_training` is entered around the steps, when any is left to train. `log`: the step's record
    into ``train_log.jsonl`` and the trackers (False: to the trackers alone, under ``tracker_prefix``);
    `checkpoints`: saved every ``train.save_every`` steps and at the last one (False: none)."""

    model: Any
    groups: list
    total: int
    micro_batch: int
    accum: int
    clip: list
    desc: str
    adamw: dict = field(default_factory=dict)
    output: str | None = TRAINED_MODEL
    while_training: AbstractContextManager = field(default_factory=nullcontext)
    log: bool = True
    checkpoints: bool = True
    tracker_prefix: str | None = None


@dataclass
class TrainingState:
    """What the steps run on: the model as accelerate wrapped it, the optimizer and the schedule (restored
    from the last checkpoint), the step the run starts at, the training log, the saved stats of a run that
    already finished (else None), the launch values, when the steps began (``time.perf_counter``) and,
    once the run is over, its stats."""

    wrapped: Any
    opt: Any
    sched: Any
    start: int
    log_path: Path
    finished: dict | None
    launch: dict
    started: float = 0.0
    stats: dict | None = None


class StepReport(NamedTuple):
    """What a recipe shows of a step beside its loss and lr: on the progress bar (formatted text), in
    the training-log record (and the trackers), and to the trackers only."""

    bar: dict[str, str]
    log: dict[str, Any]
    trackers_only: dict[str, Any] = {}


class Recipe(Protocol):
    """A training recipe as :func:`~l2c_llava.train.loop.run_training` drives it (see the module); its
    run folder holds the training log and the checkpoints."""

    run_dir: Path

    def setup(self, acc) -> Plan: ...

    def batches(self, state: TrainingState) -> Iterable[tuple[int, Any]]: ...

    def step(self, state: TrainingState, batch) -> float: ...

    def report(self, state: TrainingState, loss: float) -> StepReport: ...

    def save_checkpoint(self, state: TrainingState, step: int) -> None: ...

    def load_checkpoint(self, state: TrainingState) -> int: ...

    def save(self, state: TrainingState, last_loss: float) -> dict: ...
