"""The LLM text encoder: a decoder LLM made bidirectional, pooled over caption tokens (LLM2Vec).

llm2vec is the specification: on the same checkpoint, pooling, instruction and max length,
:meth:`TextEncoder.encode` returns what ``llm2vec.LLM2Vec.encode`` returns (the parity test checks
cosine >= 0.9999 per row against llm2vec 0.2.3 in its own environment). What is the same:

- the text put together as ``"{instruction} !@#$%^&*(){text}"`` (or ``"!@#$%^&*(){text}"``), with
  llm2vec's chat wrapping for the checkpoints it knows and its end-of-sequence suffix for
  ``eos_token`` pooling, texts first cut to ``doc_max_length`` tokens by whole words;
- the separator removed; the instruction is attended to but not pooled: the pooled positions are the
  last ``len(tokenize(text))`` ones (``embed_mask``), left padding with the EOS token;
- pooling over the base model's last hidden state (after the final norm).

What differs: bidirectional attention comes from ``config.is_causal = False`` (transformers >= 5.2,
every supported family, eager and SDPA, with padding, through peft and after merge), not from
llm2vec's patched model classes, which do not import on transformers 5.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from l2c_llava.cpu_threads import follow_share
from l2c_llava.errors import InputError
from l2c_llava.io import atomic_write_json, follow_umask
from l2c_llava.models.llm import EncoderSource, load_llm, merge_adapters, resolve_dtype
from l2c_llava.models.reference import llm_folder, resolve_model_path
from l2c_llava.train.sharded import is_fsdp_wrapped, state_dict

logger = logging.getLogger(__name__)

SEPARATOR = "!@#$%^&*()"
POOLINGS = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
ENCODER_META = "l2c_encoder.json"
LLM2VEC_CONFIG = "llm2vec_config.json"
ADAPTER_DIR = "adapter"

# llm2vec wraps the text in a chat turn for these checkpoints, keyed by config._name_or_path.
_CHAT_WRAP = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
    "mistralai/Mistral-7B-Instruct-v0.2": "[INST] {text} [/INST]",
    "meta-llama/Llama-2-7b-chat-hf": "[INST] {text} [/INST]",
    "google/gemma-2-9b-it": "<bos><start_of_turn>user\n{text}<end_of_turn>",
    "Qwen/Qwen2-1.5B-Instruct": "<|im_start|>user\n{text}<|im_end|>",
    "Qwen/Qwen2-7B-Instruct": "<|im_start|>user\n{text}<|im_end|>",
}


@dataclass
class EncoderSettings:
    """How texts become embeddings; saved as llm2vec_config.json (+ the l2c extras)."""

    pooling: str = "mean"
    max_length: int = 512
    doc_max_length: int = 400
    skip_instruction: bool = True
    chat_template: str | None = None  # "{text}" pattern; None: no wrapping
    eos_suffix: str | None = None  # appended for eos_token pooling
    bidirectional: bool = True

    def llm2vec_config(self) -> dict:
        return {
            "pooling_mode": self.pooling,
            "max_length": self.max_length,
            "doc_max_length": self.doc_max_length,
            "skip_instruction": self.skip_instruction,
        }


def _eos_suffix(model_type: str, name_or_path: str, tokenizer) -> str | None:
    """llm2vec's suffix for eos_token pooling (its rules for its families; the EOS token otherwise)."""
    if name_or_path == "meta-llama/Meta-Llama-3-8B":
        return "<|end_of_text|>"
    if model_type in ("llama", "mistral"):
        return " </s>"
    if model_type == "gemma":
        return "<eos>"
    if model_type == "qwen2":
        return "<|endoftext|>"
    return tokenizer.eos_token


