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

from .conftest import ROOT

ROOT_CONFIG = ROOT / "pipeline" / "configs" / "demo.yaml"


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
def tiny_llava(tmp_path_factory, llava_parts):
    """The tiny LLaVA-1.5 (Vicuna template, padded images) of conftest's llava_parts, saved."""
    out = tmp_path_factory.mktemp("lmms") / "m"
    model, proc = build_llava(llava_parts / "vision", SimpleNamespace(name_or_path=str(llava_parts / "llm")))
    save_llava(model, proc, out, {"template": "vicuna_v1", "image_aspect_ratio": "pad"})
    return out


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


# ---------------------------------------------------------------- the batched l2c_llava model
@pytest.fixture(scope="module")
def varied_llava(tiny_llava, tmp_path_factory):
    """The tiny LLaVA with every matrix redrawn at a larger scale: its answers differ from question to
    question and image to image (at the default scale it gives one answer to everything, and equal
    answers across batch sizes would show nothing)."""
    import shutil

    import torch
    from transformers import LlavaForConditionalGeneration

    out = tmp_path_factory.mktemp("varied") / "m"
    shutil.copytree(tiny_llava, out)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def l2c_model(varied_llava):
    from l2c_llava.mllm.lmms_model import L2CLlava

    return L2CLlava(str(varied_llava), batch_size=1)


def _docs(synth_dir, n: int = 7) -> list[dict]:
    rows = [json.loads(x) for x in (synth_dir / "eval" / "vqa_test.jsonl").read_text().splitlines()][:n]
    return [
        {"image": str(synth_dir / "images" / r["image"]), "q": r["question"], "a": r["answer"]} for r in rows
    ]


def _visual(doc):
    from PIL import Image

    return [Image.open(doc["image"])]


