"""``l2c stage2 eval``: image <-> text retrieval R@1/5/10 of the baseline CLIP (its own text tower)
and of LLM2CLIP (LLM caption features through the adapter), on a Karpathy-style short-caption set
(several captions per image, as Flickr30k 1K / COCO 5K), a long-caption set (ShareGPT4V-1K,
Urban-1K, DOCCI style) and the embedded data's hard long-caption set (families of images whose
captions share their first 77 CLIP tokens: the baseline's tower reads every member alike, and can pick
the right image for at most one caption of a family). Same images, same protocol, one table; for the
hard set also R@1 within each family, against its chance.

LLM2CLIP's caption features come from the text feature cache (``l2c stage2 cache`` embeds the test
captions too), so the LLM is not loaded here; the cache must have been made by the encoder the model
was trained with. The baseline's text tower truncates at its context (77 tokens for CLIP): the share
of captions it cut is reported beside its numbers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from l2c_llava import layout as L
from l2c_llava.cpu_threads import follow_share
from l2c_llava.data.images import clip_image_processor, load_rgb
from l2c_llava.data.readers import RetrievalSet, read_families, read_karpathy, read_long_captions
from l2c_llava.errors import InputError
from l2c_llava.io import atomic_write_json, atomic_write_text
from l2c_llava.models.reference import resolve_vision_path
from l2c_llava.stage2.cache import TextFeatureCache
from l2c_llava.stage2.clip_baseline import pooled
from l2c_llava.stage2.llm2clip import LLM2CLIP
from l2c_llava.stage2.retrieval import recall_at_k
from l2c_llava.stats import (
    paired_comparison,
    paired_recall_test,
    recall_with_ci,
    retrieval_ranks,
    retrieval_ranks_ties_in_order,
    wilson_interval,
)
from l2c_llava.trackers import report_results

logger = logging.getLogger("l2c_llava.stage2.eval")


def embed_images(
    paths: list[Path], preprocess: Callable, embed: Callable, batch_size: int, desc: str
) -> torch.Tensor:
    """L2-normalised image embeddings, in batches, with a progress bar."""
    from tqdm.auto import tqdm

    out = []
    for lo in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False):
        follow_share()  # under a parallel pipeline: the cores a neighbour left
        images = [load_rgb(p) for p in paths[lo : lo + batch_size]]
        with torch.no_grad():
            out.append(F.normalize(embed(preprocess(images)).float(), dim=-1))
    return torch.cat(out)


class BaselineCLIP:
    """A transformers CLIP folder (OpenAI's, or the demo's from ``l2c clip pretrain``): its own
    tokenizer, image processor and text tower."""

    def __init__(self, folder: str | os.PathLike):
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        folder = Path(resolve_vision_path(str(folder)))
        if not (folder / "config.json").is_file():
            raise InputError(
                f"baseline CLIP {folder}: no config.json (a transformers CLIPModel folder is expected)"
            )
        cfg = AutoConfig.from_pretrained(folder)
        if cfg.model_type != "clip":
            raise InputError(
                f"baseline CLIP {folder} is a {cfg.model_type!r} model; the baseline needs a CLIPModel "
                "folder with its text tower and tokenizer (e.g. openai/clip-vit-large-patch14-336)"
            )
        self.model = CLIPModel.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.context = int(cfg.text_config.max_position_embeddings)
        self.image_size = int(cfg.vision_config.image_size)
        self.folder = folder

    def preprocess(self, images) -> torch.Tensor:
        return clip_image_processor(self.image_size)(images=images, return_tensors="pt")["pixel_values"]

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return pooled(self.model.get_image_features(pixel_values=pixels))

    def embed_texts(self, texts: list[str], batch_size: int) -> tuple[torch.Tensor, float]:
        """Normalised text embeddings and the share of captions longer than the context."""
        out, cut = [], 0
        for lo in range(0, len(texts), batch_size):
            chunk = texts[lo : lo + batch_size]
            cut += sum(len(ids) > self.context for ids in self.tokenizer(chunk)["input_ids"])
            tok = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.context, return_tensors="pt"
            )
            with torch.no_grad():
                out.append(F.normalize(pooled(self.model.get_text_features(**tok)).float(), dim=-1))
        return torch.cat(out), cut / max(1, len(texts))


def load_sets(cfg) -> dict[str, RetrievalSet]:
    d = cfg.data
    sets = {}
    if d.eval_short:
        sets["short"] = read_karpathy(
            d.eval_short, d.eval_image_root, split=d.eval_split, image_check="exists"
        )
    if d.eval_long:
        sets["long"] = read_long_captions(d.eval_long, d.eval_image_root, image_check="exists")
    if d.eval_long_hard:
        sets["long_hard"] = read_long_captions(d.eval_long_hard, d.eval_image_root, image_check="exists")
    if not sets:
        raise InputError(
            "no retrieval test set: set data.eval_short, data.eval_long and/or data.eval_long_hard"
        )
    return sets


def _ranked(img: torch.Tensor, txt: torch.Tensor, owner: list[int], ks, families: bool) -> tuple:
    """(i2t, t2i) ranks and R@K. A set of caption families (the hard set) breaks ties by position: a tower
    that reads a family alike ties its captions, and ties counted for the query (the other sets' rule)
    would let every image of a family find its caption first."""
    if not families:
        return retrieval_ranks(img, txt, owner), recall_at_k(img, txt, owner, ks)
    ranks = retrieval_ranks_ties_in_order(img, txt, owner)
    return ranks, {
        f"{d}_R@{k}": float((r < k).float().mean()) for k in ks for d, r in zip(("i2t", "t2i"), ranks)
    }


def caption_families(rs: RetrievalSet, path) -> list[int] | None:
    """The family of each caption of `rs` (an index), from the set's "family" keys; None when it has none."""
    families = read_families(path)
    names = [families.get(rs.image_ids[i]) for i in rs.caption_image]
    if not any(names):
        return None
    index: dict[str, int] = {}
    return [
        index.setdefault(n if n is not None else f"image {i}", len(index))
        for n, i in zip(names, rs.caption_image)
    ]


def within_family(img: torch.Tensor, txt: torch.Tensor, owner: list[int], family: list[int]) -> dict:
    """Text->image R@1 among the images of each caption's family (one caption per image): a caption is
    right when its image scores strictly above the other members'. A tower that reads a family's captions
    alike ranks the family's images the same way for all of them, so it gets at most one right per family
    (R@1 <= 1/k for families of k); ``chance`` is the mean 1/k. Also the text features' mean cosine
    between members (and, for scale, between captions of different families) and the share of families
    whose members' features are the same (cosine > 1 - 1e-6)."""
    members: dict[int, list[int]] = {}
    for j, f in enumerate(family):
        members.setdefault(f, []).append(j)
    own = torch.as_tensor(owner)
    hits, chance, cosines, alike = [], [], [], 0
    for caps in members.values():
        imgs = own[caps]
        sim = txt[caps] @ img[imgs].T  # caption x its family's images (in caption order: one image each)
        mine = sim.diagonal()
        hits += (sim > mine.unsqueeze(1)).sum(dim=1).eq(0).tolist()
        chance += [1 / len(caps)] * len(caps)
        if len(caps) > 1:
            cos = txt[caps] @ txt[caps].T
            off = cos[~torch.eye(len(caps), dtype=torch.bool)]
            cosines.append(off.mean().item())
            alike += bool(off.min() > 1 - 1e-6)
    k = sum(hits)
    fam = torch.as_tensor(family)
    between = (txt @ txt.T)[fam.unsqueeze(0) != fam.unsqueeze(1)]
    return {
        "hits": hits,
        "t2i_within_family_R@1": round(k / len(hits), 4),
        "ci95": [round(x, 4) for x in wilson_interval(k, len(hits))],
        "chance": round(sum(chance) / len(chance), 4),
        "families": len(members),
        "text_cosine_within_family": round(sum(cosines) / max(1, len(cosines)), 6),
        "text_cosine_between_families": round(between.mean().item(), 6) if between.numel() else None,
        "text_identical_families": round(alike / max(1, len(cosines)), 4),
    }


def evaluate(
    cfg,
    model_dir: str | os.PathLike | None = None,
    baseline: str | os.PathLike | None = None,
    skip_baseline: bool = False,
) -> dict:
    """Both models on every configured set; writes metrics.json and retrieval.md in the run folder."""
    run_dir = Path(cfg.run.output_dir)
    ks = tuple(cfg.eval.recall_at)
    bs = cfg.eval.batch_size
    sets = load_sets(cfg)
    model = LLM2CLIP.from_pretrained(model_dir or run_dir)
    results: dict = {"sets": {}, "llm2clip": {}, "baseline": {}, "models": {"llm2clip": model.source}}
    ranks: dict[str, dict] = {"llm2clip": {}, "baseline": {}}
    families: dict[str, list[int]] = {}  # the hard set's family of each caption, when its rows carry one
    if "long_hard" in sets:
        found = caption_families(sets["long_hard"], cfg.data.eval_long_hard)
        if found is not None:
            families["long_hard"] = found
    within: dict[str, dict] = {}
    for name, rs in sets.items():
        cache = TextFeatureCache(Path(cfg.cache.dir) / f"eval_{name}")
        want = model.text_encoder_ref.get("digest")
        if want and cache.encoder_digest != want:
            raise InputError(
                f"{cache.folder} was made by another text encoder than the one {model.source} was trained "
                "with; rebuild it: l2c stage2 cache --config ..."
            )
        if cache.dim != model.text_dim:
            raise InputError(
                f"{cache.folder} holds {cache.dim}-d features; the adapter of {model.source} takes "
                f"{model.text_dim}-d ones. Rebuild the cache with the model's text encoder"
            )
        rows = cache.rows_of(rs.captions, where=f"{rs.source} ({name} set)")
        txt = F.normalize(model.get_text_features_from_llm(cache.features(rows.tolist())).float(), dim=-1)
        img = embed_images(
            rs.images, model.preprocess, model.get_image_features, bs, f"LLM2CLIP images ({name})"
        )
        ranks["llm2clip"][name], results["llm2clip"][name] = _ranked(
            img, txt, rs.caption_image, ks, name in families
        )
        results["sets"][name] = {"source": rs.source, "images": len(rs.images), "captions": len(rs.captions)}
        if name in families:
            within.setdefault(name, {})["llm2clip"] = within_family(
                img, txt, rs.caption_image, families[name]
            )
            window = cache.folder / L.CACHE_LLM_WINDOW
            if window.is_file():  # what the LLM's window kept of the captions (`l2c stage2 cache`)
                results["sets"][name]["llm_window"] = json.loads(window.read_text())
    if not skip_baseline:
        folder = baseline or cfg.eval.baseline or cfg.vision.name_or_path
        clip = BaselineCLIP(folder)
        results["models"]["baseline"] = str(folder)
        for name, rs in sets.items():
            txt, cut = clip.embed_texts(rs.captions, bs)
            img = embed_images(rs.images, clip.preprocess, clip.embed_images, bs, f"baseline images ({name})")
            ranks["baseline"][name], found = _ranked(img, txt, rs.caption_image, ks, name in families)
            results["baseline"][name] = found | {"captions_truncated": cut}
            if name in families:
                within[name]["baseline"] = within_family(img, txt, rs.caption_image, families[name])
    # uncertainty: a 95% bootstrap interval over images for every R@K, and LLM2CLIP against the
    # baseline on the same images by paired bootstrap
    results["intervals"] = {
        enc: {
            name: {m: v["ci95"] for m, v in recall_with_ci(*r, sets[name].caption_image, ks).items()}
            for name, r in by_set.items()
        }
        for enc, by_set in ranks.items()
        if by_set
    }
    if not skip_baseline:
        results["paired"] = {
            name: paired_recall_test(ranks["llm2clip"][name], ranks["baseline"][name], rs.caption_image, ks)
            for name, rs in sets.items()
        }
    # the hard set, within each family: both encoders against chance, and McNemar's test on the captions
    # only one of them gets right
    for name, by_enc in within.items():
        results["sets"][name] |= {
            "families": by_enc["llm2clip"]["families"],
            "within_family_chance": by_enc["llm2clip"]["chance"],
        }
        for enc, w in by_enc.items():
            results[enc][name] |= {
                k: w[k]
                for k in (
                    "t2i_within_family_R@1",
                    "text_cosine_within_family",
                    "text_cosine_between_families",
                    "text_identical_families",
                )
            }
            results["intervals"][enc][name]["t2i_within_family_R@1"] = w["ci95"]
        if "baseline" in by_enc:
            results.setdefault("paired_within_family", {})[name] = paired_comparison(
                by_enc["llm2clip"]["hits"], by_enc["baseline"]["hits"]
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / L.RUN_METRICS, results)
    atomic_write_text(run_dir / L.RETRIEVAL_TABLE, table(results, ks))
    report_results(cfg, run_dir, {enc: results[enc] for enc in ("llm2clip", "baseline")})  # train.report_to
    return results


def table(results: dict, ks=(1, 5, 10)) -> str:
    """Markdown: one row per set and direction, R@K of the baseline and LLM2CLIP with their 95%
    intervals, and the difference with its paired-bootstrap p-value."""
    cols = [f"R@{k}" for k in ks]
    has_base = bool(results.get("baseline"))
    head = ["set", "direction", "model", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, info in results["sets"].items():
        for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
            rows = [("LLM2CLIP", "llm2clip", results["llm2clip"][name])]
            if has_base:
                rows.insert(0, ("baseline CLIP", "baseline", results["baseline"][name]))
            for model, enc, m in rows:
                ci = results.get("intervals", {}).get(enc, {}).get(name, {})
                vals = [
                    f"{100 * m[f'{direction}_R@{k}']:.1f}"
                    + (
                        f" [{100 * ci[f'{direction}_R@{k}'][0]:.1f}-{100 * ci[f'{direction}_R@{k}'][1]:.1f}]"
                        if f"{direction}_R@{k}" in ci
                        else ""
                    )
                    for k in ks
                ]
                lines.append(
                    f"| {name} ({info['images']} img, {info['captions']} capt) | {label} | {model} | "
                    + " | ".join(vals)
                    + " |"
                )
            if has_base:
                b, l2 = results["baseline"][name], results["llm2clip"][name]
                paired = results.get("paired", {}).get(name, {})
                vals = [
                    f"{100 * (l2[f'{direction}_R@{k}'] - b[f'{direction}_R@{k}']):+.1f}"
                    + (
                        f" (p {paired[f'{direction}_R@{k}']['p_value']:.2g})"
                        if f"{direction}_R@{k}" in paired
                        else ""
                    )
                    for k in ks
                ]
                lines.append("| | | difference (paired bootstrap p) | " + " | ".join(vals) + " |")
    notes = [
        f"- baseline captions cut at its text context: {name} {100 * m['captions_truncated']:.0f}%"
        for name, m in results.get("baseline", {}).items()
    ]
    for name, info in results["sets"].items():
        if "within_family_chance" not in info:
            continue
        ci = results.get("intervals", {})
        parts = [
            f"{model} {100 * results[enc][name]['t2i_within_family_R@1']:.1f}"
            f"{_ci(ci.get(enc, {}).get(name, {}).get('t2i_within_family_R@1'))}"
            for model, enc in (("baseline CLIP", "baseline"), ("LLM2CLIP", "llm2clip"))
            if name in results.get(enc, {})
        ]
        paired = results.get("paired_within_family", {}).get(name)
        notes.append(
            f"- {name}: text->image R@1 within each of its {info['families']} families (chance "
            f"{100 * info['within_family_chance']:.1f}): "
            + ", ".join(parts)
            + (f"; McNemar p {paired['p_value']:.2g}" if paired else "")
        )
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _ci(bounds) -> str:
    return f" [{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f}]" if bounds else ""


def evaluate_clip_folder(
    folder: str | os.PathLike,
    data: str | os.PathLike,
    split: str = "test",
    max_images: int | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    batch_size: int = 64,
) -> dict:
    """Held-out retrieval of a CLIP folder (its own text tower) on a dataset in the embedded layout:
    the Karpathy short captions of `split` and the long-caption test set, each R@K with its 95%
    bootstrap interval over images, and the hard long-caption set where the dataset has one. `max_images`
    keeps the first images of each set (a fixed subset)."""
    root = Path(data)
    clip = BaselineCLIP(folder)
    sets = {
        "short": read_karpathy(root / L.RETRIEVAL_SHORT, root / L.IMAGES, split=split, image_check="exists"),
        "long": read_long_captions(root / L.RETRIEVAL_LONG, root / L.IMAGES, image_check="exists"),
    }
    if (root / L.RETRIEVAL_LONG_HARD).is_file():  # datasets written before it lack it
        sets["long_hard"] = read_long_captions(
            root / L.RETRIEVAL_LONG_HARD, root / L.IMAGES, image_check="exists"
        )
    out: dict = {"model": str(folder), "data": str(root), "sets": {}}
    for name, rs in sets.items():
        n = min(len(rs.images), max_images or len(rs.images))
        keep = [j for j, i in enumerate(rs.caption_image) if i < n]
        captions, owner = [rs.captions[j] for j in keep], [rs.caption_image[j] for j in keep]
        txt, cut = clip.embed_texts(captions, batch_size)
        img = embed_images(rs.images[:n], clip.preprocess, clip.embed_images, batch_size, f"images ({name})")
        out["sets"][name] = {
            "images": n,
            "captions": len(captions),
            "captions_truncated": round(cut, 4),
            **recall_with_ci(*_ranked(img, txt, owner, ks, name == "long_hard")[0], owner, ks),
        }
        family = caption_families(rs, root / L.RETRIEVAL_LONG_HARD) if name == "long_hard" else None
        if family is not None:  # R@1 within each family against its chance, as `l2c stage2 eval` gives it
            w = within_family(img, txt, owner, [family[j] for j in keep])
            out["sets"][name]["t2i_within_family_R@1"] = {
                "value": w["t2i_within_family_R@1"],
                "ci95": w["ci95"],
            }
            out["sets"][name] |= {k: w[k] for k in ("chance", "families", "text_identical_families")}
    return out
