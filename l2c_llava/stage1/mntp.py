"""Masked next-token prediction (MNTP), LLM2Vec's optional first step of stage 1: LoRA on the
bidirectional LLM, each masked token predicted from the position before it (the LM head reads
position i-1 for token i), BERT's 80 / 10 / 10 masking; the adapter is merged into the base before
the contrastive step. :func:`mask_tokens` is the masking, a pure function of its inputs and RNG.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
from pathlib import Path

import torch

from l2c_llava import trackers
from l2c_llava.config import Stage1Config
from l2c_llava.data.readers import _decode
from l2c_llava.errors import InputError
from l2c_llava.io import move_into_place, work_folder
from l2c_llava.models.llm import EncoderSource, load_llm, merge_adapters, resolve_dtype
from l2c_llava.quantization import prepare_for_qlora
from l2c_llava.stage1.data import epoch_order
from l2c_llava.stage1.encoder import lora_targets, save_adapter
from l2c_llava.train import sharded
from l2c_llava.train.loop import run_training
from l2c_llava.train.recipe import Plan, StepReport

logger = logging.getLogger("l2c_llava.stage1")

IGNORE = -100  # a position without a label


def mask_tokens(
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: set[int],
    mask_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of one MNTP batch. ids, attention_mask: [B, T]. Each real, non-special token
    is chosen with `probability`; a chosen one is replaced by `mask_id` (80%), a random token (10%) or
    kept (10%); labels hold the chosen tokens' ids and IGNORE elsewhere. Three draws from `generator`,
    in this order: choice, roll, random tokens."""
    can = attention_mask.bool() & ~torch.isin(ids, torch.tensor(sorted(special_ids)))
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & can
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id  # 80% mask token, 10% random, 10% unchanged
    rand_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[rand_pos] = torch.randint(vocab_size, ids.shape, generator=generator)[rand_pos]
    return inputs, labels