# Families that fuse projections: the recipe's names (q,k,v,o,gate,up,down) map onto theirs.
_FUSED_NAMES = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def lora_targets(model: nn.Module, wanted: Sequence[str]) -> list[str]:
    """The module names of `wanted` that exist in `model` (fused equivalents for Phi-3-like
    families). Raises with the available linear layer names if none match."""
    present = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    out: list[str] = []
    for w in wanted:
        name = w if w in present else _FUSED_NAMES.get(w)
        if name in present and name not in out:
            out.append(name)
    if not out:
        raise InputError(
            f"none of the LoRA target modules {list(wanted)} exist in this model; its linear layers: {', '.join(sorted(present))}"
        )
    return out


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def _read_llm2vec_config(folders: Sequence[str]) -> dict:
    """llm2vec_config.json of the last folder that has one (llm2vec reads the adapter's, else the base's)."""
    for folder in reversed(folders):
        path = Path(folder) / LLM2VEC_CONFIG
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise InputError(f"{path} is not valid JSON: {e}") from None
    return {}


# A forward pass costs about as much as this many more padded tokens (the per-layer launches of a
# small batch, measured on SmolLM2-135M on the CPU): the batching below trades the two.
BATCH_OVERHEAD_TOKENS = 64


def length_batches(
    lengths: Sequence[int], max_rows: int, overhead: int = BATCH_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Indices of `lengths` (token counts) in batches of at most `max_rows`, longest first, with the
    least padded tokens + `overhead` per batch (exact, by dynamic programming over the sorted
    lengths). Fixed batches of `max_rows` pad the batch where long texts meet short ones to the
    longest of them: 11-13% of the demo's stage-2 caption tokens (5 short captions of 10-25 tokens
    per dense one of 100-190); these batches pad about 2%."""
    if max_rows < 1:
        raise InputError(f"batch size must be at least 1, got {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    width = [lengths[i] for i in order]  # a batch starting at sorted position i is width[i] wide
    best = [0] + [math.inf] * n  # best[j]: least cost of the first j sorted texts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + width[i] * (j - i) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], n
    while j:
        bounds.append((cut[j], j))
        j = cut[j]
    return [order[a:b] for a, b in reversed(bounds)]


class TextEncoder(nn.Module):
    """A decoder LLM as a text encoder. ``forward`` gives pooled features [B, D] with gradients
    (training); :meth:`encode` embeds a list of texts without gradients (inference)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        settings: EncoderSettings,
        source: EncoderSource | None = None,
        model_type: str = "llama",
    ):
        super().__init__()
        if settings.pooling not in POOLINGS:
            raise InputError(f"pooling {settings.pooling!r} is not one of {', '.join(POOLINGS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.source = source
        self.model_type = model_type
        # llm2vec: pad with EOS, on the left; pooling reads the last positions
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        adapters: Sequence[str | os.PathLike] = (),
        gguf_file: str | None = None,
        pooling: str | None = None,
        max_length: int | None = None,
        doc_max_length: int | None = None,
        skip_instruction: bool | None = None,
        bidirectional: bool = True,
        torch_dtype: str | torch.dtype = "auto",
        attn_implementation: str = "sdpa",
        device: str | None = None,
        trust_remote_code: bool = False,
        load_in_4bit: bool = False,
    ) -> TextEncoder:
        """Load an encoder from: a transformers folder, a ``.gguf`` file (or folder + `gguf_file`),
        ``"embedded:smollm2-135m-instruct"``, an llm2vec / LLM2CLIP checkpoint (base + `adapters`
        merged in turn + llm2vec_config.json), or a folder written by :meth:`save`. Explicit options
        override the saved ones."""
        path = resolve_model_path(path, "text encoder")  # a Hub id -> its cached snapshot
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        meta_path = Path(path) / ENCODER_META
        saved: dict = {}
        if meta_path.is_file():
            saved = json.loads(meta_path.read_text())
            src = saved["source"]
            if saved.get("standalone"):
                source = EncoderSource(base=path)
            else:
                adapter = Path(path) / ADAPTER_DIR
                if not adapter.is_dir():
                    raise InputError(f"{path}: {ENCODER_META} names an adapter, but {adapter} is missing")
                source = EncoderSource(
                    src["base"], src.get("gguf_file"), list(src.get("adapters", [])) + [str(adapter)]
                )
            source.adapters += [str(a) for a in adapters]
        else:
            source = EncoderSource(base=path, gguf_file=gguf_file, adapters=[str(a) for a in adapters])
        source.adapters = [resolve_model_path(a, "LoRA adapter") for a in source.adapters]
        model, tokenizer, model_type, name = load_llm(
            source,
            bidirectional=bidirectional,
            torch_dtype=resolve_dtype(torch_dtype, device),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            load_in_4bit=load_in_4bit,
        )
        model = merge_adapters(model, source.adapters)
        folder, _ = llm_folder(source.base, source.gguf_file)
        l2v = _read_llm2vec_config([folder, *source.adapters, path] if saved else [folder, *source.adapters])
        settings = EncoderSettings(**saved.get("settings", {})) if saved else EncoderSettings()
        if not saved:
            settings.chat_template = _CHAT_WRAP.get(name)
        settings.pooling = pooling or l2v.get("pooling_mode", settings.pooling)
        settings.max_length = max_length or l2v.get("max_length", settings.max_length)
        settings.doc_max_length = doc_max_length or l2v.get("doc_max_length", settings.doc_max_length)
        if skip_instruction is not None:
            settings.skip_instruction = skip_instruction
        elif "skip_instruction" in l2v:
            settings.skip_instruction = bool(l2v["skip_instruction"])
        settings.bidirectional = bidirectional
        settings.eos_suffix = (
            _eos_suffix(model_type, name, tokenizer) if settings.pooling == "eos_token" else None
        )
        if not load_in_4bit:  # a 4-bit model is placed on the GPU at load and cannot be moved
            model = model.to(device)
        enc = cls(model.eval(), tokenizer, settings, source, model_type)
        logger.info(
            "text encoder: %s (%s, %s attention, pooling %s)",
            source.base,
            model_type,
            "bidirectional" if bidirectional else "causal",
            settings.pooling,
        )
        return enc

    # -- text preparation (llm2vec's) ------------------------------------------------------------

    def set_bidirectional(self, on: bool) -> None:
        """Switch attention between bidirectional and causal on the loaded model (transformers
        reads ``config.is_causal`` at every forward); used for the causal-attention baseline."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        base.config.is_causal = not on
        self.settings.bidirectional = on

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _cut_to_doc_length(self, text: str) -> str:
        n = len(
            self.tokenizer(
                text, add_special_tokens=False, truncation=True, max_length=self.settings.max_length
            )["input_ids"]
        )
        while n > self.settings.doc_max_length:
            words = text.split()
            text = " ".join(words[: int(len(words) * self.settings.doc_max_length / n)])
            n = len(
                self.tokenizer(
                    text, add_special_tokens=False, truncation=True, max_length=self.settings.max_length
                )["input_ids"]
            )
        return text

    def format_text(
        self, text: str, instruction: str | None = None, *, cut: bool = True, joiner: str = " "
    ) -> str:
        """The string llm2vec tokenizes for (instruction, text), separator included. ``encode`` uses
        llm2vec's inference form (``cut`` to doc_max_length, joiner " "); training uses the public
        LLM2CLIP/llm2vec training form (no cut, joiner "; ")."""
        if cut:
            text = self._cut_to_doc_length(text)
        joined = f"{instruction.strip()}{joiner}{SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"
        s = self.settings
        if s.chat_template:
            joined = s.chat_template.format(text=joined.strip())
        if s.eos_suffix is not None:
            joined = joined.strip() + s.eos_suffix
        return joined

    def _token_ids(self, formatted: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids of each whole text (separator removed) and the token count of its part after
        the separator (the pooled part)."""
        whole, parts = [], []
        for t in formatted:
            pieces = t.split(SEPARATOR)
            parts.append(pieces[1] if len(pieces) > 1 else "")
            whole.append("".join(pieces))
        tok, n = self.tokenizer, self.settings.max_length
        ids = tok(whole, truncation=True, max_length=n)["input_ids"]
        part_lens = [
            len(x) for x in tok(parts, add_special_tokens=False, truncation=True, max_length=n)["input_ids"]
        ]
        return ids, part_lens

    def _pad(self, ids: Sequence[list[int]], part_lens: Sequence[int]) -> dict[str, torch.Tensor]:
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        embed = torch.zeros((len(ids), width), dtype=torch.long)
        for i, (row, n) in enumerate(zip(ids, part_lens)):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention[i, width - len(row) :] = 1
            if n > 0:
                embed[i, max(0, width - n) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "embed_mask": embed}

    def tokenize(self, formatted: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids``, ``attention_mask`` and ``embed_mask`` (1 on the pooled positions:
        the last len(tokens of the text after the separator) positions of each row)."""
        return self._pad(*self._token_ids(formatted))

    # -- model ------------------------------------------------------------------------------------

    def pool(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """hidden [B, L, D] -> [B, D] with llm2vec's pooling (left padding: rows end at position L-1)."""
        mode = self.settings.pooling
        if mode in ("eos_token", "last_token"):
            return hidden[:, -1]
        if mode == "bos_token":
            bos = self.tokenizer.bos_token_id
            hit = (
                batch["input_ids"] == bos
                if bos is not None
                else torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            )
            if not bool(hit.any(dim=1).all()):
                raise InputError(
                    "bos_token pooling needs a BOS token in every input; this tokenizer adds none"
                )
            first = hit.int().argmax(dim=1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
        hidden = hidden.float()  # averaged in float32 whatever the compute dtype (a no-op in float32)
        mask = batch["embed_mask"] if self.settings.skip_instruction else batch["attention_mask"]
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise InputError("a text has no tokens to pool (empty text after the instruction)")
        width = hidden.shape[1]
        pos = torch.arange(width, device=hidden.device).unsqueeze(0)
        start = (width - lengths).unsqueeze(1)
        inside = pos >= start  # the last `length` positions of each row
        if mode == "mean":
            weights = inside.to(hidden.dtype) / lengths.unsqueeze(1).to(hidden.dtype)
        else:  # weighted_mean: 1..n over the last n positions, normalised
            ranks = (pos - start + 1).clamp(min=0) * inside
            weights = ranks.to(hidden.dtype) / ranks.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
        return torch.einsum("bld,bl->bd", hidden, weights)

    def _forward_rows(self, input_ids, attention_mask, embed_mask) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.pool(
            hidden, {"input_ids": input_ids, "attention_mask": attention_mask, "embed_mask": embed_mask}
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        embed_mask: torch.Tensor,
        length_buckets: int = 1,
    ) -> torch.Tensor:
        """[B, L] left-padded -> pooled [B, D]. ``length_buckets`` > 1 runs the rows in that many
        groups of similar length, each cut to its own longest row (a training batch mixes short and
        dense captions; one padded batch would spend most of its compute on padding). One call, so
        it stays a single DDP forward."""
        if length_buckets <= 1 or input_ids.shape[0] < 2:
            return self._forward_rows(input_ids, attention_mask, embed_mask)
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, descending=True)
        parts = []
        for idx in torch.tensor_split(order, min(length_buckets, input_ids.shape[0])):
            width = int(lengths[idx].max())
            parts.append(
                self._forward_rows(
                    input_ids[idx, -width:], attention_mask[idx, -width:], embed_mask[idx, -width:]
                )
            )
        return torch.cat(parts)[torch.argsort(order)]  # back to input order

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress: bool | None = None,
        normalize: bool = False,
        progress=None,
    ) -> torch.Tensor:
        """Embed `texts` -> float32 tensor [N, D] on the CPU, in input order. Texts are batched by
        token length, at most `batch_size` a batch, cut where padding would cost more than another
        forward pass (:func:`length_batches`); a progress bar shows for long inputs (or
        `show_progress`), or `progress` (a tqdm bar of the caller's, counting texts) advances instead."""
        from tqdm.auto import tqdm

        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts")
        texts = list(texts)
        if not texts:
            return torch.zeros((0, self.hidden_size), dtype=torch.float32)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InputError(f"text {i} is empty: every text needs at least one token")
        s = self.settings
        # only texts over doc_max_length are cut word by word; the others' lengths in one batched call
        lengths = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=s.max_length)
        formatted = [
            self.format_text(t, instruction, cut=len(n) > s.doc_max_length)
            for t, n in zip(texts, lengths["input_ids"])
        ]
        ids, part_lens = self._token_ids(formatted)  # tokenized once: sorted by length, then padded per batch
        batches = length_batches([len(x) for x in ids], batch_size)
        was_training = self.training
        self.eval()
        device = self.device
        out = torch.empty((len(texts), self.hidden_size), dtype=torch.float32)
        show = (len(texts) >= 512 if show_progress is None else show_progress) and progress is None
        for idx in tqdm(batches, desc="encoding", unit="batch", disable=not show):
            follow_share()  # under a parallel pipeline: the cores a neighbour left
            batch = {
                k: v.to(device)
                for k, v in self._pad([ids[i] for i in idx], [part_lens[i] for i in idx]).items()
            }
            out[idx] = self(**batch).float().cpu()
            if progress is not None:
                progress.update(len(idx))
        self.train(was_training)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    # -- saving -------------------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike, merged: bool = False) -> Path:
        """Write a folder :meth:`from_pretrained` loads. A peft-wrapped model saves its adapter
        (``adapter/``) and points at its base; ``merged=True`` (or a plain model) writes the full
        weights instead (safetensors), a standalone folder llm2vec loads too."""
        from peft import PeftModel

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.model
        standalone = merged or not isinstance(model, PeftModel)
        if standalone:
            if isinstance(model, PeftModel):
                model = model.merge_and_unload()
                self.model = model
            model.config.is_causal = True  # stored like any checkpoint; bidirectionality is set at load
            model.save_pretrained(out, safe_serialization=True)
            model.config.is_causal = not self.settings.bidirectional
        else:
            save_adapter(model, out / ADAPTER_DIR)
        self.tokenizer.save_pretrained(out)
        for f in out.rglob("*.safetensors"):  # save_pretrained writes them 0600
            follow_umask(f)
        atomic_write_json(out / LLM2VEC_CONFIG, self.settings.llm2vec_config())
        src = self.source or EncoderSource(base="")
        base_adapters = [a for a in src.adapters if Path(a).resolve() != (out / ADAPTER_DIR).resolve()]
        atomic_write_json(
            out / ENCODER_META,
            {
                "format": "l2c-llava text encoder",
                "standalone": standalone,
                "model_type": self.model_type,
                "source": {
                    "base": src.base,
                    "gguf_file": src.gguf_file,
                    "adapters": [] if standalone else base_adapters,
                },
                "settings": asdict(self.settings),
            },
        )
        return out


