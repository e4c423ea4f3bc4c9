"""The embedded dataset: procedural scenes written in the real formats every stage reads.

``l2c data synth --out DIR --images N --seed S`` writes::

    DIR/
      images/00000/000000000.jpg ...        image_root for every file below
      captions/{train,val,test}.jsonl       caption pairs {"image", "short", "long", "alternatives"}  (stages 1, 2)
      retrieval/karpathy.json               Karpathy-style, 5 captions per image, all splits (COCO/Flickr)
      retrieval/long_test.json              long-caption test set, ShareGPT4V-1K style (one dense caption)
      retrieval/long_hard.json              hard long-caption set, same style: families of 3 test scenes whose
                                            captions share their first 77 CLIP tokens (a "family" key per row)
      images/hard/000000012_1.jpg ...       the hard set's redrawn members (member 0 is the test image itself)
      llava/pretrain.json                   blip_laion_cc_sbu_558k.json-style rows (train split)
      llava/instruct.json                   llava_v1_5_mix665k.json-style rows (train split, some text-only)
      eval/vqa_{val,test}.jsonl             short-answer VQA (color, count, shape, position, existence)
      eval/pope_test.jsonl                  POPE-style yes/no, categories random / popular / adversarial
      scenes.jsonl                          ground truth scene graph per image
      SHA256SUMS                            size-checked, `sha256sum -c` list of every file above
      manifest.json                         options, counts, statistics, content digest

Same options, same bytes: every random choice comes from a generator seeded by (seed, image index).
One writer per folder (the run lock, ``DIR/.l2c.lock``); the folder is built in a hidden sibling
(``.DIR.l2c-tmp-PID-HOST-*``) and renamed into place when complete. A rerun with the same options does
nothing only when every file still matches SHA256SUMS (count and bytes first, then hashes); a damaged
dataset is generated again. Nothing the generator did not write is ever removed: a folder without its
manifest, or holding other files, is refused, ``overwrite`` or not.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import statistics
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from l2c_llava import layout as L
from l2c_llava.data import captions as C
from l2c_llava.data.scenes import (
    BACKGROUNDS,
    COLOURS,
    MIN_CONTRAST,
    SHAPES,
    Background,
    Group,
    Scene,
    render_scene,
    sample_scene,
)
from l2c_llava.embedded import clip_tokenizer, demo_clip_tokenizer
from l2c_llava.errors import InputError, L2CError, OutputExistsError
from l2c_llava.io import (
    LOCK_FILES,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    clean_interrupted,
    move_into_place,
    remove_lock_only_folder,
    run_lock,
    sha256_file,
    tree_digest,
    work_folder,
    writing,
)

logger = logging.getLogger(__name__)

GENERATOR = "l2c-llava synthetic scenes"
GENERATOR_VERSION = 3  # 2: caption pairs carry the five COCO-like "alternatives"; 3: retrieval/long_hard.json
CLIP_CONTEXT = 77
HARD_FAMILY_SIZE = 3  # images per family of the hard long-caption set: a 77-token tower gets at most 1 in 3
HARD_MAX_FAMILIES = 100  # the first test scenes that make a family, at most

BRIEF_PROMPTS = [
    "Describe the image concisely.",
    "Give a short description of this picture.",
    "Summarize what the image shows in one line.",
    "Write a brief caption for the image.",
    "What does this picture show? Answer briefly.",
    "Provide a compact summary of the image.",
    "Offer a one-line description of the visual content.",
    "Caption this image in a few words.",
]
DETAIL_PROMPTS = [
    "Describe this image in detail.",
    "Explain the visual content of the image in great detail.",
    "What is in the image? Describe every object, its position and appearance.",
    "Give an elaborate description of the picture.",
]
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class SynthOptions:
    images: int = 1000
    seed: int = 0
    size: int = 336
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_objects: int = 5
    jpeg_quality: int = 90

    def validate(self) -> None:
        problems = []
        if self.images < 3:
            problems.append(f"--images must be >= 3 (one per split), got {self.images}")
        if not 32 <= self.size <= 2048:
            problems.append(f"--size must be within 32..2048 pixels, got {self.size}")
        if not (
            0 < self.val_fraction < 1
            and 0 < self.test_fraction < 1
            and self.val_fraction + self.test_fraction < 1
        ):
            problems.append("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
        if not 2 <= self.max_objects <= 9:
            problems.append(f"--max-objects (groups per image) must be within 2..9, got {self.max_objects}")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"--jpeg-quality must be within 1..100, got {self.jpeg_quality}")
        if problems:
            raise InputError("invalid synthetic data options:\n  - " + "\n  - ".join(problems))


def image_relpath(index: int) -> str:
    return f"{index // 1000:05d}/{index:09d}.jpg"


def assign_splits(n: int, seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Disjoint train/val/test assignment, a permutation of the indices cut by the fractions."""
    order = list(range(n))
    random.Random(f"{seed}-splits").shuffle(order)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    split = ["train"] * n
    for i in order[:n_test]:
        split[i] = "test"
    for i in order[n_test : n_test + n_val]:
        split[i] = "val"
    return split


