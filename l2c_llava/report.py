"""The pipeline's comparison report: ``report.md``, ``report.json`` and PNG plots in the run folder.

Every number is read from what the steps wrote (stage 1 ``metrics.json``, stage 2 ``metrics.json``,
each encoder's lmms-eval ``results.json``, the ``train_log.jsonl`` of every training step); nothing is
typed in. A part whose step has not produced its file is reported as missing, not invented.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from l2c_llava import layout as L
from l2c_llava.io import atomic_save, atomic_write_json, atomic_write_text
from l2c_llava.mllm.evaluate import normalize, prior_answers, question_type
from l2c_llava.stats import paired_comparison, wilson_interval

ENCODERS = L.ENCODERS
IN_RUN = L.PipelineRun(Path())  # the run folder's layout relative to it: the curves' keys, the plots' links


def _rel(path: Path) -> str:
    return path.as_posix()


# the training runs whose loss curves are drawn, by their folder in the run (their key in report.json)
STAGE1, CLIP, STAGE2 = _rel(IN_RUN.stage1), _rel(IN_RUN.clip), _rel(IN_RUN.stage2)
LLAVA = {
    (enc, stage): _rel(IN_RUN.llava(enc, stage)) for stage in ("pretrain", "finetune") for enc in L.ENCODERS
}
CURVES = (
    (STAGE1, "stage 1 (caption contrastive, LoRA)"),
    (CLIP, "baseline CLIP from scratch"),
    (STAGE2, "stage 2 (vision vs LLM features)"),
    (LLAVA["baseline", "pretrain"], "LLaVA pretrain, baseline"),
    (LLAVA["llm2clip", "pretrain"], "LLaVA pretrain, LLM2CLIP"),
    (LLAVA["baseline", "finetune"], "LLaVA finetune, baseline"),
    (LLAVA["llm2clip", "finetune"], "LLaVA finetune, LLM2CLIP"),
)
# plot panels: the LLaVA stages show both encoders on one axis
PANELS = (
    ("stage 1 (caption contrastive, LoRA)", (STAGE1,)),
    ("baseline CLIP from scratch", (CLIP,)),
    ("stage 2 (vision vs LLM features)", (STAGE2,)),
    ("LLaVA pretrain (projector)", (LLAVA["baseline", "pretrain"], LLAVA["llm2clip", "pretrain"])),
    ("LLaVA finetune", (LLAVA["baseline", "finetune"], LLAVA["llm2clip", "finetune"])),
)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _log(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# per-question 0/1 metrics of the local tasks: what the paired test between encoders compares
PER_QUESTION = {"l2c_vqa": "exact_match", "l2c_vqa_shuffled": "exact_match", "l2c_pope": "pope_accuracy"}


def _sample_hits(folder: Path, task: str, metric: str) -> dict[int, bool]:
    """doc_id -> correct, from lmms-eval's logged samples (``--log_samples``) of one task."""
    files = sorted(folder.rglob(f"*_samples_{task}.jsonl")) if folder.is_dir() else []
    hits: dict[int, bool] = {}
    for line in files[-1].read_text().splitlines() if files else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if metric in row and "doc_id" in row:
            hits[int(row["doc_id"])] = bool(row[metric])
    return hits


def paired_llava(out: Path) -> dict:
    """For each local task with one right/wrong answer per question: both encoders' accuracy with its
    95% Wilson interval, and LLM2CLIP against the baseline on the questions both answered (McNemar's
    exact test on the questions only one gets right)."""
    res = {}
    for task, metric in PER_QUESTION.items():
        by_enc = {enc: _sample_hits(L.PipelineRun(out).lmms_eval(enc), task, metric) for enc in ENCODERS}
        common = sorted(set.intersection(*(set(h) for h in by_enc.values())))
        if not common:
            continue
        row: dict = {"metric": metric, "n": len(common)}
        for enc, h in by_enc.items():
            k = sum(h[i] for i in common)
            row[enc] = {
                "accuracy": round(k / len(common), 4),
                "ci95": [round(x, 4) for x in wilson_interval(k, len(common))],
            }
        row["llm2clip_vs_baseline"] = paired_comparison(
            [by_enc["llm2clip"][i] for i in common], [by_enc["baseline"][i] for i in common]
        )
        res[task] = row
    return res


def _task_rows(out: Path, name: str) -> list[dict]:
    """The rows a local task was given (``eval/<encoder>/tasks/<task>.jsonl``, the same for both)."""
    run = L.PipelineRun(out)
    tasks = next((p for p in map(run.eval_tasks, ENCODERS) if p.is_dir()), None)
    f = tasks / f"{name}.jsonl" if tasks else None
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f and f.is_file() else []


