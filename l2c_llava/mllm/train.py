"""LLaVA-1.5 training: ``pretrain`` (projector only, plain template) and ``finetune`` (projector +
LLM, full or LoRA, vicuna_v1 template), with the global batch kept constant whatever the number of
processes (gradient accumulation = global / (per-device x processes)).

Checkpoints hold the trainable weights (safetensors) with the optimizer, scheduler and RNG states; a
re-run resumes at the next micro-batch of the same epoch order. The finished model is saved in the
transformers format (``run/model``: ``LlavaForConditionalGeneration`` + processor with its chat
template), LoRA merged into the weights.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from l2c_llava import trackers
from l2c_llava.cards import model_card
from l2c_llava.config import MllmConfig
from l2c_llava.data.readers import read_llava_json
from l2c_llava.errors import InputError, MissingFileError
from l2c_llava.io import atomic_write_json, publish_folder, run_lock
from l2c_llava.losses import supervised_loss
from l2c_llava.mllm.build import build_llava, image_tokens_of, save_llava
from l2c_llava.mllm.data import Collate, LlavaDataset, ModalityLengthSampler, PackedCollate
from l2c_llava.quantization import quantize_linears_4bit_
from l2c_llava.train import sharded
from l2c_llava.train.accelerator import is_deepspeed, make_accelerator
from l2c_llava.train.checkpoints import Checkpoints
from l2c_llava.train.loop import accumulate_gradients, run_training
from l2c_llava.train.recipe import Plan, StepReport
from l2c_llava.train.resume import check_resume_config
from l2c_llava.train.run_dir import prepare_run_dir, write_train_stats
from l2c_llava.train.sharded import clean_name
from l2c_llava.train.sharded import state_dict as sharded_state_dict

logger = logging.getLogger("l2c_llava.mllm")

PROJECTOR = "model.multi_modal_projector."
TOWER = "model.vision_tower."


def rank_order(order: list[int], batch: int, world: int, rank: int) -> list[int]:
    """This process's rows: each run of `batch x world` rows is split into `world` batches."""
    mega = batch * world
    out = []
    for lo in range(0, len(order) - mega + 1, mega):
        out += order[lo + rank * batch : lo + (rank + 1) * batch]
    return out