def _instances(kind: str, args: list[tuple]):
    from lmms_eval.api.instance import Instance

    return [
        Instance(kind, a, idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
        for i, a in enumerate(args)
    ]


def test_l2c_llava_answers_equal_llava_hf_at_batch_1_and_across_batch_sizes(
    varied_llava, synth_dir, tmp_path
):
    """lmms-eval's own evaluation of the local tasks, in one process (bench/lmms_batched.py): llava_hf at
    batch 1, l2c_llava at batch 1 and at batch 4 give the same answers to every question (llava_hf's cut
    at the task's `until`, which it ignores)."""
    import subprocess
    import sys

    tasks = ["l2c_vqa", "l2c_pope", "l2c_caption"]
    args = [
        "--model",
        str(varied_llava),
        "--data",
        str(synth_dir),
        "--questions",
        "6",
        "--out",
        str(tmp_path),
    ]
    args += ["--runs", "llava_hf:1,l2c_llava:1,l2c_llava:4", "--tasks", ",".join(tasks)]
    done = subprocess.run(
        [sys.executable, "bench/lmms_batched.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    hf, one, four = json.loads((tmp_path / "lmms_batched.json").read_text())["runs"]
    assert (hf["model"], one["batch"], four["batch"]) == ("llava_hf", 1, 4)
    for task in tasks:
        assert len(hf["answers"][task]) == 6
        for doc, answer in hf["answers"][task].items():
            assert answer.split("\n\n")[0] == one["answers"][task][doc] == four["answers"][task][doc], (
                task,
                doc,
            )
    vqa = list(one["answers"]["l2c_vqa"].values())
    assert len(set(vqa)) >= 4 and all(vqa)  # the answers vary: the comparison means something


def test_l2c_llava_honours_each_requests_until_and_max_new_tokens(l2c_model, synth_dir):
    """Requests with different settings in one call: grouped by their settings, each answer bounded by
    its own max_new_tokens and cut before its own `until`, the same at batch 1 and batch 3, in the
    order asked."""
    docs = _docs(synth_dir, 6)
    l2c_model.task_dict = {"t": {"test": docs}}
    free = l2c_model.generate_batch(
        [l2c_model._chat_text(l2c_model._user_content(d["q"], 1)) for d in docs],
        [_visual(d) for d in docs],
        {"max_new_tokens": 8},
    )
    # a stop word each answer holds: its second word
    stops = [a.text.split()[1] for a in free]
    kwargs = [
        {"max_new_tokens": 8, "until": [stops[0]]},
        {"max_new_tokens": 3},
        {"max_new_tokens": 8, "until": stops[2]},
        {"max_new_tokens": 3},
        {"max_new_tokens": 8, "until": [stops[4]]},
        {"max_new_tokens": 8},
    ]

    def requests():
        return _instances(
            "generate_until",
            [(d["q"], dict(k), _visual, i, "t", "test") for i, (d, k) in enumerate(zip(docs, kwargs))],
        )

    got = {}
    for bs in (1, 3):
        l2c_model.batch_size_per_gpu = bs
        got[bs] = l2c_model.generate_until(requests())
    l2c_model.batch_size_per_gpu = 1
    assert [r.text for r in got[1]] == [r.text for r in got[3]]
    for i, (r, f, k) in enumerate(zip(got[3], free, kwargs)):
        if "until" in k:
            assert r.text == f.text.split(stops[i])[0]
            assert r.token_counts.output_tokens < 8  # the row stopped once its stop word came
        elif k["max_new_tokens"] == 3:
            assert r.token_counts.output_tokens <= 3 and f.text.startswith(r.text.strip())
        else:
            assert r.text == f.text


def test_l2c_llava_loglikelihood_batched_equals_the_models_own_loss(l2c_model, synth_dir):
    """The summed log-probability of each continuation: the same at batch 1 and batch 4 (right padding),
    and equal to minus the model's own loss over the continuation's tokens times their number."""
    import torch

    docs = _docs(synth_dir, 7)
    l2c_model.task_dict = {"t": {"test": docs}}
    args = [(d["q"], (" " if i % 2 else "") + d["a"], _visual, i, "t", "test") for i, d in enumerate(docs)]
    args.append((docs[0]["q"], lambda doc: doc["a"], _visual, 0, "t", "test"))  # doc_to_target as a function
    got = {}
    for bs in (1, 4):
        l2c_model.batch_size_per_gpu = bs
        got[bs] = l2c_model.loglikelihood(_instances("loglikelihood", args))
    l2c_model.batch_size_per_gpu = 1
    for (a, ga), (b, gb) in zip(got[1], got[4]):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert got[1][-1][0] == pytest.approx(got[1][0][0], abs=1e-5)
    m = l2c_model
    for (ctx, cont, _, i, *_), (ll, _) in zip(args[:-1], got[1]):
        image = m._pixels_ready(_visual(docs[i]))
        content = [{"type": "image"}, {"type": "text", "text": ctx}]
        prompt = m.processor(text=m._chat_text(content), images=image, return_tensors="pt")
        full = m.processor(text=m._chat_text(content, cont), images=image, return_tensors="pt")
        labels = full["input_ids"].clone()
        n_ctx = prompt["input_ids"].shape[1]
        labels[:, :n_ctx] = -100
        with torch.no_grad():
            loss = m.model(**full, labels=labels).loss
        assert ll == pytest.approx(-float(loss) * (labels.shape[1] - n_ctx), rel=1e-4)
        assert ll < 0


def test_l2c_llava_multi_round_follows_the_round_protocol(l2c_model, synth_dir):
    """generate_until_multi_round: doc i runs i % 3 + 1 rounds, each round's prompt made from the
    previous answers; the same at batch 1 and batch 3, and each round's answer is what a lone request
    with that prompt gets."""
    docs = _docs(synth_dir, 5)
    l2c_model.task_dict = {"t": {"test": docs}}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        i = docs.index(doc)
        info = (previous_round_info or 0) + 1
        seen.append((i, round_idx, list(previous_output)))
        text = f"Again: {previous_output[-1][:12]}?"
        return _visual(doc), text, round_idx > i % 3, previous_output, info

    gen = {"max_new_tokens": 4}
    args = [(d["q"], dict(gen), _visual, doc_to_text, i, "t", "test") for i, d in enumerate(docs)]
    got = {}
    for bs in (1, 3):
        l2c_model.batch_size_per_gpu = bs
        got[bs] = l2c_model.generate_until_multi_round(_instances("generate_until_multi_round", args))
    l2c_model.batch_size_per_gpu = 1
    assert got[1] == got[3]
    assert [len(r) for r in got[3]] == [i % 3 + 1 for i in range(len(docs))]
    m = l2c_model
    for i, rounds in enumerate(got[3]):
        prompts = [docs[i]["q"]] + [f"Again: {a[:12]}?" for a in rounds[:-1]]
        for text, answer in zip(prompts, rounds):
            alone = m.generate_batch([m._chat_text(m._user_content(text, 1))], [_visual(docs[i])], gen)[0]
            assert alone.text == answer


def test_l2c_llava_chat_form_answers_like_the_simple_form(l2c_model, varied_llava, synth_dir):
    """The chat class (what `--model l2c_llava` resolves to) on lmms-eval's messages gives the simple
    class's answers."""
    from l2c_llava.mllm.lmms_model import L2CLlavaChat

    docs = _docs(synth_dir, 4)
    chat = L2CLlavaChat(str(varied_llava), batch_size=3)
    chat.task_dict = l2c_model.task_dict = {"t": {"test": docs}}

    def doc_to_messages(doc):
        return [
            {
                "role": "user",
                "content": [{"type": "image", "url": _visual(doc)[0]}, {"type": "text", "text": doc["q"]}],
            }
        ]

    gen = {"max_new_tokens": 5, "until": ["\n\n"]}
    a = chat.generate_until(
        _instances(
            "generate_until",
            [(d["q"], doc_to_messages, dict(gen), i, "t", "test") for i, d in enumerate(docs)],
        )
    )
    b = l2c_model.generate_until(
        _instances(
            "generate_until", [(d["q"], dict(gen), _visual, i, "t", "test") for i, d in enumerate(docs)]
        )
    )
    assert [r.text for r in a] == [r.text for r in b]


def test_l2c_llava_is_registered_through_the_lmms_eval_entry_point(tmp_path):
    """pyproject.toml names the model in lmms-eval's `lmms_eval.models` entry-point group; installed
    (here: a distribution's metadata on the path, as `pip install` writes it), lmms-eval resolves
    `l2c_llava` to the chat class and, with --force_simple, to the simple one, without our entry
    module's own registration."""
    import os
    import subprocess
    import sys

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    assert eps == {"l2c_llava": "l2c_llava.mllm.lmms_entry:lmms_eval_models"}
    dist = tmp_path / "l2c_llava_entry_check-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: l2c-llava-entry-check\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
    )
    code = (
        "from lmms_eval.models import get_model; "
        "print(get_model('l2c_llava').__name__, get_model('l2c_llava', force_simple=True).__name__)"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["L2CLlavaChat", "L2CLlava"]


def test_llava_hf_takes_batch_size_1_only(tmp_path, tiny_llava, synth_dir, capsys):
    from l2c_llava.config import load_config

    args = ["mllm", "eval", "--model", str(tiny_llava), "--tasks", "l2c_vqa", "--out", str(tmp_path / "o")]
    assert main([*args, "--data", str(synth_dir), "--lmms-model", "llava_hf", "--batch-size", "4"]) == 2
    assert "one question at a time" in capsys.readouterr().err
    with pytest.raises(Exception, match="eval.model llava_hf answers one question at a time"):
        load_config(ROOT_CONFIG, ["eval.model=llava_hf"])
    assert load_config(ROOT_CONFIG, ["eval.model=llava_hf", "eval.batch_size=1"]).eval.batch_size == 1
    assert load_config(ROOT_CONFIG).eval.model == "l2c_llava"
