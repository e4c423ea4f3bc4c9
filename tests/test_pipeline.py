"""`l2c pipeline`: step fingerprints decide skip / resume / re-run; the quick pipeline runs for real,
resumes a killed step, skips everything on a second run, and re-runs only stage 2 onwards when a
stage-2 setting changes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from l2c_llava.io import atomic_write_json
from l2c_llava.pipeline import load_pipeline

from .conftest import finish, quick_pipeline

ROOT = Path(__file__).resolve().parent.parent
QUICK = str(ROOT / "pipeline" / "configs" / "quick.yaml")
AFTER_STAGE2 = [
    "stage2",
    "retrieval",
    "export",
    "health",
    "pretrain_llm2clip",
    "finetune_llm2clip",
    "eval_llm2clip",
    "report",
]
# the baseline's LLaVA reads nothing stage 2 writes
NOT_AFTER_STAGE2 = [
    "data",
    "stage1",
    "baseline",
    "text_cache",
    "pretrain_baseline",
    "finetune_baseline",
    "eval_baseline",
]


def plan(out: Path, *overrides: str) -> dict[str, str]:
    return load_pipeline(QUICK, [f"run.output_dir={out}", *overrides]).run(dry_run=True, echo=lambda *_: None)


def pretend_done(out: Path, pipe, unfinished: str | None = None) -> None:
    steps = {}
    for s in pipe.steps:
        s.done_marker.parent.mkdir(parents=True, exist_ok=True)
        if s.done_marker.suffix == ".safetensors":  # a weights file must be whole to count as done
            import torch
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(2)}, str(s.done_marker))
        else:
            s.done_marker.touch()
        steps[s.name] = {
            "fingerprint": s.fingerprint,
            "status": "running" if s.name == unfinished else "done",
        }
    atomic_write_json(out / "pipeline" / "state.json", {"steps": steps})


def test_fingerprints_decide_skip_resume_and_rerun(tmp_path):
    out = tmp_path / "p"
    assert set(plan(out).values()) == {"fresh"}
    pretend_done(out, load_pipeline(QUICK, [f"run.output_dir={out}"]), unfinished="text_cache")
    first = plan(out)
    assert first["text_cache"] == "resume" and {first[s] for s in first if s != "text_cache"} == {"skip"}
    pretend_done(out, load_pipeline(QUICK, [f"run.output_dir={out}"]))
    assert set(plan(out).values()) == {"skip"}
    # a logging-only key changes nothing; a training setting of stage 2 re-runs stage 2 and what follows
    assert set(plan(out, "stage2.overrides=[train.log_every=3]").values()) == {"skip"}
    changed = plan(out, "stage2.overrides=[train.lr=0.0003]")
    assert [changed[s] for s in NOT_AFTER_STAGE2] == ["skip"] * len(NOT_AFTER_STAGE2)
    assert [changed[s] for s in AFTER_STAGE2] == ["fresh"] * len(AFTER_STAGE2)
    # the LLaVA finetune of one encoder: only that encoder's finetune and eval, then the report
    changed = plan(out, "mllm.finetune.overrides=[train.lr=0.0001]")
    assert {s for s, d in changed.items() if d != "skip"} == {
        "finetune_baseline",
        "eval_baseline",
        "finetune_llm2clip",
        "eval_llm2clip",
        "report",
    }
    # a stage-1 setting re-runs everything but the data
    changed = plan(out, "stage1.overrides=[train.lr=0.0001]")
    assert changed["data"] == "skip" and changed["baseline"] == "skip" and changed["stage1"] == "fresh"
    assert changed["text_cache"] == changed["stage2"] == "fresh"
    # a missing output means the step has to run again even when its state says done
    (out / "stage2" / "model" / "model.safetensors").unlink()
    assert plan(out)["stage2"] == "resume"


def test_bad_pipeline_configs_are_named(tmp_path, capsys):
    from l2c_llava.cli import main

    assert (
        main(
            [
                "pipeline",
                "--config",
                QUICK,
                f"run.output_dir={tmp_path}",
                "baseline.vision=openai/clip",
                "--dry-run",
            ]
        )
        == 2
    )
    assert "exactly one of baseline.clip" in capsys.readouterr().err
    assert (
        main(
            [
                "pipeline",
                "--config",
                QUICK,
                f"run.output_dir={tmp_path}",
                "stage2.overrides=[train.lrr=1]",
                "--dry-run",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "train.lrr" in err and "stage2/configs/quick.yaml" in err


# --- each step's resolved config file ---------------------------------------------------------

SHIPPED = ("quick", "demo", "demo_1200", "demo_4k", "paper")


def portable_fingerprints(name: str, out: Path) -> dict[str, tuple[str, str]]:
    """Each step's (fingerprint, resume key) of a shipped pipeline config, with the run folder and the
    checkout's path taken out (an upstream step counts by its portable fingerprint)."""
    import hashlib

    import l2c_llava.pipeline as P

    seen: list[dict] = []
    digest = P._digest
    P._digest = lambda obj: (seen.append(json.loads(P.dumps_json(obj, indent=None))), digest(obj))[1]
    try:
        pipe = load_pipeline(str(ROOT / "pipeline" / "configs" / f"{name}.yaml"), [f"run.output_dir={out}"])
    finally:
        P._digest = digest
    portable: dict[str, list[str]] = {}
    for obj in seen:  # two per step (fingerprint, resume key), in the plan's order
        obj["upstream"] = {u: portable[u][0] for u in obj["upstream"]}
        obj["inputs"].pop("files", None)  # sizes and times of input files outside the run: this machine's
        text = json.dumps(obj, sort_keys=True).replace(str(out), "<out>").replace(str(ROOT), "<checkout>")
        portable.setdefault(obj["step"], []).append(hashlib.sha256(text.encode()).hexdigest()[:16])
    assert [s.name for s in pipe.steps] == list(portable)
    return {k: tuple(v) for k, v in portable.items()}


