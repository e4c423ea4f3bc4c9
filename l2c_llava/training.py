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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from l2c_llava import trackers
from l2c_llava.errors import InputError, L2CError
from l2c_llava.grad_cache import contrastive_accumulate
from l2c_llava.losses import clip_loss
from l2c_llava.quantization import make_adamw
from l2c_llava.resume import check_resume
from l2c_llava.runs import prepare_run_dir

logger = logging.getLogger(__name__)


def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, else no mixed precision."""
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(mixed_precision: str, seed: int, report_to=(), run_dir=None):
    """The accelerate Accelerator every recipe runs under (CPU when there is no GPU), seeded, with the
    experiment trackers of ``train.report_to`` (l2c_llava.trackers; none by default)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = Accelerator(
        mixed_precision=resolve_mixed_precision(mixed_precision),
        cpu=not torch.cuda.is_available(),
        **trackers.accelerator_kwargs(report_to, run_dir),
    )
    set_seed(seed)
    return acc


class LaunchError(L2CError, ValueError):
    """A launch (accelerate / DeepSpeed / FSDP) that cannot run the recipe as configured."""


# what the training config decides under DeepSpeed (the accelerate yaml decides ZeRO stage, offload,
# topology); accelerate fills these from a prepared DataLoader, else raises, and fills
# gradient_clipping with 1.0 whatever the recipe asked
DEEPSPEED_FROM_TRAINING = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                           "train_batch_size")  # fmt: skip


def deepspeed_values(ds_config: dict, *, micro_batch: int, accum: int, grad_clip: float | None,
                     world: int) -> dict:  # fmt: skip
    """Write the training config's micro batch, accumulation and clipping into a DeepSpeed config
    (in place; returned). The recipes draw their own per-rank batches, so no DataLoader goes through
    ``accelerator.prepare``: these values are set here instead. A value the launcher put there that
    differs (``gradient_accumulation_steps: 1`` is what ``accelerate launch`` writes when the yaml says
    nothing) is replaced, with a log line; clipping 0 means none, as DeepSpeed reads it."""
    want = {"train_micro_batch_size_per_gpu": int(micro_batch), "gradient_accumulation_steps": int(accum),
            "gradient_clipping": float(grad_clip or 0.0), "train_batch_size": int(micro_batch * accum * world)}  # fmt: skip
    for key in DEEPSPEED_FROM_TRAINING:
        have = ds_config.get(key)
        if have not in (None, "auto") and have != want[key]:
            logger.warning("DeepSpeed %s: %s from the launch config replaced by %s from the training config",
                           key, have, want[key])  # fmt: skip
        ds_config[key] = want[key]
    return ds_config