def _render_chunk(args: tuple[list[dict], int, int, int, str]) -> list[tuple[int, list[list[list[int]]]]]:
    """Worker: draw and save a chunk of scenes (at their "path" under the image folder, by default
    :func:`image_relpath` of their index); returns each scene's instance boxes."""
    scenes, size, seed, quality, image_dir = args
    out = []
    for s in scenes:
        scene = Scene(s["index"], Background(**s["background"]), [Group(**g) for g in s["groups"]])
        img = render_scene(scene, size, seed)
        path = Path(image_dir) / s.get("path", image_relpath(scene.index))
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="JPEG", quality=quality)
        out.append((s.get("path", scene.index), [g.boxes for g in scene.groups]))
    return out


def _scene_payload(scene: Scene, path: str | None = None) -> dict:
    out = {
        "index": scene.index,
        "background": asdict(scene.background),
        "groups": [asdict(g) for g in scene.groups],
    }
    return out | ({"path": path} if path is not None else {})


def _draw(
    payload: list[dict], options: SynthOptions, workers: int, image_dir: Path, progress: bool, desc: str
) -> dict:
    """Draw and save every scene of `payload` (in parallel: each image depends only on (seed, index));
    returns {its "path", else its index: the instance boxes of each group}."""
    n = len(payload)
    chunk = max(1, min(64, n // (workers * 4) or 1))
    jobs = [
        (payload[i : i + chunk], options.size, options.seed, options.jpeg_quality, str(image_dir))
        for i in range(0, n, chunk)
    ]
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress)
    boxes: dict = {}
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for res in pool.map(_render_chunk, jobs):
                boxes.update(res)
                bar.update(len(res))
    else:
        for job in jobs:
            res = _render_chunk(job)
            boxes.update(res)
            bar.update(len(res))
    bar.close()
    return boxes


def _karpathy_tokens(text: str) -> list[str]:
    return [w for w in "".join(ch if ch.isalnum() or ch in " -" else " " for ch in text.lower()).split() if w]


def _files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative path: size), the run lock left out."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() not in LOCK_FILES
    }


def write_sums(folder: Path) -> dict:
    """``SHA256SUMS`` of every file in `folder` (``sha256sum -c`` reads it); returns what the manifest
    records of it: file count, total bytes and the list's own hash."""
    files = {k: v for k, v in _files(folder).items() if k not in (L.MANIFEST, L.DATASET_SUMS)}
    text = "".join(f"{sha256_file(folder / rel)}  {rel}\n" for rel in sorted(files))
    atomic_write_text(folder / L.DATASET_SUMS, text)
    return {
        "files": len(files),
        "bytes": sum(files.values()),
        "sums_sha256": sha256_file(folder / L.DATASET_SUMS),
    }


_LEGACY_IMAGE = re.compile(r"images/\d{5}/\d{9}\.jpg")


def _written_by_us(manifest: dict, folder: Path) -> set[str]:
    """The files the generator wrote into `folder`: those its SHA256SUMS lists, and the names of the
    layout (a dataset made before SHA256SUMS existed, or one whose list is damaged)."""
    known = {L.MANIFEST, L.DATASET_SUMS}
    for v in L.DATASET_FILES.values():
        known |= set(v.values()) if isinstance(v, dict) else {v}
    known |= {rel for rel in _files(folder) if _LEGACY_IMAGE.fullmatch(rel)}
    if "content" in manifest:
        try:
            listed = (folder / L.DATASET_SUMS).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            listed = []
        known |= {line.split("  ", 1)[1] for line in listed if "  " in line}
    return known