def _prior_hits(out: Path, vqa: list[dict]) -> list[bool]:
    """Per l2c_vqa row: whether the blind answer prior (the most frequent training answer of the
    question's type, from the LLaVA training JSON) is right."""
    train = L.PipelineRun(out).data / L.LLAVA_INSTRUCT
    if not vqa or not train.is_file():
        return []
    prior = prior_answers(train, vqa)
    return [
        normalize(prior.get(question_type(q["question"]), "")) in {normalize(a) for a in q["answers"]}
        for q in vqa
    ]


# what the demo must show of each LLaVA (issue "the demo proves the method")
READS_IMAGE = {
    "min_gain_over_shuffled": 0.10,
    "max_p_shuffled": 0.01,
    "max_p_prior": 0.05,
    "min_pope_accuracy": 0.65,
    "pope_yes_ratio": (0.3, 0.7),
}


def image_use(out: Path) -> dict:
    """Does each LLaVA read the image? Per encoder, on the same questions: VQA with the right image
    against the same questions asked about another image (McNemar) and against the blind answer
    prior (McNemar), and POPE's accuracy and yes ratio; ``reads_image`` when every threshold of
    ``READS_IMAGE`` is met."""
    vqa_rows = _task_rows(out, "l2c_vqa")
    prior = _prior_hits(out, vqa_rows)
    res: dict = {}
    for enc in ENCODERS:
        folder = L.PipelineRun(out).lmms_eval(enc)
        right = _sample_hits(folder, "l2c_vqa", "exact_match")
        if not right:
            continue
        r: dict = {}
        ids = sorted(right)
        r["vqa"] = _accuracy(sum(right[i] for i in ids), len(ids))
        other = _sample_hits(folder, "l2c_vqa_shuffled", "exact_match")
        common = [i for i in ids if i in other]
        if common:
            r["vqa_another_image"] = _accuracy(sum(other[i] for i in common), len(common))
            r["vs_another_image"] = paired_comparison([right[i] for i in common], [other[i] for i in common])
        if len(prior) > max(ids):
            r["vqa_prior"] = _accuracy(sum(prior[i] for i in ids), len(ids))
            r["vs_prior"] = paired_comparison([right[i] for i in ids], [prior[i] for i in ids])
        pope = _sample_hits(folder, "l2c_pope", "pope_accuracy")
        yes = _sample_hits(folder, "l2c_pope", "pope_yes_ratio")
        if pope:
            r["pope"] = {
                **_accuracy(sum(pope.values()), len(pope)),
                "yes_ratio": round(sum(yes.values()) / len(yes), 4) if yes else None,
            }
        r["checks"] = _reads_image_checks(r)
        r["reads_image"] = bool(r["checks"]) and all(r["checks"].values())
        res[enc] = r
    return res


def _accuracy(k: int, n: int) -> dict:
    """`k` right of `n`: the accuracy with its 95% Wilson interval."""
    return {"accuracy": round(k / n, 4), "n": n, "ci95": [round(x, 4) for x in wilson_interval(k, n)]}


def _reads_image_checks(r: dict) -> dict[str, bool]:
    """Each threshold of READS_IMAGE that one encoder's numbers (:func:`image_use`) can be held to, met or not."""
    t = READS_IMAGE
    checks = {}
    if "vs_another_image" in r:
        v = r["vs_another_image"]
        checks["above_another_image"] = (
            v["gain"] >= t["min_gain_over_shuffled"] and v["p_value"] < t["max_p_shuffled"]
        )
    if "vs_prior" in r:
        v = r["vs_prior"]
        checks["above_prior"] = v["gain"] > 0 and v["p_value"] < t["max_p_prior"]
    if "pope" in r:
        lo, hi = t["pope_yes_ratio"]
        yr = r["pope"]["yes_ratio"]
        checks["pope"] = r["pope"]["accuracy"] >= t["min_pope_accuracy"] and yr is not None and lo <= yr <= hi
    return checks


