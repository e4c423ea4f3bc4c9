"""Stage-1 training examples: (query, positive, hard negative) from short/dense caption pairs.

As in the public LLM2CLIP code (llm_caption_contrastive/dataset/E5_cc3m.py): per pair, the short and
the dense caption in random order; the query carries the instruction of its direction
("{instruction}; !@#$%^&*(){caption}"), the positive and the negative only the separator; the hard
negative is a caption of the same kind as the positive, from another image. General-text pairs
(JSONL ``{"query", "positive", "negative"?, "instruction"?}``) can be mixed in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from l2c_llava.data.readers import CaptionPair, DataError, RowProblem, iter_rows, nonempty_str
from l2c_llava.errors import InputError, MissingFileError


@dataclass(frozen=True)
class Example:
    query: str
    positive: str
    negative: str | None
    instruction: str | None


def caption_examples(
    pairs: Sequence[CaptionPair],
    short_to_long: str,
    long_to_short: str,
    seed: int,
    hard_negatives: bool = True,
) -> list[Example]:
    """One example per pair, direction and negative drawn with `seed` (fixed for the run)."""
    if hard_negatives and len(pairs) < 2:
        raise InputError("hard negatives need at least two caption pairs")
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(pairs):
        j = rng.randrange(len(pairs) - 1) if hard_negatives else -1
        j = j + (j >= i)  # any other pair
        if rng.random() < 0.5:
            out.append(Example(p.short, p.long, pairs[j].long if hard_negatives else None, short_to_long))
        else:
            out.append(Example(p.long, p.short, pairs[j].short if hard_negatives else None, long_to_short))
    return out


def general_text_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """General (query, positive[, negative][, instruction]) pairs, e.g. the E5 data llm2vec trains on.
    Every bad row is reported at once, by line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"general-text file not found: {path}")
    problems, out = [], []
    for label, row, problem in iter_rows(path):
        if problem is None:
            try:
                query, positive = nonempty_str(row, "query"), nonempty_str(row, "positive")
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            problems.append(RowProblem(str(path), label, problem))
            continue
        negative, instruction = row.get("negative"), row.get("instruction")
        out.append(
            Example(
                query,
                positive,
                negative if isinstance(negative, str) and negative.strip() else None,
                instruction if isinstance(instruction, str) and instruction.strip() else None,
            )
        )
        if limit is not None and len(out) >= limit:
            break
    if problems:
        raise DataError(problems, str(path))
    return out


def mix(caption: list[Example], general: list[Example], share: float, seed: int) -> list[Example]:
    """Add general examples so they make up `share` of the whole (as many as available)."""
    if share <= 0 or not general:
        return list(caption)
    want = min(len(general), round(share / (1 - share) * len(caption))) if share < 1 else len(general)
    rng = random.Random(seed + 1)
    return list(caption) + rng.sample(general, want)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
    return order
