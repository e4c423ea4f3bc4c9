"""``l2c data filter``: caption filtering in the spirit of BLIP's CapFilt, with the tools at hand.

Every image-caption pair is scored by a trained image-text model (an LLM2CLIP model: the image
through its tower, the caption through the LLM encoder + adapter; or a CLIP model through its own
text tower). ``score=zscore`` (default): the pair's cosine as a z-score against the image's cosines
with other captions and the caption's with other images (a sample of 256 each), which removes each
image's and caption's own level: weaker models put many pairs, matched or not, at one cosine
("hubs"). ``score=cosine``: the raw cosine. Either means nothing by itself, so the threshold is
calibrated on the same data: the pairs are shuffled (each caption set against another row's image)
and a pair is kept when it scores higher than ``null_quantile`` (default 95%) of shuffled pairs do.
An absolute threshold can be given instead.

Formats, written back as read (same keys, same order, nothing else changed):
- ``pairs``: caption-pair JSONL / CSV / TSV (``image``, ``short``, ``long``); both captions scored,
  a row is dropped when either is under its threshold (or only the ``--fields`` named);
- ``llava``: LCS-558K-style JSON (``image`` + ``conversations``); the caption is the first ``gpt``
  turn; rows without an image are kept unscored.

``mode=drop`` writes the kept rows; ``mode=flag`` writes every row with an ``l2c_filter`` entry
(scores, flagged). Beside the output: ``.report.json`` / ``.report.md`` (thresholds, counts, every
dropped row with its file row, image, caption and score), ``.scores.png`` (own vs shuffled score
histograms with the threshold) and ``.scores.safetensors`` (the scores, reused by a re-run with the
same data and model, e.g. to try another threshold without embedding again).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l2c_llava.data.images import ImageError, load_rgb
from l2c_llava.data.readers import DataError, RowProblem, iter_rows, resolve_under
from l2c_llava.errors import InputError, MissingFileError
from l2c_llava.io import atomic_save, atomic_write_json, atomic_write_text, check_output_file, sha256_file

logger = logging.getLogger("l2c_llava.filter")


@dataclass
class Row:
    label: str  # "line 12", "row 3"
    raw: Any
    image: str | None
    captions: dict[str, str]
    image_path: Path | None = None


def read_rows(
    path: Path,
    fmt: str,
    image_root: Path,
    fields: tuple[str, ...],
    image_key: str = "image",
    on_bad_row: str = "error",
) -> tuple[list[Row], list[RowProblem], str]:
    """The rows (raw, to be written back) with their captions; bad rows reported by file and row."""
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path}")
    problems: list[RowProblem] = []
    rows: list[Row] = []
    if fmt == "pairs":
        kind = "csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl"
        for label, raw, problem in iter_rows(path):
            if problem:
                problems.append(RowProblem(str(path), label, problem))
                continue
            caps, missing = {}, []
            for f in fields:
                v = raw.get(f)
                if isinstance(v, str) and v.strip():
                    caps[f] = v
                else:
                    missing.append(f)
            image = raw.get(image_key)
            if missing or not isinstance(image, str) or not image.strip():
                what = ", ".join(
                    [*missing, *([image_key] if not isinstance(image, str) or not image.strip() else [])]
                )
                problems.append(RowProblem(str(path), label, f"missing or empty {what}"))
                continue
            rows.append(Row(label, raw, image, caps))
    elif fmt == "llava":
        kind = "json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e}); the llava format is one JSON list") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of rows (LCS-558K style)")
        for i, raw in enumerate(data):
            label = f"item {i}"
            conv = raw.get("conversations") if isinstance(raw, dict) else None
            answer = next(
                (t.get("value") for t in conv or [] if isinstance(t, dict) and t.get("from") == "gpt"), None
            )
            if not isinstance(answer, str) or not answer.strip():
                problems.append(RowProblem(str(path), label, "no gpt turn with a caption"))
                continue
            image = raw.get(image_key)
            rows.append(
                Row(
                    label,
                    raw,
                    image if isinstance(image, str) and image.strip() else None,
                    {"caption": answer},
                )
            )
    else:
        raise InputError(f"format {fmt!r}: expected pairs or llava")
    for r in rows:
        if r.image is None:
            continue
        try:
            r.image_path = resolve_under(image_root, r.image)
        except ValueError as e:
            problems.append(RowProblem(str(path), r.label, str(e)))
            continue
        if not r.image_path.is_file():
            problems.append(RowProblem(str(path), r.label, f"image not found: {r.image_path}"))
    bad = {p.row for p in problems}
    if problems and on_bad_row == "error":
        raise DataError(problems, str(path), len(rows) + len(bad))
    for p in problems:
        logger.warning("%s (skipped)", p)
    return [r for r in rows if r.label not in bad], problems, kind


def row_stats(a: torch.Tensor, b: torch.Tensor, sample: int = 256, seed: int = 0, chunk: int = 16384):
    """Mean and standard deviation of each row of `a` against a random sample of rows of `b` (its
    own index left out): how a caption scores against other images, or an image against other
    captions."""
    n = b.shape[0]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n, generator=g)[: min(sample, n)]
    means, stds = [], []
    for lo in range(0, a.shape[0], chunk):
        s = a[lo : lo + chunk] @ b[pick].T
        own = pick[None, :] == torch.arange(lo, lo + s.shape[0])[:, None]
        s = s.masked_fill(own, float("nan"))
        mu = torch.nanmean(s, dim=1)
        means.append(mu)
        stds.append(torch.sqrt(torch.nanmean((s - mu[:, None]) ** 2, dim=1)))
    return torch.cat(means), torch.cat(stds)


def pair_scores(
    img: torch.Tensor, txt: torch.Tensor, rounds: int = 8, seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """Own-pair and shuffled-pair scores, two ways: the raw cosine, and the z-score of the cosine
    against the image's cosines with other captions and the caption's with other images (removes
    each image's and caption's own level: a weak model puts many pairs at one cosine, "hubs").
    Shuffled pairs set each caption against another row's image (a random non-zero shift per round).
    -> {"own": {"cosine": [N], "zscore": [N]}, "shuffled": {...: [rounds x N]}}."""
    n = img.shape[0]
    mu_i, sd_i = row_stats(img, txt, seed=seed)
    mu_t, sd_t = row_stats(txt, img, seed=seed + 1)

    def both(t_index: torch.Tensor) -> dict[str, torch.Tensor]:
        cos = (img * txt[t_index]).sum(-1)
        z = (cos - (mu_i + mu_t[t_index]) / 2) / ((sd_i + sd_t[t_index]) / 2 + 1e-6)
        return {"cosine": cos, "zscore": z}

    own = both(torch.arange(n))
    shuffled: dict[str, list[torch.Tensor]] = {"cosine": [], "zscore": []}
    if n >= 2:
        g = torch.Generator().manual_seed(seed)
        for _ in range(rounds):
            shift = int(torch.randint(1, n, (1,), generator=g))
            for k, v in both(torch.arange(n).roll(shift)).items():
                shuffled[k].append(v)
    return {"own": own, "shuffled": {k: torch.cat(v) if v else torch.empty(0) for k, v in shuffled.items()}}


def score(
    rows: list[Row], encoder, progress: bool = True
) -> tuple[dict[str, dict], dict[str, dict], list[int]]:
    """(field -> kind -> own-pair scores, field -> kind -> shuffled scores, indices of the scored rows);
    kind: cosine, zscore (see pair_scores)."""
    from tqdm.auto import tqdm

    scored = [i for i, r in enumerate(rows) if r.image_path is not None]
    bs = encoder.batch_size
    img_vecs, ok = [], []
    for lo in tqdm(range(0, len(scored), bs), desc="images", unit="batch", disable=not progress):
        pics, idx = [], []
        for i in scored[lo : lo + bs]:
            try:
                pics.append(load_rgb(rows[i].image_path))
                idx.append(i)
            except ImageError as e:
                logger.warning("%s: %s (kept unscored)", rows[i].label, e)
        if pics:
            img_vecs.append(encoder.embed_images(pics))
            ok.extend(idx)
    if not ok:
        raise InputError("no readable image: nothing to score")
    img = torch.cat(img_vecs)
    scores, null = {}, {}
    for f in rows[ok[0]].captions:
        texts = [rows[i].captions[f] for i in ok]
        txt = torch.cat(
            [
                encoder.embed_texts(texts[lo : lo + bs])
                for lo in tqdm(
                    range(0, len(texts), bs), desc=f"captions ({f})", unit="batch", disable=not progress
                )
            ]
        )
        both = pair_scores(img, txt)
        scores[f], null[f] = both["own"], both["shuffled"]
    return scores, null, ok


def thresholds(null: dict[str, torch.Tensor], threshold: float | None, quantile: float) -> dict[str, float]:
    if threshold is not None:
        return {f: float(threshold) for f in null}
    out = {}
    for f, s in null.items():
        if s.numel() == 0:
            raise InputError("fewer than 2 scored rows: no shuffled pairs to calibrate on; give --threshold")
        out[f] = float(torch.quantile(s.float(), quantile))
    return out


def _write(path: Path, kind: str, raws: list, header: list[str] | None, delimiter: str = ",") -> None:
    if kind == "jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in raws))
    elif kind == "json":
        atomic_write_text(path, json.dumps(raws, indent=2, ensure_ascii=False) + "\n")
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header, delimiter=delimiter, lineterminator="\n")
        w.writeheader()
        for r in raws:
            w.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})
        atomic_write_text(path, buf.getvalue())


def _fingerprint(path: Path, encoder, fields: tuple[str, ...], fmt: str) -> str:
    return hashlib.sha256(f"{sha256_file(path)}|{encoder.digest}|{fields}|{fmt}|v2".encode()).hexdigest()


def filter_captions(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    encoder,
    out: str | os.PathLike,
    *,
    fmt: str = "pairs",
    fields: tuple[str, ...] = ("short", "long"),
    threshold: float | None = None,
    null_quantile: float = 0.95,
    mode: str = "drop",
    on_bad_row: str = "error",
    score_kind: str = "zscore",
    drop_share: float | None = None,
    progress: bool = True,
    truth: Callable[[Row], bool] | None = None,
) -> dict:
    """Score, threshold and write the filtered copy and its report. `truth(row) -> corrupted?` (for
    measurements) adds precision / recall of the dropped rows to the report."""
    from safetensors.torch import load_file, save_file

    if drop_share is not None and not 0.0 < drop_share < 1.0:
        raise InputError(f"drop_share {drop_share}: must be between 0 and 1 (the share of rows to drop)")
    if drop_share is not None and threshold is not None:
        raise InputError("give either a threshold or a drop share, not both")
    if score_kind not in ("cosine", "zscore"):
        raise InputError(f"score {score_kind!r}: expected cosine or zscore")
    if mode not in ("drop", "flag"):
        raise InputError(f"mode {mode!r}: expected drop or flag")
    if not 0.0 < null_quantile < 1.0:
        raise InputError(f"null_quantile {null_quantile}: must be between 0 and 1")
    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve():
        raise InputError(f"--out {out} is the input file; write the filtered copy elsewhere")
    check_output_file(out)  # before any scoring
    fields = ("caption",) if fmt == "llava" else tuple(fields)
    rows, problems, kind = read_rows(path, fmt, Path(image_root), fields, on_bad_row=on_bad_row)
    cache = out.with_name(out.name + ".scores.safetensors")
    fp = _fingerprint(path, encoder, fields, fmt)
    loaded = None
    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), framework="pt") as h:
            if (h.metadata() or {}).get("fingerprint") == fp:
                loaded = load_file(str(cache))
    if loaded is not None:
        ok = loaded.pop("rows").tolist()
        every = {f: {k: loaded[f"score.{k}.{f}"] for k in ("cosine", "zscore")} for f in fields}
        null_all = {f: {k: loaded[f"null.{k}.{f}"] for k in ("cosine", "zscore")} for f in fields}
        logger.info("scores reused from %s", cache)
    else:
        every, null_all, ok = score(rows, encoder, progress)
        tensors = {"rows": torch.tensor(ok)}
        for f in fields:
            for k in ("cosine", "zscore"):
                tensors[f"score.{k}.{f}"] = every[f][k].contiguous()
                tensors[f"null.{k}.{f}"] = null_all[f][k].contiguous()
        atomic_save(cache, lambda tmp: save_file(tensors, str(tmp), metadata={"fingerprint": fp}))
    scores = {f: every[f][score_kind] for f in fields}
    null = {f: null_all[f][score_kind] for f in fields}
    th = thresholds(null, threshold, null_quantile)
    per_row: dict[int, dict[str, float]] = {
        i: {f: float(scores[f][j]) for f in fields} for j, i in enumerate(ok)
    }
    if (
        drop_share is not None
    ):  # the lowest-ranked rows: each caption's rank among its field, the worst counts
        ranks = {f: torch.argsort(torch.argsort(scores[f])).float() / max(1, len(ok) - 1) for f in fields}
        row_rank = {i: min(float(ranks[f][j]) for f in fields) for j, i in enumerate(ok)}
        flagged = set(sorted(row_rank, key=row_rank.get)[: int(round(drop_share * len(ok)))])
        th = {f: float(max((per_row[i][f] for i in flagged), default=float("nan"))) for f in fields}
    else:
        flagged = {i for i, s in per_row.items() if any(s[f] < th[f] for f in fields)}
    warnings = []
    if drop_share is None and ok and len(flagged) > len(ok) / 2:
        warnings.append(too_many_dropped(len(flagged), len(ok), scores, null, th, score_kind, mode))
        logger.warning(warnings[-1])
    if mode == "drop":
        written = [r.raw for i, r in enumerate(rows) if i not in flagged]
    else:
        written = []
        for i, r in enumerate(rows):
            tag = {"scores": {f: round(v, 5) for f, v in per_row.get(i, {}).items()}, "flagged": i in flagged}
            written.append({**r.raw, "l2c_filter": tag} if isinstance(r.raw, dict) else r.raw)
    header = None
    if kind == "csv":
        header = list(rows[0].raw.keys()) if rows else []
        if mode == "flag":
            header.append("l2c_filter")
    _write(out, kind, written, header, "\t" if path.suffix.lower() == ".tsv" else ",")
    dropped = sorted(flagged)
    report = {
        "input": str(path),
        "output": str(out),
        "format": fmt,
        "mode": mode,
        "encoder": encoder.identity,
        "score": score_kind,
        "fields": list(fields),
        "threshold": th,
        "threshold_from": "given"
        if threshold is not None
        else (
            f"the lowest {drop_share:.0%} of rows (highest dropped score shown)"
            if drop_share is not None
            else f"{null_quantile:.0%} quantile of shuffled pairs"
        ),
        "rows": len(rows),
        "scored": len(ok),
        "unscored": len(rows) - len(ok),
        "flagged": len(dropped),
        "kept": len(rows) - (len(dropped) if mode == "drop" else 0),
        "bad_rows_skipped": [str(p) for p in problems],
        "warnings": warnings,
        "score_quantiles": {f: score_quantiles(scores[f]) for f in fields},
        "shuffled_quantiles": {f: score_quantiles(null[f]) for f in fields},
        "score_mean": {f: float(scores[f].mean()) for f in fields},
        "shuffled_mean": {f: float(null[f].mean()) if null[f].numel() else None for f in fields},
        "cosine_mean": {f: float(every[f]["cosine"].mean()) for f in fields},
        "shuffled_cosine_mean": {
            f: float(null_all[f]["cosine"].mean()) if null_all[f]["cosine"].numel() else None for f in fields
        },
        "flagged_rows": [
            {"row": rows[i].label, "image": rows[i].image, "scores": per_row[i], "captions": rows[i].captions}
            for i in dropped
        ],
    }
    if truth is not None:
        corrupted = {i for i, r in enumerate(rows) if truth(r)}
        tp = len(corrupted & flagged)
        row_score = {i: min(v.values()) for i, v in per_row.items()}  # a row is as good as its worst caption
        bad_s = torch.tensor([v for i, v in row_score.items() if i in corrupted])
        good_s = torch.tensor([v for i, v in row_score.items() if i not in corrupted])
        auc = float((good_s[:, None] > bad_s[None, :]).float().mean()) if len(bad_s) and len(good_s) else None
        report["measured"] = {
            "auc": auc,  # P(a clean row scores above a corrupted one): the separation, whatever the threshold
            "corrupted": len(corrupted),
            "flagged_corrupted": tp,
            "flagged_clean": len(flagged - corrupted),
            "precision": tp / len(flagged) if flagged else None,
            "recall": tp / len(corrupted) if corrupted else None,
            "clean_dropped_share": len(flagged - corrupted) / max(1, len(rows) - len(corrupted)),
        }
    atomic_write_json(out.with_name(out.name + ".report.json"), report)
    atomic_write_text(out.with_name(out.name + ".report.md"), report_md(report))
    plot_scores(scores, null, th, out.with_name(out.name + ".scores.png"), score_kind)
    return report


QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def score_quantiles(values: torch.Tensor) -> dict[str, float]:
    """The spread of a score: min, 5%, 25%, median, 75%, 95%, max (empty for no values)."""
    if not values.numel():
        return {}
    q = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"q{round(p * 100):02d}": round(float(v), 4) for p, v in zip(QUANTILES, q)}


def too_many_dropped(
    flagged: int, scored: int, scores: dict, null: dict, th: dict, kind: str, mode: str
) -> str:
    """The warning for a threshold that takes out most of the data: a weak model (or a threshold on
    another scale) puts the own pairs' scores among the shuffled ones', and the rows are not bad."""
    spread = "; ".join(
        f"{f}: threshold {th[f]:.4f}, own pairs "
        + " ".join(f"{k} {v:.4f}" for k, v in score_quantiles(scores[f]).items())
        + ", shuffled pairs "
        + " ".join(f"{k} {v:.4f}" for k, v in score_quantiles(null[f]).items())
        for f in scores
    )
    return (
        f"the threshold {'drops' if mode == 'drop' else 'flags'} {flagged} of {scored} scored rows (more than "
        f"half): the model hardly tells matched pairs from shuffled ones, or the threshold is on another "
        f"scale. {kind} spread: {spread}. Check the model (l2c clip eval / l2c stage2 eval), or give "
        "--drop-share for a known noise rate, or a lower --threshold / --null-quantile"
    )


def report_md(r: dict) -> str:
    lines = [
        f"# Caption filter: {r['input']}",
        "",
        f"- encoder: {r['encoder']['kind']} {r['encoder']['path']}",
        f"- rows: {r['rows']} ({r['scored']} scored), {r['flagged']} under the threshold "
        f"({'dropped' if r['mode'] == 'drop' else 'flagged'}), {r['kept']} written",
        f"- score: {r['score']}; threshold ({r['threshold_from']}): "
        + ", ".join(f"{f} {v:.4f}" for f, v in r["threshold"].items()),
        f"- mean {r['score']}, own vs shuffled pairs: "
        + ", ".join(
            f"{f} {r['score_mean'][f]:.4f} vs {r['shuffled_mean'][f]:.4f}"
            for f in r["fields"]
            if r["shuffled_mean"][f] is not None
        ),
        "- mean cosine, own vs shuffled pairs: "
        + ", ".join(
            f"{f} {r['cosine_mean'][f]:.4f} vs {r['shuffled_cosine_mean'][f]:.4f}"
            for f in r["fields"]
            if r["shuffled_cosine_mean"][f] is not None
        ),
    ]
    lines += [f"- **WARNING**: {w}" for w in r.get("warnings", [])]
    if "measured" in r:
        m = r["measured"]
        lines.append(
            f"- against the known corruptions: precision {m['precision']}, recall {m['recall']}, "
            f"clean rows dropped {m['clean_dropped_share']:.1%}, AUC {m['auc']}"
        )
    lines += [
        "",
        "## Lowest-scoring rows",
        "",
        "| row | image | " + " | ".join(r["fields"]) + " | caption |",
        "|---|---|" + "---|" * len(r["fields"]) + "---|",
    ]
    worst = sorted(r["flagged_rows"], key=lambda x: min(x["scores"].values()))[:20]
    for x in worst:
        cap = next(iter(x["captions"].values())).replace("|", "/")[:90]
        lines.append(
            f"| {x['row']} | {x['image']} | "
            + " | ".join(f"{x['scores'][f]:.3f}" for f in r["fields"])
            + f" | {cap} |"
        )
    return "\n".join(lines) + "\n"


def plot_scores(scores: dict, null: dict, th: dict, out: Path, kind: str = "zscore") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores), 3.2), squeeze=False)
    for ax, (f, s) in zip(axes[0], scores.items()):
        ax.hist(null[f].numpy(), bins=40, alpha=0.5, density=True, label="shuffled pairs")
        ax.hist(s.numpy(), bins=40, alpha=0.6, density=True, label="own pairs")
        ax.axvline(th[f], color="k", linestyle="--", label=f"threshold {th[f]:.3f}")
        ax.set_title(f"{f} captions")
        ax.set_xlabel("cosine(image, caption)" if kind == "cosine" else "z-score of cosine(image, caption)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save(out, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
