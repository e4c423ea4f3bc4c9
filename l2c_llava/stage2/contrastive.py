"""The training recipe both image-text contrastive models share: stage 2 (``stage2/train.py``) and the
demo CLIP baseline (``stage2/clip_baseline.py``), a :class:`~l2c_llava.train.recipe.Recipe` that the shared
driver runs (:func:`l2c_llava.train.loop.run_training`)."""

from __future__ import annotations

import time
from functools import partial
from itertools import islice
from pathlib import Path

import torch

from l2c_llava import trackers
from l2c_llava.errors import InputError
from l2c_llava.losses import clip_loss
from l2c_llava.train.accelerator import make_accelerator
from l2c_llava.train.checkpoints import Checkpoints
from l2c_llava.train.grad_cache import contrastive_accumulate
from l2c_llava.train.loop import accumulate_gradients, run_training
from l2c_llava.train.recipe import Plan, StepReport
from l2c_llava.train.resume import check_resume_config
from l2c_llava.train.run_dir import prepare_run_dir, write_train_stats
from l2c_llava.train.sharded import state_dict as sharded_state_dict
from l2c_llava.train.sharded import unsharded, whole_models


class ContrastiveRecipe:
    """What both image-text contrastive recipes share (stage 2 and the demo CLIP baseline), on the
    shared driver (setup / batches / step / report / checkpoints / save): one pass over the images per epoch (resumed mid-epoch), the CLIP loss with
    features gathered across processes, gradient accumulation (plain, or the gradient cache with
    ``train.contrastive_accum``), the logit-scale clamp after each step, the whole model's state in
    each checkpoint.

    A recipe provides ``build_data(acc) -> (dataset, length or None)``, ``build_model(acc)``,
    ``param_groups(model)``, ``embed(wrapped, batch, acc) -> (image, text, scale)`` (normalised
    embeddings), ``after_step(acc, model) -> logit scale`` and ``save_model(model)``; optionally
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

    def after_step(self, acc, model) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def save_model(self, model) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        acc = self.acc = make_accelerator(t.mixed_precision, cfg.run.seed, t.report_to, self.run_dir)
        self.dataset, self.n = self.build_data(acc)
        check_resume_config(self.run_dir, cfg)
        if acc.is_main_process:
            prepare_run_dir(cfg, self.run_dir, source=self.source, overrides=self.overrides)
        trackers.start(acc, cfg, self.run_dir)
        stats = run_training(acc, self, t, resume=cfg.run.resume).stats
        trackers.finish(acc)
        acc.wait_for_everyone()
        return stats

    # -- the recipe as the shared driver runs it (train/recipe.py) ----------------------------------

    def setup(self, acc) -> Plan:
        t = self.cfg.train
        with whole_models(acc):  # ZeRO-3: built as on one process, partitioned by the engine
            self.model = self.build_model(acc)
        per_step = t.batch_size * acc.num_processes * t.grad_accum
        self.steps_per_epoch = max(1, self.n // per_step) if self.n else None
        total = self.total = t.max_steps or (
            t.epochs * self.steps_per_epoch if self.steps_per_epoch else None
        )
        if total is None:
            raise InputError("data.format=webdataset streams without a known length: set train.max_steps")
        self.loss_fn = partial(clip_loss, local_loss=t.local_loss, gather_with_grad=t.gather_with_grad)
        self.seen = 0  # images this process trained on in this session
        return Plan(
            self.model,
            self.param_groups(self.model),
            total,
            micro_batch=t.batch_size,
            accum=t.grad_accum,
            clip=list(self.model.parameters()),
            desc=self.name,
            # fused: bench/gemm_limit.py: the optimizer is a tenth of a demo step otherwise
            adamw=dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=True),
        )

    def batches(self, state):
        return self._steps(self.dataset, self.acc, state.start, self.steps_per_epoch)

    def step(self, state, micro_batches: list) -> float:
        t, acc = self.cfg.train, self.acc
        if getattr(t, "contrastive_accum", False) and len(micro_batches) > 1:

            def embed(batch):  # the gradient cache's forward, under autocast as the plain one
                with acc.autocast():
                    return self.embed(state.wrapped, batch, acc)

            loss, rows = contrastive_accumulate(embed, micro_batches, self.loss_fn, acc.backward)
            self.seen += rows
            return loss  # the driver logs its mean over processes

        def loss_of(batch) -> torch.Tensor:
            img, txt, scale = self.embed(state.wrapped, batch, acc)
            self.seen += img.shape[0]
            return self.loss_fn(img, txt, scale)

        return accumulate_gradients(acc, micro_batches, loss_of, t.grad_accum)

    def report(self, state, loss: float) -> StepReport:
        scale = self.after_step(self.acc, self.model)
        rate = self.seen * self.acc.num_processes / max(1e-9, time.perf_counter() - state.started)
        return StepReport({"scale": f"{scale:.1f}"}, {"logit_scale": scale}, {"images_per_second": rate})

    def save(self, state, last_loss: float) -> dict:
        acc, seconds = self.acc, time.perf_counter() - state.started
        stats = {
            "steps": self.total,
            "final_loss": last_loss,
            "seconds_this_session": round(seconds, 1),
            "images_per_second": round(self.seen * acc.num_processes / seconds, 2) if self.seen else None,
        }
        stats["launch"] = state.launch
        with unsharded(acc, state.wrapped, self.model):  # every process: the full weights on the main one
            if acc.is_main_process:
                self.save_model(self.model)
                write_train_stats(self.run_dir, stats)
        return stats

    def _steps(self, dataset, acc, start: int, steps_per_epoch: int | None):
        """(epoch, the step's micro-batches) for each step from `start` on: one pass over the data per
        epoch, a resumed run picking up inside its epoch; a pass that ends inside a step gives that step
        the micro-batches left (a stream of unknown length ends its epochs so)."""
        t = self.cfg.train
        step = start
        epoch = start // steps_per_epoch if steps_per_epoch else 0
        while True:
            dataset.epoch = epoch
            done_micro = (step - epoch * steps_per_epoch) * t.grad_accum if steps_per_epoch else 0
            batches = iter(self._loader(dataset, epoch, acc, skip_batches=done_micro))  # resume mid-epoch
            steps_before = step
            while micro_batches := list(islice(batches, t.grad_accum)):
                yield epoch, micro_batches
                step += 1
                if len(micro_batches) < t.grad_accum:  # the pass is over
                    break
            if step == steps_before:  # a whole pass gave no batch: stop instead of looping forever
                raise InputError(
                    f"{self.cfg.data.train}: not enough samples for one batch of {t.batch_size} per "
                    f"process ({acc.num_processes} process(es)); lower train.batch_size or add data"
                )
            epoch += 1

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
        return DataLoader(
            Subset(dataset, mine),
            batch_size=t.batch_size,
            shuffle=False,
            num_workers=d.num_workers,
            drop_last=True,
            collate_fn=self.collate,
        )

    # -- checkpoints ---------------------------------------------------------------------------------

    @staticmethod
    def _state(model) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in sharded_state_dict(model).items()}

    def save_checkpoint(self, state, step: int) -> None:
        Checkpoints(self.run_dir, self.cfg.train.keep_checkpoints).save_state(
            self.acc,
            step,
            lambda: self._state(self.model),
            state.opt,
            state.sched,
            wrapped=state.wrapped,
            model=self.model,
        )

    def load_checkpoint(self, state) -> int:
        checkpoints = Checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return checkpoints.load_state(
            self.acc,
            lambda: self._state(self.model),
            state.opt,
            state.sched,
            wrapped=state.wrapped,
            model=self.model,
        )
