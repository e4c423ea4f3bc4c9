"""Checkpoints of a training run, with an exact resume.

A checkpoint is a folder ``run_dir/checkpoints/step-NNNNNNN/`` with the recipe's weights (written by
the recipe: an adapter, or the trainable state as safetensors) and ``trainer_state.pt`` (optimizer,
scheduler, RNG states, step; tensors and plain types only, loaded with ``weights_only=True``). It is
built as ``.step-NNNNNNN.tmp`` and renamed, so a kill leaves the previous checkpoint intact; only the
last ``keep`` are kept. Each holds ``checkpoint_sha256.json``: the size and sha256 of every file in it
(any file: per-rank optimizer shards too) and whether its weights were all finite, written with it and
checked before a resume. A damaged latest one (a file changed, cut short or missing, weights with NaN)
is set aside as ``damaged-step-NNNNNNN`` and the run resumes from the previous one; the rotation never
removes the newest checkpoint with finite weights. Checkpoints written before the hashes existed are
still accepted when every file reads back and the weights are finite.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from l2c_llava.errors import InputError, L2CError
from l2c_llava.io import (
    atomic_write_json,
    clean_interrupted,
    file_record,
    move_into_place,
    records_problem,
    writing,
)
from l2c_llava.layout import CHECKPOINTS
from l2c_llava.train import sharded

logger = logging.getLogger(__name__)

CHECKPOINT_SUMS = "checkpoint_sha256.json"  # {"files": {path: {"bytes", "sha256"}}, "finite": bool}


def nonfinite_tensors(folder: Path) -> list[str]:
    """The tensors of the safetensors files under `folder` holding NaN or infinity ("file:name"); every
    byte of their data is read, so a file cut short fails here too."""
    from safetensors import safe_open

    bad = []
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(f"{f.relative_to(folder)}:{k}")
    return bad


def write_checkpoint_sums(folder: Path) -> dict:
    """Record the size and sha256 of every file in `folder` (subfolders too) and whether its weights
    are finite, in ``CHECKPOINT_SUMS``; returns the record."""
    files = {
        p.relative_to(folder).as_posix(): file_record(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CHECKPOINT_SUMS
    }
    bad = nonfinite_tensors(folder)
    record = {"files": files, "finite": not bad, "nonfinite": bad[:20]}
    atomic_write_json(folder / CHECKPOINT_SUMS, record)
    return record


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint `folder` must not be resumed from (None: it is intact): a file missing or of
    another size (cheap checks first), a sha256 that differs from what was recorded when it was
    written, or non-finite weights."""
    import json

    try:
        record = json.loads((folder / CHECKPOINT_SUMS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _legacy_problem(folder)
    except (OSError, ValueError) as e:
        return f"{CHECKPOINT_SUMS} cannot be read ({type(e).__name__}: {e})"
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not files:
        return f"{CHECKPOINT_SUMS} lists no files"
    problem = records_problem(folder, files)
    if problem:
        return problem
    if not record.get("finite", True):
        return f"its weights are not finite (NaN or infinity in {', '.join(record.get('nonfinite', [])[:3])})"
    return None


def _legacy_problem(folder: Path) -> str | None:
    """A checkpoint written before the hashes existed: every weight read back and finite."""
    logger.info(
        "%s has no %s (written by an older version): checking that it reads back", folder, CHECKPOINT_SUMS
    )
    bad = nonfinite_tensors(folder)
    if bad:
        return f"its weights are not finite (NaN or infinity in {', '.join(bad[:3])})"
    return None


def _recorded_finite(ck: Path) -> bool:
    import json

    try:
        return bool(json.loads((ck / CHECKPOINT_SUMS).read_text(encoding="utf-8")).get("finite", True))
    except FileNotFoundError:
        return True  # written before the record existed: it was resumable then
    except (OSError, ValueError, AttributeError):
        return False


class Checkpoints:
    def __init__(self, run_dir: Path, keep: int):
        self.root = Path(run_dir) / CHECKPOINTS
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

    def latest_intact(self) -> tuple[Path, dict] | None:
        """The newest checkpoint whose files all match the sizes and hashes recorded when it was written
        (:data:`CHECKPOINT_SUMS`) and whose weights are finite, with its trainer state; None when there is
        none. A damaged one (a disk filled up, a copy cut short, bytes changed in place) is set aside as ``damaged-step-N`` (kept,
        not deleted, and out of the rotation) and the previous one is used, with a warning that says so."""
        found = self.all()
        damaged = []
        for ck in reversed(found):
            try:
                problem = checkpoint_problem(ck)
                if problem:
                    raise ValueError(problem)
                state = torch.load(ck / "trainer_state.pt", weights_only=True, map_location="cpu")
                if not isinstance(state, dict) or "step" not in state:
                    raise ValueError("trainer_state.pt holds no step")
            except Exception as e:  # noqa: BLE001 - any read failure means: do not resume from it
                reason = f"{type(e).__name__}: {str(e)[:200]}"
                aside = ck.with_name(f"damaged-{ck.name}")
                try:  # another process of the same launch may have moved it already
                    shutil.rmtree(aside, ignore_errors=True)
                    ck.rename(aside)
                except OSError:
                    pass
                damaged.append(ck.name)
                logger.warning(
                    "checkpoint %s cannot be read (%s); moved to %s and trying the previous one",
                    ck,
                    reason,
                    aside.name,
                )
                continue
            if damaged:
                logger.warning(
                    "resuming from %s: the later checkpoint(s) %s are damaged (kept as damaged-*)",
                    ck,
                    ", ".join(damaged),
                )
            return ck, state
        if damaged:
            raise L2CError(
                f"{self.root}: every checkpoint is damaged ({', '.join(damaged)}, now damaged-*); set "
                "run.resume=false to start over, or use a new run.output_dir"
            )
        return None

    def save(
        self,
        step: int,
        write_weights: Callable[[Path], None],
        opt,
        sched,
        extra: dict | None = None,
        *,
        optimizer_state: dict | None = None,
        prepared: Path | None = None,
    ) -> Path:
        """One process writes the checkpoint of `step`: `write_weights(folder)`, then
        ``trainer_state.pt``, then the rename into place. `prepared`: a temporary folder already holding
        files other processes wrote (DeepSpeed's shards: :meth:`save_state`); `optimizer_state`: the
        state to keep instead of ``opt.state_dict()`` (FSDP's gathered one; None under DeepSpeed)."""
        final, tmp = self.root / f"step-{step:07d}", self.root / f".step-{step:07d}.tmp"
        if prepared is None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        state = {
            "step": step,
            "optimizer": opt.state_dict()
            if prepared is None and optimizer_state is None
            else optimizer_state,
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            **(extra or {}),
        }
        try:
            with writing(tmp):  # a full disk, the file size limit: one line naming the folder
                write_weights(tmp)
                torch.save(state, tmp / "trainer_state.pt")
                record = write_checkpoint_sums(tmp)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # the space it took is given back; earlier ones intact
            raise
        clean_interrupted(final)
        move_into_place(tmp, final)
        if not record["finite"]:
            logger.error(
                "checkpoint %s holds non-finite weights (%s): a resume will not use it, and the newest "
                "checkpoint with finite weights is kept",
                final,
                ", ".join(record["nonfinite"][:3]),
            )
        self._rotate()
        logger.info("checkpoint %s", final)
        return final

    def _rotate(self) -> None:
        """Keep the last ``keep`` checkpoints, and never remove the newest one whose weights were
        finite when written (a run that went NaN keeps its last usable state)."""
        found = self.all()
        keep = set(found[-self.keep :]) if self.keep > 0 else set()
        good = [ck for ck in found if _recorded_finite(ck)]
        if good:
            keep.add(good[-1])
        for old in found:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def save_with(
        self,
        acc,
        step: int,
        write_weights: Callable[[Path], None],
        opt,
        sched,
        *,
        wrapped,
        model,
    ) -> None:
        """Every process meets here, under every launch: the main one runs `write_weights(folder)` while
        `model` holds its full parameters (:func:`~l2c_llava.train.sharded.unsharded`), the optimizer
        state is gathered (FSDP) or written by each process in the engine's files (DeepSpeed)."""
        tmp = self.root / f".step-{step:07d}.tmp"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        with sharded.unsharded(acc, wrapped, model):
            if acc.is_main_process:
                try:
                    with writing(tmp):  # a full disk: one line naming the folder, not a traceback
                        write_weights(tmp)
                except OSError:
                    shutil.rmtree(tmp, ignore_errors=True)  # the space it took is given back
                    raise
        optimizer_state = sharded.save_optimizer_state(acc, wrapped, opt, tmp)
        # what a resume checks beside the config (one rule for every recipe: train/resume.py)
        extra = {"launch": {"kind": sharded.kind(acc), "world_size": sharded.world_size(acc)}}
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.save(step, lambda d: None, opt, sched, extra, optimizer_state=optimizer_state, prepared=tmp)
        acc.wait_for_everyone()

    def save_state(
        self,
        acc,
        step: int,
        state_fn: Callable[[], dict],
        opt,
        sched,
        name: str = "model.safetensors",
        *,
        wrapped,
        model,
    ) -> None:
        """Every process meets here; the main one writes `state_fn()` (tensors, read while the model
        holds its full parameters) as safetensors."""
        from safetensors.torch import save_file

        self.save_with(
            acc,
            step,
            lambda d: save_file(state_fn(), str(d / name)),
            opt,
            sched,
            wrapped=wrapped,
            model=model,
        )

    def restore_with(
        self, acc, read_weights: Callable[[Path], None], opt, sched, *, wrapped, model
    ) -> dict | None:
        """Every process: the last intact checkpoint back into the run, under every launch:
        `read_weights(folder)` while `model` holds its full parameters (kept after), the optimizer state
        (DeepSpeed: each process its shard from the engine's files), the schedule and the RNG states.
        Returns the trainer state, or None where there is no checkpoint."""
        found = self.latest_intact()
        if found is None:
            return None
        ck, trainer_state = found
        sharded.check_optimizer_layout(acc, ck, trainer_state)
        with sharded.unsharded(acc, wrapped, model, writeback=True):
            read_weights(ck)
        sharded.load_optimizer_state(acc, wrapped, opt, ck, trainer_state.get("optimizer"))
        return self.restore(ck, None, sched, trainer_state)

    def load_state(
        self, acc, own_fn: Callable[[], dict], opt, sched, name: str = "model.safetensors", *, wrapped, model
    ) -> int:
        """Restore the latest checkpoint into `model` (whose checkpointed tensors are ``own_fn()``, read
        while it holds its full parameters) and the optimizer state; 0 when there is none. Other tensor
        names or shapes are refused with the reason."""

        def read(ck: Path) -> None:
            self.load_weights(model, own_fn(), ck, name)

        state = self.restore_with(acc, read, opt, sched, wrapped=wrapped, model=model)
        return 0 if state is None else int(state["step"])

    @staticmethod
    def load_weights(model, own: dict, ck: Path, name: str) -> None:
        from safetensors.torch import load_file

        state = load_file(str(ck / name))
        if set(state) != set(own):
            extra, lacking = sorted(set(state) - set(own)), sorted(set(own) - set(state))
            raise InputError(
                f"{ck} holds other weights than this run trains (extra {extra[:3]}, lacking {lacking[:3]}): "
                "train.tune or the model changed; use a new run.output_dir"
            )
        wrong = [
            f"{k} {tuple(v.shape)} (this run: {tuple(own[k].shape)})"
            for k, v in state.items()
            if v.shape != own[k].shape
        ]
        if wrong:
            raise InputError(
                f"{ck} was written by a run of another shape: {', '.join(wrong[:3])}. A changed "
                "text encoder (feature dimension) or model size needs a new run.output_dir"
            )
        sharded.load_state_dict(model, state)

    def restore(self, ck: Path, opt, sched, state: dict | None = None) -> dict:
        """Load optimizer (unless None), scheduler and RNG states from `ck` (or the `state` already read
        from it); returns the whole trainer state."""
        if state is None:
            state = torch.load(ck / "trainer_state.pt", weights_only=True, map_location="cpu")
        if opt is not None:
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        logger.info("resumed from %s (step %d)", ck, state["step"])
        return state