def mntp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of token i predicted from position i-1. logits: [B, T-1, V] (positions 0..T-2),
    labels: [B, T] (IGNORE where nothing was masked)."""
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def run_mntp(cfg: Stage1Config, src: EncoderSource, run_dir: Path, acc, texts: list[str]) -> Path:
    """Masked next-token prediction with LoRA on the bidirectional LLM; returns the adapter folder
    (merged into the base before the contrastive step). Restarts from scratch if interrupted."""
    out = run_dir / "mntp"
    if (out / ".complete").is_file():
        logger.info("MNTP already done: %s", out)
        return out
    if sharded.zero_stage(acc) == 3:
        raise InputError(
            "MNTP under ZeRO-3: its LM head runs outside the DeepSpeed engine, which ZeRO-3 cannot "
            "partition. Run MNTP under a ZeRO-2 or DDP launch (stage1/accelerate/deepspeed_zero2.yaml), or "
            "name a trained MNTP adapter in model.adapters and set mntp.enabled=false"
        )
    if cfg.mntp.text:
        texts = texts + [
            t for t in _decode(Path(cfg.mntp.text).read_bytes(), cfg.mntp.text).splitlines() if t.strip()
        ]
    # MNTP's own optimisation: a constant lr, no clipping, no checkpoint (train/recipe.py's Plan)
    train = cfg.train.model_copy(
        update={"schedule": "constant", "warmup_steps": 0, "grad_clip": None, "contrastive_accum": False}
    )
    run_training(acc, MntpRecipe(cfg, src, out, texts), train, resume=False)
    return out


class MntpRecipe:
    """MNTP as the shared driver runs it (:class:`~l2c_llava.train.recipe.Recipe`): each step a batch of
    texts in the epoch's order, masked (:func:`mask_tokens`), the masked tokens' cross-entropy; the
    adapter saved at the end into `out` (``.complete`` marks it done). No checkpoint: an interrupted
    MNTP starts over. Its log goes to the logger and the trackers (``mntp/``), not ``train_log.jsonl``."""

    def __init__(self, cfg: Stage1Config, src: EncoderSource, out: Path, texts: list[str]):
        self.cfg, self.src, self.out, self.texts = cfg, src, out, texts
        self.run_dir = out.parent

    def setup(self, acc) -> Plan:
        from peft import LoraConfig, get_peft_model

        cfg, m = self.cfg, self.cfg.model
        self.acc = acc
        lm, tok, _, _ = load_llm(
            self.src,
            bidirectional=True,
            torch_dtype=resolve_dtype(m.torch_dtype, str(acc.device)),
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
            causal_lm=True,
            load_in_4bit=m.load_in_4bit,
        )
        lm = merge_adapters(lm, self.src.adapters)
        base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        self.head = lm.get_output_embeddings()
        lora = cfg.lora
        if m.load_in_4bit:
            base = prepare_for_qlora(base, m.gradient_checkpointing)
        self.model = get_peft_model(
            base,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora_targets(base, lora.target_modules),
            ),
        )
        self.head.requires_grad_(False)
        tok.pad_token = tok.pad_token or tok.eos_token
        mask_ids = tok(cfg.mntp.mask_token, add_special_tokens=False)["input_ids"]
        if len(mask_ids) != 1:
            raise InputError(
                f"mntp.mask_token {cfg.mntp.mask_token!r} is not a single token for this tokenizer"
            )
        self.tok, self.mask_id = tok, mask_ids[0]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.head.to(
            acc.device
        )  # frozen: not handed to DDP (it refuses modules without trainable parameters)
        bs = cfg.mntp.batch_size
        self.total = cfg.mntp.max_steps or cfg.mntp.epochs * math.ceil(len(self.texts) / bs)
        self.done = 0
        return Plan(
            self.model,
            params,
            self.total,
            micro_batch=bs,
            accum=1,
            clip=params,
            desc="stage 1 MNTP",
            adamw=dict(lr=cfg.mntp.lr),
            output=None,
            log=False,
            checkpoints=False,
        )

    def batches(self, state):
        cfg, tok, texts, bs = self.cfg, self.tok, self.texts, self.cfg.mntp.batch_size
        gen = torch.Generator().manual_seed(cfg.run.seed)
        special = set(tok.all_special_ids)
        for step in itertools.count(state.start):
            epoch, k = divmod(step, max(1, math.ceil(len(texts) / bs)))
            order = epoch_order(len(texts), cfg.run.seed + 17, epoch)
            batch_texts = [texts[i] for i in order[k * bs : (k + 1) * bs]] or [texts[0]]
            enc = tok(
                batch_texts,
                padding=True,
                truncation=True,
                max_length=cfg.model.max_length,
                return_tensors="pt",
            )
            ids, att = enc["input_ids"], enc["attention_mask"]
            inputs, labels = mask_tokens(
                ids, att, special, self.mask_id, len(tok), cfg.mntp.mask_probability, gen
            )
            yield epoch, (inputs, att, labels)

    def step(self, state, batch) -> float:
        inputs, att, labels = batch
        device = self.acc.device
        hidden = state.wrapped(input_ids=inputs.to(device), attention_mask=att.to(device)).last_hidden_state
        loss = mntp_loss(self.head(hidden[:, :-1]), labels.to(device))
        self.acc.backward(loss)
        return loss.item()

    def report(self, state, loss: float) -> StepReport:
        step, self.done = self.done, self.done + 1
        if step % self.cfg.train.log_every == 0:
            logger.info("mntp step %d/%d loss %.4f", step + 1, self.total, loss)
            trackers.log(self.acc, {"loss": loss}, step + 1, prefix="mntp/")
        return StepReport({}, {})

    def save_checkpoint(self, state, step: int) -> None:  # pragma: no cover - the plan saves none
        raise NotImplementedError

    def load_checkpoint(self, state) -> int:  # pragma: no cover - the plan resumes none
        return 0

    def save(self, state, last_loss: float) -> dict:
        acc = self.acc
        unwrapped = acc.unwrap_model(state.wrapped)
        with sharded.unsharded(
            acc, state.wrapped, unwrapped
        ):  # every process: FSDP's whole weights on the main one
            if acc.is_main_process:
                tmp = work_folder(self.out)  # a hidden, new folder: never a user's "mntp.tmp"
                try:
                    save_adapter(unwrapped, tmp)
                    (tmp / ".complete").write_text(f"{self.total} steps\n")
                    move_into_place(tmp, self.out)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        return {"steps": self.total, "final_loss": last_loss}