def dataset_problems(folder: str | os.PathLike, manifest: dict) -> list[str]:
    """What differs between `folder` and what its manifest recorded when it was written ([] when
    nothing): missing files and changed sizes first (cheap), then every file's sha256."""
    folder = Path(folder)
    now = {k: v for k, v in _files(folder).items() if k != L.MANIFEST}
    content = manifest.get("content")
    if content is None:  # an older dataset: its one digest over every file
        if manifest.get("content_sha256") != tree_digest(folder, exclude=[L.MANIFEST]):
            return ["its content differs from the content_sha256 its manifest recorded"]
        return []
    sums = folder / L.DATASET_SUMS
    if not sums.is_file() or sha256_file(sums) != content.get("sums_sha256"):
        return [f"{L.DATASET_SUMS} is missing or changed"]
    listed = {}
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, _, rel = line.partition("  ")
        listed[rel] = digest
    missing = sorted(set(listed) - set(now))
    if missing:
        return [
            f"{len(missing)} file(s) missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        ]
    size = sum(now[rel] for rel in listed)
    if size != content.get("bytes"):
        return [f"its files hold {size} bytes, {content.get('bytes')} when written"]
    changed = sorted(rel for rel, digest in listed.items() if sha256_file(folder / rel) != digest)
    if changed:
        return [
            f"{len(changed)} file(s) changed: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}"
        ]
    return []


def _own_manifest(out: Path) -> dict | None:
    """The manifest of the dataset at `out`; None when `out` is missing or empty. Refuses a folder that
    holds anything the generator did not write (cheap: names only)."""
    present = sorted(_files(out)) if out.is_dir() else []
    if not present:
        return None
    try:
        old = json.loads((out / L.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or old.get("generator") != GENERATOR:
        raise OutputExistsError(
            f"{out} is not empty ({', '.join(present[:5])}{' ...' if len(present) > 5 else ''}) and holds no "
            f"dataset written by `l2c data synth` (no readable {L.MANIFEST} of it): refusing to replace it, "
            "--overwrite or not. Choose a new or empty --out"
        )
    extra = sorted(set(present) - _written_by_us(old, out))
    if extra:
        raise OutputExistsError(
            f"{out} is a dataset written by `l2c data synth`, but holds files it did not write "
            f"({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}): replacing it would lose them, "
            "--overwrite or not. Move them away, or choose another --out"
        )
    return old


def _existing(out: Path, wanted: dict, overwrite: bool) -> dict | None:
    """The manifest of the identical, intact dataset already at `out` (nothing to do); None when one
    is to be generated there. Refuses a folder that holds anything the generator did not write."""
    old = _own_manifest(out)
    if old is None:
        return None
    if {k: old.get(k) for k in wanted} != wanted:
        if not overwrite:
            raise OutputExistsError(
                f"{out} holds a dataset made with other options ({old.get('options')}); pass --overwrite to "
                "replace it (it replaces only a dataset `l2c data synth` wrote), or choose another --out"
            )
        return None
    problems = dataset_problems(out, old)
    if problems:
        logger.warning(
            "%s does not match what its manifest recorded (%s): generating it again", out, "; ".join(problems)
        )
        return None
    return old


def generate(
    out_dir: str | os.PathLike,
    options: SynthOptions = SynthOptions(),
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Generate the dataset into `out_dir`; returns the manifest. Skips work if an identical dataset
    (same options, same generator version) is already there and every file matches what was written;
    regenerates a damaged one; replaces one made with other options only when `overwrite`; never
    replaces a folder holding anything the generator did not write. One writer per folder: a second
    one stops at once (:class:`~l2c_llava.errors.CannotRunError`)."""
    options.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is an existing file, not a folder; choose another --out")
    wanted = {"generator": GENERATOR, "version": GENERATOR_VERSION, "options": options.__dict__}
    _own_manifest(out)  # a folder of the user's is refused before anything (a lock file) is put in it
    for p in clean_interrupted(out):
        logger.warning("removed %s, left by an interrupted earlier run", p)
    created = not out.exists()
    try:
        with run_lock(out, "data synth"):
            old = _existing(out, wanted, overwrite)
            if old is not None:
                return old | {"skipped": True}
            tmp = work_folder(out)
            try:
                with writing(out):  # a full disk, the file size limit: one line naming the folder
                    manifest = _generate(tmp, options, workers, progress)
                    # the old folder (if any) is only removed once the new one is complete
                    move_into_place(tmp, out, carry=LOCK_FILES)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        if created:  # a failed first run leaves no folder behind
            remove_lock_only_folder(out)
        raise
    return manifest


class HardSetError(L2CError, RuntimeError):
    """A family of the hard long-caption set that does not have the property the set is for (its
    captions the same for CLIP's 77 tokens and different after, its images different): a generator
    bug, never written out."""

    exit_code = 1


def check_hard_family(family: str, captions: list[str], tokenizer, context: int = CLIP_CONTEXT) -> dict:
    """Tokenize a family's captions as the baseline's text tower does and check that its members are
    the same for the tower and different after: every caption longer than `context` tokens (start and
    end tokens counted), the first `context` tokens of all of them equal (so the truncated inputs, the
    start token, ``context - 2`` caption tokens and the end token, are equal token for token), and the
    captions different after. Returns {"shared_tokens": the tokens all members begin with (start token
    counted), "tokens_max"}; raises HardSetError naming the family and what fails."""
    full = tokenizer(captions, add_special_tokens=True, verbose=False)["input_ids"]
    cut = tokenizer(captions, add_special_tokens=True, truncation=True, max_length=context)["input_ids"]
    problems = []
    if len(captions) < 2:
        problems.append(f"{len(captions)} member(s); a family has at least 2")
    if len(set(captions)) != len(captions):
        problems.append("two members have the same caption")
    short = [i for i, ids in enumerate(full) if len(ids) <= context]
    if short:
        problems.append(
            f"member(s) {short} have at most {context} tokens ({[len(full[i]) for i in short]}): the tower reads them whole"
        )
    shared = 0
    while all(len(ids) > shared for ids in full) and len({ids[shared] for ids in full}) == 1:
        shared += 1
    if shared < context:
        words = tokenizer.decode(full[0][max(1, shared - 4) : shared + 4])
        problems.append(
            f"the members differ at token {shared} (near {words!r}), within the first {context} tokens the tower reads"
        )
    if len({tuple(ids) for ids in cut}) != 1:
        problems.append(f"their inputs cut at {context} tokens differ")
    if problems:
        raise HardSetError(
            f"hard long-caption family {family}: "
            + "; ".join(problems)
            + ". Its captions: "
            + " | ".join(captions)
        )
    return {"shared_tokens": shared, "tokens_max": max(map(len, full))}


def _late_values(scene: Scene, late: Group, attribute: str) -> list[str]:
    """The colours (or shapes) the late group may take in the other members: another one than its own,
    (colour, shape) still unique in the scene, a colour with the contrast the sampler asks for."""
    others = {(g.colour, g.shape) for g in scene.groups if g is not late}
    if attribute == "shape":
        return [sh for sh in SHAPES if sh != late.shape and (late.colour, sh) not in others]
    bg = scene.background
    bg_rgb = [BACKGROUNDS[bg.colour]] + ([BACKGROUNDS[bg.colour2]] if bg.colour2 else [])
    return [
        c
        for c, rgb in COLOURS.items()
        if c != late.colour
        and (c, late.shape) not in others
        and all(sum((x - y) ** 2 for x, y in zip(rgb, b)) ** 0.5 >= MIN_CONTRAST for b in bg_rgb)
    ]


# mean absolute difference (0-255) where the late group is drawn, at least: two draws of one scene are
# byte for byte the same (0); the smallest change measured, a small shape's at 32 px, is about 4
HARD_MIN_PIXEL_CHANGE = 2.0


def _check_pixels(image_dir: Path, family: dict, boxes: dict) -> float:
    """The members of a family differ where their late group is drawn (the union of its boxes in
    every member): a mean absolute difference of at least HARD_MIN_PIXEL_CHANGE between any two.
    Returns the smallest."""
    members = family["members"]
    drawn = [
        m["group"].boxes if m["image"] not in boxes else boxes[m["image"]][family["slot"]] for m in members
    ]
    pixels = []
    for m in members:
        with Image.open(image_dir / m["image"]) as im:
            pixels.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    mask = np.zeros(pixels[0].shape[:2], dtype=bool)
    for x0, y0, x1, y1 in (b for bs in drawn for b in bs):
        mask[y0 : y1 + 1, x0 : x1 + 1] = True
    smallest = float("inf")
    for i in range(len(members)):
        for j in range(i + 1, len(members)):
            change = float(np.abs(pixels[i] - pixels[j])[mask].mean()) if mask.any() else 0.0
            smallest = min(smallest, change)
            if change < HARD_MIN_PIXEL_CHANGE:
                raise HardSetError(
                    f"hard long-caption family {family['family']}: {members[i]['image']} and {members[j]['image']} "
                    f"differ by {change:.1f} (of 255) on average where their {family['attribute']} differs, "
                    f"less than {HARD_MIN_PIXEL_CHANGE}: the images do not show what the captions tell apart"
                )
    return smallest


def _hard_family(s: Scene, seed: int, tok) -> tuple[dict, list[dict]] | None:
    """The hard set's family of the test scene `s`: the scene and HARD_FAMILY_SIZE - 1 copies of it whose
    most salient group takes another colour (or shape), captioned alike until CLIP's window is full; with
    the copies to draw. None where the scene makes no family (too few other values for the group, captions
    that do not fill the window)."""
    rng = random.Random(f"{seed}-hard-{s.index}")
    late = max(s.groups, key=C.salience)
    attribute = rng.choice(("colour", "shape"))
    values = _late_values(s, late, attribute)
    sentences = C.hard_caption_sentences(s, late, rng)
    template = rng.randrange(2)
    if len(values) < HARD_FAMILY_SIZE - 1:
        return None
    # the fewest opening sentences that fill the tower's window: the caption's difference comes after
    lengths = tok([" ".join(sentences[: k + 1]) for k in range(len(sentences))], verbose=False)["input_ids"]
    keep = next((k + 1 for k, ids in enumerate(lengths) if len(ids) - 1 >= CLIP_CONTEXT), None)
    if keep is None:
        return None
    opening = " ".join(sentences[:keep])
    family = f"{s.index:09d}"
    members, payload = [], []
    for j, value in enumerate([None, *rng.sample(values, HARD_FAMILY_SIZE - 1)]):
        g = late if value is None else replace(late, **{attribute: value}, boxes=[])
        if g.shape == "circle":
            g = replace(g, tilt=0.0)
        variant = Scene(s.index, s.background, [g if x is late else x for x in s.groups])
        rel = image_relpath(s.index) if value is None else f"{L.HARD_IMAGES}/{family}_{j}.jpg"
        if value is not None:
            payload.append(_scene_payload(variant, rel))
        members.append(
            {"image": rel, "group": g, "caption": f"{opening} {C.hard_caption_ending(g, template)}"}
        )
    return {
        "family": family,
        "attribute": attribute,
        "slot": s.groups.index(late),
        "members": members,
    }, payload


def hard_long_set(
    partial: Path, scenes: list[Scene], splits: list[str], options: SynthOptions, workers: int, progress: bool
) -> tuple[list[dict], dict]:
    """The hard long-caption set, ShareGPT4V-1K style with a "family" key per row: for each of the first
    HARD_MAX_FAMILIES test scenes, HARD_FAMILY_SIZE images that differ only in the colour (or the shape)
    of the scene's most salient group: the test image itself and redrawn copies (same layout, same
    noise) under ``images/hard/``. Their captions tell the rest of the scene until they fill CLIP's
    77-token window, the same words for every member, then that group (:func:`~l2c_llava.data.captions.
    hard_caption_ending`). Checked with the demo CLIP's tokenizer (:func:`check_hard_family`) and on
    the pixels (the members differ where the group is drawn); returns the rows and the statistics the
    manifest records."""
    tok = demo_clip_tokenizer()
    if tok.model_max_length != CLIP_CONTEXT:
        raise HardSetError(
            f"the demo CLIP's tokenizer keeps {tok.model_max_length} tokens, not {CLIP_CONTEXT}"
        )
    families, payload = [], []
    for s in scenes:
        if splits[s.index] != "test" or len(families) == HARD_MAX_FAMILIES:
            continue
        made = _hard_family(s, options.seed, tok)
        if made is not None:
            families.append(made[0])
            payload += made[1]
    if not families:
        return [], {"families": 0}
    boxes = _draw(payload, options, workers, partial / L.IMAGES, progress, "drawing the hard set")
    rows, checks, change = [], [], []
    for f in families:
        checks.append(check_hard_family(f["family"], [m["caption"] for m in f["members"]], tok))
        change.append(_check_pixels(partial / L.IMAGES, f, boxes))
        for j, m in enumerate(f["members"]):
            rows.append(
                {
                    "id": f"{f['family']}_{j}",
                    "image": m["image"],
                    "family": f["family"],
                    "differs": {
                        "attribute": f["attribute"],
                        "value": getattr(m["group"], f["attribute"]),
                        "position": m["group"].position,
                    },
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe this image in detail."},
                        {"from": "gpt", "value": m["caption"]},
                    ],
                }
            )
    sizes = Counter(len(f["members"]) for f in families)
    return rows, {
        "families": len(families),
        "family_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "images": len(rows),
        "redrawn_images": len(payload),
        "differs_in": dict(sorted(Counter(f["attribute"] for f in families).items())),
        "clip_tokenizer": "l2c_llava/assets/demo_clip",
        "clip_context": CLIP_CONTEXT,
        "shared_clip_tokens_min": min(c["shared_tokens"] for c in checks),
        "clip_tokens_max": max(c["tokens_max"] for c in checks),
        "caption_words_max": max(len(r["conversations"][1]["value"].split()) for r in rows),
        "pixel_change_min": round(min(change), 2),
    }


def _generate(partial: Path, options: SynthOptions, workers: int | None, progress: bool) -> dict:
    """Write the dataset into the empty folder `partial`; returns its manifest. Every part draws its random
    choices from generators seeded by (seed, what, index): none depends on the order the parts run in."""
    wanted = {"generator": GENERATOR, "version": GENERATOR_VERSION, "options": options.__dict__}
    t0 = time.perf_counter()
    (partial / L.IMAGES).mkdir(parents=True)
    workers = workers or min(4, os.cpu_count() or 1)

    scenes = _scenes(partial, options, workers, progress)
    splits = assign_splits(options.images, options.seed, options.val_fraction, options.test_fraction)
    rows = _language(scenes, splits, options.seed)
    _write_caption_pairs(partial, rows)
    _write_retrieval_sets(partial, rows)
    # hard long-caption set (the demo's Urban-1K): families told apart only after CLIP's 77 tokens
    hard_rows, hard_stats = hard_long_set(partial, scenes, splits, options, workers, progress)
    atomic_write_json(partial / L.RETRIEVAL_LONG_HARD, hard_rows)
    pretrain = _llava_pretrain(rows, options.seed)
    atomic_write_json(partial / L.LLAVA_PRETRAIN, pretrain)
    instruct, n_text = _llava_instruct(rows, options.seed)
    atomic_write_json(partial / L.LLAVA_INSTRUCT, instruct)
    pope = _write_questions(partial, rows)
    atomic_write_jsonl(
        partial / L.SCENES,
        ({"image": image_relpath(s.index), "split": splits[s.index], **s.to_json()} for s in scenes),
    )

    stats = {
        "splits": dict(Counter(splits)),
        "pretrain_rows": len(pretrain),
        "instruct_rows": len(instruct),
        "instruct_text_only_rows": n_text,
        "vqa_questions": {
            name: sum(len(r["questions"]) for r in _split(rows, name)) for name in ("val", "test")
        },
        "pope_questions": pope,
        "short_caption_words_mean": round(statistics.fmean(len(r["short"].split()) for r in rows), 2),
        "alternatives_per_image": min(len(r["alternatives"]) for r in rows),
        "long_hard": hard_stats,
        **_dense_caption_lengths(rows),
    }
    content = write_sums(partial)
    manifest = wanted | {
        "image_root": L.IMAGES,
        "files": L.DATASET_FILES,
        "stats": stats,
        "content": content,
        "content_sha256": tree_digest(partial),
    }
    atomic_write_json(partial / L.MANIFEST, manifest)
    return manifest | {"seconds": round(time.perf_counter() - t0, 2)}


def _scenes(partial: Path, options: SynthOptions, workers: int, progress: bool) -> list[Scene]:
    """Every image's scene, sampled and drawn (in parallel: each image depends only on (seed, index)),
    each group given its instance boxes as drawn."""
    scenes = [
        sample_scene(random.Random(f"{options.seed}-scene-{i}"), i, options.max_objects)
        for i in range(options.images)
    ]
    boxes = _draw(
        [_scene_payload(s) for s in scenes], options, workers, partial / L.IMAGES, progress, "drawing images"
    )
    for s in scenes:
        for g, b in zip(s.groups, boxes[s.index]):
            g.boxes = b
    return scenes


def _language(scenes: list[Scene], splits: list[str], seed: int) -> list[dict]:
    """Per image: its short caption, five COCO-like alternatives, the dense caption, its questions and
    (a test image) its POPE questions, from one generator per image."""
    text_rng = {s.index: random.Random(f"{seed}-text-{s.index}") for s in scenes}
    freq = Counter(p for s in scenes for p in s.present())
    # ties broken by name: most_common() keeps first-seen order, which follows the sets' hash order
    popular = [o for o, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))] + sorted(
        {(c, s) for c in COLOURS for s in SHAPES} - set(freq), key=str
    )
    all_objects = [(c, s) for c in COLOURS for s in SHAPES]
    rows = []
    for s in scenes:
        rng = text_rng[s.index]
        rows.append(
            {
                "index": s.index,
                "image": image_relpath(s.index),
                "split": splits[s.index],
                "short": C.short_caption(s, rng),
                "alternatives": C.alternative_captions(s, rng, n=5),
                "long": C.dense_caption(s, rng),
                "questions": C.scene_questions(s, rng, all_objects),
                "pope": C.pope_questions(s, rng, popular) if splits[s.index] == "test" else [],
            }
        )
    return rows


def _split(rows: list[dict], name: str) -> list[dict]:
    return [r for r in rows if r["split"] == name]


def _write_caption_pairs(partial: Path, rows: list[dict]) -> None:
    """Caption pairs (stages 1 and 2); "alternatives": the image's five COCO-like captions, a list stage 2
    can train on (data.short_key=alternatives) as LLM2CLIP trains on raw web captions."""
    for name in ("train", "val", "test"):
        atomic_write_jsonl(
            partial / L.CAPTION_PAIRS[name],
            (
                {
                    "image": r["image"],
                    "short": r["short"],
                    "long": r["long"],
                    "alternatives": r["alternatives"],
                }
                for r in _split(rows, name)
            ),
        )


def _write_retrieval_sets(partial: Path, rows: list[dict]) -> None:
    """The Karpathy-style retrieval JSON (like dataset_coco.json / dataset_flickr30k.json: every split, the
    five alternatives per image) and the long-caption test set, ShareGPT4V-1K style."""
    images, sentid = [], 0
    for imgid, r in enumerate(rows):
        sents = []
        for raw in r["alternatives"]:
            sents.append({"tokens": _karpathy_tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        folder, filename = r["image"].split("/")
        images.append(
            {
                "filepath": folder,
                "filename": filename,
                "imgid": imgid,
                "split": r["split"],
                "sentids": [x["sentid"] for x in sents],
                "sentences": sents,
                "cocoid": r["index"],
            }
        )
    atomic_write_json(partial / L.RETRIEVAL_SHORT, {"images": images, "dataset": "l2c-synth"}, indent=None)
    atomic_write_json(
        partial / L.RETRIEVAL_LONG,
        [
            {
                "id": f"{r['index']:09d}",
                "image": r["image"],
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe this image in detail."},
                    {"from": "gpt", "value": r["long"]},
                ],
            }
            for r in _split(rows, "test")
        ],
    )


def _llava_pretrain(rows: list[dict], seed: int) -> list[dict]:
    """LLaVA pretrain rows, blip_laion_cc_sbu_558k.json style: a brief prompt and the short caption."""
    pretrain = []
    for r in _split(rows, "train"):
        rng = random.Random(f"{seed}-pretrain-{r['index']}")
        prompt = rng.choice(BRIEF_PROMPTS)
        human = f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"
        pretrain.append(
            {
                "id": f"{r['index']:09d}",
                "image": r["image"],
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": r["short"]}],
            }
        )
    return pretrain


def _llava_instruct(rows: list[dict], seed: int) -> tuple[list[dict], int]:
    """LLaVA instruction rows, llava_v1_5_mix665k.json style (short-answer VQA, conversation, detail and
    brief captions, some text-only rows), shuffled; returns them and how many are text-only."""
    instruct = []
    for r in _split(rows, "train"):
        rng = random.Random(f"{seed}-instruct-{r['index']}")
        kind = rng.choices(("vqa", "conversation", "detail", "brief"), weights=(0.55, 0.2, 0.15, 0.1))[0]
        if kind == "vqa":
            # 2-5 of the image's 7 questions (all 7 per row was measured: no better reading of the
            # image after 100 LoRA steps, 9% slower steps; bench/RESULTS.md, 2026-12-05)
            qs = rng.sample(r["questions"], rng.randint(2, min(5, len(r["questions"]))))
            turns = [(f"{q['question']}\n{SHORT_ANSWER_SUFFIX}", q["answer"]) for q in qs]
        elif kind == "conversation":
            qs = rng.sample(r["questions"], rng.randint(1, 3))
            turns = [(q["question"], C.conversational_answer(q)) for q in qs]
        elif kind == "detail":
            turns = [(rng.choice(DETAIL_PROMPTS), r["long"])]
        else:
            turns = [
                ("Provide a one-sentence caption for the provided image.", rng.choice(r["alternatives"]))
            ]
        first_q = turns[0][0]
        turns[0] = (f"{first_q}\n<image>" if rng.random() < 0.1 else f"<image>\n{first_q}", turns[0][1])
        conv = []
        for q, a in turns:
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        instruct.append({"id": f"{r['index']:09d}", "image": r["image"], "conversations": conv})
    n_text = max(1, round(len(instruct) * 0.0612))  # mix665k: ~40.7k of 665k rows have no image
    for k in range(n_text):
        rng = random.Random(f"{seed}-textonly-{k}")
        conv = []
        for q, a in C.text_only_conversation(rng):
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        instruct.append({"id": f"textonly_{k:06d}", "conversations": conv})
    random.Random(f"{seed}-instruct-order").shuffle(instruct)
    return instruct, n_text


def _write_questions(partial: Path, rows: list[dict]) -> int:
    """The VQA evaluation splits (val, test) and POPE (test); returns the number of POPE questions."""
    for name in ("val", "test"):
        qrows = []
        for r in _split(rows, name):
            for k, q in enumerate(r["questions"]):
                qrows.append(
                    {
                        "question_id": f"{r['index']:09d}_{k}",
                        "image": r["image"],
                        "question": q["question"],
                        "answer": q["answer"],
                        "answers": q["answers"],
                        "type": q["type"],
                    }
                )
        atomic_write_jsonl(partial / L.VQA[name], qrows)
    pope = []
    for r in _split(rows, "test"):
        for k, q in enumerate(r["pope"]):
            pope.append({"question_id": f"{r['index']:09d}_{k}", "image": r["image"], **q})
    atomic_write_jsonl(partial / L.POPE, pope)
    return len(pope)


def _dense_caption_lengths(rows: list[dict]) -> dict:
    """The dense captions' lengths in CLIP tokens and the share over its 77-token window (the manifest's
    statistics; not measured, and said so, without the CLIP vocabulary package)."""
    try:
        tok = clip_tokenizer()
        ids = tok([r["long"] for r in rows], add_special_tokens=True, verbose=False)["input_ids"]
    except FileNotFoundError as e:  # the CLIP vocabulary package is missing: say so, generate anyway
        return {"dense_clip_tokens": f"not measured: {e}"}
    lengths = [len(x) for x in ids]
    return {
        "dense_clip_tokens_mean": round(statistics.fmean(lengths), 1),
        "dense_clip_tokens_median": statistics.median(lengths),
        "dense_clip_tokens_max": max(lengths),
        "dense_over_77_clip_tokens_share": round(sum(n > CLIP_CONTEXT for n in lengths) / len(lengths), 4),
    }
