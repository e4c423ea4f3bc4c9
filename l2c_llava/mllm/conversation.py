"""LLaVA-1.5 conversation templates and the exact label masks of its training.

``plain`` (pretrain): ``<image>`` + caption + ``\\n``; loss on the caption and the newline only.
``vicuna_v1`` (finetune): ``{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:
{a2}</s>...``; loss on each answer (with the space before it, which the model generates after the
prompt's "ASSISTANT:") and its ``</s>``; -100 on the system prompt, the user turns, the role words,
the image tokens and padding. ``</s>`` is the LLM's own end-of-sequence token (Vicuna's
is ``</s>``; the demo's SmolLM2 uses ``<|im_end|>``).

The whole text is tokenized at once (the same tokens a prompt gets at inference) and a token is
supervised when its characters overlap an answer span (fast tokenizers' offset mapping), so the
masks need none of the length arithmetic of the original code. As in LLaVA, ``<image>`` moves to
the start of the first human turn followed by a newline.
"""

from __future__ import annotations

from dataclasses import dataclass

from l2c_llava.errors import InputError
from l2c_llava.losses import IGNORE_INDEX

IMAGE_TOKEN = "<image>"
IGNORE = IGNORE_INDEX  # a label the loss skips (l2c_llava.losses)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("plain", "vicuna_v1")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    text: str

    @property
    def supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def normalize_turns(conversations: list[dict], has_image: bool) -> list[tuple[str, str]]:
    """[(role, text)] with roles 'human'/'gpt' alternating from a human turn, and `<image>` moved to
    the start of the first human turn (removed from every other place)."""
    turns = []
    for i, turn in enumerate(conversations):
        role, value = turn.get("from"), turn.get("value")
        want = "human" if i % 2 == 0 else "gpt"
        if role != want:
            raise InputError(
                f"turn {i} is from {role!r}; turns must alternate human, gpt, ... from a human turn"
            )
        turns.append((role, value.replace(IMAGE_TOKEN, "").strip()))  # a text-only row has no image to place
    if not turns or turns[-1][0] != "gpt":
        raise InputError("a conversation must end with a gpt turn")
    if has_image:
        turns[0] = ("human", f"{IMAGE_TOKEN}\n{turns[0][1]}")
    return turns


def render(turns: list[tuple[str, str]], template: str, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """The training text and the character spans that carry the loss."""
    spans: list[tuple[int, int]] = []
    if template == "plain":
        # LLaVA's plain template: the image, then the (first) answer, then the separator "\n"
        prefix = IMAGE_TOKEN if turns[0][1].startswith(IMAGE_TOKEN) else ""
        text = prefix
        answer = turns[1][1] + "\n"
        spans.append((len(text), len(text) + len(answer)))
        return text + answer, spans
    if template != "vicuna_v1":
        raise InputError(f"unknown template {template!r} (one of: {', '.join(TEMPLATES)})")
    text = VICUNA_SYSTEM + " "
    for i in range(0, len(turns), 2):
        text += f"USER: {turns[i][1]} ASSISTANT:"
        answer = " " + turns[i + 1][1] + eos
        # the space after "ASSISTANT:" belongs to the answer: the inference prompt ends at the colon, so
        # the model generates it. Tokenizers that split digits (SmolLM2, Llama) give " 3" as a lone
        # space token then "3"; left unsupervised, a numeric answer could never be produced.
        spans.append((len(text), len(text) + len(answer)))
        text += answer
    return text, spans


def prompt(question: str, template: str, has_image: bool) -> str:
    """The inference prompt of one user turn (the model continues after it)."""
    q = f"{IMAGE_TOKEN}\n{question.replace(IMAGE_TOKEN, '').strip()}" if has_image else question.strip()
    if template == "plain":
        return IMAGE_TOKEN if has_image else ""
    return f"{VICUNA_SYSTEM} USER: {q} ASSISTANT:"


def encode(
    conversations: list[dict],
    tokenizer,
    template: str,
    *,
    has_image: bool,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
) -> Encoded:
    """Token ids and labels of one row: `<image>` expanded to `num_image_tokens` copies of
    `image_token_id` (all -100), truncated at `max_length` (never inside the image tokens)."""
    turns = normalize_turns(conversations, has_image)
    text, spans = render(turns, template, tokenizer.eos_token or "")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, labels = [], []
    for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tok == image_token_id:
            ids += [image_token_id] * num_image_tokens
            labels += [IGNORE] * num_image_tokens
            continue
        # supervised when the token overlaps an answer: byte-level BPE merges the space before an
        # answer into its first token ("ASSISTANT: red" -> ":", " red"), whose offsets start at the space
        inside = end > start and any(start < hi and end > lo for lo, hi in spans)
        ids.append(tok)
        labels.append(tok if inside else IGNORE)
    if has_image and ids.count(image_token_id) != num_image_tokens:
        raise InputError(f"{IMAGE_TOKEN} did not become one token; add it to the tokenizer first")
    if len(ids) > max_length:
        first = ids.index(image_token_id) if has_image else 0
        if has_image and first + num_image_tokens > max_length:
            raise InputError(f"max_length {max_length} cuts into the {num_image_tokens} image tokens")
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, text)
