"""``l2c_llava``: the project's own lmms-eval model, batched (``l2c mllm eval``'s default).

lmms-eval's ``llava_hf`` answers one question per forward (it asserts batch size 1); on the 2-core
machine the demo's 1,300 held-out questions took 7.5 minutes per LLaVA that way. This model loads the
same folder the same way (transformers' ``LlavaForConditionalGeneration`` through
:func:`l2c_llava.mllm.export.load_trained_llava`, the saved processor on the PIL backend), builds the
same prompt (the processor's chat template, the image first in the user turn) and gives the model
training's pixels (:func:`l2c_llava.data.images.pad_images`: padded to the processor's mean colour where
the model was trained with ``image_aspect_ratio: pad``), and answers many questions per forward:

- ``generate_until``: requests grouped by their generation settings, longest prompts first, left
  padded; greedy unless the task asks for a temperature; each request's own ``until`` strings end its
  answer (and stop its row early) and its own ``max_new_tokens`` bounds it;
- ``loglikelihood``: the log-probability of the continuation (the assistant turn the chat template
  writes for it, end-of-turn token included, as ``llava_hf`` scores it), summed over its tokens,
  many requests per forward (right padded), with whether greedy decoding would produce it;
- ``generate_until_multi_round``: lmms-eval's round protocol (``doc_to_text`` / ``doc_to_messages``
  called with ``round_idx``, ``previous_output``, ``previous_round_info`` until it says terminal), the
  requests of a batch advanced round by round together.

Two classes under one name, as lmms-eval does for ``llava_hf``: the chat one (``is_simple = False``,
what ``--model l2c_llava`` resolves to, tasks hand it messages) and the simple one (``--force_simple``,
tasks hand it a context string and ``doc_to_visual``; the only one lmms-eval gives ``loglikelihood``
and multiple-choice requests to). Registered through lmms-eval's ``lmms_eval.models`` entry points
(``pyproject.toml``; :func:`l2c_llava.mllm.lmms_entry.lmms_eval_models`).

Differences from ``llava_hf`` on purpose: ``until`` is honoured (``llava_hf`` computes it and drops
it); ``loglikelihood`` returns the summed log-probability lmms-eval's metrics expect (``llava_hf``
returns the mean cross-entropy, a positive number, so a multiple-choice argmax picks the least likely
choice) and compares greedy tokens at the positions that predict them (``llava_hf`` is off by one).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from l2c_llava.cpu_threads import follow_share
from l2c_llava.data.images import pad_images
from l2c_llava.mllm.export import load_trained_llava

IMAGE_TOKEN = "<image>"
DEFAULT_MAX_NEW_TOKENS = 1024  # llava_hf's default when a task names none


class L2CLlava(lmms):
    """Batched LLaVA-1.5 for lmms-eval on a folder saved by this project (or any transformers LLaVA
    with its processor). ``--model_args pretrained=DIR[,device=cpu][,dtype=auto][,batch_size=8]``."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int | str = 8,
        device_map: str = "",
        attn_implementation: str | None = None,
        use_cache: bool | str = True,
        max_batch_size: int | None = None,  # lmms-eval's option for its auto batch size; unused
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"l2c_llava: unknown model_args {sorted(kwargs)}")
        from accelerate import Accelerator

        accelerator = Accelerator()
        self.accelerator = accelerator
        if accelerator.num_processes > 1 and not device_map:  # one replica per process, lmms-eval shards
            device = f"cuda:{accelerator.local_process_index}"
        self._device = torch.device(device)
        load: dict = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
        if device_map:
            load["device_map"] = device_map
        if attn_implementation:
            load["attn_implementation"] = attn_implementation
        self.folder, model, self.processor = load_trained_llava(pretrained, **load)
        if not device_map:
            model.to(self._device)
        self.model = model.eval()
        meta_path = self.folder / "l2c_mllm.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.aspect = meta.get("image_aspect_ratio", "pad")
        self.tokenizer = self.processor.tokenizer
        self.batch_size_per_gpu = int(batch_size)
        self.use_cache = str(use_cache).lower() not in ("false", "0")
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"l2c_llava: batch_size must be >= 1, got {batch_size}")

    # ------------------------------------------------------------------ lmms-eval's interface
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Simple form: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` per request."""

        def prompt(args) -> tuple[str, list]:
            ctx, _, doc_to_visual, doc_id, task, split = args
            return ctx, _images(doc_to_visual(self.task_dict[task][split][doc_id]))

        return self._generate_requests(requests, prompt, gen_index=1)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Simple form: ``(context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)``.
        Round 0 asks the context about ``doc_to_visual``'s images; each later round asks what
        ``doc_to_text(doc, round_idx=, previous_output=, previous_round_info=)`` returns
        (``visuals, text, terminal, previous_output, previous_round_info``) until it is terminal."""

        def first(args) -> tuple[str, list]:
            ctx, _, doc_to_visual, _, doc_id, task, split = args
            return ctx, _images(doc_to_visual(self.task_dict[task][split][doc_id]))

        def later(args, r: int, outputs: list[str], info):
            _, _, _, doc_to_text, doc_id, task, split = args
            visuals, text, terminal, outputs, info = doc_to_text(
                self.task_dict[task][split][doc_id],
                previous_output=list(outputs),
                round_idx=r,
                previous_round_info=info,
            )
            return None if terminal else (text, _images(visuals)), outputs, info

        return self._multi_round(requests, first, later, gen_index=1)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)`` per request:
        the summed log-probability of the continuation's tokens after the prompt, and whether greedy
        decoding gives every one of them. Batched, right padded (no position shifts)."""
        items = []
        for inst in requests:
            ctx, target, doc_to_visual, doc_id, task, split = inst.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            images = _images(doc_to_visual(doc)) if doc_to_visual is not None else []
            items.append((ctx, continuation, images))
        order = sorted(range(len(items)), key=lambda i: -len(self.tok_encode(items[i][0] + items[i][1])))
        out: list[tuple[float, bool] | None] = [None] * len(items)
        bar = tqdm(total=len(items), disable=self.rank != 0, desc="l2c_llava loglikelihood")
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            for i, r in zip(idx, self._loglikelihood_batch([items[i] for i in idx])):
                out[i] = r
            bar.update(len(idx))
        bar.close()
        return out

    # ------------------------------------------------------------------ prompts and pixels
    def _chat_text(self, content: str | list, answer: str | None = None) -> str:
        messages = [{"role": "user", "content": content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=answer is None
        )

    def _user_content(self, ctx: str, n_images: int) -> str | list:
        """A context that places its own ``<image>`` tokens stays text; otherwise the images come
        first in the user turn, as in training and in ``llava_hf``."""
        if IMAGE_TOKEN in ctx or not n_images:
            return ctx
        return [{"type": "image"}] * n_images + [{"type": "text", "text": ctx}]

    def _pixels_ready(self, images: list) -> list:
        """Training's pixels: LLaVA's pad to a square of the processor's mean colour where the model
        was trained with it (the processor then resizes and crops as in training)."""
        return pad_images(images, self.processor.image_processor, self.aspect)

    def _inputs(self, texts: list[str], images: list) -> dict:
        enc = self.processor(
            text=texts,
            images=self._pixels_ready(images) or None,
            return_tensors="pt",
            padding=True,
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        return enc

    # ------------------------------------------------------------------ generation
    def _generate_requests(self, requests, prompt: Callable, gen_index: int) -> list[GenerationResult]:
        """Group by generation settings, order by prompt length (less padding), batch, put back."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, inst in enumerate(requests):
            groups[_settings_key(inst.args[gen_index])].append(i)
        out: list[GenerationResult | None] = [None] * len(requests)
        n_batches = sum(-(-len(g) // self.batch_size) for g in groups.values())
        bar = tqdm(total=n_batches, disable=self.rank != 0, desc="l2c_llava generating")
        for idx in groups.values():
            idx.sort(key=lambda i: -len(self.tok_encode(requests[i].args[0])))
            for lo in range(0, len(idx), self.batch_size):
                chunk = idx[lo : lo + self.batch_size]
                prompts = [prompt(requests[i].args) for i in chunk]
                gen = requests[chunk[0]].args[gen_index]
                texts = [self._chat_text(self._user_content(c, len(ims))) for c, ims in prompts]
                results = self.generate_batch(texts, [ims for _, ims in prompts], gen)
                for i, r in zip(chunk, results):
                    out[i] = r
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen), r.text)
                bar.update(1)
        bar.close()
        return out

    @torch.inference_mode()
    def generate_batch(
        self, texts: Sequence[str], images: Sequence[list], gen_kwargs: dict
    ) -> list[GenerationResult]:
        """Answers to full prompts (chat template applied), ``images[i]`` the images of ``texts[i]``,
        one left-padded ``generate``. Each answer ends before the first of ``gen_kwargs['until']``."""
        follow_share()  # under a parallel pipeline: the cores a neighbour left
        until, kwargs = self._generation_settings(gen_kwargs)
        self.tokenizer.padding_side = "left"  # every row continues at the same position
        inputs = self._inputs(list(texts), [im for ims in images for im in ims])
        n_prompt = inputs["input_ids"].shape[1]
        stop = StoppingCriteriaList([UntilStrings(self.tokenizer, until, n_prompt)]) if until else None
        ids = self.model.generate(
            **inputs,
            **kwargs,
            stopping_criteria=stop,
            use_cache=self.use_cache,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eot_token_id,
        )[:, n_prompt:]
        results = []
        for row, mask in zip(ids, inputs["attention_mask"]):
            text = _cut(self.tokenizer.decode(row, skip_special_tokens=True), until)
            tokens = row.tolist()  # generated tokens: up to the end of turn, or the row's last real one
            eos, pad = self.eot_token_id, self.tokenizer.pad_token_id
            n_out = tokens.index(eos) + 1 if eos in tokens else sum(t != pad for t in tokens)
            results.append(
                GenerationResult(text, TokenCounts(input_tokens=int(mask.sum()), output_tokens=n_out))
            )
        return results

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], dict]:
        """lmms-eval's task settings -> (until strings, ``generate`` kwargs), llava_hf's defaults."""
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        until = [u for u in until if u]
        temperature = float(gen.get("temperature", 0) or 0)
        do_sample = temperature > 0
        kwargs = {
            "max_new_tokens": int(gen.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            "do_sample": do_sample,
            "num_beams": int(gen.get("num_beams", 1) or 1),
        }
        if do_sample:
            kwargs["temperature"] = temperature
            if gen.get("top_p") is not None:
                kwargs["top_p"] = float(gen["top_p"])
        else:  # greedy: the checkpoint's generation_config must not turn sampling settings on
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return until, kwargs

    def _multi_round(self, requests, first: Callable, later: Callable, gen_index: int) -> list[list[str]]:
        """The requests of a batch advance round by round together; a request leaves the batch when its
        task says its rounds are over."""
        out: list[list[str]] = [[] for _ in requests]
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="l2c_llava multi-round")
        groups: dict[str, list[int]] = defaultdict(list)
        for i, inst in enumerate(requests):
            groups[_settings_key(inst.args[gen_index])].append(i)
        for idx in groups.values():
            for lo in range(0, len(idx), self.batch_size):
                chunk = idx[lo : lo + self.batch_size]
                gen = requests[chunk[0]].args[gen_index]
                active = {i: first(requests[i].args) for i in chunk}
                info: dict[int, object] = dict.fromkeys(chunk)
                r = 0
                while active:
                    keys = list(active)
                    texts = [self._chat_text(self._user_content(c, len(ims))) for c, ims in active.values()]
                    answers = self.generate_batch(texts, [ims for _, ims in active.values()], gen)
                    r += 1
                    nxt = {}
                    for i, a in zip(keys, answers):
                        out[i].append(a.text)
                        turn, outputs, info[i] = later(requests[i].args, r, out[i], info[i])
                        if outputs is not None:
                            out[i] = list(outputs)
                        if turn is not None:
                            nxt[i] = turn
                    active = nxt
                bar.update(len(chunk))
        bar.close()
        return out

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def _loglikelihood_batch(self, items: list[tuple[str, str, list]]) -> list[tuple[float, bool]]:
        follow_share()  # under a parallel pipeline: the cores a neighbour left
        rows, starts, pixels = [], [], []
        for ctx, continuation, images in items:
            content = self._user_content(ctx, len(images))
            prompt = self._inputs([self._chat_text(content)], images)
            full = self._inputs([self._chat_text(content, continuation)], images)
            ids, ctx_ids = full["input_ids"][0], prompt["input_ids"][0]
            n = min(len(ids), len(ctx_ids))
            same = (ids[:n] == ctx_ids[:n]).int()
            start = n if bool(same.all()) else int(same.argmin())  # a token merged across the boundary
            rows.append(ids)
            starts.append(max(start, 1))
            if "pixel_values" in full:
                pixels.append(full["pixel_values"])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long, device=self.device)
        attention = torch.zeros_like(input_ids)
        for k, r in enumerate(rows):
            input_ids[k, : len(r)], attention[k, : len(r)] = r, 1
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        logits = self.model(**batch).logits.float()
        out = []
        for k, (r, s) in enumerate(zip(rows, starts)):
            logp = torch.log_softmax(logits[k, s - 1 : len(r) - 1], dim=-1)  # position t predicts t+1
            target = r[s:]
            ll = float(logp.gather(-1, target[:, None]).sum())
            out.append((ll, bool((logp.argmax(-1) == target).all())))
        return out


class L2CLlavaChat(L2CLlava):
    """The chat form (what ``--model l2c_llava`` resolves to): tasks hand over messages, built by
    lmms-eval from ``doc_to_visual`` and ``doc_to_text`` where a task names no ``doc_to_messages``."""

    is_simple = False

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """``(context, doc_to_messages, gen_kwargs, doc_id, task, split)`` per request."""

        def prompt(args) -> tuple[str | list, list]:
            _, doc_to_messages, _, doc_id, task, split = args
            return _from_messages(doc_to_messages(self.task_dict[task][split][doc_id]))

        return self._generate_requests(requests, prompt, gen_index=2)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        def first(args):
            _, doc_to_messages, _, doc_id, task, split = args
            return _from_messages(doc_to_messages(self.task_dict[task][split][doc_id]))

        def later(args, r: int, outputs: list[str], info):
            _, doc_to_messages, _, doc_id, task, split = args
            payload = doc_to_messages(
                self.task_dict[task][split][doc_id],
                round_idx=r,
                previous_output=list(outputs),
                previous_round_info=info,
            )
            if not (isinstance(payload, tuple) and len(payload) == 4):
                return None, None, info
            messages, terminal, outputs, info = payload
            return None if terminal else _from_messages(messages), outputs, info

        return self._multi_round(requests, first, later, gen_index=2)

    def _user_content(self, ctx, n_images: int):
        return ctx  # already the user turn's content, images in place


def _from_messages(messages) -> tuple[list, list]:
    """lmms-eval's messages (one user turn with images and text) -> (user content for the processor's
    chat template, the images in order). Only image content is taken: this is an image LLaVA."""
    from lmms_eval.protocol import ChatMessages

    chat = ChatMessages(messages=messages)
    images, videos, audios = chat.extract_media()
    if videos or audios:
        raise NotImplementedError("l2c_llava answers about images; this task gives video or audio")
    dumped = chat.model_dump()["messages"]
    if len(dumped) != 1 or dumped[0]["role"] != "user":
        raise NotImplementedError(
            f"l2c_llava takes one user turn per request (LLaVA-1.5's eval); got roles "
            f"{[m['role'] for m in dumped]}"
        )
    return dumped[0]["content"], _images(images)


def _images(visuals) -> list:
    out = []
    for v in visuals or []:
        if isinstance(v, str):
            v = Image.open(v)
        if not isinstance(v, Image.Image):
            raise NotImplementedError(f"l2c_llava answers about images; got a {type(v).__name__}")
        out.append(v.convert("RGB"))
    return out


def _settings_key(gen_kwargs: dict) -> str:
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)


def _cut(text: str, until: Sequence[str]) -> str:
    for u in until:
        text = text.split(u)[0]
    return text


class UntilStrings(StoppingCriteria):
    """Stops a row of a batched ``generate`` once its answer holds one of the ``until`` strings (the
    answer is cut before it afterwards); other rows go on."""

    def __init__(self, tokenizer, until: Sequence[str], n_prompt: int):
        self.tokenizer, self.until, self.n_prompt = tokenizer, list(until), n_prompt

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.n_prompt :], skip_special_tokens=True)
        return torch.tensor([any(u in t for u in self.until) for t in texts], device=input_ids.device)