PORTABLE_FINGERPRINTS = {  # step -> (fingerprint, resume key), as the code before them gave
    # (the eval steps and the report changed on purpose with eval.model / eval.batch_size: the batched
    # l2c_llava model, issue 33; quick and demo from their data step on with the generator's version 3:
    # the hard long-caption set, issue 33)
    "quick": {
        "data": ("13520ed31032af9b", "13520ed31032af9b"),
        "stage1": ("4d1e1b78ba13516f", "447a095ae701bfbe"),
        "baseline": ("5a85c6148575430e", "c98a4805fa17c033"),
        "text_cache": ("d26cbbf79ae47d2d", "d26cbbf79ae47d2d"),
        "stage2": ("ad773b6ba10bb34e", "8cf92431b2cfb665"),
        "retrieval": ("19da09a854c9e1de", "0eab988f0b70c733"),
        "export": ("a011f7662cbd2ed4", "a011f7662cbd2ed4"),
        "health": ("6e304792af6cdfef", "6e304792af6cdfef"),
        "pretrain_baseline": ("f0fd8cab8ad8fe9f", "770fc9a0544625a4"),
        "finetune_baseline": ("28e4c8e88291140e", "2221afc779514bab"),
        "eval_baseline": ("ce3b128aeff9c73b", "ce3b128aeff9c73b"),
        "pretrain_llm2clip": ("5610b7e42534679c", "e08073c42e3b53cd"),
        "finetune_llm2clip": ("61a16d671a8090b2", "c80435e993b24e56"),
        "eval_llm2clip": ("94515d742fd992e8", "94515d742fd992e8"),
        "report": ("8efad30daad0931d", "8efad30daad0931d"),
    },
    "demo": {  # 2026-12-08: demo_1200's data, stage 2 on 684 of its training images and shorter steps (issue 33)
        "data": ("5ef820a78816a2b9", "5ef820a78816a2b9"),
        "stage1": ("ec6d0ed1e3efd227", "c67ee9f730c729d4"),
        "text_cache": ("041522b55b887273", "041522b55b887273"),
        "stage2": ("860c76c519ed3839", "fadbe0d355cbe847"),
        "retrieval": ("47b00c5fb33543f7", "bbb56b20f2b361f6"),
        "export": ("0a5f67688930f4e4", "0a5f67688930f4e4"),
        "health": ("0253b5cc204fab4a", "0253b5cc204fab4a"),
        "pretrain_baseline": ("f22bce9d1da6556d", "2661bf84e1bc14df"),
        "finetune_baseline": ("f0e6354c5c58490c", "60a5a7b86e7bc298"),
        "eval_baseline": ("b97f8dfa385c6cc8", "b97f8dfa385c6cc8"),
        "pretrain_llm2clip": ("85ec8e6470142b5b", "e4935d848e7d69dc"),
        "finetune_llm2clip": ("581b4c2f99255cc8", "4f923c128204fb90"),
        "eval_llm2clip": ("8f8ae73cd97223d2", "8f8ae73cd97223d2"),
        "report": ("e0048877b7b41ab3", "e0048877b7b41ab3"),
    },
    "demo_1200": {  # the demo until 2026-12-08, its run folders unchanged
        "data": ("5ef820a78816a2b9", "5ef820a78816a2b9"),
        "stage1": ("b0e4c4d09e101cea", "4bcaa14fefd6d325"),
        "text_cache": ("52dc711be25cb2a7", "52dc711be25cb2a7"),
        "stage2": ("69d841a1a339161d", "8b71e61402342b82"),
        "retrieval": ("3030d4aa2f73ed20", "9324899c7509a68f"),
        "export": ("e81c2c277e589f2a", "e81c2c277e589f2a"),
        "health": ("17650c75b28b2d29", "17650c75b28b2d29"),
        "pretrain_baseline": ("650dd704e8dade43", "2661bf84e1bc14df"),
        "finetune_baseline": ("770675b7cbcf1fe0", "847e70576e08e4ee"),
        "eval_baseline": ("c42fb896f3f134c9", "c42fb896f3f134c9"),
        "pretrain_llm2clip": ("08132ed3ad27bc42", "3cf08bf590d3a2e8"),
        "finetune_llm2clip": ("f0db555f8233153f", "82926b0496ae57fc"),
        "eval_llm2clip": ("cf542269356c726b", "cf542269356c726b"),
        "report": ("597d0d0acdb17e4a", "597d0d0acdb17e4a"),
    },
    "demo_4k": {
        "data": ("9c03fb2e86b1c4ee", "9c03fb2e86b1c4ee"),
        "stage1": ("ffdc6e72b97ab508", "67936e7cc7aea911"),
        "text_cache": ("35941ef37122842b", "35941ef37122842b"),
        "stage2": ("617cdaefeff0ca7c", "1cc41c5143e108b4"),
        "retrieval": ("1c5a22c447b94311", "a944a568b39ce351"),
        "export": ("d370b8a6b6e02c48", "d370b8a6b6e02c48"),
        "health": ("7bd288d1fb2e3b35", "7bd288d1fb2e3b35"),
        "pretrain_baseline": ("10656021eb8a2d50", "203f86ccc6f7dea6"),
        "finetune_baseline": ("dd55029d4e940fa3", "2925a7abfd72c631"),
        "eval_baseline": ("42f4ede0de0e3475", "42f4ede0de0e3475"),
        "pretrain_llm2clip": ("9f0943221d7c5b37", "577504de61a7edfe"),
        "finetune_llm2clip": ("e8a534fde8ad6e7b", "fbf4ea06bb722fa5"),
        "eval_llm2clip": ("70f494fe20815904", "70f494fe20815904"),
        "report": ("9ef1e4ee96319d41", "9ef1e4ee96319d41"),
    },
    "paper": {
        "stage1": ("2bcdd38cd45e6ae5", "f822cec8cdb29b8f"),
        "text_cache": ("da1c848225c4815b", "da1c848225c4815b"),
        "stage2": ("62f5963b2ac3ef41", "829164083e60976d"),
        "retrieval": ("059d81d93b9d8c98", "34ee6541881ba30d"),
        "export": ("f297a3b08d401e66", "f297a3b08d401e66"),
        "pretrain_baseline": ("a20fdad5a2dabca5", "06b6891f15d5b41e"),
        "finetune_baseline": ("f58030a243584b7a", "ccd211eee96614f9"),
        "eval_baseline": ("3dcb7952c7eae575", "3dcb7952c7eae575"),
        "pretrain_llm2clip": ("f46ad8ad65ad3c22", "59192ae2773c92ed"),
        "finetune_llm2clip": ("631e177d3251682d", "4e706b99dc1ff4a0"),
        "eval_llm2clip": ("3d8a7441b30561f4", "3d8a7441b30561f4"),
        "report": ("6e3dd6eb3a437ab8", "6e3dd6eb3a437ab8"),
    },
}