class MllmRecipe:
    def __init__(self, cfg: MllmConfig, source: str | None = None, overrides: tuple[str, ...] = ()):
        self.cfg, self.source, self.overrides = cfg, source, tuple(overrides)
        self.run_dir = Path(cfg.run.output_dir)

    # -- model -------------------------------------------------------------------------------------

    def build(self, quantize: bool = True):
        """The model to train: built, projector initialised, the trainable parts unfrozen; with
        ``model.llm.load_in_4bit`` (QLoRA) the LLM's linears in NF4 on the GPU (``quantize=False``
        gives the same model in full precision, to merge the trained LoRA into for saving)."""
        m, t = self.cfg.model, self.cfg.train
        model, processor = build_llava(
            m.vision_tower,
            m.llm,
            projector_type=m.projector_type,
            image_aspect_ratio=m.image_aspect_ratio,
            vision_feature_layer=m.vision_feature_layer,
            vision_feature_select_strategy=m.vision_feature_select_strategy,
            torch_dtype=m.llm.torch_dtype,
            connector=m.connector.model_dump(),
        )
        if m.init_from:
            self._load_projector(model, Path(m.init_from))
        model.requires_grad_(False)
        if m.llm.load_in_4bit and quantize:
            dtype = torch.float16 if t.mixed_precision == "fp16" else torch.bfloat16
            n = quantize_linears_4bit_(model.model.language_model, dtype, "model.llm.load_in_4bit")
            logger.info("QLoRA: %d LLM linears in NF4", n)
            model.to(torch.device("cuda", torch.cuda.current_device()))
        self._projector_trainable(model)
        if t.tune == "full":
            model.model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
        elif t.tune == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lc = LoraConfig(
                r=t.lora.r,
                lora_alpha=t.lora.alpha,
                lora_dropout=t.lora.dropout,
                target_modules=list(t.lora.target_modules),
            )
            inject_adapter_in_model(lc, model.model.language_model)
            self._projector_trainable(model)
        if not t.freeze_vision_tower:
            model.model.vision_tower.requires_grad_(True)
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model, processor

    def _projector_trainable(self, model) -> None:
        proj = model.model.multi_modal_projector
        proj.requires_grad_(True)
        if self.cfg.model.projector_type == "linear":
            proj.linear_2.requires_grad_(False)  # the identity that makes it a single Linear

    def _load_projector(self, model, init_from: Path) -> None:
        """The pretrained projector from ``init_from`` (its ``projector/`` or ``model/`` folder), and the
        vision tower too when that run trained it (``train.freeze_vision_tower: false``)."""
        from safetensors import safe_open

        folder = next((f for f in (init_from / "projector", init_from / "model") if f.is_dir()), init_from)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise MissingFileError(
                f"model.init_from={init_from}: no pretrained model (run `l2c mllm pretrain` first)"
            )
        meta_file = folder / "l2c_mllm.json"
        tower_trained = meta_file.is_file() and json.loads(meta_file.read_text()).get(
            "vision_tower_trained", False
        )
        prefixes = (PROJECTOR, TOWER) if tower_trained else (PROJECTOR,)
        state = {}
        for f in files:  # on disk transformers writes "multi_modal_projector.*" (its legacy layout)
            with safe_open(str(f), framework="pt") as handle:  # read what was trained only, not the LLM
                for k in handle.keys():
                    name = "model." + k.removeprefix("model.")
                    # a saved model's tower is under vision_tower.vision_model.* (the layout 4.x reads too)
                    name = name.replace("model.vision_tower.vision_model.", "model.vision_tower.", 1)
                    if name.startswith(prefixes):
                        state[name] = handle.get_tensor(k)
        for prefix, what in zip(prefixes, ("projector", "trained vision tower")):
            found = {k: v for k, v in state.items() if k.startswith(prefix)}
            own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
            if set(found) != set(own) or any(found[k].shape != own[k].shape for k in own):
                raise InputError(
                    f"model.init_from={init_from}: its {what} does not fit this model "
                    f"(found {sorted(found)[:4]}, need {sorted(own)[:4]} with the same shapes)"
                )
        if tower_trained:
            logger.info(
                "model.init_from=%s: its vision tower was trained, loading it over %s",
                init_from,
                self.cfg.model.vision_tower,
            )
        model.load_state_dict(state, strict=False)

    def param_groups(self, model) -> list[dict]:
        """One group per learning rate: the projector (``train.projector_lr``), a trained vision tower
        (``train.vision_lr``, LLaVA-NeXT's mm_vision_tower_lr) and the LLM (``train.lr``)."""
        t = self.cfg.train
        parts: dict[str, list] = {"proj": [], "tower": [], "rest": []}
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = (
                    "proj"
                    if "multi_modal_projector" in name
                    else "tower"
                    if "vision_tower" in name
                    else "rest"
                )
                parts[key].append(p)
        groups = []
        for key, lr in (("proj", t.projector_lr or t.lr), ("tower", t.vision_lr or t.lr), ("rest", t.lr)):
            if parts[key] or key == "proj":
                groups.append(
                    {"params": parts[key], "lr": lr, "lr_scale": lr / t.lr, "weight_decay": t.weight_decay}
                )
        return groups

    def trainable_state(self, model) -> dict[str, torch.Tensor]:
        names = {clean_name(n) for n, p in model.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().contiguous() for k, v in sharded_state_dict(model).items() if k in names}

    # -- data --------------------------------------------------------------------------------------

    def read_rows(self):
        """Every row checked (and every image, at data.image_check) before any model loads."""
        d = self.cfg.data
        return read_llava_json(d.path, d.image_root, on_bad_row=d.on_bad_row, image_check=d.image_check)

    def build_data(self, processor, model, rows=None):
        d = self.cfg.data
        rows = rows if rows is not None else self.read_rows()
        n_img = image_tokens_of(model.config)
        if d.max_length <= n_img:
            raise InputError(
                f"data.max_length={d.max_length} leaves no room for text after {n_img} image tokens"
            )
        return LlavaDataset(
            rows.items,
            processor,
            d.template,
            d.max_length,
            n_img,
            model.config.image_token_id,
            self.cfg.model.image_aspect_ratio,
        )

    def epoch_order(self, ds: LlavaDataset, epoch: int, world: int, rank: int) -> list[int]:
        t = self.cfg.train
        if self.cfg.data.group_by_modality_length:
            sampler = ModalityLengthSampler(ds.lengths, t.per_device_batch_size, world, self.cfg.run.seed)
            sampler.epoch = epoch
            order = list(sampler)
        else:
            g = torch.Generator().manual_seed(self.cfg.run.seed + epoch)
            order = torch.randperm(len(ds), generator=g).tolist()
        return rank_order(order, t.per_device_batch_size, world, rank)

    # -- the recipe as the shared driver runs it (train/recipe.py) -------------------------------------

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        acc = self.acc = make_accelerator(t.mixed_precision, cfg.run.seed, t.report_to, self.run_dir)
        world = acc.num_processes
        if t.global_batch_size % (t.per_device_batch_size * world):
            raise InputError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of per_device_batch_size "
                f"x processes ({t.per_device_batch_size} x {world})"
            )
        self.accum = t.global_batch_size // (t.per_device_batch_size * world)
        rows = self.read_rows()  # bad rows are reported before the LLM and the tower are built
        with sharded.whole_models(acc):  # ZeRO-3: built whole and partitioned by the engine (no meta build
            self.model, self.processor = self.build()  # under zero.Init)
        self.ds = self.build_data(self.processor, self.model, rows)
        check_resume_config(self.run_dir, cfg)
        if acc.is_main_process:
            prepare_run_dir(cfg, self.run_dir, source=self.source, overrides=self.overrides)
        trackers.start(acc, cfg, self.run_dir)
        stats = run_training(acc, self, t, resume=cfg.run.resume).stats
        trackers.finish(acc)
        acc.wait_for_everyone()
        return stats

    def setup(self, acc) -> Plan:
        cfg, t, model = self.cfg, self.cfg.train, self.model
        self.steps_per_epoch = len(self.ds) // t.global_batch_size
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{cfg.data.path}: {len(self.ds)} rows, fewer than one global batch of {t.global_batch_size}"
            )
        self.total = t.max_steps or t.epochs * self.steps_per_epoch
        pad_id = self.processor.tokenizer.pad_token_id
        self.collate = PackedCollate(pad_id) if cfg.data.packing else Collate(pad_id)
        self.tokens, self.step_tokens, self.step_began = 0, 0, 0.0
        model.train()  # as the wrapped model's train() would: the wrappers keep the module's mode
        return Plan(
            model,
            self.param_groups(model),
            self.total,
            micro_batch=t.per_device_batch_size,
            accum=self.accum,
            clip=[p for p in model.parameters() if p.requires_grad],
            desc=f"llava {t.stage}",
            adamw=dict(lr=t.lr),
        )

    def batches(self, state):
        """Each step's micro-batches, drawn from the epoch's loader when their turn comes; a resumed run
        picks up inside its epoch."""
        from torch.utils.data import DataLoader, Subset

        t, acc, per_epoch = self.cfg.train, self.acc, self.steps_per_epoch
        step = state.start
        while True:
            epoch = step // per_epoch
            order = self.epoch_order(self.ds, epoch, acc.num_processes, acc.process_index)
            done_rows = (step - epoch * per_epoch) * self.accum * t.per_device_batch_size
            loader = DataLoader(
                Subset(self.ds, order[done_rows:]),
                batch_size=t.per_device_batch_size,
                collate_fn=self.collate,
                num_workers=self.cfg.data.num_workers,
            )
            batches = iter(loader)
            for _ in range(per_epoch - (step - epoch * per_epoch)):
                yield epoch, [batches] * self.accum
                step += 1

    def step(self, state, micro_batches: list) -> float:
        acc, world, packing = self.acc, self.acc.num_processes, self.cfg.data.packing
        self.step_tokens, self.step_began = 0, time.perf_counter()

        def loss_of(batches) -> torch.Tensor | None:
            batch = {k: v.to(acc.device) for k, v in next(batches).items()}
            real = int(batch.pop("num_tokens")) if packing else int(batch["attention_mask"].sum())
            # packed rows: no cache, or transformers does not read the packing from position_ids
            loss = supervised_loss(state.wrapped, batch, use_cache=False)
            if not torch.isfinite(loss):  # a micro-batch with no supervised token
                if world == 1 and not is_deepspeed(acc):
                    return None
                # every rank must run each backward (DDP's all-reduce, DeepSpeed's boundary):
                # a zero loss gives zero gradients (the empty selection has no NaN gradient)
                loss = loss.nan_to_num(0.0) * 0.0
            self.step_tokens += real
            return loss

        return accumulate_gradients(acc, micro_batches, loss_of, self.accum)

    def report(self, state, loss: float) -> StepReport:
        self.tokens += self.step_tokens
        tps = self.step_tokens * self.acc.num_processes / max(1e-9, time.perf_counter() - self.step_began)
        return StepReport({"tok_s": f"{tps:.0f}"}, {"tokens_per_second": round(tps, 1)})

    def save(self, state, last_loss: float) -> dict:
        acc, world = self.acc, self.acc.num_processes
        seconds = time.perf_counter() - state.started
        stats = {
            "steps": self.total,
            "final_loss": last_loss,
            "grad_accum": self.accum,
            "rows": len(self.ds),
            "seconds_this_session": round(seconds, 1),
            "tokens_per_second": round(self.tokens * world / seconds, 1) if self.tokens else None,
        }
        stats["launch"] = state.launch
        unwrapped = acc.unwrap_model(state.wrapped)
        # every process: the whole weights on the main one, which builds whole models only (the load-back)
        with sharded.unsharded(acc, state.wrapped, unwrapped), sharded.whole_models(acc):
            if acc.is_main_process:
                self.save_model(unwrapped, self.processor, stats)
                write_train_stats(self.run_dir, stats)
        return stats

    # -- checkpoints and output --------------------------------------------------------------------

    def save_checkpoint(self, state, step: int) -> None:
        Checkpoints(self.run_dir, self.cfg.train.keep_checkpoints).save_state(
            self.acc,
            step,
            lambda: self.trainable_state(self.model),
            state.opt,
            state.sched,
            name="trainable.safetensors",
            wrapped=state.wrapped,
            model=self.model,
        )

    def load_checkpoint(self, state) -> int:
        checkpoints = Checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return checkpoints.load_state(
            self.acc,
            lambda: self.trainable_state(self.model),
            state.opt,
            state.sched,
            name="trainable.safetensors",
            wrapped=state.wrapped,
            model=self.model,
        )

    def save_model(self, model, processor, stats: dict | None = None) -> Path:
        t = self.cfg.train
        if not (t.save_full_model if t.save_full_model is not None else t.stage == "finetune"):
            return self.save_projector(model)
        if self.cfg.model.llm.load_in_4bit:  # QLoRA: the trained LoRA merged into the full-precision LLM
            trained = self.trainable_state(model)
            model, _ = self.build(quantize=False)
            own = model.state_dict()
            unknown = sorted(set(trained) - set(own))
            if unknown:
                raise RuntimeError(
                    f"QLoRA save: trained tensors the full-precision model lacks: {unknown[:4]}"
                )
            model.load_state_dict({k: v.to(own[k].dtype) for k, v in trained.items()}, strict=False)
        if self.cfg.train.tune == "lora":
            from peft.tuners.tuners_utils import BaseTunerLayer

            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.merge()
            model = _strip_lora(model)
        m = self.cfg.model
        meta = {
            "stage": self.cfg.train.stage,
            "template": self.cfg.data.template,
            "image_aspect_ratio": m.image_aspect_ratio,
            "vision_tower": m.vision_tower,
            "vision_tower_trained": not self.cfg.train.freeze_vision_tower,
            "llm": m.llm.name_or_path,
            "projector_type": m.projector_type,
        }
        if self.cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        card = model_card(
            "llava", str(self.run_dir / "model"), self.run_dir, metrics={"train_stats.json": stats or {}}
        )
        weights = None
        if sharded.is_fsdp_wrapped(model):  # the plain model's names (LoRA merged above, its layers gone)
            weights = {
                k.replace(".base_layer.", "."): v
                for k, v in sharded.state_dict(model).items()
                if "lora_" not in k
            }
        return save_llava(
            model, processor, self.run_dir / "model", meta, overwrite=True, card=card, state_dict=weights
        )  # the run's own

    def save_projector(self, model) -> Path:
        """The pretrain's output as LLaVA keeps it (``mm_projector.bin``): the projector's weights only,
        in ``run/projector/projector.safetensors`` (transformers' names), with the model config and
        meta beside them; the LLM is unchanged, so not copied. A tower trained too
        (``train.freeze_vision_tower: false``) is kept beside it, in ``vision_tower.safetensors``."""
        from safetensors.torch import save_file

        tower_trained = not self.cfg.train.freeze_vision_tower
        keep = (PROJECTOR, TOWER) if tower_trained else (PROJECTOR,)
        kept = {
            k: v.detach().cpu().contiguous()
            for k, v in sharded_state_dict(model).items()
            if k.startswith(keep)
        }
        state = {k: v for k, v in kept.items() if k.startswith(PROJECTOR)}
        m = self.cfg.model
        meta = {
            "stage": self.cfg.train.stage,
            "projector_only": True,
            "vision_tower": m.vision_tower,
            "vision_tower_trained": tower_trained,
            "llm": m.llm.name_or_path,
            "projector_type": m.projector_type,
            "template": self.cfg.data.template,
        }

        def build(tmp: Path) -> None:
            save_file(state, str(tmp / "projector.safetensors"), metadata={"format": "pt"})
            if tower_trained:
                tower = {k: v for k, v in kept.items() if k.startswith(TOWER)}
                save_file(tower, str(tmp / "vision_tower.safetensors"), metadata={"format": "pt"})
            model.config.save_pretrained(tmp)
            atomic_write_json(tmp / "l2c_mllm.json", meta)

        return publish_folder(self.run_dir / "projector", build, "llava projector", overwrite=True)


def _strip_lora(model):
    """Replace merged LoRA layers by their base layers (so the saved keys are the plain model's)."""
    from peft.tuners.lora import LoraLayer

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLayer):
                setattr(module, child_name, child.get_base_layer())
    return model


def run_mllm(cfg: MllmConfig, source: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    with run_lock(cfg.run.output_dir, f"mllm {cfg.train.stage} run"):  # one writer per run folder
        return MllmRecipe(cfg, source, overrides).run()
