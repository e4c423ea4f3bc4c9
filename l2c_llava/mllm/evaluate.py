"""Short-answer VQA accuracy of a trained LLaVA on held-out questions (``l2c mllm eval-vqa``): greedy
answers to ``{question}\\nAnswer the question using a single word or phrase.`` (LLaVA-1.5's short
answer prompt), exact match after normalisation against any accepted answer, per question type, next
to the prior baseline: always giving the most frequent answer of the question's type among the
training answers (what a model that ignores the image can reach).

The question file is JSONL with ``question_id``, ``image``, ``question``, ``answers`` (or
``answer``) and an optional ``type`` (the synthetic set's format; lmms-eval tasks come with the
evaluation issue).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch

from l2c_llava.cpu_threads import follow_share
from l2c_llava.data.images import load_rgb, pad_images
from l2c_llava.data.readers import DataError, RowProblem, iter_rows, resolve_under
from l2c_llava.io import atomic_save, atomic_write_json, atomic_write_jsonl
from l2c_llava.mllm.export import load_trained_llava
from l2c_llava.stats import paired_comparison, sign_test_p, wilson_interval  # noqa: F401 (re-exported)

SHORT_ANSWER = "Answer the question using a single word or phrase."
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalize(text: str) -> str:
    t = text.strip().lower().split("\n")[0]
    t = re.sub(r"[^\w\s-]", "", t).strip()
    t = re.sub(r"^(a|an|the)\s+", "", t)
    return NUMBERS.get(t, t)


def read_questions(path: str | os.PathLike, image_root: str | os.PathLike) -> list[dict]:
    rows, problems = [], []
    for label, row, err in iter_rows(Path(path)):
        if err:
            problems.append(RowProblem(str(path), label, err))
            continue
        try:
            answers = row.get("answers") or [row["answer"]]
            rows.append(
                {
                    "id": str(row["question_id"]),
                    "question": str(row["question"]),
                    "image_path": resolve_under(image_root, row["image"]),
                    "answers": [str(a) for a in answers],
                    "type": row.get("type", "all"),
                }
            )
        except (KeyError, ValueError, TypeError) as e:
            problems.append(RowProblem(str(path), label, f"bad question row ({type(e).__name__}: {e})"))
    if problems:
        raise DataError(problems, str(path), total=len(rows) + len(problems))
    return rows


def prior_answers(train_json: str | os.PathLike, questions: list[dict]) -> dict[str, str]:
    """Most frequent training answer per question type (types guessed from the question's wording)."""
    data = json.loads(Path(train_json).read_text())
    by_type: dict[str, Counter] = defaultdict(Counter)
    for row in data:
        conv = row.get("conversations", [])
        for q, a in zip(conv[::2], conv[1::2]):
            by_type[question_type(q["value"])][normalize(a["value"])] += 1
    return {t: c.most_common(1)[0][0] for t, c in by_type.items() if c}


def question_type(q: str) -> str:
    q = q.lower()
    if q.startswith("how many"):
        return "count"
    if q.startswith(("is there", "are there", "is the", "are the")):
        return "existence"
    if "color" in q or "colour" in q:
        return "color"
    if "shape" in q:
        return "shape"
    if q.startswith("where"):
        return "position"
    return "other"


@torch.no_grad()
def evaluate_vqa(
    model_dir: str | os.PathLike,
    questions_path: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    train_json: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    limit: int | None = None,
    shuffled_images: bool = False,
) -> dict:
    """Greedy short answers, exact match per type; with ``train_json`` the answer prior beside them.
    ``shuffled_images`` answers every question a second time with another question's image (a
    different file, the same for every question on one image): what the model scores when the image
    carries nothing about the question, and how many answers the real image changed. Accuracy above
    the prior and above the shuffled-image run is what shows the image is used."""
    folder, model, processor = load_trained_llava(model_dir)
    meta = json.loads((folder / "l2c_mllm.json").read_text()) if (folder / "l2c_mllm.json").is_file() else {}
    questions = read_questions(questions_path, image_root)[:limit]
    model.eval()
    preds = _answers(
        model,
        processor,
        meta,
        questions,
        [q["image_path"] for q in questions],
        batch_size,
        max_new_tokens,
        "vqa",
    )
    records = [
        {
            "question_id": q["id"],
            "type": q["type"],
            "prediction": p,
            "answers": q["answers"],
            "correct": _correct(p, q),
        }
        for q, p in zip(questions, preds)
    ]
    metrics = summarize(records)
    if shuffled_images:
        other = shifted_images([q["image_path"] for q in questions])
        blind = _answers(
            model, processor, meta, questions, other, batch_size, max_new_tokens, "vqa, shuffled images"
        )
        for r, q, p in zip(records, questions, blind):
            r["prediction_shuffled_image"], r["correct_shuffled_image"] = p, _correct(p, q)
        metrics["shuffled_images"] = summarize(
            [{"type": r["type"], "correct": r["correct_shuffled_image"]} for r in records]
        )
        metrics["shuffled_images"]["answers_changed"] = round(
            sum(normalize(r["prediction"]) != normalize(r["prediction_shuffled_image"]) for r in records)
            / max(1, len(records)),
            4,
        )
        metrics["vs_shuffled_images"] = paired_comparison(
            [r["correct"] for r in records], [r["correct_shuffled_image"] for r in records]
        )
    if train_json:
        prior = prior_answers(train_json, questions)
        hits = [_correct(prior.get(question_type(q["question"]), ""), q) for q in questions]
        metrics["prior"] = summarize([{"type": q["type"], "correct": h} for q, h in zip(questions, hits)])
        metrics["vs_prior"] = paired_comparison([r["correct"] for r in records], hits)
    out = Path(out_dir)
    atomic_write_jsonl(out / "vqa_answers.jsonl", records)
    atomic_write_json(out / "vqa_metrics.json", metrics)
    plot_by_type(metrics, out / "vqa_by_type.png", records)
    return metrics


def plot_by_type(metrics: dict, path: Path, records: list[dict]) -> Path:
    """Accuracy per question type, the model (95% Wilson interval) beside its shuffled-image run and
    the answer prior when they were measured: where the image helps is where the bars part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted(metrics["by_type"]) + ["all"]
    series = [("model", metrics)] + [
        (label, metrics[key])
        for key, label in (("shuffled_images", "another image"), ("prior", "answer prior"))
        if key in metrics
    ]
    counts = Counter(r["type"] for r in records)
    hits = Counter(r["type"] for r in records if r["correct"])
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(1.3 + 1.1 * len(types), 3.6))
    for k, (label, m) in enumerate(series):
        values = [m["by_type"].get(t, 0.0) for t in types[:-1]] + [m["accuracy"]]
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(types))]
        err = None
        if label == "model":
            bounds = [wilson_interval(hits[t], counts[t]) for t in types[:-1]] + [tuple(m["accuracy_ci95"])]
            err = [
                [v - lo for v, (lo, _) in zip(values, bounds)],
                [hi - v for v, (_, hi) in zip(values, bounds)],
            ]
        ax.bar(xs, values, width, label=label, yerr=err, capsize=2)
    ax.set_xticks(range(len(types)), [f"{t}\n({counts[t] if t != 'all' else metrics['n']})" for t in types])
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=len(series))
    ax.set_title("held-out short-answer VQA by question type (n), 95% interval on the model", fontsize=9)
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def shifted_images(paths: list[Path]) -> list[Path]:
    """Each question's image replaced by the next distinct image in sorted order (a rotation, so no
    question keeps its own image while there are two or more images)."""
    unique = sorted(set(paths))
    nxt = {p: unique[(i + 1) % len(unique)] for i, p in enumerate(unique)}
    return [nxt[p] for p in paths]


def _correct(prediction: str, q: dict) -> bool:
    return normalize(prediction) in {normalize(a) for a in q["answers"]}


def _answers(
    model,
    processor,
    meta: dict,
    questions: list[dict],
    image_paths: list,
    batch_size: int,
    max_new_tokens: int,
    desc: str,
) -> list[str]:
    from tqdm.auto import tqdm

    tok = processor.tokenizer
    tok.padding_side = "left"  # batched generation continues every row at the same position
    preds: list[str] = []
    for lo in tqdm(range(0, len(questions), batch_size), desc=desc, unit="batch"):
        follow_share()  # under a parallel pipeline: the cores a neighbour left
        chunk = questions[lo : lo + batch_size]
        texts = [
            processor.apply_chat_template(
                [user_turn(f"{q['question']}\n{SHORT_ANSWER}")], add_generation_prompt=True
            )
            for q in chunk
        ]
        images = [load_rgb(p) for p in image_paths[lo : lo + batch_size]]
        images = pad_images(images, processor.image_processor, meta.get("image_aspect_ratio", "pad"))
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        preds += [
            tok.decode(ids, skip_special_tokens=True).strip()
            for ids in out[:, inputs["input_ids"].shape[1] :]
        ]
    return preds


def user_turn(text: str, image: bool = True) -> dict:
    return {
        "role": "user",
        "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}],
    }


def summarize(records: list[dict]) -> dict:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_type[r["type"]].append(bool(r["correct"]))
    hits = sum(bool(r["correct"]) for r in records)
    return {
        "accuracy": hits / max(1, len(records)),
        "n": len(records),
        "accuracy_ci95": [round(x, 4) for x in wilson_interval(hits, len(records))],
        "by_type": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_type.items())},
    }
