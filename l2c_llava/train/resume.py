"""The one rule that decides whether a run can resume, used by every recipe (stage 1, stage 2, the CLIP
baseline, LLaVA) and by the pipeline.

A run folder's checkpoints were written under the ``config.yaml`` beside them. A new config may pick
them up when every key that differs passes :func:`may_change_on_resume`:

- bookkeeping, which never changes what is computed: how the run logs and saves, and the folder it
  runs from (:data:`BOOKKEEPING`);
- where its outputs go (:data:`OUTPUT_LOCATIONS`: a run folder may be moved);
- the run's length (:data:`RUN_LENGTH`): a longer run continues the same one (the schedule is made
  for the new total), so raising ``train.max_steps`` resumes in every recipe and in the pipeline;
- the sections read once training is over (:data:`AFTER_TRAINING`: evaluation, export).

Anything else (the model, the data, the optimiser, the schedule's shape) refuses the resume and names
the keys. "Already finished" is stricter: the saved config must equal the new one but for bookkeeping
(:func:`same_run`). The pipeline's step fingerprint leaves out the bookkeeping and the sections read
after training that the step does not use (:func:`fingerprint_keys`), and its resume key leaves out,
besides, what may change on resume (:func:`resumable_keys`): a step whose fingerprint changed but
whose resume key did not runs again in place and resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import yaml
from pydantic import BaseModel

from l2c_llava.config.core import config_to_dict, flatten
from l2c_llava.config.migrations import with_removed_keys, without_migrated_keys
from l2c_llava.errors import InputError
from l2c_llava.layout import RUN_CONFIG
from l2c_llava.train.checkpoints import Checkpoints

BOOKKEEPING = frozenset(
    {
        "run.resume",
        "run.root",
        "train.log_every",
        "train.report_to",
        "train.save_every",
        "train.keep_checkpoints",
        "data.num_workers",
    }
)
OUTPUT_LOCATIONS = frozenset({"run.output_dir"})  # (export.dir is in an AFTER_TRAINING section)
RUN_LENGTH = frozenset({"train.max_steps", "train.epochs"})
AFTER_TRAINING = frozenset({"eval", "export"})  # top-level sections
# The keys a schema gained or lost after run folders existed: config/migrations.py.


def is_bookkeeping(key: str) -> bool:
    """A dotted key that never changes what a run computes."""
    return key in BOOKKEEPING


def may_change_on_resume(key: str) -> bool:
    """THE rule: may checkpoints written under one value of this dotted key be resumed under another?"""
    return (
        key in BOOKKEEPING
        or key in OUTPUT_LOCATIONS
        or key in RUN_LENGTH
        or key.split(".")[0] in AFTER_TRAINING
    )


def flat_config(cfg: BaseModel | Mapping) -> dict:
    """A config (typed or as loaded from config.yaml) as {dotted key: value}."""
    return without_migrated_keys(flatten(dict(cfg) if isinstance(cfg, Mapping) else config_to_dict(cfg)))


def differences(
    old: BaseModel | Mapping, new: BaseModel | Mapping, allowed: Callable[[str], bool] = may_change_on_resume
) -> list[str]:
    """The dotted keys whose values differ between two configs, but those `allowed` to."""
    a, b = flat_config(old), flat_config(new)
    return sorted(k for k in set(a) | set(b) if not allowed(k) and a.get(k) != b.get(k))


def _describe(old: Mapping, new: Mapping, keys: list[str]) -> str:
    a, b = flat_config(old), flat_config(new)
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4])


def saved_config(run_dir: str | Path) -> dict | None:
    """The config.yaml a run folder was written under, as a plain dict (None when there is none)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        data = e
    if not isinstance(data, dict):
        reason = f"{type(data).__name__}: {str(data).splitlines()[0][:160] if str(data) else ''}"
        raise InputError(
            f"{path}, the config this run's checkpoints were written under, is damaged ({reason}). Restore "
            "it, or set run.resume=false to start the run over, or use a new run.output_dir"
        )
    return data


def check_resume(run_dir: str | Path, cfg: BaseModel, has_checkpoints: bool) -> None:
    """Refuse to resume checkpoints written under a config that differs from `cfg` in a key that may
    not change on resume (a changed model, data or optimiser would silently continue another run)."""
    old = saved_config(run_dir)
    if not has_checkpoints or old is None or not getattr(cfg.run, "resume", True):
        return
    differ = differences(old, cfg)
    if differ:
        raise InputError(
            f"{run_dir} holds checkpoints of a run with another config ({_describe(old, cfg, differ)}). "
            "Use a new run.output_dir, or run.resume=false to start over there"
        )


def check_resume_config(run_dir: str | Path, cfg: BaseModel) -> None:
    """:func:`check_resume` on a training run folder: refuse to resume its checkpoints (if any) when they
    were written under a config that differs from `cfg` in a key that may not change on resume."""

    check_resume(run_dir, cfg, has_checkpoints=bool(Checkpoints(Path(run_dir), 1).all()))


def same_run(run_dir: str | Path, cfg: BaseModel) -> bool:
    """Whether `run_dir` was written under `cfg` but for bookkeeping (a finished run is then reused)."""
    old = saved_config(run_dir)
    return old is not None and not differences(old, cfg, is_bookkeeping)


def fingerprint_keys(flat: Mapping[str, object], keep: tuple[str, ...] = ()) -> dict:
    """What a pipeline step's outputs depend on: all but the bookkeeping, and of the sections read after
    training only those in `keep` (the step evaluates, say)."""
    return {
        k: v
        for k, v in with_removed_keys(without_migrated_keys(flat)).items()
        if not is_bookkeeping(k) and (k.split(".")[0] not in AFTER_TRAINING or k.split(".")[0] in keep)
    }


def resumable_keys(flat: Mapping[str, object], keep: tuple[str, ...] = ()) -> dict:
    """What must be equal for a pipeline step to resume its earlier run rather than start over."""
    return {
        k: v
        for k, v in fingerprint_keys(flat, keep).items()
        if not may_change_on_resume(k) or k.split(".")[0] in keep
    }


def resume_key(flat: Mapping[str, object]) -> str:
    """A digest of a flattened config without the keys that may change on resume: two configs with
    the same key can share checkpoints."""
    kept = {k: v for k, v in flat.items() if not may_change_on_resume(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