def test_step_fingerprints_are_those_the_override_strings_gave(tmp_path):
    """Steps read a resolved config file instead of override strings (issue 20) under the same fingerprints,
    so no existing run folder runs a step again. A change here re-runs that step in every run folder: make
    it on purpose, then put the new values in (`portable_fingerprints`)."""
    for name in SHIPPED:
        assert portable_fingerprints(name, tmp_path / name) == PORTABLE_FINGERPRINTS[name], name


def test_each_step_runs_its_resolved_config_file_which_every_command_loads(tmp_path, capsys):
    from l2c_llava.cli import _prepare as prepare
    from l2c_llava.cli import main, parse_args
    from l2c_llava.config import load_config
    from l2c_llava.layout import PipelineRun
    from l2c_llava.pipeline import command_line, config_fingerprint, write_step_config

    commands = set()
    for name in SHIPPED:
        out = tmp_path / name
        pipe = load_pipeline(str(ROOT / "pipeline" / "configs" / f"{name}.yaml"), [f"run.output_dir={out}"])
        for s in pipe.steps:
            if s.config is None:
                continue
            file = PipelineRun(out).step_config(s.name)
            assert s.config_file == file and s.argv[-2:] == ["--config", str(file)], s.argv
            assert not any("=" in w for w in s.argv), s.argv  # no overrides: the file says everything
            assert not file.exists()  # planning (--dry-run) writes nothing
            write_step_config(s)
            head = file.read_text().splitlines()[:2]
            assert head[0].startswith(f"# {' '.join(s.argv)}") and s.config_origin in head[1]
            back = load_config(file)
            # the very config the step was planned with, value types included (an int default of a float key
            # stays an int: libraries write them into their own files, 32 or 32.0)
            assert repr(back.model_dump()) == repr(s.config.model_dump())
            assert config_fingerprint(back) == config_fingerprint(s.config)
            # the step's own command reads it (as `l2c` would, the launcher's too), and `l2c validate`
            args = parse_args(s.argv[1:])
            prepare(args)
            assert repr(args.cfg.model_dump()) == repr(s.config.model_dump())
            assert main(["validate", str(file)]) == 0
            cmd = command_line(s.argv, s.launch)
            assert cmd[-len(s.argv) + 1 :] == s.argv[1:] and cmd[: len(s.launch or [])] == (s.launch or [])
            commands.add(" ".join(s.argv[1 : s.argv.index("--config")]))
    assert commands == {
        "stage1",
        "clip pretrain",
        "stage2 cache",
        "stage2 train",
        "stage2 eval",
        "mllm pretrain",
        "mllm finetune",
    }
    paper = load_pipeline(
        str(ROOT / "pipeline" / "configs" / "paper.yaml"), [f"run.output_dir={tmp_path / 'p'}"]
    )
    fin = next(s for s in paper.steps if s.name == "finetune_llm2clip")
    assert command_line(fin.argv, fin.launch)[:2] == ["accelerate", "launch"]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the shared run (conftest.quick_run) starts in the first test that reads it