def _image_use_section(use: dict) -> list[str]:
    """Does each LLaVA read the image: the right image against another image and the answer prior."""
    if not use:
        return []
    t = READS_IMAGE
    md = [
        "### Does each LLaVA read the image?",
        "",
        "The same held-out questions asked about their own image, about another test image, and answered by "
        "the blind prior (the most frequent training answer of the question's type); POPE's yes ratio says "
        "whether a score comes from always answering one way. 95% Wilson intervals; p: McNemar's exact test "
        "on the questions only one side gets right.",
        "",
        "| encoder | VQA, right image | VQA, another image | gain, p | blind prior | gain, p | POPE accuracy | "
        "POPE yes ratio | reads the image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def acc(x):
        return f"{x['accuracy']:.3f}{_ci3(x['ci95'])} (n {x['n']})" if x else "-"

    def gain(x):
        return f"{x['gain']:+.3f}, p {x['p_value']:.2g}" if x else "-"

    for enc, r in use.items():
        pope = r.get("pope") or {}
        yr = pope.get("yes_ratio")
        failed = [k for k, ok in r.get("checks", {}).items() if not ok]
        verdict = "yes" if r.get("reads_image") else ("no: " + ", ".join(failed) if failed else "-")
        md.append(
            f"| {'LLM2CLIP' if enc == 'llm2clip' else enc} | {acc(r.get('vqa'))} | {acc(r.get('vqa_another_image'))} | "
            f"{gain(r.get('vs_another_image'))} | {acc(r.get('vqa_prior'))} | {gain(r.get('vs_prior'))} | "
            f"{acc(pope) if pope else '-'} | {_num(yr, 3)} | {verdict} |"
        )
    md += [
        "",
        f'"Reads the image" means: at least {100 * t["min_gain_over_shuffled"]:.0f} points above another image '
        f"with p < {t['max_p_shuffled']}, above the prior with p < {t['max_p_prior']}, POPE accuracy at least "
        f"{t['min_pope_accuracy']} with a yes ratio within {t['pope_yes_ratio'][0]}-{t['pope_yes_ratio'][1]}.",
        "",
    ]
    return md


def _ci(bounds) -> str:
    return f" [{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f}]" if bounds else ""


def _ci3(bounds) -> str:
    return f" [{bounds[0]:.3f}-{bounds[1]:.3f}]" if bounds else ""


# the patch probe's questions (stage2/health.py), in the order the report shows them
PROBE_TASKS = ("existence", "position", "colour")


def _health_section(health: dict | None, plots: Path) -> list[str]:
    """Encoder health of both towers: collapse figures and the patch probe, against chance."""
    md = ["## Encoder health: do the towers keep the image? (read this before any number built on them)", ""]
    if not health:
        return md + ["(missing: health/health.json)", ""]
    tasks = PROBE_TASKS
    md += [
        "| encoder | median cosine, two different images (pooled / mean patch) | top direction's variance share | "
        "probe: existence | position | colour |",
        "|---|---|---|---|---|---|",
    ]
    chance = {}
    for enc, h in health.items():
        p = h["probe"]
        chance = p["chance"]
        md.append(
            f"| {enc} | {h['pooled']['median_cosine']:.3f} / {h['patch_mean']['median_cosine']:.3f} | "
            f"{h['pooled']['top_direction_share']:.3f} | "
            + " | ".join(f"{p['test'][t]:.3f} (chance {p['chance'][t]:.3f})" for t in tasks)
            + " |"
        )
    first = next(iter(health.values()))["probe"]
    md += [
        "",
        f"A collapsed tower maps every image near one point (median cosine near 1, one direction holding "
        "nearly all variance). The probe is a small reader trained on a tower's frozen penultimate-layer patch "
        f"tokens (what the LLaVA reads; {first['tokens']} per image), on {first['train_scenes']} train scenes, "
        f"scored on {first['test_scenes']} test scenes: is there a <colour> <shape>, in which of the 3x3 cells, "
        "and what colour is the <shape> in <cell>. Near chance, no LLaVA on those features can answer better.",
    ]
    return md + _health_plot(health, chance, plots)


def _health_plot(health: dict, chance: dict, plots: Path) -> list[str]:
    """Each tower's patch-probe accuracy per question, against chance (dashed)."""
    import matplotlib.pyplot as plt

    tasks = PROBE_TASKS
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for i, (enc, h) in enumerate(health.items()):
        ax.bar(
            [j + 0.4 * (i - 0.5) for j in range(3)],
            [h["probe"]["test"][t] for t in tasks],
            width=0.4,
            label="LLM2CLIP" if enc == "llm2clip" else enc,
        )
    for j, t in enumerate(tasks):
        ax.hlines(
            chance[t],
            j - 0.45,
            j + 0.45,
            colors="black",
            linestyles="dashed",
            label="chance" if not j else None,
        )
    ax.set_xticks(range(3), list(tasks))
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Patch probe on each tower's LLaVA features")
    ax.legend(fontsize=7)
    return _figure(fig, plots, "encoder_health.png", "encoder health")


def _figure(fig, plots: Path, name: str, alt: str) -> list[str]:
    """Save `fig` as plots/name atomically, close it, and return the Markdown lines that show it."""
    import matplotlib.pyplot as plt

    path = plots / name
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return ["", f"![{alt}]({_rel(IN_RUN.plots / name)})", ""]


# the retrieval sets, in the order the report shows them (stage 2's metrics.json names)
SETS = ("short", "long", "long_hard")
SET_TITLES = {"short": "short captions", "long": "long captions", "long_hard": "hard long captions"}


def _hard_set_section(ret: dict) -> list[str]:
    """The hard long-caption set: what it measures, both encoders within its families against chance,
    McNemar's test, and what the numbers say."""
    info = ret.get("sets", {}).get("long_hard")
    if not info or "within_family_chance" not in info:
        return []
    chance = info["within_family_chance"]
    k = round(1 / chance) if chance else 0
    window = info.get("llm_window") or {}
    md = [
        "",
        "### The hard long-caption set (the demo's Urban-1K)",
        "",
        f"`long_hard`: {info['families']} families of about {k} held-out scenes ({info['images']} images) that "
        "differ only in the colour or the shape of one group. Each caption first tells the rest of the scene, in "
        "the same words for every member of its family, until CLIP's first 77 tokens are used up; the group that "
        "differs is described after them. A 77-token text tower (the baseline's) reads every member of a family "
        "alike, so it can rank the right image first for at most one caption of a family: within families its "
        f"R@1 is at most 1/{k} ({_pct(chance)}%, the chance level), and over the whole set at most that. "
        "The LLM reads the whole caption"
        + (
            f" (its window: {window['max_length']} tokens; the captions hold up to {window['tokens_max']}, and "
            f"the members of a family part by token {window['first_difference_max']} at the latest; "
            f"{window['families_read_alike']} of {window['families']} families read alike)."
            if window.get("max_length")
            else "."
        ),
        "",
        f"| encoder | text->image R@1, whole set [95% CI] | R@1 within its family [95% CI] (chance {_pct(chance)}) | "
        "families whose text features are the same | mean text cosine: members / other families' captions |",
        "|---|---|---|---|---|",
    ]
    ci = ret.get("intervals", {})
    for enc, name in (("baseline", "baseline CLIP"), ("llm2clip", "LLM2CLIP")):
        r = ret.get(enc, {}).get("long_hard")
        if not r or "t2i_within_family_R@1" not in r:
            continue
        c = ci.get(enc, {}).get("long_hard", {})
        md.append(
            f"| {name} | {_pct(r.get('t2i_R@1'))}{_ci(c.get('t2i_R@1'))} | "
            f"{_pct(r['t2i_within_family_R@1'])}{_ci(c.get('t2i_within_family_R@1'))} | "
            f"{_pct(r['text_identical_families'])}% | {_num(r['text_cosine_within_family'])} / "
            f"{_num(r.get('text_cosine_between_families'))} |"
        )
    paired = ret.get("paired_within_family", {}).get("long_hard")
    if paired:
        md += [
            "",
            f"Within families, LLM2CLIP - baseline: {100 * paired['gain']:+.1f} points; captions only LLM2CLIP "
            f"gets right / only the baseline: {paired['wins']} / {paired['losses']}, McNemar's exact p "
            f"{paired['p_value']:.2g}.",
        ]
    md += ["", *_hard_set_reading(ret, chance)]
    return md


def _hard_set_reading(ret: dict, chance: float) -> list[str]:
    """One sentence per encoder on the hard set: above chance within families or not, and why not."""
    out = []
    ci = ret.get("intervals", {})
    for enc, name in (("baseline", "The baseline"), ("llm2clip", "LLM2CLIP")):
        r = ret.get(enc, {}).get("long_hard")
        lo_hi = ci.get(enc, {}).get("long_hard", {}).get("t2i_within_family_R@1")
        if not r or "t2i_within_family_R@1" not in r or not lo_hi:
            continue
        same, cos = r["text_identical_families"], r["text_cosine_within_family"]
        if lo_hi[0] > chance:
            out.append(
                f"{name} is above chance within families: it tells the members apart by the late detail."
            )
        elif same >= 0.999:
            out.append(
                f"{name} is at chance or below within families ({_pct(r['t2i_within_family_R@1'])}%, interval "
                f"{_ci(lo_hi).strip()}): its text features of a family's members are the same (every family), as "
                "a tower that stops reading before the captions differ must give."
            )
        else:
            other = r.get("text_cosine_between_families")
            little = (
                f"; captions of other families are at {other:.4f}: the late words move its caption feature "
                "little, and not in a direction its image side follows"
                if isinstance(other, float) and cos > other
                else ""
            )
            out.append(
                f"{name} is not above chance within families ({_pct(r['t2i_within_family_R@1'])}%, interval "
                f"{_ci(lo_hi).strip()}) although its text features of the members differ (mean cosine {cos:.4f}, "
                f"{_pct(same)}% of the families the same{little}): what differs in them does not rank the "
                "family's images better than chance."
            )
    return out


def collect(out: Path) -> dict:
    """Every number the report shows, from the run folder."""
    run = L.PipelineRun(out)
    data: dict = {
        "stage1": _read(run.stage1_metrics),
        "retrieval": _read(run.retrieval_metrics),
        "lmms": {},
        "curves": {},
        "connectors": _read(run.connectors / "connectors.json"),
        "health": _read(run.health_json),
        "llava_paired": paired_llava(out),
        "llava_image_use": image_use(out),
    }
    for enc in ENCODERS:
        res = _read(run.eval_results(enc))
        data["lmms"][enc] = res["rows"] if res else None
    for folder, _ in CURVES:
        rows = [r for r in _log(out / folder / L.TRAIN_LOG) if "loss" in r and "step" in r]
        if rows:
            data["curves"][folder] = [[r["step"], r["loss"]] for r in rows]
    return data


def _pct(x) -> str:
    return f"{100 * x:.1f}" if isinstance(x, (int, float)) else "-"


def _num(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def blind_references(out: Path) -> dict[tuple[str, str], float]:
    """What a model that ignores the image scores on the local tasks' rows it was given:
    l2c_vqa, the most frequent training answer per question type (from the LLaVA training JSON);
    l2c_pope, always the majority answer (accuracy) and always "yes" (F1, yes ratio)."""
    refs: dict[tuple[str, str], float] = {}
    hits = _prior_hits(out, _task_rows(out, "l2c_vqa"))
    if hits:
        refs[("l2c_vqa", "exact_match")] = sum(hits) / len(hits)
    pope = _task_rows(out, "l2c_pope")
    if pope:
        yes = sum(normalize(q["answer"]).startswith("yes") for q in pope) / len(pope)
        refs[("l2c_pope", "pope_accuracy")] = max(yes, 1 - yes)
        refs[("l2c_pope", "pope_f1")] = 2 * yes / (1 + yes) if yes else 0.0
    return refs


def _se(row: dict, enc: str) -> str:
    se = row.get(enc + "_stderr")
    return f" ± {se:.3f}" if isinstance(se, float) else ""


def lmms_table(lmms: dict) -> list[dict]:
    """One row per (task, metric): both encoders' values and the difference (LLM2CLIP - baseline)."""
    keyed: dict[tuple, dict] = {}
    for enc in ENCODERS:
        for r in lmms.get(enc) or []:
            row = keyed.setdefault((r["task"], r["metric"]), {"task": r["task"], "metric": r["metric"]})
            row[enc], row[f"{enc}_stderr"], row["n"] = r["value"], r["stderr"], r["n"]
    rows = list(keyed.values())
    for r in rows:
        if isinstance(r.get("baseline"), float) and isinstance(r.get("llm2clip"), float):
            r["diff"] = r["llm2clip"] - r["baseline"]
    return rows


def write_report(out: str | os.PathLike, cfg=None, state: dict | None = None) -> Path:
    """``report.md`` (one section per part of the method, its plots under ``plots/``) and ``report.json``
    (every number it shows) in the run folder `out`; `state` is the pipeline's (its steps and versions)."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    run = L.PipelineRun(out)
    plots = run.plots
    plots.mkdir(parents=True, exist_ok=True)
    state = state or {}
    data = collect(out)
    scale = getattr(cfg, "scale", None) or state.get("scale", "?")
    table = lmms_table(data["lmms"])
    md = [
        *_opening(out, scale, state),
        *_stage1_section(data["stage1"], plots),
        *_health_section(data.get("health"), plots),
        *_retrieval_section(data["retrieval"], plots),
        *_lmms_section(out, table, data["lmms"], plots),
        *_paired_section(data.get("llava_paired") or {}),
        "",
        *_image_use_section(data.get("llava_image_use") or {}),
        *_curves_section(data["curves"], plots),
        *_bench_sections(run),
        *_steps_section(state),
        *_versions_section(state),
    ]
    atomic_write_json(
        run.report_json,
        {
            "scale": scale,
            "numbers": {**data, "lmms_table": table},
            "steps": state.get("steps", {}),
            "versions": state.get("versions", {}),
        },
    )
    return atomic_write_text(run.report_md, "\n".join(md) + "\n")


def _opening(out: Path, scale: str, state: dict) -> list[str]:
    """The title, where the numbers come from, and (below paper scale) how to read them."""
    md = [f"# LLM2CLIP vs baseline CLIP: {scale} scale", ""]
    md += [
        f"Run folder `{out}`, written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Config `{state.get('config', '?')}`"
        + (f" with `{' '.join(state['overrides'])}`" if state.get("overrides") else "")
        + ". Every number below is read from the files the steps wrote.",
        "",
    ]
    run = L.PipelineRun(out)
    manifest = _read(run.data / L.MANIFEST)
    if scale != "paper":
        size = f"{manifest['options']['images']} synthetic images" if manifest else "a small dataset"
        clip = "a small CLIP trained from scratch" if run.clip_model.is_dir() else "a small demo-world CLIP"
        md += [
            f"At this scale (the embedded 135M LLM, {clip}, {size}) the numbers show how the two encoders "
            "compare here; they are not the paper's numbers. Read each difference with its interval and test.",
            "",
        ]
    return md


def _stage1_section(s1: dict | None, plots: Path) -> list[str]:
    """Stage 1: the LLM's caption retrieval accuracy before (causal, bidirectional untrained) and after."""
    import matplotlib.pyplot as plt

    md = ["## Stage 1: caption retrieval accuracy (CRA) of the LLM as a caption encoder", ""]
    if not s1:
        return md + ["(missing: stage1/metrics.json)", ""]
    rows = [
        ("causal LLM (before)", "_before_causal"),
        ("bidirectional, untrained (before)", "_before"),
        ("after stage 1", "_after"),
    ]
    md += ["| encoder | CRA | short->long top-1 | long->short top-1 |", "|---|---|---|---|"]
    for name, suffix in rows:
        md.append(
            f"| {name} | {_pct(s1.get('cra' + suffix))} | {_pct(s1.get('short_to_long_top1' + suffix))} | "
            f"{_pct(s1.get('long_to_short_top1' + suffix))} |"
        )
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    keys = ("cra", "short_to_long_top1", "long_to_short_top1")
    for i, (name, suffix) in enumerate(rows):
        vals = [100 * (s1.get(k + suffix) or 0) for k in keys]
        ax.bar([j + 0.27 * (i - 1) for j in range(3)], vals, width=0.27, label=name)
    ax.set_xticks(range(3), ["CRA", "short->long top-1", "long->short top-1"])
    ax.set_ylabel("%")
    ax.set_title("Stage 1: the LLM as a caption encoder")
    ax.legend(fontsize=7)
    return md + _figure(fig, plots, "stage1_cra.png", "stage 1")


def _retrieval_section(ret: dict | None, plots: Path) -> list[str]:
    """Stage 2: image-text retrieval of both encoders on each set (intervals, the paired difference), the
    sets, the hard long-caption set, and the recall plot."""
    md = ["## Stage 2: image-text retrieval, baseline CLIP vs LLM2CLIP (R@K, %)", ""]
    if not ret:
        return md + ["(missing: stage2/metrics.json)", ""]
    md += [
        "| captions | direction | baseline R@1 [95% CI] | LLM2CLIP R@1 [95% CI] | R@1 difference [95% CI], paired p "
        "| baseline R@5/10 | LLM2CLIP R@5/10 |",
        "|---|---|---|---|---|---|---|",
    ]
    ci = ret.get("intervals", {})
    for cap in SETS:
        for d, name in (("i2t", "image->text"), ("t2i", "text->image")):
            b = ret.get("baseline", {}).get(cap, {})
            l_ = ret.get("llm2clip", {}).get(cap, {})
            if not b or not l_:
                continue
            m = f"{d}_R@1"
            cells = [
                f"{_pct(r.get(m))}{_ci(ci.get(enc, {}).get(cap, {}).get(m))}"
                for enc, r in (("baseline", b), ("llm2clip", l_))
            ]
            paired = ret.get("paired", {}).get(cap, {}).get(m)
            diff = f"{100 * (l_[m] - b[m]):+.1f}" + (
                f"{_ci(paired['ci95'])}, p {paired['p_value']:.2g}" if paired else ""
            )
            rest = [" / ".join(_pct(r.get(f"{d}_R@{k}")) for k in (5, 10)) for r in (b, l_)]
            md.append(f"| {cap} | {name} | {cells[0]} | {cells[1]} | {diff} | {rest[0]} | {rest[1]} |")
    if ret.get("paired"):
        md += [
            "",
            "Intervals: 95% percentile bootstrap over the test images (an image and its captions drawn "
            "together); p: paired bootstrap of LLM2CLIP minus the baseline on the same resamples, two-sided.",
        ]
    sets = ret.get("sets", {})
    md += [
        "",
        "Sets: "
        + "; ".join(f"{k}: {v.get('images')} images, {v.get('captions')} captions" for k, v in sets.items())
        + ".",
    ]
    trunc = ret.get("baseline", {}).get("long", {}).get("captions_truncated")
    if trunc is not None:
        md.append(
            f"The baseline's text tower cut {_pct(trunc)}% of the long captions at its 77-token context."
        )
    md += _hard_set_section(ret)
    return md + _retrieval_plot(ret, plots)


def _retrieval_plot(ret: dict, plots: Path) -> list[str]:
    """R@1/5/10 both ways of both encoders, a panel per set LLM2CLIP was scored on."""
    import matplotlib.pyplot as plt

    shown = [cap for cap in SETS if ret.get("llm2clip", {}).get(cap)] or ["short", "long"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.2), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, cap in zip(axes, shown):
        labels = [f"{d} R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
        for i, enc in enumerate(ENCODERS):
            vals = [
                100 * (ret.get(enc, {}).get(cap, {}).get(f"{lab.split()[0]}_{lab.split()[1]}") or 0)
                for lab in labels
            ]
            ax.bar([j + 0.4 * (i - 0.5) for j in range(len(labels))], vals, width=0.4, label=enc)
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
        ax.set_title(SET_TITLES.get(cap, f"{cap} captions"))
    axes[0].set_ylabel("recall %")
    axes[0].legend(fontsize=7)
    return _figure(fig, plots, "retrieval.png", "retrieval")


def _lmms_section(out: Path, table: list[dict], lmms: dict, plots: Path) -> list[str]:
    """lmms-eval of each encoder's LLaVA: a row per (task, metric) beside what answering blind scores
    (written into the table's rows as ``without_image``), and the plot."""
    md = ["## LLaVA-1.5 on each encoder: lmms-eval", ""]
    if not table:
        return md + ["(missing: eval/*/results.json)", ""]
    refs = blind_references(out)
    md += [
        "| task | metric | baseline | LLM2CLIP | difference | without the image | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        ref = refs.get((r["task"], r["metric"]))
        r["without_image"] = ref
        md.append(
            f"| {r['task']} | {r['metric']} | {_num(r.get('baseline'))}{_se(r, 'baseline')} | "
            f"{_num(r.get('llm2clip'))}{_se(r, 'llm2clip')} | {_num(r.get('diff')) if 'diff' in r else '-'} | "
            f"{_num(ref)} | {r.get('n', '-')} |"
        )
    if refs:
        md += [
            "",
            '"Without the image" is what answering blind scores on the same rows: for l2c_vqa the most '
            "frequent training answer of the question's type, for POPE the majority answer (accuracy) and "
            'always "yes" (F1). A model above it uses the image.',
        ]
    missing = [enc for enc in ENCODERS if not lmms.get(enc)]
    if missing:
        md.append(f"\n(missing: eval/{missing[0]}/results.json)")
    return md + _lmms_plot(table, plots)


def _lmms_plot(table: list[dict], plots: Path) -> list[str]:
    """Both encoders' lmms-eval numbers, a panel per task, with what answering blind scores dashed."""
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in table})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in table if r["task"] == task]
        for i, enc in enumerate(ENCODERS):
            ax.bar(
                [j + 0.4 * (i - 0.5) for j in range(len(rows))],
                [r.get(enc) or 0 for r in rows],
                width=0.4,
                label="LLM2CLIP" if enc == "llm2clip" else enc,
            )
        for j, r in enumerate(rows):  # what answering without the image scores
            if r.get("without_image") is not None:
                ax.hlines(
                    r["without_image"],
                    j - 0.45,
                    j + 0.45,
                    colors="black",
                    linestyles="dashed",
                    label="without the image" if not j else None,
                )
        ax.set_xticks(range(len(rows)), [r["metric"] for r in rows], fontsize=7, rotation=20)
        ax.set_title(task, fontsize=9)
        if any(r.get("without_image") is not None for r in rows):
            ax.legend(fontsize=6)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("lmms-eval: the same LLaVA recipe on each encoder", fontsize=9)
    return _figure(fig, plots, "lmms_eval.png", "lmms-eval")


def _paired_section(paired: dict) -> list[str]:
    """The two LLaVAs question by question (:func:`paired_llava`): accuracies and McNemar's test."""
    if not paired:
        return []
    md = [
        "",
        "Per question, the same questions for both encoders (95% Wilson intervals; McNemar's exact "
        "test on the questions only one of them gets right):",
        "",
        "| task | n | baseline [95% CI] | LLM2CLIP [95% CI] | LLM2CLIP - baseline | only LLM2CLIP right / "
        "only baseline right | McNemar p |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, r in paired.items():
        t = r["llm2clip_vs_baseline"]
        md.append(
            f"| {task} ({r['metric']}) | {r['n']} | {r['baseline']['accuracy']:.3f}{_ci3(r['baseline']['ci95'])} | "
            f"{r['llm2clip']['accuracy']:.3f}{_ci3(r['llm2clip']['ci95'])} | {t['gain']:+.3f} | "
            f"{t['wins']} / {t['losses']} | {t['p_value']:.3g} |"
        )
    return md


def _curves_section(curves: dict, plots: Path) -> list[str]:
    """Every training step's loss curve (a panel per stage, both encoders on one for the LLaVAs) and a
    table of first and last logged losses."""
    import matplotlib.pyplot as plt

    md = ["## Training curves", ""]
    if not curves:
        return md + ["(no train_log.jsonl found)", ""]
    panels = [(t, [f for f in fs if f in curves]) for t, fs in PANELS]
    panels = [(t, fs) for t, fs in panels if fs]
    n = len(panels)
    cols = min(3, n)
    rows_ = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 2.8 * rows_), squeeze=False)
    titles = dict(CURVES)
    for ax, (title, folders) in zip(axes.flat, panels):
        for f in folders:
            pts = curves[f]
            label = "LLM2CLIP" if "llm2clip" in f else "baseline" if "baseline" in f else None
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
        if len(folders) > 1:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("loss", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    md += ["| step | first logged loss | last logged loss | logged points |", "|---|---|---|---|"]
    for folder, pts in curves.items():
        md.append(f"| {titles.get(folder, folder)} | {pts[0][1]:.3f} | {pts[-1][1]:.3f} | {len(pts)} |")
    return md + _figure(fig, plots, "training_curves.png", "training curves")


def _bench_sections(run: L.PipelineRun) -> list[str]:
    """The optional sections the bench scripts write on this run folder (connectors, caption filtering)."""
    md = []
    conn = _read(run.connectors / "connectors.json")
    if conn:
        md += [
            f"## Connectors: MLP vs Q-Former vs perceiver resampler (baseline encoder, {conn['queries']} "
            "queries; `python bench/connectors.py`)",
            "",
        ]
        md += (run.connectors / "connectors.md").read_text().splitlines()[2:] + [""]
    filt = run.caption_filter / "filter.md"
    if filt.is_file():
        md += ["## Caption filtering on deliberately corrupted pairs (`python bench/caption_filter.py`)", ""]
        md += filt.read_text().splitlines()[2:] + [""]
    return md


def _steps_section(state: dict) -> list[str]:
    """Each step's status, seconds and fingerprint, the time in steps and the last run's wall time."""
    steps = state.get("steps", {})
    if not steps:
        return []
    md = ["## Steps", "", "| step | status | seconds | fingerprint |", "|---|---|---|---|"]
    for name, rec in steps.items():
        if name == "report":
            continue
        md.append(
            f"| {name} | {rec.get('status')} | {rec.get('seconds', 0):.0f} | `{rec.get('fingerprint', '')[:12]}` |"
        )
    total = sum(r.get("seconds", 0) for r in steps.values())
    md += ["", f"Time in steps: {total / 60:.1f} min."]
    last = state.get("last_run") or {}
    if last.get("parallel", 1) > 1 and (last.get("seconds") or last.get("started")):
        ends = [r["finished"] for r in steps.values() if r.get("finished")]
        wall = last.get("seconds") or (max(ends, default=last["started"]) - last["started"])
        md += [
            f"The last run took {wall / 60:.1f} min of wall time, up to {last['parallel']} steps at once "
            "(each beside another on its share of the CPU threads, so a step's seconds are not those of a "
            "run of one step at a time)."
        ]
    return md + [""]


def _versions_section(state: dict) -> list[str]:
    """The versions of the packages the run used (the pipeline's state)."""
    versions = state.get("versions")
    if not versions:
        return []
    return [
        "## Versions",
        "",
        "| package | version |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in versions.items()),
        "",
    ]
