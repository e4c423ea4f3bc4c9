"""LLaVA training data: LCS-558K / mix665k-style JSON rows, tokenized lazily (a row becomes tokens
when the loader asks for it), images padded to square with the mean colour (LLaVA's "pad") and
preprocessed by the model's processor (``l2c_llava.data.images.preprocess_images``, every stage's pixels);
batches grouped by length with image and text-only rows kept apart (LLaVA's group_by_modality_length);
with ``data.packing`` a micro-batch's samples are packed into rows without padding (:class:`PackedCollate`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from l2c_llava.data.images import load_rgb, preprocess_images
from l2c_llava.data.readers import LlavaRow
from l2c_llava.mllm.conversation import IGNORE, encode


def row_length(row: LlavaRow, image_tokens: int) -> int:
    """LLaVA's length estimate for grouping: words of the conversation, plus the image tokens;
    negative for text-only rows (its modality_lengths convention)."""
    words = sum(len(t["value"].split()) for t in row.conversations)
    return words + image_tokens if row.has_image else -words


class LlavaDataset(Dataset):
    def __init__(
        self,
        rows: Sequence[LlavaRow],
        processor,
        template: str,
        max_length: int,
        num_image_tokens: int,
        image_token_id: int,
        aspect: str = "pad",
    ):
        self.rows, self.processor, self.template = list(rows), processor, template
        self.max_length, self.num_image_tokens, self.image_token_id, self.aspect = (
            max_length,
            num_image_tokens,
            image_token_id,
            aspect,
        )
        self.lengths = [row_length(r, num_image_tokens) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        enc = encode(
            row.conversations,
            self.processor.tokenizer,
            self.template,
            has_image=row.has_image,
            image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens,
            max_length=self.max_length,
        )
        item = {"input_ids": enc.input_ids, "labels": enc.labels, "row": row.row}
        if row.has_image:
            img = load_rgb(row.image_path, name=f"{row.image} ({row.row})")
            item["pixel_values"] = preprocess_images([img], self.processor.image_processor, self.aspect)[0]
        return item


class Collate:
    """Right-pad ids (pad token) and labels (-100); stack the images of the rows that have one."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        images = [b["pixel_values"] for b in batch if "pixel_values" in b]
        if images:
            out["pixel_values"] = torch.stack(images)
        return out


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """The samples of `lengths` placed into as few rows of at most `capacity` tokens as it finds, the
    rows kept even (the longest row sets the batch's width): longest sample first, each into the
    least-filled row it fits in, with one more row whenever a sample fits in none. A sample longer
    than `capacity` gets a row of its own. Each row lists its samples' indices, longest first."""
    order = sorted(range(len(lengths)), key=lambda j: (-lengths[j], j))
    alone = [[i] for i in order if lengths[i] > capacity]
    rest = [i for i in order if lengths[i] <= capacity]
    n_rows = max(1, -(-sum(lengths[i] for i in rest) // capacity)) if rest else 0
    while rest:
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        filled = [0] * n_rows
        for i in rest:
            fits = [r for r in range(n_rows) if filled[r] + lengths[i] <= capacity]
            if not fits:
                break
            r = min(fits, key=lambda r: (filled[r], r))
            rows[r].append(i)
            filled[r] += lengths[i]
        else:
            return alone + rows
        n_rows += 1
    return alone


class PackedCollate:
    """Padding-free batches: a micro-batch's samples packed end to end into as few, even rows of at
    most `capacity` tokens as :func:`pack_rows` finds (by default the longest sample's length: the
    padded batch's width, its rows filled with the other samples instead of padding, so no row's
    attention is wider than padding would have made it; the positions computed fall from
    ``batch x longest`` to about the real tokens), with no attention mask and each sample's
    ``position_ids`` starting again at 0. transformers reads the packing from the positions and keeps
    attention inside each sample (sdpa, eager and flash-attention; the forward needs
    ``use_cache=False``, or the cache turns the detection off). The first label of each sample is
    ignored, so no token is predicted across a boundary (in a padded batch that label is never
    used either), and the images are stacked in the order their ``<image>`` tokens come in the rows,
    the order LLaVA fills them in. The loss over a micro-batch (the mean over its supervised tokens)
    is the padded batch's; ``num_tokens`` counts the real tokens (for the throughput log; it is not a
    model input). A row's tail after its last sample, if shorter than the longest row, is padding with
    positions of its own, and carries no label."""

    def __init__(self, pad_id: int, capacity: int | None = None):
        self.pad_id, self.capacity = pad_id, capacity

    def __call__(self, batch: list[dict]) -> dict:
        lengths = [len(b["input_ids"]) for b in batch]
        rows = pack_rows(lengths, self.capacity or max(lengths))
        n = max(sum(lengths[i] for i in r) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), n), dtype=torch.long)
        images = []
        for r, members in enumerate(rows):
            at = 0
            for i in members:
                k, b = lengths[i], batch[i]
                ids[r, at : at + k] = torch.tensor(b["input_ids"])
                labels[r, at + 1 : at + k] = torch.tensor(b["labels"][1:], dtype=torch.long)
                positions[r, at : at + k] = torch.arange(k)
                if "pixel_values" in b:
                    images.append(b["pixel_values"])
                at += k
            positions[r, at:] = torch.arange(n - at)
        out = {
            "input_ids": ids,
            "labels": labels,
            "position_ids": positions,
            "num_tokens": torch.tensor(sum(lengths)),
        }
        if images:
            out["pixel_values"] = torch.stack(images)
        return out


class ModalityLengthSampler(Sampler[int]):
    """LLaVA's group_by_modality_length: image rows and text-only rows are shuffled apart, cut into
    mega-batches of `batch x world` sorted by length (so a batch holds rows of similar length and a
    single modality), and the mega-batches are shuffled; the last incomplete ones are merged. The
    order depends on (seed, epoch) only."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world: int = 1, seed: int = 0):
        self.lengths, self.batch_size, self.world, self.seed, self.epoch = (
            list(lengths),
            batch_size,
            world,
            seed,
            0,
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(f"{self.seed}-{self.epoch}")
        image = [i for i, n in enumerate(self.lengths) if n > 0]
        text = [i for i, n in enumerate(self.lengths) if n <= 0]
        mega = self.batch_size * self.world
        batches, rests = [], []
        for group in (image, text):
            rng.shuffle(group)
            chunks = [group[i : i + mega] for i in range(0, len(group), mega)]
            for c in chunks:
                c.sort(key=lambda i: -abs(self.lengths[i]))
            if chunks and len(chunks[-1]) < mega:
                rests += chunks.pop()
            batches += chunks
        rng.shuffle(batches)
        if rests:
            batches.append(rests)
        return iter([i for b in batches for i in b])


def padding_waste(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> float:
    """Share of padded positions when `order` is cut into batches (for the benchmark and tests)."""
    total = padded = 0
    for lo in range(0, len(order), batch_size):
        ls = [abs(lengths[i]) for i in order[lo : lo + batch_size]]
        total += max(ls) * len(ls)
        padded += max(ls) * len(ls) - sum(ls)
    return padded / max(1, total)
