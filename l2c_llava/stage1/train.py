"""Stage-1 recipe: caption-contrastive fine-tuning of a decoder LLM (LLM2Vec method, LLM2CLIP data).

Reads top to bottom like the method:

1. load the caption pairs and the held-out sets (every bad row reported before any model loads);
2. load the LLM (folder / GGUF / llm2vec chain), measure CRA with causal and with bidirectional
   attention: the "before" numbers;
3. optional MNTP: LoRA on the bidirectional LLM predicting masked token i from position i-1, merged;
4. supervised contrastive training with a new LoRA: query (with its instruction) vs positive,
   in-batch and cross-process negatives plus one hard negative, HardNegativeNLLLoss;
5. save the encoder (adapter + its base, and merged weights on request), measure CRA again.

Launch: ``l2c stage1 --config C`` or ``accelerate launch -m l2c_llava.cli stage1 --config C``.
Checkpoints (adapter + optimizer + scheduler + step) are written atomically every ``save_every``
steps; a re-run with ``run.resume: true`` continues from the last one.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

from l2c_llava import trackers
from l2c_llava.config import Stage1Config, dump_config
from l2c_llava.data.readers import read_caption_pairs, read_karpathy
from l2c_llava.io import atomic_write_json, run_lock
from l2c_llava.layout import RUN_METRICS, STAGE1_ENCODER
from l2c_llava.losses import hard_negative_nll_loss
from l2c_llava.models.llm import EncoderSource
from l2c_llava.quantization import prepare_for_qlora
from l2c_llava.stage1.cra import evaluate_caption_retrieval
from l2c_llava.stage1.data import Example, caption_examples, epoch_order, general_text_examples, mix
from l2c_llava.stage1.encoder import TextEncoder, frozen_linears_in, lora_targets, save_adapter
from l2c_llava.stage1.mntp import run_mntp
from l2c_llava.train import sharded
from l2c_llava.train.accelerator import is_deepspeed, make_accelerator
from l2c_llava.train.checkpoints import Checkpoints
from l2c_llava.train.grad_cache import contrastive_accumulate
from l2c_llava.train.loop import accumulate_gradients, run_training
from l2c_llava.train.recipe import Plan, StepReport
from l2c_llava.train.resume import check_resume_config, same_run
from l2c_llava.train.run_dir import prepare_run_dir, write_train_stats

logger = logging.getLogger("l2c_llava.stage1")


class Stage1Recipe:
    def __init__(self, cfg: Stage1Config, source: str | None = None, overrides: tuple[str, ...] = ()):
        self.cfg = cfg
        self.source = source
        self.overrides = tuple(overrides)
        self.run_dir = Path(cfg.run.output_dir)

    # -- setup --------------------------------------------------------------------------------

    def _accelerator(self):
        t = self.cfg.train
        return make_accelerator(t.mixed_precision, self.cfg.run.seed, t.report_to, self.run_dir)

    def _log_to_file(self) -> logging.Handler:
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("l2c_llava").addHandler(handler)
        logging.getLogger("l2c_llava").setLevel(logging.INFO)
        return handler

    def load_data(self):
        d = self.cfg.data
        pairs = read_caption_pairs(
            d.train,
            None,
            short_key=d.short_key,
            long_key=d.long_key,
            on_bad_row=d.on_bad_row,
            max_rows=d.max_samples,
        )
        test = (
            read_karpathy(
                d.eval, Path(d.eval).parent, split=d.eval_split, image_check="none", on_bad_row=d.on_bad_row
            )
            if (d.eval and self.cfg.eval.cra)
            else None
        )
        held_out = (
            read_caption_pairs(
                d.eval_pairs, None, short_key=d.short_key, long_key=d.long_key, on_bad_row=d.on_bad_row
            ).items
            if d.eval_pairs
            else None
        )
        general = general_text_examples(d.general_text) if d.general_text and d.general_text_share > 0 else []
        return pairs, test, held_out, general

    def evaluate(
        self, encoder: TextEncoder, test, held_out, desc: str | None = None, mixed_precision: str = "no"
    ) -> dict:
        """CRA and short<->long top-1; `desc` names a progress bar over the texts encoded. A bf16
        run (`mixed_precision`, the accelerator's) evaluates in bf16 too: under autocast, every linear
        held in bf16 meanwhile (the text cache's precision; 2.2x the float32 encode here, bench/RESULTS.md)."""
        ins = self.cfg.data.instructions
        with ExitStack() as stack:
            if mixed_precision == "bf16":
                stack.enter_context(torch.autocast(encoder.device.type, dtype=torch.bfloat16))
                stack.enter_context(frozen_linears_in(encoder.model, torch.bfloat16, frozen_only=False))
            return evaluate_caption_retrieval(
                encoder,
                test,
                held_out,
                ins.short_to_long,
                ins.long_to_short,
                batch_size=self.cfg.eval.batch_size,
                max_images=self.cfg.eval.max_images,
                desc=desc,
            )

    def base_source(self) -> EncoderSource:
        m = self.cfg.model
        return EncoderSource(base=m.name_or_path, gguf_file=m.gguf_file, adapters=list(m.adapters))

    def load_encoder(self, adapters_extra: list[str] = ()) -> TextEncoder:
        m = self.cfg.model
        src = self.base_source()
        return TextEncoder.from_pretrained(
            src.base,
            gguf_file=src.gguf_file,
            adapters=src.adapters + list(adapters_extra),
            pooling=m.pooling,
            max_length=m.max_length,
            torch_dtype=m.torch_dtype,
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
            bidirectional=m.bidirectional,
            load_in_4bit=m.load_in_4bit,
        )

    # -- the method ------------------------------------------------------------------------------

    def finished(self) -> dict | None:
        """The saved metrics if this config (but for bookkeeping: train/resume.py) already ran to the end in
        run_dir, else None."""
        done = self.run_dir / RUN_METRICS
        if not (
            done.is_file() and (self.run_dir / STAGE1_ENCODER).is_dir() and same_run(self.run_dir, self.cfg)
        ):
            return None
        return json.loads(done.read_text())

    def run(self) -> dict:
        if (previous := self.finished()) is not None:
            logger.info("%s already holds a finished run of this config; nothing to do", self.run_dir)
            return previous
        acc = self._accelerator()
        cfg = self.cfg
        pairs, test, held_out, general = self.load_data()  # bad rows stop us before any model loads
        handler = None
        # before config.yaml is replaced: the checkpoints were made under the old one
        check_resume_config(self.run_dir, cfg)
        if acc.is_main_process:
            prepare_run_dir(cfg, self.run_dir, source=self.source, overrides=self.overrides)
            handler = self._log_to_file()
        acc.wait_for_everyone()
        trackers.start(acc, cfg, self.run_dir)
        try:
            return self._run(acc, pairs, test, held_out, general)
        finally:
            trackers.finish(acc)
            if handler is not None:
                logging.getLogger("l2c_llava").removeHandler(handler)
                handler.close()

    def _run(self, acc, pairs, test, held_out, general) -> dict:
        cfg = self.cfg
        logger.info(
            "stage 1: %d caption pairs (%d skipped), %s",
            len(pairs),
            len(pairs.skipped),
            cfg.model.name_or_path,
        )

        before_path = self.run_dir / "eval_before.json"
        before = json.loads(before_path.read_text()) if before_path.is_file() else None
        encoder = None
        # ZeRO-3 / FSDP: the training model is sharded across processes; the main process evaluates a
        # whole one of its own (before: the base; after: the saved encoder)
        partitioned = sharded.is_partitioned(acc)
        if before is None and (test is not None or held_out):
            if not partitioned or acc.is_main_process:
                with sharded.whole_models(acc):
                    encoder = self.load_encoder()
            before = {}
            if acc.is_main_process:
                if cfg.eval.causal_baseline:
                    encoder.set_bidirectional(False)
                    before["causal"] = self.evaluate(
                        encoder, test, held_out, "eval before training (causal)", acc.mixed_precision
                    )
                    encoder.set_bidirectional(True)
                before["bidirectional"] = self.evaluate(
                    encoder, test, held_out, "eval before training (bidirectional)", acc.mixed_precision
                )
                atomic_write_json(before_path, before)
                logger.info("before training: %s", before)
            acc.wait_for_everyone()
            if partitioned:
                encoder = None  # the training model is built sharded (ZeRO-3) or wrapped (FSDP)
        trackers.log(acc, before or {}, 0, prefix="eval/before/")

        extra = []
        if cfg.mntp.enabled:
            extra.append(str(self.run_mntp(acc, [p.short for p in pairs] + [p.long for p in pairs])))
            encoder = None  # reload with the MNTP adapter merged
        if encoder is None:
            encoder = self.load_encoder(extra)

        examples = caption_examples(
            pairs.items,
            cfg.data.instructions.short_to_long,
            cfg.data.instructions.long_to_short,
            seed=cfg.run.seed,
            hard_negatives=cfg.data.hard_negatives,
        )
        examples = mix(examples, general, cfg.data.general_text_share, cfg.run.seed)
        train_stats = self.train_contrastive(acc, encoder, examples)

        encoder = acc.unwrap_model(encoder)
        metrics: dict = {"before": before or {}, "train": train_stats}
        parts = [STAGE1_ENCODER] + ([f"{STAGE1_ENCODER}_merged"] if cfg.output.merge_weights else [])
        evaluate_after = test is not None or bool(held_out)
        if evaluate_after and not partitioned and acc.is_main_process:
            metrics["after"] = self.evaluate(
                encoder, test, held_out, "eval after training", acc.mixed_precision
            )
        with sharded.unsharded(acc, self._wrapped, encoder):  # every process: whole weights on the main one
            if acc.is_main_process:
                from tqdm.auto import tqdm

                with tqdm(total=len(parts), desc="saving", unit="folder") as bar:
                    for part in parts:  # merged last: merging folds the adapter into the model in place
                        bar.set_postfix_str(part)
                        merged = part == f"{STAGE1_ENCODER}_merged"
                        if merged and partitioned:  # merged below, from the saved encoder
                            continue
                        out = encoder.save(self.run_dir / part, merged=merged)
                        logger.info("%s saved to %s", part, out)
                        bar.update(1)
        if acc.is_main_process and partitioned:  # the encoder as saved, whole on this process
            with sharded.whole_models(acc):
                saved = TextEncoder.from_pretrained(
                    str(self.run_dir / STAGE1_ENCODER),
                    torch_dtype=cfg.model.torch_dtype,
                    attn_implementation=cfg.model.attn_implementation,
                )
            if evaluate_after:
                metrics["after"] = self.evaluate(
                    saved, test, held_out, "eval after training", acc.mixed_precision
                )
            if cfg.output.merge_weights:
                out = saved.save(self.run_dir / f"{STAGE1_ENCODER}_merged", merged=True)
                logger.info("%s saved to %s", f"{STAGE1_ENCODER}_merged", out)
        if acc.is_main_process:
            if "after" in metrics:
                trackers.log(acc, metrics["after"], int(train_stats.get("steps") or 0), prefix="eval/after/")
            for key in ("cra", "short_to_long_top1", "long_to_short_top1"):
                if key in metrics.get("after", {}):
                    if "causal" in metrics["before"]:
                        metrics[f"{key}_before_causal"] = metrics["before"]["causal"].get(key)
                    metrics[f"{key}_before"] = metrics["before"].get("bidirectional", {}).get(key)
                    metrics[f"{key}_after"] = metrics["after"][key]
            atomic_write_json(self.run_dir / RUN_METRICS, metrics)
            logger.info(
                "metrics: %s", json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)})
            )
        acc.wait_for_everyone()
        return metrics

    # -- MNTP ------------------------------------------------------------------------------------

    def run_mntp(self, acc, texts: list[str]) -> Path:
        """Masked next-token prediction with LoRA (stage1/mntp.py); returns the adapter folder."""
        return run_mntp(self.cfg, self.base_source(), self.run_dir, acc, texts)

    # -- contrastive training -------------------------------------------------------------------------

    def train_contrastive(self, acc, encoder: TextEncoder, examples: list[Example]) -> dict:
        """Supervised contrastive training with a new LoRA, on the shared driver (train/recipe.py): each
        step a global batch of examples in the epoch's order, split into micro-batches and processes;
        HardNegativeNLLLoss over the queries, their positives and hard negatives (gathered across
        processes)."""
        self.acc, self.encoder, self.examples = acc, encoder, examples
        state = run_training(acc, self, self.cfg.train, resume=self.cfg.run.resume)
        self._wrapped = state.wrapped
        return state.stats

    # -- the contrastive step as the shared driver runs it (train/recipe.py) ----------------------------

    def setup(self, acc) -> Plan:
        from peft import LoraConfig, get_peft_model

        cfg, t, encoder = self.cfg, self.cfg.train, self.encoder
        lora = cfg.lora
        targets = lora_targets(encoder.model, lora.target_modules)
        if cfg.model.load_in_4bit:
            encoder.model = prepare_for_qlora(encoder.model, cfg.model.gradient_checkpointing)
        encoder.model = get_peft_model(
            encoder.model,
            LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets),
        )
        if cfg.model.gradient_checkpointing:
            encoder.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        encoder.train()
        self.per_step = t.batch_size * acc.num_processes * t.grad_accum
        self.steps_per_epoch = max(1, len(self.examples) // self.per_step)
        self.total = t.max_steps or t.epochs * self.steps_per_epoch
        self.tokens = 0
        params = [p for p in encoder.parameters() if p.requires_grad]
        # bf16 autocast on a plain or DDP launch: the frozen base kept in bf16 while training (the same
        # products, without re-casting it at every forward); ZeRO / FSDP hold their own copies
        low = acc.mixed_precision == "bf16" and not (is_deepspeed(acc) or acc.distributed_type.name == "FSDP")
        return Plan(
            encoder,
            params,
            self.total,
            micro_batch=t.batch_size,
            accum=t.grad_accum,
            clip=params,
            desc="stage 1 contrastive",
            adamw=dict(lr=t.lr, weight_decay=t.weight_decay, fused=True),
            output=None,
            while_training=frozen_linears_in(encoder.model, torch.bfloat16) if low else nullcontext(),
        )

    def batches(self, state):
        t, acc, examples, per_step = self.cfg.train, self.acc, self.examples, self.per_step
        world, rank = acc.num_processes, acc.process_index
        for step in itertools.count(state.start):
            epoch, k = divmod(step, self.steps_per_epoch)
            order = epoch_order(len(examples), self.cfg.run.seed, epoch)
            chunk = order[k * per_step : (k + 1) * per_step] if len(examples) >= per_step else order
            micro_batches = []
            for micro in range(t.grad_accum):
                part = chunk[micro * t.batch_size * world : (micro + 1) * t.batch_size * world]
                mine = [examples[i] for i in part[rank * t.batch_size : (rank + 1) * t.batch_size]] or [
                    examples[part[0]]
                ]
                micro_batches.append((mine, self._batch(self.encoder, mine, acc.device)))
            yield epoch, micro_batches

    def step(self, state, micro_batches: list) -> float:
        t, acc, model = self.cfg.train, self.acc, state.wrapped

        def features(item):
            """queries, positives, hard negatives (none: an empty tensor) of one micro-batch."""
            mine, batch = item
            feats = model(**batch, length_buckets=t.length_buckets)
            n = len(mine)
            return feats[:n], feats[n : 2 * n], feats[2 * n :]

        def loss_fn(q, p, neg):
            return hard_negative_nll_loss(
                q, p, neg if neg.shape[0] else None, scale=t.loss_scale, gather=t.gather_across_processes
            )

        if not (t.contrastive_accum and t.grad_accum > 1):

            def loss_of(item) -> torch.Tensor:
                self.tokens += int(item[1]["attention_mask"].sum())
                return loss_fn(*features(item))

            return accumulate_gradients(
                acc, micro_batches, loss_of, t.grad_accum, no_sync=model, backward_in_autocast=True
            )

        def embed(item):  # the gradient cache's forward, under autocast as the plain one
            with acc.autocast():
                return features(item)

        # the gradient cache: the loss of the whole accumulated batch
        self.tokens += sum(int(b["attention_mask"].sum()) for _, b in micro_batches)
        loss, _ = contrastive_accumulate(embed, micro_batches, loss_fn, acc.backward, shared=())
        return loss  # the driver logs its mean over processes

    def report(self, state, loss: float) -> StepReport:
        tps = round(self.tokens / max(1e-9, time.perf_counter() - state.started), 1)
        return StepReport({"lr": f"{state.sched.get_last_lr()[0]:.2e}"}, {"tokens_per_second": tps})

    def save(self, state, last_loss: float) -> dict:
        """The training stats (the encoder is saved by :meth:`_run`, after training)."""
        if state.start >= self.total:  # trained already, but its stats were never written
            return {}
        seconds = time.perf_counter() - state.started
        stats = {
            "steps": self.total,
            "examples": len(self.examples),
            "global_batch": self.per_step,
            "final_loss": last_loss,
            "seconds_this_session": round(seconds, 1),
            "tokens_per_second": round(self.tokens / max(1e-9, seconds), 1),
            "launch": state.launch,
        }
        if self.acc.is_main_process:
            write_train_stats(self.run_dir, stats)
        return stats

    @staticmethod
    def _batch(encoder: TextEncoder, examples: list[Example], device) -> dict[str, torch.Tensor]:
        """queries, then positives, then hard negatives (if any) in one padded batch."""
        fmt = encoder.format_text
        texts = [fmt(e.query, e.instruction, cut=False, joiner="; ") for e in examples]
        texts += [fmt(e.positive, None, cut=False) for e in examples]
        negs = [e.negative for e in examples if e.negative is not None]
        if len(negs) == len(examples):
            texts += [fmt(n, None, cut=False) for n in negs]
        return {k: v.to(device) for k, v in encoder.tokenize(texts).items()}

    # -- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self, state, step: int) -> None:
        acc = self.acc
        adapter = acc.unwrap_model(self.encoder).model
        Checkpoints(self.run_dir, self.cfg.train.keep_checkpoints).save_with(
            acc,
            step,
            lambda d: save_adapter(adapter, d / "adapter"),
            state.opt,
            state.sched,
            wrapped=state.wrapped,
            model=acc.unwrap_model(self.encoder),
        )

    def load_checkpoint(self, state) -> int:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        acc = self.acc
        checkpoints = Checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        unwrapped = acc.unwrap_model(self.encoder)

        def read(ck: Path) -> None:
            weights = load_file(str(ck / "adapter" / "adapter_model.safetensors"))
            peft_model = unwrapped.model
            if sharded.is_fsdp_wrapped(peft_model):  # peft finds no layer behind FSDP's wrappers
                name = peft_model.active_adapter
                weights = {_with_adapter_name(k, name): v for k, v in weights.items()}
                sharded.load_state_dict(peft_model, weights)
            else:
                set_peft_model_state_dict(peft_model, weights)

        trainer_state = checkpoints.restore_with(
            acc, read, state.opt, state.sched, wrapped=state.wrapped, model=unwrapped
        )
        return 0 if trainer_state is None else int(trainer_state["step"])


def _with_adapter_name(key: str, name: str) -> str:
    """peft's saved name of a LoRA weight ('...q_proj.lora_A.weight') as the model holds it
    ('...q_proj.lora_A.default.weight')."""
    head, _, last = key.rpartition(".")
    return f"{head}.{name}.{last}"


def evaluate_encoder(
    cfg: Stage1Config, encoder: str | None = None, base: bool = False, causal: bool = False
) -> dict:
    """``l2c stage1 eval``: CRA and short<->long top-1 on the config's eval sets, of the run's encoder
    (or the folder `encoder`, or with `base` the untuned LLM), bidirectional unless `causal`."""
    recipe = Stage1Recipe(cfg)
    _, test, held_out, _ = recipe.load_data()
    if base:
        model = recipe.load_encoder()
    else:
        path = encoder or str(Path(cfg.run.output_dir) / STAGE1_ENCODER)
        model = TextEncoder.from_pretrained(
            path, torch_dtype=cfg.model.torch_dtype, attn_implementation=cfg.model.attn_implementation
        )
    model.set_bidirectional(not causal)
    return recipe.evaluate(model, test, held_out, "eval")


def run_stage1(cfg: Stage1Config, source: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    """Entry point of ``l2c stage1``."""
    logger.debug("resolved config:\n%s", dump_config(cfg))
    with run_lock(cfg.run.output_dir, "stage-1 run"):  # one writer per run folder
        return Stage1Recipe(cfg, source, overrides).run()