def test_quick_pipeline_end_to_end_with_kill_resume_skip_and_a_changed_setting(quick_run):
    """The quick pipeline (conftest.quick_run: under the paper's launch words where DeepSpeed is installed)
    killed while stage 1 trains and run again: stage 1 resumes and every step runs to the report; the same
    command again skips every step; a changed stage-2 setting, launch words left out, runs stage 2 and
    what follows again, on one process, and nothing before it."""
    out = quick_run.out
    # 1-2) killed after stage 1's first checkpoint, then run again: stage 1 resumes from its checkpoint
    text = quick_run.resumed_text
    assert "stage 1: LLM -> caption encoder (resuming)" in text
    assert "resumed from" in (out / "stage1" / "train.log").read_text()
    state = quick_run.state
    assert all(rec["status"] == "done" for rec in state.values()), state
    stage2_config = out / "pipeline" / "configs" / "stage2.yaml"  # the resolved config stage 2 ran under
    assert state["stage2"]["argv"][-2:] == ["--config", str(stage2_config)] and stage2_config.is_file()
    report = quick_run.report
    for part in (
        "## Stage 1",
        "## Stage 2",
        "| l2c_vqa | exact_match |",
        "| l2c_pope | pope_f1 |",
        "## Training curves",
        "## Encoder health",
        "paired bootstrap",
        "McNemar p",
    ):
        assert part in report
    health = json.loads((out / "health" / "health.json").read_text())
    assert set(health) == {"baseline", "llm2clip"} and all(
        h["probe"]["test_scenes"] == 12 for h in health.values()
    )
    for png in (
        "stage1_cra.png",
        "retrieval.png",
        "lmms_eval.png",
        "training_curves.png",
        "encoder_health.png",
    ):
        assert (out / "plots" / png).stat().st_size > 1000
    numbers = json.loads((out / "report.json").read_text())["numbers"]
    assert numbers["lmms"]["baseline"] and numbers["lmms"]["llm2clip"] and numbers["retrieval"]["llm2clip"]
    # 3) run again: every step is skipped
    text = finish(quick_pipeline(out, *quick_run.command()))
    assert text.count("inputs unchanged: skipped") == len(state) and "(running)" not in text
    # 4) a stage-2 setting changes: stage 2 and what follows run again, stage 1 does not
    stage1_mtime = (out / "stage1" / "metrics.json").stat().st_mtime_ns
    text = finish(quick_pipeline(out, *quick_run.command(launch=False), "stage2.overrides=[train.lr=0.0003]"))
    assert "stage 1: LLM -> caption encoder: done earlier" in text
    assert "stage 2: vision encoder vs cached LLM features (running)" in text
    assert (
        "lmms-eval (llm2clip) (running)" in text
        and "LLaVA (baseline): instruction-tune: done earlier" in text
    )
    assert (out / "stage1" / "metrics.json").stat().st_mtime_ns == stage1_mtime
    cfg = (out / "stage2" / "config.yaml").read_text()
    assert "lr: 0.0003" in cfg
    assert json.loads((out / "stage2" / "train_stats.json").read_text())["launch"]["world_size"] == 1


