"""The learning-rate schedule every training recipe uses."""

from __future__ import annotations


def make_scheduler(opt, schedule: str, total: int, warmup_steps: int | None, warmup_ratio: float | None):
    """transformers' schedule by name ('constant' warms up too), warmup in steps or as a ratio."""
    from transformers import get_scheduler

    warmup = warmup_steps if warmup_steps is not None else round((warmup_ratio or 0) * total)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(name, opt, num_warmup_steps=min(warmup, total), num_training_steps=total)
