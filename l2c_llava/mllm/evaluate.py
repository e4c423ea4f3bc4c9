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

from l2c_llava.data.readers import DataError, RowProblem, iter_rows, resolve_under
from l2c_llava.io import atomic_write_json, atomic_write_jsonl

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
            rows.append({"id": str(row["question_id"]), "question": str(row["question"]),
                         "image_path": resolve_under(image_root, row["image"]), "answers": [str(a) for a in answers],
                         "type": row.get("type", "all")})  # fmt: skip
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
def evaluate_vqa(model_dir: str | os.PathLike, questions_path: str | os.PathLike, image_root: str | os.PathLike,
                 out_dir: str | os.PathLike, train_json: str | None = None, batch_size: int = 8,
                 max_new_tokens: int = 8, limit: int | None = None) -> dict:  # fmt: skip
    from tqdm.auto import tqdm

    from l2c_llava.data.images import load_rgb
    from l2c_llava.mllm.data import expand2square, mean_colour
    from l2c_llava.mllm.export import _load_hf

    folder, model, processor = _load_hf(model_dir)
    meta = json.loads((folder / "l2c_mllm.json").read_text()) if (folder / "l2c_mllm.json").is_file() else {}
    questions = read_questions(questions_path, image_root)[:limit]
    tok = processor.tokenizer
    tok.padding_side = "left"  # batched generation continues every row at the same position
    model.eval()
    records = []
    for lo in tqdm(range(0, len(questions), batch_size), desc="vqa", unit="batch"):
        chunk = questions[lo : lo + batch_size]
        texts = [
            processor.apply_chat_template(
                [user_turn(f"{q['question']}\n{SHORT_ANSWER}")], add_generation_prompt=True
            )
            for q in chunk
        ]
        images = [load_rgb(q["image_path"]) for q in chunk]
        if meta.get("image_aspect_ratio", "pad") == "pad":
            images = [expand2square(im, mean_colour(processor.image_processor)) for im in images]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        for q, ids in zip(chunk, out[:, inputs["input_ids"].shape[1] :]):
            pred = tok.decode(ids, skip_special_tokens=True)
            ok = normalize(pred) in {normalize(a) for a in q["answers"]}
            records.append({"question_id": q["id"], "type": q["type"], "prediction": pred.strip(),
                            "answers": q["answers"], "correct": ok})  # fmt: skip
    metrics = summarize(records)
    if train_json:
        prior = prior_answers(train_json, questions)
        hits = [normalize(prior.get(question_type(q["question"]), "")) in {normalize(a) for a in q["answers"]}
                for q in questions]  # fmt: skip
        metrics["prior"] = summarize([{"type": q["type"], "correct": h} for q, h in zip(questions, hits)])
    out = Path(out_dir)
    atomic_write_jsonl(out / "vqa_answers.jsonl", records)
    atomic_write_json(out / "vqa_metrics.json", metrics)
    return metrics


def user_turn(text: str, image: bool = True) -> dict:
    return {
        "role": "user",
        "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}],
    }


def summarize(records: list[dict]) -> dict:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_type[r["type"]].append(bool(r["correct"]))
    return {"accuracy": sum(r["correct"] for r in records) / max(1, len(records)), "n": len(records),
            "by_type": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_type.items())}}  # fmt: skip
