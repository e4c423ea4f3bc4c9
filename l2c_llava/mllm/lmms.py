"""lmms-eval on an exported transformers LLaVA (``l2c mllm eval``).

The model goes through lmms-eval's own entry point (``python -m lmms_eval eval``) in a child process,
so what is measured is what lmms-eval measures. Two lmms-eval models: ``l2c_llava`` (the default), the
project's own, batched (:mod:`l2c_llava.mllm.lmms_model`; the same answers as ``llava_hf`` at batch 1,
tested), and lmms-eval's ``llava_hf``, which answers one question at a time. Two kinds of tasks:

- the paper's benchmarks by their lmms-eval names (``vqav2_val``, ``gqa``, ``pope``, ``mme``, ...),
  which lmms-eval downloads from the Hub (a GPU cluster with internet);
- the local tasks shipped in ``mllm/tasks`` (``l2c_vqa``, ``l2c_vqa_shuffled``, ``l2c_pope``,
  ``l2c_caption``), which run
  offline on the embedded dataset's eval splits (or any data in the same formats): their rows are
  written as JSONL with each image resolved under the image root, and the task YAMLs are pointed at
  those files in a copy of the task folder inside the output folder.

Results land in the output folder as lmms-eval wrote them (``lmms_eval/``) and as one normalized
table (``results.json``, ``results.md``: task, metric, value, stderr, n).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

from l2c_llava import layout as L
from l2c_llava.data.readers import DataError, RowProblem, iter_rows, resolve_under
from l2c_llava.errors import CannotRunError
from l2c_llava.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from l2c_llava.mllm.evaluate import normalize, shifted_images

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = ROOT / "mllm" / "tasks"
LOCAL_TASKS = ("l2c_vqa", "l2c_vqa_shuffled", "l2c_pope", "l2c_caption")
# The paper table's columns by their lmms-eval names (RECIPE.md "Evaluation with lmms-eval"); the
# last four need a GPT judge (OPENAI_API_KEY). `--tasks paper` / `paper_all` expand to them.
PAPER_TASKS = (
    "vqav2_val",
    "gqa",
    "vizwiz_vqa_val",
    "scienceqa_img",
    "textvqa_val",
    "pope_random",
    "pope_pop",
    "pope_adv",
    "mme",
    "seedbench",
)
JUDGED_TASKS = ("mmbench_en_dev", "mmbench_cn_dev", "llava_in_the_wild", "mmvet")
ALIASES = {"paper": PAPER_TASKS, "paper_all": PAPER_TASKS + JUDGED_TASKS, "local": LOCAL_TASKS}
# lmms-eval models `l2c mllm eval` runs: ours (batched) and lmms-eval's own (batch size 1 only)
LMMS_MODELS = ("l2c_llava", "llava_hf")
DEFAULT_LMMS_MODEL = "l2c_llava"


def expand_tasks(tasks: list[str]) -> list[str]:
    out: list[str] = []
    for t in tasks:
        for x in ALIASES.get(t, (t,)):
            if x not in out:
                out.append(x)
    return out


# ---------------------------------------------------------------- scoring (called from mllm/tasks/utils.py)
def vqa_process_results(doc, results):
    pred = normalize(results[0]) if results else ""
    return {"exact_match": float(pred in {normalize(str(a)) for a in doc["answers"]})}


def yes_no(text: str) -> str:
    t = normalize(text)
    return "yes" if t.startswith("yes") else "no" if t.startswith("no") else t


def pope_process_results(doc, results):
    pred, gold = yes_no(results[0] if results else ""), yes_no(doc["answer"])
    return {
        "pope_accuracy": float(pred == gold),
        "pope_f1": {"pred": pred, "gold": gold},
        "pope_yes_ratio": float(pred == "yes"),
    }


def pope_f1(items) -> float:
    """F1 with "yes" as the positive class (POPE's convention); an answer that is neither counts as no."""
    tp = sum(i["pred"] == "yes" and i["gold"] == "yes" for i in items)
    fp = sum(i["pred"] == "yes" and i["gold"] != "yes" for i in items)
    fn = sum(i["pred"] != "yes" and i["gold"] == "yes" for i in items)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(pred: str, ref: str) -> float:
    a, b = _words(pred), _words(ref)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def caption_process_results(doc, results):
    pred = (results[0] if results else "").strip()
    refs = [str(r) for r in doc["references"]]
    return {"bleu4": {"pred": pred, "refs": refs}, "rougeL": max(rouge_l(pred, r) for r in refs)}


def caption_bleu4(items) -> float:
    """Corpus BLEU-4 (sacrebleu, 13a tokenisation) over every image's references, on 0-1 like COCO's."""
    import sacrebleu

    n_refs = max(len(i["refs"]) for i in items)
    streams = [[i["refs"][k] if k < len(i["refs"]) else i["refs"][0] for i in items] for k in range(n_refs)]
    return float(sacrebleu.corpus_bleu([i["pred"] for i in items], streams).score) / 100


# ---------------------------------------------------------------- local task data
def _rows(path: Path, image_root: Path, build) -> list[dict]:
    out, problems = [], []
    for label, row, err in iter_rows(path):
        if err:
            problems.append(RowProblem(str(path), label, err))
            continue
        try:
            image = resolve_under(image_root, row["image"])
            if not image.is_file():
                raise ValueError(f"image {row['image']!r} not found under {image_root}")
            out.append({"image_path": str(image), **build(row)})
        except (KeyError, ValueError, TypeError) as e:
            problems.append(RowProblem(str(path), label, f"{type(e).__name__}: {e}"))
    if problems:
        raise DataError(problems, str(path), total=len(out) + len(problems))
    return out


def local_task_rows(task: str, data_dir: Path, image_root: Path | None = None) -> list[dict]:
    """The rows of a local task from a data folder in the embedded dataset's layout
    (``eval/vqa_test.jsonl``, ``eval/pope_test.jsonl``, ``retrieval/karpathy.json``)."""
    root = image_root or data_dir / L.IMAGES
    if task == "l2c_vqa":
        return _rows(
            data_dir / L.VQA["test"],
            root,
            lambda r: {
                "question_id": str(r["question_id"]),
                "question": str(r["question"]),
                "answer": str(r["answer"]),
                "answers": [str(a) for a in (r.get("answers") or [r["answer"]])],
                "type": str(r.get("type", "all")),
            },
        )
    if task == "l2c_vqa_shuffled":  # the same questions, each shown another test image
        rows = local_task_rows("l2c_vqa", data_dir, image_root)
        other = shifted_images([Path(r["image_path"]) for r in rows])
        return [r | {"image_path": str(o), "own_image_path": r["image_path"]} for r, o in zip(rows, other)]
    if task == "l2c_pope":
        return _rows(
            data_dir / L.POPE,
            root,
            lambda r: {
                "question_id": str(r["question_id"]),
                "question": str(r["question"]),
                "answer": str(r["answer"]),
                "category": str(r.get("category", "random")),
            },
        )
    if task == "l2c_caption":
        path = data_dir / L.RETRIEVAL_SHORT
        if not path.is_file():
            raise CannotRunError(f"{path}: not found (the caption task reads the Karpathy-style test split)")
        images = json.loads(path.read_text()).get("images", [])
        rows, problems = [], []
        for i, im in enumerate(images):
            if im.get("split") != "test":
                continue
            rel = "/".join(x for x in (im.get("filepath", ""), im.get("filename", "")) if x)
            try:
                image = resolve_under(root, rel)
                refs = [s["raw"] for s in im["sentences"]]
                if not image.is_file() or not refs:
                    raise ValueError(f"image {rel!r} missing under {root} or no reference captions")
                rows.append(
                    {"image_path": str(image), "image_id": str(im.get("imgid", i)), "references": refs}
                )
            except (KeyError, ValueError, TypeError) as e:
                problems.append(RowProblem(str(path), f"images[{i}]", f"{type(e).__name__}: {e}"))
        if problems:
            raise DataError(problems, str(path), total=len(rows) + len(problems))
        return rows
    raise CannotRunError(f"unknown local task {task!r}; local tasks are {', '.join(LOCAL_TASKS)}")


def spread_sample(rows: list[dict], cap: int, seed: int = 0) -> list[dict]:
    """`cap` rows drawn at random (seeded, in file order) rather than the first `cap`: the first rows
    are the questions of a few images, which would make the sample one of images, not of questions.
    The same draw for every task of the same length, so ``l2c_vqa`` and ``l2c_vqa_shuffled`` keep the
    same questions in the same order (their per-question answers pair up for McNemar's test)."""
    if cap >= len(rows):
        return rows
    keep = sorted(random.Random(f"{seed}-{len(rows)}").sample(range(len(rows)), cap))
    return [rows[i] for i in keep]


def prepare_local_tasks(
    tasks: list[str],
    data_dir: Path,
    out: Path,
    image_root: Path | None = None,
    limit: int | None = None,
    task_limits: dict[str, int] | None = None,
) -> Path:
    """A copy of ``mllm/tasks`` under ``out/tasks`` whose YAMLs read JSONL files written there."""
    dest = out / L.EVAL_TASKS
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(TASK_DIR / "utils.py", dest / "utils.py")
    for task in tasks:
        rows = local_task_rows(task, data_dir, image_root)
        cap = (task_limits or {}).get(task, limit)
        if cap:
            rows = spread_sample(rows, cap)
        if not rows:
            raise CannotRunError(f"task {task}: no rows in {data_dir}")
        data = dest / f"{task}.jsonl"
        atomic_write_jsonl(data, rows)
        text = (TASK_DIR / f"{task}.yaml").read_text()
        if "__DATA_FILE__" not in text:
            raise CannotRunError(
                f"{TASK_DIR / f'{task}.yaml'}: no __DATA_FILE__ placeholder for its data file"
            )
        atomic_write_text(dest / f"{task}.yaml", text.replace("__DATA_FILE__", json.dumps(str(data))))
    return dest


# ---------------------------------------------------------------- running lmms-eval
def lmms_command(
    model_dir: Path,
    tasks: list[str],
    out: Path,
    include_path: Path | None,
    device: str,
    batch_size: int,
    limit: int | None,
    model: str = DEFAULT_LMMS_MODEL,
) -> list[str]:
    model_args = f"pretrained={model_dir},device={device}"
    if model == "llava_hf":
        model_args += f",device_map={device}"
    cmd = [
        sys.executable,
        "-m",
        "l2c_llava.mllm.lmms_entry",
        "eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        ",".join(tasks),
        "--batch_size",
        str(batch_size),
        "--output_path",
        str(out / L.LMMS_EVAL_OUTPUT),
        "--log_samples",
    ]
    if include_path is not None:
        cmd += ["--include_path", str(include_path)]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def run_lmms_eval(
    model_dir: str | os.PathLike,
    tasks: list[str],
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    limit: int | None = None,
    task_limits: dict[str, int] | None = None,
    offline: bool | None = None,
    model: str = DEFAULT_LMMS_MODEL,
) -> list[dict]:
    """Run lmms-eval on `model_dir` for `tasks` with the lmms-eval `model` (``l2c_llava``: batched;
    ``llava_hf``: batch size 1), then write the normalized table. Returns its rows."""
    if model not in LMMS_MODELS:
        raise CannotRunError(f"lmms-eval model {model!r}: use one of {', '.join(LMMS_MODELS)}")
    if model == "llava_hf" and batch_size != 1:
        raise CannotRunError(
            f"lmms-eval's llava_hf answers one question at a time (batch size 1, not {batch_size}); "
            "use --batch-size 1, or the batched l2c_llava model"
        )
    folder = Path(model_dir).resolve()
    if (folder / L.TRAINED_MODEL / "config.json").is_file():  # an mllm run folder
        folder = folder / L.TRAINED_MODEL
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if cfg.get("model_type") != "llava" or not (folder / "processor_config.json").is_file():
        raise CannotRunError(
            f"{model_dir}: not a transformers LLaVA folder with its processor (config.json with "
            "model_type llava, processor_config.json); point at a finetune run or make one with "
            "`l2c export llava --format hf`"
        )
    if cfg.get("l2c_connector"):
        kind = cfg["l2c_connector"].get("type")
        raise CannotRunError(
            f"{folder}: a LLaVA with the {kind} connector; lmms-eval's llava_hf model loads it with "
            "transformers' LLaVA class, which takes only the MLP connector. Score it with "
            "`l2c mllm eval-vqa` (our loader) instead"
        )
    try:
        import lmms_eval  # noqa: F401
    except ImportError as e:
        raise CannotRunError(
            f"lmms-eval is not installed ({e}); `bash scripts/setup_env.sh` installs it "
            "(without torchvision, see README 'Evaluation')"
        ) from e
    tasks = expand_tasks(tasks)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    local = [t for t in tasks if t in LOCAL_TASKS]
    unknown = set(task_limits or {}) - set(local)
    if unknown:
        raise CannotRunError(
            f"per-task limits for {sorted(unknown)}: only local tasks take one (use --limit for the others)"
        )
    for stale in (L.EVAL_RESULTS, "results.md"):  # a result folder holds the result of one run
        (out / stale).unlink(missing_ok=True)
    include = None
    if local:
        if data_dir is None:
            raise CannotRunError(
                f"tasks {', '.join(local)} are local: give --data (the embedded dataset's folder)"
            )
        root = Path(image_root) if image_root else None
        include = prepare_local_tasks(local, Path(data_dir), out, root, limit, task_limits)
    env = dict(os.environ)
    if offline if offline is not None else all(t in LOCAL_TASKS for t in tasks):
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    raw = out / L.LMMS_EVAL_OUTPUT
    if raw.exists():
        shutil.rmtree(raw)
    # local tasks are cut when their rows are written; lmms-eval's --limit caps the others
    cmd = lmms_command(folder, tasks, out, include, device, batch_size, limit, model)
    atomic_write_json(
        out / "lmms_command.json", {"argv": cmd[1:], "offline": env.get("HF_HUB_OFFLINE") == "1"}
    )
    # lmms-eval's output goes to the terminal as it comes (its progress) and to lmms_eval.log
    lines: list[str] = []
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            lines.append(line)
            sys.stderr.write(line)
    atomic_write_text(out / "lmms_eval.log", "".join(lines))
    if proc.returncode != 0:
        tail = "".join(lines[-25:])
        raise CannotRunError(
            f"lmms-eval exited with {proc.returncode} (full log: {out / 'lmms_eval.log'}):\n{tail}"
        )
    results = sorted(raw.rglob("*results.json"))
    if not results:
        raise CannotRunError(f"lmms-eval wrote no *results.json under {raw} (log: {out / 'lmms_eval.log'})")
    rows = normalize_results(json.loads(results[-1].read_text()))
    write_table(out, rows, results[-1])
    return rows


def normalize_results(res: dict) -> list[dict]:
    """lmms-eval's results JSON -> rows of task, metric, value, stderr, n (filters dropped from names)."""
    n_samples = res.get("n-samples", {})
    rows = []
    for task, metrics in sorted(res.get("results", {}).items()):
        n = n_samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if key == "alias" or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "n": n,
                }
            )
    return rows


def write_table(out: Path, rows: list[dict], source: Path) -> None:
    atomic_write_json(out / L.EVAL_RESULTS, {"source": str(source.relative_to(out)), "rows": rows})
    lines = ["| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
    for r in rows:
        se = f"{r['stderr']:.4f}" if r["stderr"] is not None else "-"
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {se} | {r['n'] if r['n'] is not None else '-'} |"
        )
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
