"""Stage-2 recipe: fine-tune a CLIP vision tower against the frozen LLM's cached caption features.

1. open the text feature cache (built by ``l2c stage2 cache``; the LLM is never loaded here) and
   check that it holds every caption of the training data;
2. build the model: the CLIP vision tower + a new projection, the adapter on the LLM feature, a
   learnable logit scale (init 1/0.07);
3. train with the CLIP loss (features gathered across processes with gradient, local loss), per
   sample the dense caption with probability ``dense_share`` else the short one; AdamW with
   layer-wise lr decay on the vision blocks, no weight decay on norms, biases and the logit scale,
   cosine schedule, gradient clipping, logit scale clamped to [0, ln 100] after each step;
4. checkpoints (trainable weights, optimizer, scheduler, RNG, step) atomically every ``save_every``
   steps; a re-run resumes from the last one; the trained model is saved as safetensors.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset

from l2c_llava import layout as L
from l2c_llava.config import Stage2Config
from l2c_llava.data.images import TrainTransform, load_rgb
from l2c_llava.data.readers import read_caption_pairs
from l2c_llava.data.webdataset import expand_shards, iter_samples, sample_id
from l2c_llava.errors import InputError
from l2c_llava.io import atomic_save, atomic_write_json, run_lock
from l2c_llava.models.vision import load_vision_tower
from l2c_llava.stage2.cache import WEBDATASET_ROWS, TextFeatureCache
from l2c_llava.stage2.contrastive import ContrastiveRecipe
from l2c_llava.stage2.model import LLM2CLIPModel
from l2c_llava.train.sharded import clamp_scale

logger = logging.getLogger("l2c_llava.stage2")


def pick_dense(seed: int, epoch: int, sample: int | str, share: float) -> bool:
    """Per sample and epoch, the dense caption with probability `share` (reproducible across runs,
    workers and processes: seeded by the sample's id, never by Python's salted hash)."""
    return random.Random(f"{seed}-{epoch}-{sample}").random() < share


def sample_rng(seed: int, epoch: int, sample: int | str) -> random.Random:
    """The augmentation RNG of one sample in one epoch (same crop whichever worker draws it)."""
    return random.Random(f"{seed}-{epoch}-{sample}-crop")


class PairImages(Dataset):
    """JSONL caption pairs: (pixel_values, cache row of the chosen caption). A row with several short
    captions (a list, as COCO's five) gives one of them, drawn per visit, when the dense one is not
    chosen."""

    def __init__(
        self,
        pairs,
        rows_short: Sequence[Sequence[int]],
        rows_long: torch.Tensor,
        transform,
        seed: int,
        share: float,
    ):
        self.pairs, self.rows_short, self.rows_long = pairs, rows_short, rows_long
        self.transform, self.seed, self.share, self.epoch = transform, seed, share, 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        p = self.pairs[i]
        dense = pick_dense(self.seed, self.epoch, i, self.share)
        img = load_rgb(p.image_path, name=f"{p.image} ({p.row})")
        self.transform.rng = sample_rng(self.seed, self.epoch, i)
        if dense:
            return self.transform(img), int(self.rows_long[i])
        shorts = self.rows_short[i]
        pick = (
            random.Random(f"{self.seed}-{self.epoch}-{i}-short").randrange(len(shorts))
            if len(shorts) > 1
            else 0
        )
        return self.transform(img), int(shorts[pick])


class ShardImages(IterableDataset):
    """Webdataset shards streamed; each worker and process reads its own shards."""

    def __init__(
        self,
        shards: list[str],
        cache: TextFeatureCache,
        transform,
        seed: int,
        share: float,
        rank: int = 0,
        world: int = 1,
        on_bad_row: str = "error",
    ):
        self.shards, self.cache, self.transform = shards, cache, transform
        bad = cache.folder / "bad_samples.json"
        self.bad = set(json.loads(bad.read_text())) if bad.is_file() else set()
        self.seed, self.share, self.rank, self.world, self.on_bad_row, self.epoch = (
            seed,
            share,
            rank,
            world,
            on_bad_row,
            0,
        )

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        mine = self.shards[self.rank * n_workers + worker :: self.world * n_workers]
        for s in iter_samples(mine, on_bad_row=self.on_bad_row, skipped=[]):
            sample = sample_id(s.shard, s.key)
            if sample in self.bad:  # found by the scan of `l2c stage2 cache` (on_bad_row=skip)
                continue
            dense = pick_dense(self.seed, self.epoch, sample, self.share)
            row = self.cache.rows_of([s.long if dense else s.short], where=f"{s.shard} sample {s.key}")[0]
            self.transform.rng = sample_rng(self.seed, self.epoch, sample)
            yield self.transform(load_rgb(s.image, name=f"{s.shard}/{s.key}")), int(row)


def param_groups(
    model: LLM2CLIPModel, lr: float, weight_decay: float, layer_decay: float, adapter_lr: float | None = None
) -> list[dict]:
    """AdamW groups: vision block i gets lr x decay^(L+1-i) (embeddings i=0, projection L+1), the
    adapter and the logit scale the full lr (or ``adapter_lr``); no weight decay on 1-D parameters
    (norms, biases) nor on the logit scale."""
    n_layers = len(model.vision_model.encoder.layers)
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("vision_model."):
            if ".encoder.layers." in name:
                depth = int(name.split(".encoder.layers.")[1].split(".")[0]) + 1
            elif ".embeddings." in name or ".pre_layrnorm." in name:
                depth = 0
            else:
                depth = n_layers + 1
            scale = layer_decay ** (n_layers + 1 - depth)
        else:
            scale = (adapter_lr or lr) / lr
        wd = 0.0 if (p.ndim < 2 or name == "logit_scale") else weight_decay
        groups.setdefault((scale, wd), []).append(p)
    return [
        {"params": ps, "lr": lr * scale, "lr_scale": scale, "weight_decay": wd}
        for (scale, wd), ps in groups.items()
    ]


class Stage2Recipe(ContrastiveRecipe):
    name = "stage 2"

    def build_data(self, acc):
        self.cache = TextFeatureCache(Path(self.cfg.cache.dir) / "train")
        d, rank, world = self.cfg.data, acc.process_index, acc.num_processes
        transform = TrainTransform(
            self.cfg.vision.image_size, tuple(d.rrc_scale), rng=random.Random(self.cfg.run.seed + rank)
        )
        if d.format == "webdataset":
            if d.max_train_rows is not None:
                raise InputError(WEBDATASET_ROWS)
            ds = ShardImages(
                expand_shards(d.train),
                self.cache,
                transform,
                self.cfg.run.seed,
                d.dense_share,
                rank,
                world,
                d.on_bad_row,
            )
            return ds, None
        pairs = read_caption_pairs(
            d.train,
            d.image_root,
            short_key=d.short_key,
            long_key=d.long_key,
            on_bad_row=d.on_bad_row,
            image_check=d.image_check,
            max_rows=d.max_train_rows,
        )
        flat = self.cache.rows_of([c for p in pairs for c in p.shorts], where=d.train).tolist()
        ends = list(itertools.accumulate(len(p.shorts) for p in pairs))
        rows_short = [flat[end - len(p.shorts) : end] for p, end in zip(pairs, ends)]
        rows_long = self.cache.rows_of([p.long for p in pairs], where=d.train)
        ds = PairImages(pairs.items, rows_short, rows_long, transform, self.cfg.run.seed, d.dense_share)
        return ds, len(ds)

    def build_model(self, acc) -> LLM2CLIPModel:
        cfg = self.cfg
        vision = load_vision_tower(cfg.vision.name_or_path, cfg.vision.attn_implementation)
        model = LLM2CLIPModel.from_vision_tower(
            vision,
            self.cache.dim,
            projection_dim=cfg.adapter.projection_dim,
            num_blocks=cfg.adapter.num_blocks,
            expansion=cfg.adapter.expansion,
            logit_scale_init=cfg.logit_scale.init,
            center_text=cfg.adapter.center_features,
        )
        if cfg.adapter.center_features:
            model.text_adapter.feature_mean.copy_(self.cache.mean_feature())
        model.logit_scale.requires_grad_(cfg.logit_scale.learnable)
        model.max_logit_scale = cfg.logit_scale.max
        self._freeze(model)
        if cfg.vision.gradient_checkpointing:
            model.vision_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        return model

    def param_groups(self, model):
        t = self.cfg.train
        return param_groups(model, t.lr, t.weight_decay, self.cfg.vision.layer_decay, t.adapter_lr)

    def embed(self, wrapped, batch, acc):
        pixels, rows = batch
        text = self.cache.features(rows.tolist()).to(acc.device)
        return wrapped(pixels.to(acc.device), text)

    def after_step(self, acc, model) -> float:
        return clamp_scale(acc, model.logit_scale, self.cfg.logit_scale.max)

    def _freeze(self, model: LLM2CLIPModel) -> None:
        v = self.cfg.vision
        if v.trainable == "none":
            model.vision_model.requires_grad_(False)
        elif v.trainable == "last_n":
            model.vision_model.requires_grad_(False)
            for block in model.vision_model.encoder.layers[-v.trainable_last_n :]:
                block.requires_grad_(True)
            model.vision_model.post_layernorm.requires_grad_(True)

    def save_model(self, model: LLM2CLIPModel) -> Path:
        from safetensors.torch import save_file

        out = self.run_dir / L.TRAINED_MODEL
        out.mkdir(parents=True, exist_ok=True)
        state = self._state(model)
        atomic_save(out / L.STAGE2_WEIGHTS, lambda tmp: save_file(state, str(tmp)))  # whole or absent
        atomic_write_json(
            out / "llm2clip_config.json",
            {
                "vision_config": model.vision_model.config.to_dict(),
                "text_dim": self.cache.dim,
                "projection_dim": self.cfg.adapter.projection_dim,
                "num_blocks": self.cfg.adapter.num_blocks,
                "expansion": self.cfg.adapter.expansion,
                "text_encoder": self.cfg.text_encoder.path,
                "text_encoder_digest": self.cache.encoder_digest,
                # the dtype the cached features were computed in: queries are encoded in it too (a bf16-trained
                # adapter fed float32 features lost 3.5 points of long R@1 on the demo, bench/RESULTS.md)
                "text_encoder_dtype": self.cache.manifest.get("compute_dtype", "auto"),
                "instruction": self.cfg.text_encoder.instruction,
            },
        )
        return out


def run_stage2(cfg: Stage2Config, source: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    with run_lock(cfg.run.output_dir, "stage-2 run"):  # one writer per run folder
        return Stage2Recipe(cfg, source, overrides).run()