@contextmanager
def frozen_linears_in(model: nn.Module, dtype: torch.dtype, frozen_only: bool = True):
    """Within: the frozen nn.Linear weights (and biases) of `model` stored in `dtype` (every linear's
    with ``frozen_only=False``: for inference, under ``no_grad``), the originals back on exit. Under
    autocast to `dtype` every linear casts its weight at each call, and autocast keeps the cast only of
    weights that need gradients: a LoRA step re-casts the whole frozen base at every forward (a quarter
    of a bf16 stage-1 step, bench/gemm_limit.py). Autocast would run these products in `dtype` anyway,
    on the same rounded values: the step computes exactly the same."""
    kept = []
    for mod in model.modules():
        if not isinstance(mod, nn.Linear) or (frozen_only and mod.weight.requires_grad):
            continue
        for name in ("weight", "bias"):
            p = getattr(mod, name)
            if p is None or (frozen_only and p.requires_grad):
                continue
            if p.dtype != dtype and p.is_floating_point():
                kept.append((p, p.data))
                p.data = p.data.to(dtype)
    try:
        yield len(kept)
    finally:
        for p, data in kept:
            p.data = data


def save_adapter(model, folder: Path) -> Path:
    """A peft model's adapter folder (``adapter_config.json``, ``adapter_model.safetensors``), as
    ``save_pretrained`` writes it; also inside an FSDP launch's
    :func:`~l2c_llava.train.sharded.unsharded`, where peft finds no adapter weights behind FSDP's
    wrappers: there the weights are read by their plain names and written in peft's layout."""
    if not is_fsdp_wrapped(model):
        model.save_pretrained(folder, safe_serialization=True)
        return folder
    from safetensors.torch import save_file

    name = model.active_adapter
    weights = {
        k.replace(f".{name}.", "."): v.detach().cpu().contiguous()
        for k, v in state_dict(model).items()
        if "lora_" in k and f".{name}." in k
    }
    folder.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[name]
    config.inference_mode = True
    config.save_pretrained(str(folder))
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder
