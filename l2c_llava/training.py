"""What every training recipe shares: the learning-rate schedule, the training log, checkpoints.

A checkpoint is a folder ``run_dir/checkpoints/step-NNNNNNN/`` with the recipe's weights (written by
the recipe: an adapter, or the trainable state as safetensors) and ``trainer_state.pt`` (optimizer,
scheduler, RNG states, step; tensors and plain types only, loaded with ``weights_only=True``). It is
built as ``.step-NNNNNNN.tmp`` and renamed, so a kill leaves the previous checkpoint intact; only the
last ``keep`` are kept.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def make_scheduler(opt, schedule: str, total: int, warmup_steps: int | None, warmup_ratio: float | None):
    """transformers' schedule by name ('constant' warms up too), warmup in steps or as a ratio."""
    from transformers import get_scheduler

    warmup = warmup_steps if warmup_steps is not None else round((warmup_ratio or 0) * total)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(name, opt, num_warmup_steps=min(warmup, total), num_training_steps=total)


def truncate_log(path: Path, step: int) -> None:
    """Keep the JSONL training-log records up to `step` (a resumed run appends after them)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= step))


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Checkpoints:
    def __init__(self, run_dir: Path, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(
            p for p in self.root.glob("step-*") if p.is_dir() and (p / "trainer_state.pt").is_file()
        )

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(
        self, step: int, write_weights: Callable[[Path], None], opt, sched, extra: dict | None = None
    ) -> Path:
        final, tmp = self.root / f"step-{step:07d}", self.root / f".step-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_weights(tmp)
        state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), **(extra or {})}  # fmt: skip
        torch.save(state, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.all()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", final)
        return final

    def restore(self, ck: Path, opt, sched) -> dict:
        """Load optimizer, scheduler and RNG states from `ck`; returns the whole trainer state."""
        state = torch.load(ck / "trainer_state.pt", weights_only=True, map_location="cpu")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        logger.info("resumed from %s (step %d)", ck, state["step"])
        return state