def configure_launch(acc, *, micro_batch: int, accum: int, grad_clip: float | None,
                     contrastive_accum: bool = False) -> dict | None:  # fmt: skip
    """Before ``acc.prepare``: under DeepSpeed, set the engine's batch sizes, accumulation and clipping
    from the training config (:func:`deepspeed_values`); returns the DeepSpeed config, or None."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    if contrastive_accum and accum > 1:
        raise LaunchError("train.contrastive_accum (GradCache) backpropagates each micro-batch twice, which "
                          "DeepSpeed's accumulation does not allow: launch with the DDP or FSDP config, or set "
                          "train.contrastive_accum=false")  # fmt: skip
    deepspeed_values(plugin.deepspeed_config, micro_batch=micro_batch, accum=accum, grad_clip=grad_clip,
                     world=acc.num_processes)  # fmt: skip
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


def check_resume_config(run_dir: Path, cfg) -> None:
    """Refuse to resume checkpoints written under another config, by the one rule (resume.py)."""
    check_resume(run_dir, cfg, has_checkpoints=bool(Checkpoints(run_dir, 1).all()))


def finished_stats(run_dir: Path, start: int, total: int) -> dict | None:
    """The saved train_stats.json when the run already trained all `total` steps and saved its model."""
    stats = Path(run_dir) / "train_stats.json"
    if start < total or not stats.is_file() or not (Path(run_dir) / "model").is_dir():
        return None
    logger.info("%s already finished (%d steps); nothing to do", run_dir, total)
    return json.loads(stats.read_text())


@dataclass
class OpenRun:
    wrapped: Any
    opt: Any
    sched: Any
    start: int
    log_path: Path
    finished: dict | None


def open_run(recipe, acc, model, groups: list[dict], total: int, *, micro_batch: int, accum: int,
             **adamw) -> OpenRun:  # fmt: skip
    """What every training loop does before its first step: AdamW on the recipe's groups, the schedule,
    accelerate's wrapping, the resume from the last checkpoint (``run.resume``), and the training log
    cut back to that step. ``finished`` holds the saved stats when the run is already complete."""
    t = recipe.cfg.train
    opt = make_adamw(groups, t.optimizer, **adamw)
    sched = make_scheduler(opt, t.schedule, total, t.warmup_steps, t.warmup_ratio)
    configure_launch(acc, micro_batch=micro_batch, accum=accum, grad_clip=t.grad_clip,
                     contrastive_accum=getattr(t, "contrastive_accum", False))  # fmt: skip
    wrapped, opt = acc.prepare(model, opt)
    start = recipe.load_checkpoint(model, opt, sched) if recipe.cfg.run.resume else 0
    log_path = recipe.run_dir / "train_log.jsonl"
    finished = finished_stats(recipe.run_dir, start, total)
    if finished is None and acc.is_main_process:
        truncate_log(log_path, start)
    return OpenRun(wrapped, opt, sched, start, log_path, finished)


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

    def latest_intact(self) -> tuple[Path, dict] | None:
        """The newest checkpoint whose files all read back, with its trainer state; None when there is
        none. A damaged one (a disk filled up, a copy cut short) is set aside as ``damaged-step-N`` (kept,
        not deleted, and out of the rotation) and the previous one is used, with a warning that says so."""
        from safetensors import safe_open

        found = self.all()
        damaged = []
        for ck in reversed(found):
            try:
                for f in sorted(ck.rglob("*.safetensors")):
                    with safe_open(str(f), framework="pt") as st:
                        for k in st.keys():
                            st.get_slice(k)
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
                logger.warning("checkpoint %s cannot be read (%s); moved to %s and trying the previous one",
                               ck, reason, aside.name)  # fmt: skip
                continue
            if damaged:
                logger.warning("resuming from %s: the later checkpoint(s) %s are damaged (kept as damaged-*)",
                               ck, ", ".join(damaged))  # fmt: skip
            return ck, state
        if damaged:
            from l2c_llava.errors import L2CError

            raise L2CError(f"{self.root}: every checkpoint is damaged ({', '.join(damaged)}, now damaged-*); set "
                           "run.resume=false to start over, or use a new run.output_dir")  # fmt: skip
        return None

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

    def save_state(
        self, acc, step: int, state_fn: Callable[[], dict], opt, sched, name: str = "model.safetensors"
    ) -> None:
        """Every process meets here; the main one writes `state_fn()` (tensors) as safetensors."""
        from safetensors.torch import save_file

        acc.wait_for_everyone()
        if acc.is_main_process:
            state = state_fn()
            self.save(step, lambda d: save_file(state, str(d / name)), opt, sched)
        acc.wait_for_everyone()

    def load_state(self, model, own: dict, opt, sched, name: str = "model.safetensors") -> int:
        """Restore the latest checkpoint into `model` (whose checkpointed tensors are `own`) and the
        optimizer state; 0 when there is none. Other tensor names or shapes are refused with the reason."""
        from safetensors.torch import load_file

        found = self.latest_intact()
        if found is None:
            return 0
        ck, trainer_state = found
        state = load_file(str(ck / name))
        if set(state) != set(own):
            extra, lacking = sorted(set(state) - set(own)), sorted(set(own) - set(state))
            raise InputError(f"{ck} holds other weights than this run trains (extra {extra[:3]}, lacking {lacking[:3]}): "
                             "train.tune or the model changed; use a new run.output_dir")  # fmt: skip
        wrong = [f"{k} {tuple(v.shape)} (this run: {tuple(own[k].shape)})" for k, v in state.items()
                 if v.shape != own[k].shape]  # fmt: skip
        if wrong:
            raise InputError(f"{ck} was written by a run of another shape: {', '.join(wrong[:3])}. A changed "
                             "text encoder (feature dimension) or model size needs a new run.output_dir")  # fmt: skip
        model.load_state_dict(state, strict=False)
        return int(self.restore(ck, opt, sched, trainer_state)["step"])

    def restore(self, ck: Path, opt, sched, state: dict | None = None) -> dict:
        """Load optimizer, scheduler and RNG states from `ck` (or the `state` already read from it);
        returns the whole trainer state."""
        if state is None:
            state = torch.load(ck / "trainer_state.pt", weights_only=True, map_location="cpu")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        logger.info("resumed from %s (step %d)", ck, state["step"])
        return state


class ContrastiveRecipe:
    """The training loop both image-text contrastive recipes share (stage 2 and the demo CLIP
    baseline): accelerate, AdamW on the recipe's parameter groups, schedule, CLIP loss with features
    gathered across processes, gradient accumulation and clipping, logit-scale clamp, atomic
    checkpoints every ``save_every`` steps and an exact resume, a JSONL log and a progress bar.

    A recipe provides ``build_data(acc) -> (dataset, length or None)``, ``build_model(acc)``,
    ``param_groups(model)``, ``embed(wrapped, batch, acc) -> (image, text, scale)`` (normalised
    embeddings), ``after_step(model) -> logit scale`` and ``save_model(model)``; optionally
    ``collate``. Its config has ``run``, ``train`` (lr, betas, eps, batch_size, grad_accum, epochs or
    max_steps, schedule, local_loss, gather_with_grad, ...) and ``data.num_workers``.
    """

    name = "train"
    collate = None

    def __init__(self, cfg, source: str | None = None, overrides: tuple[str, ...] = ()):
        self.cfg, self.source, self.overrides = cfg, source, tuple(overrides)
        self.run_dir = Path(cfg.run.output_dir)

    def build_data(self, acc):  # pragma: no cover - abstract
        raise NotImplementedError

    def build_model(self, acc):  # pragma: no cover - abstract
        raise NotImplementedError

    def param_groups(self, model):  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, wrapped, batch, acc):  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, model) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def save_model(self, model) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self) -> dict:
        import time

        from tqdm.auto import tqdm

        cfg, t = self.cfg, self.cfg.train
        acc = make_accelerator(t.mixed_precision, cfg.run.seed, t.report_to, self.run_dir)
        dataset, n = self.build_data(acc)
        check_resume_config(self.run_dir, cfg)
        if acc.is_main_process:
            prepare_run_dir(cfg, self.run_dir, source=self.source, overrides=self.overrides)
        trackers.start(acc, cfg, self.run_dir)
        model = self.build_model(acc)
        per_step = t.batch_size * acc.num_processes * t.grad_accum
        steps_per_epoch = max(1, n // per_step) if n else None
        total = t.max_steps or (t.epochs * steps_per_epoch if steps_per_epoch else None)
        if total is None:
            raise InputError("data.format=webdataset streams without a known length: set train.max_steps")
        run = open_run(
            self,
            acc,
            model,
            self.param_groups(model),
            total,
            micro_batch=t.batch_size,
            accum=t.grad_accum,
            lr=t.lr,
            betas=tuple(t.betas),
            eps=t.eps,
        )
        if run.finished is not None:  # a re-run of a finished run: keep its model and numbers
            trackers.finish(acc)
            return run.finished
        wrapped, opt, sched, start, log_path = run.wrapped, run.opt, run.sched, run.start, run.log_path
        bar = tqdm(total=total, initial=start, desc=self.name, unit="step", disable=not acc.is_main_process)
        t0, last, step, seen = time.perf_counter(), float("nan"), start, 0
        epoch = start // steps_per_epoch if steps_per_epoch else 0
        while step < total:
            dataset.epoch = epoch
            done_micro = (step - epoch * steps_per_epoch) * t.grad_accum if steps_per_epoch else 0
            batches = iter(self._loader(dataset, epoch, acc, skip_batches=done_micro))  # resume mid-epoch
            done_epoch, steps_before = False, step
            while step < total and not done_epoch:
                micro_batches = []
                for _ in range(t.grad_accum):
                    try:
                        micro_batches.append(next(batches))
                    except StopIteration:
                        done_epoch = True
                        break
                if not micro_batches:
                    break
                loss_fn = partial(clip_loss, local_loss=t.local_loss, gather_with_grad=t.gather_with_grad)
                if getattr(t, "contrastive_accum", False) and len(micro_batches) > 1:

                    def embed(b):
                        with acc.autocast():
                            return self.embed(wrapped, b, acc)

                    loss_sum, rows = contrastive_accumulate(embed, micro_batches, loss_fn, acc.backward)
                    seen += rows
                else:
                    loss_sum = 0.0
                    for i, batch in enumerate(micro_batches):
                        with acc.autocast():
                            img, txt, scale = self.embed(wrapped, batch, acc)
                            loss = loss_fn(img, txt, scale)
                        micro_backward(acc, loss, t.grad_accum, last=i == len(micro_batches) - 1)
                        loss_sum += loss.item() / t.grad_accum
                        seen += img.shape[0]
                if acc.num_processes > 1:  # log the global batch's loss, not this process's share
                    loss_sum = acc.reduce(torch.tensor(loss_sum, device=acc.device), "mean").item()
                clip_gradients(acc, wrapped, model.parameters(), t.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                scale_now = self.after_step(model)
                step += 1
                last = loss_sum
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}", scale=f"{scale_now:.1f}")
                if acc.is_main_process and (step % t.log_every == 0 or step == total):
                    rec = {"step": step, "epoch": epoch, "loss": round(loss_sum, 6), "lr": sched.get_last_lr()[0],
                           "logit_scale": scale_now}  # fmt: skip
                    append_log(log_path, rec)
                    rate = seen * acc.num_processes / max(1e-9, time.perf_counter() - t0)
                    trackers.log(acc, {**rec, "images_per_second": rate}, step)
                if step % t.save_every == 0 or step == total:
                    self.save_checkpoint(acc, model, opt, sched, step)
            if step == steps_before:  # a whole pass gave no batch: stop instead of looping forever
                raise InputError(f"{cfg.data.train}: not enough samples for one batch of {t.batch_size} per process "
                                 f"({acc.num_processes} process(es)); lower train.batch_size or add data")  # fmt: skip
            epoch += 1
        bar.close()
        seconds = time.perf_counter() - t0
        stats = {"steps": total, "final_loss": last, "seconds_this_session": round(seconds, 1),
                 "images_per_second": round(seen * acc.num_processes / seconds, 2) if seen else None}  # fmt: skip
        if acc.is_main_process:
            self.save_model(model)
            from l2c_llava.io import atomic_write_json

            atomic_write_json(self.run_dir / "train_stats.json", stats)
        trackers.finish(acc)
        acc.wait_for_everyone()
        return stats

    def _loader(self, dataset, epoch: int, acc, skip_batches: int = 0):
        """This process's batches of the epoch; `skip_batches` already trained ones are left out of the
        order (not loaded and thrown away)."""
        from torch.utils.data import DataLoader, IterableDataset, Subset

        t, d = self.cfg.train, self.cfg.data
        if isinstance(dataset, IterableDataset):
            return DataLoader(
                dataset, batch_size=t.batch_size, num_workers=d.num_workers, collate_fn=self.collate
            )
        g = torch.Generator().manual_seed(self.cfg.run.seed + epoch)
        order = torch.randperm(len(dataset), generator=g)
        mine = order[acc.process_index :: acc.num_processes].tolist()[skip_batches * t.batch_size :]
        return DataLoader(Subset(dataset, mine), batch_size=t.batch_size, shuffle=False, num_workers=d.num_workers,
                          drop_last=True, collate_fn=self.collate)  # fmt: skip

    # -- checkpoints ---------------------------------------------------------------------------------

    @staticmethod
    def _state(model) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def save_checkpoint(self, acc, model, opt, sched, step: int) -> None:
        Checkpoints(self.run_dir, self.cfg.train.keep_checkpoints).save_state(
            acc, step, lambda: self._state(model), opt, sched
        )

    def load_checkpoint(self, model, opt, sched) -> int:
        checkpoints = Checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return checkpoints.load_state(model, self._state(model), opt, sched)