def test_report_shows_the_bench_sections_when_present(tmp_path):
    from l2c_llava.io import write_results
    from l2c_llava.report import write_report

    out = tmp_path / "run"
    out.mkdir()
    assert "## Connectors" not in write_report(out).read_text()  # absent: no section, no error
    table = "| connector | tokens / image |\n|---|---|\n| qformer | 16 |\n"
    write_results([(out / "connectors", "connectors")], {"queries": 16, "rows": []}, "# title\n\n" + table)
    write_results(
        [(out / "filter", "filter")],
        {"results": []},
        "# title\n\n| model | AUC |\n|---|---|\n| CLIP | 0.7 |\n",
    )
    text = write_report(out).read_text()
    assert "## Connectors: MLP vs Q-Former vs perceiver resampler (baseline encoder, 16 queries" in text
    assert "| qformer | 16 |" in text and "## Caption filtering" in text and "| CLIP | 0.7 |" in text
    assert json.loads((out / "report.json").read_text())["numbers"]["connectors"]["queries"] == 16


def test_report_pairs_the_two_llavas_question_by_question(tmp_path):
    """McNemar between the encoders' LLaVAs, from lmms-eval's logged samples (doc_id, metric)."""
    from l2c_llava.report import paired_llava, write_report
    from l2c_llava.stats import sign_test_p

    out = tmp_path / "run"
    base = [1, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    l2c = [1, 1, 1, 1, 1, 1, 0, 0, 1, 0]
    for enc, hits in (("baseline", base), ("llm2clip", l2c)):
        folder = out / "eval" / enc / "lmms_eval" / "model"
        folder.mkdir(parents=True)
        rows = [{"doc_id": i, "exact_match": float(h), "target": "x"} for i, h in enumerate(hits)]
        rows.append({"doc_id": 99, "exact_match": 1.0})  # answered by one encoder only: not paired
        if enc == "baseline":
            rows = rows[:-1]
        (folder / "20261202_samples_l2c_vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = paired_llava(out)["l2c_vqa"]
    assert res["n"] == 10 and res["baseline"]["accuracy"] == 0.3 and res["llm2clip"]["accuracy"] == 0.7
    t = res["llm2clip_vs_baseline"]
    assert (t["wins"], t["losses"]) == (5, 1) and t["p_value"] == round(sign_test_p(5, 1), 6)
    lo, hi = res["baseline"]["ci95"]
    assert lo < 0.3 < hi
    text = write_report(out).read_text()
    assert "| l2c_vqa (exact_match) | 10 |" in text and "5 / 1" in text


def test_report_says_whether_each_llava_reads_the_image(tmp_path):
    """Right image vs another image (McNemar), vs the blind prior, POPE accuracy and yes ratio, and the
    verdict against the thresholds: one encoder that reads the image, one that answers blind."""
    from l2c_llava.report import image_use, write_report

    out = tmp_path / "run"
    n = 60
    vqa = [
        {"question": "What color is the circle?", "answers": ["red" if i % 2 else "blue"], "image_path": "x"}
        for i in range(n)
    ]
    (out / "data" / "llava").mkdir(parents=True)  # the prior: "red" for colour questions
    conv = [{"from": "human", "value": "What color is the square?"}, {"from": "gpt", "value": "red"}]
    (out / "data" / "llava" / "instruct.json").write_text(json.dumps([{"conversations": conv}]))
    tasks = out / "eval" / "baseline" / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "l2c_vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vqa))
    answers = {  # (right image, another image, pope correct, pope said yes)
        "baseline": (lambda i: i % 10 != 0, lambda i: i % 2 == 1, lambda i: i % 5 != 0, lambda i: i % 2 == 0),
        "llm2clip": (lambda i: i % 2 == 1, lambda i: i % 2 == 1, lambda i: i % 2 == 0, lambda i: True),
    }
    for enc, (right, other, pope_ok, said_yes) in answers.items():
        folder = out / "eval" / enc / "lmms_eval" / "model"
        folder.mkdir(parents=True)
        for task, fn in (("l2c_vqa", right), ("l2c_vqa_shuffled", other)):
            rows = [{"doc_id": i, "exact_match": float(fn(i))} for i in range(n)]
            (folder / f"x_samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        rows = [
            {"doc_id": i, "pope_accuracy": float(pope_ok(i)), "pope_yes_ratio": float(said_yes(i))}
            for i in range(40)
        ]
        (folder / "x_samples_l2c_pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    use = image_use(out)
    b, l_ = use["baseline"], use["llm2clip"]
    assert b["vqa"]["accuracy"] == 0.9 and b["vqa_another_image"]["accuracy"] == 0.5
    assert b["vqa_prior"]["accuracy"] == 0.5  # "red" is right on the odd questions
    assert (b["vs_another_image"]["wins"], b["vs_another_image"]["losses"]) == (24, 0)
    assert b["pope"] == {"accuracy": 0.8, "n": 40, "ci95": b["pope"]["ci95"], "yes_ratio": 0.5}
    assert b["reads_image"] and all(b["checks"].values())
    assert not l_["reads_image"]  # no better than another image or the prior, and always "yes"
    assert l_["checks"] == {"above_another_image": False, "above_prior": False, "pope": False}
    text = write_report(out).read_text()
    assert "### Does each LLaVA read the image?" in text
    assert "| baseline | 0.900" in text and "| yes |" in text
    assert "no: above_another_image, above_prior, pope" in text
    assert json.loads((out / "report.json").read_text())["numbers"]["llava_image_use"]["baseline"][
        "reads_image"
    ]


# -- several steps at once (`parallel`) ---------------------------------------------------------------

_STEP_SCRIPT = """
import json, os, sys, time
out, seconds, fail = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "fail"
os.makedirs(out, exist_ok=True)
start = time.time()
print("working in", out, flush=True)
seen, share = [], os.environ.get("L2C_THREADS_FILE")  # the CPU threads the pipeline gives it over time
while time.time() < start + seconds:
    if share and os.path.exists(share):
        n = open(share).read().strip()
        if not seen or seen[-1] != n:
            seen.append(n)
    time.sleep(0.02)
if fail:
    print("this step fails here", flush=True)
    sys.exit(3)
rec = {"start": start, "end": time.time(), "threads": os.environ.get("OMP_NUM_THREADS"), "seen": seen}
with open(os.path.join(out, "done.json"), "w") as f:
    json.dump(rec, f)
"""


def _toy_pipeline(out: Path, monkeypatch, parallel: int, fail: str = "", seconds: dict | None = None):
    """The quick pipeline's object with its steps replaced by small commands (sleep, then write
    done.json): a: -, b: a, c: -, d: b and c (`seconds`: other durations than 1, 0.2, 2 and 0.1)."""
    import l2c_llava.pipeline as P

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(
        P, "command_line", lambda argv, launch=None: [sys.executable, "-c", _STEP_SCRIPT, *argv[1:]]
    )
    pipe = load_pipeline(QUICK, [f"run.output_dir={out}", f"parallel={parallel}"])
    steps = []
    durations = {"a": 1.0, "b": 0.2, "c": 2.0, "d": 0.1} | (seconds or {})
    for name, upstream in (("a", []), ("b", ["a"]), ("c", []), ("d", ["b", "c"])):
        folder = out / name
        steps.append(
            P.Step(
                name=name,
                title=f"step {name}",
                argv=["l2c", str(folder), str(durations[name]), "fail" if name == fail else "ok"],
                outputs=[folder],
                done_marker=folder / "done.json",
                fingerprint=f"fp-{name}",
                resume_key=f"rk-{name}",
                upstream=upstream,
            )
        )
    pipe.steps = steps
    pipe.status_every = 0.3
    return pipe


def test_parallel_steps_run_side_by_side_after_what_they_read(tmp_path, monkeypatch):
    """parallel=2: a step starts only once every step it reads from has finished, two independent
    steps run at the same time, each on its share of the CPU threads (a step alone to the end on all
    of them), each with its own log; the state records every step done and the run's wall time; a
    second run skips them all."""
    out = tmp_path / "run"
    lines: list[str] = []
    ran = _toy_pipeline(out, monkeypatch, 2).run(echo=lines.append)
    assert ran == {"a": "fresh", "c": "fresh", "b": "fresh", "d": "fresh"}, ran
    rec = {n: json.loads((out / n / "done.json").read_text()) for n in "abcd"}
    assert rec["b"]["start"] >= rec["a"]["end"]  # b reads a
    assert rec["d"]["start"] >= max(rec["b"]["end"], rec["c"]["end"])  # d reads b and c
    assert rec["c"]["start"] < rec["a"]["end"] and rec["a"]["start"] < rec["c"]["end"]  # side by side
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert [rec[n]["threads"] for n in "abc"] == [threads] * 3, rec
    assert rec["d"]["threads"] is None, (
        rec
    )  # alone to the end (nothing beside it, nothing after): every thread
    for n in "abcd":
        assert f"working in {out / n}" in (out / "pipeline" / "logs" / f"{n}.log").read_text()
    state = json.loads((out / "pipeline" / "state.json").read_text())
    assert all(state["steps"][n]["status"] == "done" for n in "abcd")
    assert state["last_run"]["parallel"] == 2 and state["last_run"]["seconds"] > 0
    assert any("log:" in line for line in lines)
    # while steps run beside each other, a line now and then with what each last printed
    assert any(
        line.strip().startswith("elapsed") and "a 0m" in line and "working in" in line for line in lines
    ), lines
    again = _toy_pipeline(out, monkeypatch, 2).run(echo=lambda *_: None)
    assert set(again.values()) == {"skip"}


def test_parallel_step_takes_the_cores_its_neighbour_left(tmp_path, monkeypatch):
    """On 4 cores with parallel=2: a and c start on 2 threads each; when a ends, b takes its place (2
    each still); when b ends nothing else can start (d reads c), and c, still running, is given all 4
    in its threads file, which its steps read (l2c_llava/cpu_threads.py); d, alone to the end, starts
    on its default."""
    import l2c_llava.pipeline as P

    out = tmp_path / "run"
    pipe = _toy_pipeline(
        out, monkeypatch, 2, seconds={"c": 6.0}
    )  # c outlasts a and b however slow they start
    monkeypatch.setattr(P.os, "cpu_count", lambda: 4)
    lines: list[str] = []
    pipe.run(echo=lines.append)
    rec = {n: json.loads((out / n / "done.json").read_text()) for n in "abcd"}
    assert [rec[n]["threads"] for n in "abc"] == ["2"] * 3, rec
    assert rec["a"]["seen"] == ["2"] and rec["b"]["seen"] == ["2"], rec
    assert rec["c"]["seen"] == ["2", "4"], rec  # b ended while c ran: the cores b left
    assert rec["d"]["threads"] is None and rec["d"]["seen"] == [], rec
    assert "== c: now on 4 CPU thread(s)" in lines, lines
    assert (out / "pipeline" / "logs" / "c.threads").read_text() == "4\n"


def test_follow_share_sets_the_threads_the_file_holds(tmp_path, monkeypatch):
    """A step's loops adopt the count in L2C_THREADS_FILE (read at most every few seconds unless
    forced); a missing or malformed file, or no variable, changes nothing."""
    import torch

    from l2c_llava import cpu_threads

    before = torch.get_num_threads()
    share = tmp_path / "step.threads"
    try:
        monkeypatch.delenv(cpu_threads.THREADS_FILE_ENV, raising=False)
        assert cpu_threads.follow_share(force=True) is None
        monkeypatch.setenv(cpu_threads.THREADS_FILE_ENV, str(share))
        assert cpu_threads.follow_share(force=True) is None  # no file yet
        share.write_text("oops\n")
        assert cpu_threads.follow_share(force=True) is None and torch.get_num_threads() == before
        target = 1 if before != 1 else 2
        share.write_text(f"{target}\n")
        assert cpu_threads.follow_share(force=True) == target and torch.get_num_threads() == target
        share.write_text(f"{before}\n")
        assert cpu_threads.follow_share() is None  # read again only after CHECK_EVERY seconds
        assert torch.get_num_threads() == target
        assert cpu_threads.follow_share(force=True) == before
    finally:
        torch.set_num_threads(before)


def test_parallel_step_failure_lets_the_others_finish_and_names_the_log(tmp_path, monkeypatch):
    """A failing step under parallel=2: the step beside it runs to its end, nothing that reads the
    failed step starts, the error names the failed step's log, whose tail is shown; the next run
    skips what finished and runs the rest."""
    from l2c_llava.pipeline import PipelineError

    out = tmp_path / "run"
    lines: list[str] = []
    with pytest.raises(PipelineError, match=r"logs/a\.log"):
        _toy_pipeline(out, monkeypatch, 2, fail="a").run(echo=lines.append)
    assert (out / "c" / "done.json").is_file()  # the step beside it finished
    assert not (out / "b").exists() and not (out / "d").exists()  # what reads the failed one never started
    assert any("this step fails here" in line for line in lines)
    state = json.loads((out / "pipeline" / "state.json").read_text())["steps"]
    assert state["a"]["status"] == "running" and state["c"]["status"] == "done"
    ran = _toy_pipeline(out, monkeypatch, 2).run(echo=lambda *_: None)
    assert ran == {"c": "skip", "a": "resume", "b": "fresh", "d": "fresh"}, ran


def test_one_step_at_a_time_keeps_the_terminal_and_the_threads(tmp_path, monkeypatch):
    """parallel=1 (the default): steps in plan order, each after the one before, on this terminal
    (no logs), with the threads the environment gives."""
    out = tmp_path / "run"
    _toy_pipeline(out, monkeypatch, 1).run(echo=lambda *_: None)
    rec = {n: json.loads((out / n / "done.json").read_text()) for n in "abcd"}
    assert rec["a"]["end"] <= rec["b"]["start"] <= rec["b"]["end"] <= rec["c"]["start"] <= rec["d"]["start"]
    assert all(r["threads"] is None for r in rec.values())
    assert not (out / "pipeline" / "logs").exists()


def test_the_step_table_declares_each_planned_step(tmp_path):
    """Every planned step is a row of the table (pipeline.STEPS), in its order: it reads only steps before
    it, those the run plans; its command line is the row's `l2c` command; what it writes, the row's."""
    from l2c_llava.layout import PipelineRun
    from l2c_llava.pipeline import STEPS

    order = list(STEPS)
    assert all(set(row.reads) <= set(order[: order.index(name)]) for name, row in STEPS.items())
    for name in SHIPPED:
        out = tmp_path / name
        pipe = load_pipeline(str(ROOT / "pipeline" / "configs" / f"{name}.yaml"), [f"run.output_dir={out}"])
        names = [s.name for s in pipe.steps]
        assert names == [n for n in order if n in names], names
        for s in pipe.steps:
            row = STEPS[s.name]
            assert s.upstream == [u for u in row.reads if u in names[: names.index(s.name)]], s.name
            assert s.outputs == row.writes(PipelineRun(out)) and s.done_marker == row.done(PipelineRun(out))
            if row.command is None:
                assert s.argv is None and s.func is not None, s.name
            else:
                assert s.argv[: 1 + len(row.command.split())] == ["l2c", *row.command.split()], s.argv
            assert (s.launch is not None) <= row.launched, s.name
