"""lmms-eval: the local tasks' scoring, the normalized table, and a real run of lmms-eval's own entry
point (`python -m lmms_eval eval --model llava_hf`) on a tiny LLaVA, offline."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from l2c_llava.cli import main
from l2c_llava.mllm.build import build_llava, save_llava
from l2c_llava.mllm.lmms import (
    caption_bleu4,
    normalize_results,
    pope_f1,
    pope_process_results,
    rouge_l,
    vqa_process_results,
)

from .test_stage2_model import tiny_vision
from .tiny_llm import save_tiny_llm


def test_scoring_functions():
    doc = {"answers": ["2", "two"]}
    assert vqa_process_results(doc, ["Two."]) == {"exact_match": 1.0}
    assert vqa_process_results(doc, ["three"]) == {"exact_match": 0.0}
    assert vqa_process_results(doc, []) == {"exact_match": 0.0}
    r = pope_process_results({"answer": "yes"}, ["Yes, there is."])
    assert r["pope_accuracy"] == 1.0 and r["pope_yes_ratio"] == 1.0
    # F1 with yes as the positive class: tp=1, fp=1, fn=1 -> 0.5; an answer that is neither counts as no
    items = [
        {"pred": "yes", "gold": "yes"},
        {"pred": "yes", "gold": "no"},
        {"pred": "maybe", "gold": "yes"},
        {"pred": "no", "gold": "no"},
    ]
    assert pope_f1(items) == pytest.approx(0.5)
    assert pope_f1([{"pred": "no", "gold": "yes"}]) == 0.0
    # ROUGE-L: LCS "a red circle" (3 of 4 words each way) -> F = 0.75
    assert rouge_l("a red circle here", "a big red circle") == pytest.approx(0.75)
    assert rouge_l("", "x") == 0.0
    same = [{"pred": "a red circle on a blue background", "refs": ["a red circle on a blue background"]}]
    assert caption_bleu4(same) == pytest.approx(1.0)
    assert caption_bleu4([{"pred": "green", "refs": ["a red circle on a blue background"]}]) < 0.1


def test_task_aliases_expand_to_lmms_eval_names():
    from l2c_llava.mllm.lmms import expand_tasks

    paper = expand_tasks(["paper"])
    assert {"vqav2_val", "gqa", "textvqa_val", "pope_adv", "mme"} <= set(paper) and "mmvet" not in paper
    assert "mmvet" in expand_tasks(["paper_all"])
    assert expand_tasks(["local", "l2c_vqa", "gqa"]) == [
        "l2c_vqa",
        "l2c_vqa_shuffled",
        "l2c_pope",
        "l2c_caption",
        "gqa",
    ]


def test_normalize_results_keeps_values_stderr_and_n():
    res = {
        "results": {
            "l2c_vqa": {
                "alias": "l2c_vqa",
                "exact_match,none": 0.25,
                "exact_match_stderr,none": 0.1,
                "exact_match_stderr_clt,none": 0.1,
                "exact_match_stderr_clustered,none": "N/A",
            },
            "l2c_pope": {"pope_f1,none": 0.5, "pope_f1_stderr,none": "N/A"},
        },
        "n-samples": {
            "l2c_vqa": {"original": 10, "effective": 8},
            "l2c_pope": {"original": 4, "effective": 4},
        },
    }
    rows = normalize_results(res)
    assert rows == [
        {"task": "l2c_pope", "metric": "pope_f1", "value": 0.5, "stderr": None, "n": 4},
        {"task": "l2c_vqa", "metric": "exact_match", "value": 0.25, "stderr": 0.1, "n": 8},
    ]


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    save_tiny_llm(root / "llm", "llama")
    tiny_vision().save_pretrained(root / "vision")
    model, proc = build_llava(root / "vision", SimpleNamespace(name_or_path=str(root / "llm")))
    save_llava(model, proc, root / "m", {"template": "vicuna_v1", "image_aspect_ratio": "pad"})
    return root / "m"


def test_lmms_eval_runs_for_real_on_the_local_tasks(tmp_path, tiny_llava, synth_dir, capsys):
    out = tmp_path / "eval"
    args = [
        "mllm",
        "eval",
        "--model",
        str(tiny_llava),
        "--tasks",
        "l2c_vqa,l2c_vqa_shuffled,l2c_pope,l2c_caption",
        "--out",
        str(out),
        "--data",
        str(synth_dir),
        "--limit",
        "3",
        "--task-limit",
        "l2c_caption=2",
    ]
    assert main(args) == 0
    table = json.loads((out / "results.json").read_text())["rows"]
    got = {(r["task"], r["metric"]) for r in table}
    assert got == {
        ("l2c_vqa", "exact_match"),
        ("l2c_vqa_shuffled", "exact_match"),
        ("l2c_pope", "pope_accuracy"),
        ("l2c_pope", "pope_f1"),
        ("l2c_pope", "pope_yes_ratio"),
        ("l2c_caption", "bleu4"),
        ("l2c_caption", "rougeL"),
    }
    assert all(r["n"] == (2 if r["task"] == "l2c_caption" else 3) and 0.0 <= r["value"] <= 1.0 for r in table)
    # lmms-eval's own files are kept as written; its per-sample log agrees with the table
    raw = list((out / "lmms_eval").rglob("*results.json"))
    samples = list((out / "lmms_eval").rglob("*samples_l2c_vqa.jsonl"))
    assert len(raw) == 1 and len(samples) == 1
    logged = [json.loads(x) for x in samples[0].read_text().splitlines()]
    assert len(logged) == 3
    em = next(r for r in table if r["metric"] == "exact_match")
    assert em["value"] == pytest.approx(sum(s["exact_match"] for s in logged) / 3)
    # the generated task folder points at JSONL files whose images were resolved under the root
    rows = [json.loads(x) for x in (out / "tasks" / "l2c_vqa.jsonl").read_text().splitlines()]
    assert rows and all(r["image_path"].startswith(str(synth_dir.resolve())) for r in rows)
    assert "| l2c_vqa | exact_match |" in (out / "results.md").read_text()
    # the shuffled task: the same questions in the same order (they pair up), each on another image
    other = [json.loads(x) for x in (out / "tasks" / "l2c_vqa_shuffled.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in other] == [r["question_id"] for r in rows]
    assert all(o["image_path"] != r["image_path"] == o["own_image_path"] for o, r in zip(other, rows))


def test_a_task_limit_draws_questions_across_the_file(tmp_path, synth_dir):
    """A cap draws rows across the file (not the first images' questions), the same draw for l2c_vqa and
    l2c_vqa_shuffled, in file order."""
    from l2c_llava.mllm.lmms import local_task_rows, prepare_local_tasks

    every = local_task_rows("l2c_vqa", synth_dir)
    dest = prepare_local_tasks(["l2c_vqa", "l2c_vqa_shuffled"], synth_dir, tmp_path, limit=5)
    got = {
        t: [json.loads(x) for x in (dest / f"{t}.jsonl").read_text().splitlines()]
        for t in ("l2c_vqa", "l2c_vqa_shuffled")
    }
    ids = [r["question_id"] for r in got["l2c_vqa"]]
    assert len(ids) == 5 and ids == [r["question_id"] for r in got["l2c_vqa_shuffled"]]
    order = [r["question_id"] for r in every]
    assert [order.index(i) for i in ids] == sorted(order.index(i) for i in ids)
    assert ids != order[:5] and len({r["image_path"] for r in got["l2c_vqa"]}) > 1


def test_lmms_eval_bad_inputs_are_named(tmp_path, tiny_llava, synth_dir, capsys):
    # not a LLaVA folder
    (tmp_path / "notllava").mkdir()
    (tmp_path / "notllava" / "config.json").write_text('{"model_type": "clip"}')
    assert (
        main(
            [
                "mllm",
                "eval",
                "--model",
                str(tmp_path / "notllava"),
                "--tasks",
                "l2c_vqa",
                "--out",
                str(tmp_path / "o"),
                "--data",
                str(synth_dir),
            ]
        )
        == 2
    )
    assert "not a transformers LLaVA folder" in capsys.readouterr().err
    # a local task without --data
    assert (
        main(
            ["mllm", "eval", "--model", str(tiny_llava), "--tasks", "l2c_pope", "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "are local: give --data" in capsys.readouterr().err
    # a per-task limit only for local tasks, and well-formed
    assert (
        main(
            [
                "mllm",
                "eval",
                "--model",
                str(tiny_llava),
                "--tasks",
                "gqa",
                "--out",
                str(tmp_path / "o"),
                "--task-limit",
                "gqa=3",
            ]
        )
        == 2
    )
    assert "only local tasks take one" in capsys.readouterr().err
    assert (
        main(
            [
                "mllm",
                "eval",
                "--model",
                str(tiny_llava),
                "--tasks",
                "l2c_vqa",
                "--out",
                str(tmp_path / "o"),
                "--data",
                str(synth_dir),
                "--task-limit",
                "l2c_vqa=x",
            ]
        )
        == 2
    )
    assert "use TASK=N" in capsys.readouterr().err
    # a question row whose image escapes the root is reported with file and row
    bad = tmp_path / "data"
    (bad / "eval").mkdir(parents=True)
    (bad / "images").mkdir()
    (bad / "eval" / "vqa_test.jsonl").write_text(
        json.dumps({"question_id": 1, "image": "../../etc/passwd", "question": "q?", "answer": "a"}) + "\n"
    )
    assert (
        main(
            [
                "mllm",
                "eval",
                "--model",
                str(tiny_llava),
                "--tasks",
                "l2c_vqa",
                "--out",
                str(tmp_path / "o"),
                "--data",
                str(bad),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "vqa_test.jsonl" in err and "escapes the image root" in err
