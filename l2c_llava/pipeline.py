"""``l2c pipeline``: every step of the method for both encoders, then the comparison report.

Steps (each a ``l2c`` command run in a child process, so each one frees its memory and is exactly
what a user would run by hand):

    data -> stage1 -> baseline CLIP -> text cache -> stage2 -> retrieval eval -> export
         -> for baseline and llm2clip: LLaVA pretrain -> finetune -> lmms-eval
         -> report

Each step is a row of the step table (:data:`STEPS`): the steps it reads from, its ``l2c`` command, what it
writes and what its fingerprint reads; :meth:`Pipeline._plan` fills the rows in from the pipeline config, one
part per family of steps (data, stage 1, baseline, stage 2, health, each encoder's LLaVA, report).

A step that runs a recipe gets its config resolved here: the step's YAML, the pipeline config's
``overrides`` for it, and the wiring the pipeline sets (output folders under ``run.output_dir``, the
embedded dataset's files, the upstream steps' outputs), validated into the recipe's typed config and
written to ``OUTPUT/pipeline/configs/<step>.yaml`` just before the step runs ``l2c ... --config`` that
file (the run-folder layout: :class:`l2c_llava.layout.PipelineRun`).

Each step has a fingerprint of its inputs: its resolved config (keys that only change logging left
out), the fingerprints of the steps it reads from, and the size and time of every input file its
config names. ``OUTPUT/pipeline/state.json`` records the fingerprint a step ran under and whether it
finished. On the next run a finished step with the same fingerprint is skipped; a step whose
fingerprint changed has its outputs removed and runs again (and so does everything downstream, whose
fingerprints include it); a step that was started under the same fingerprint but did not finish (a
kill, a crash) runs again in place, and the recipe resumes from its last checkpoint. When a step
finishes, the size and sha256 of the weights it wrote (every ``*.safetensors`` of its outputs but its
checkpoints) are recorded; a finished step is skipped only when they still match (sizes first) and each
file is whole, else it runs again in place like an unfinished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from l2c_llava import layout as L
from l2c_llava.config import load_config, write_config
from l2c_llava.config.core import RecipeConfig, config_to_dict, flatten
from l2c_llava.config.schemas import PipelineConfig, PipelineStep
from l2c_llava.config_names import project_root
from l2c_llava.cpu_threads import THREADS_FILE_ENV
from l2c_llava.errors import L2CError
from l2c_llava.io import (
    atomic_write_json,
    atomic_write_text,
    dumps_json,
    file_record,
    records_problem,
    run_lock,
    safetensors_problem,
)
from l2c_llava.models.reference import is_hub_id, resolve_vision_path
from l2c_llava.report import write_report
from l2c_llava.train.resume import fingerprint_keys, resumable_keys
from l2c_llava.train.run_dir import versions

ENCODERS = L.ENCODERS


class PipelineError(L2CError, RuntimeError):
    """A step failed (its own message and log say why): `l2c pipeline` exits 1, not 2 (bad input)."""

    exit_code = 1


@dataclass
class Step:
    name: str
    title: str
    argv: list[str] | None  # an `l2c` command line; None: run in process (`func`)
    outputs: list[Path]  # what the step writes; removed when its inputs changed
    done_marker: Path  # exists once the step's work is complete
    fingerprint: str = ""
    resume_key: str = ""  # the fingerprint without what may change on resume (train/resume.py)
    upstream: list[str] = field(default_factory=list)
    func: Callable[[], None] | None = None
    launch: list[str] | None = None  # launcher words (accelerate launch ...); None: this Python
    # the resolved config `argv` reads, written to `config_file` before the step runs; where it comes from (the
    # step's YAML and overrides, a comment in the file)
    config: RecipeConfig | None = None
    config_file: Path | None = None
    config_origin: str = ""


@dataclass
class _Child:
    """A step running in a child process (its output in `log`, or on this terminal when None)."""

    step: Step
    decision: str
    proc: subprocess.Popen
    started: float
    log: Path | None
    threads: int | None = None  # the CPU threads it was given (None: its default, every core)
    threads_file: Path | None = None  # where it reads its share while it runs (l2c_llava/cpu_threads.py)

    @classmethod
    def start(cls, step: Step, decision: str, log: Path | None, threads: int | None) -> _Child:
        cmd = command_line(step.argv, step.launch)
        env, threads_file = None, None
        if threads is not None:  # torch, OpenMP and MKL read these at start; the file, at each step
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            if log is not None:
                threads_file = log.with_suffix(".threads")
                atomic_write_text(threads_file, f"{threads}\n")
                env[THREADS_FILE_ENV] = str(threads_file)
        out = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = open(log, "a", encoding="utf-8")  # noqa: SIM115 (the child holds it; closed here after start)
            out.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            out.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env)
        finally:
            if out is not None:
                out.close()
        return cls(step, decision, proc, time.time(), log, threads, threads_file)

    def share(self, threads: int) -> bool:
        """Give the running child `threads` CPU threads from its next step on (a child started with its
        default, or without a log, keeps what it has). True if that changed its share."""
        if self.threads_file is None or threads == self.threads:
            return False
        atomic_write_text(self.threads_file, f"{threads}\n")
        self.threads = threads
        return True

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


def _tail(log: Path, lines: int = 40) -> str:
    """The last `lines` lines of a step's log (progress bars' carriage returns folded)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return f"({log} cannot be read: {e})"
    rows = [r.rsplit("\r", 1)[-1] for r in text.splitlines()]
    return "\n".join("   | " + r for r in rows[-lines:])


def _last_line(log: Path, width: int = 90) -> str:
    """What a step last printed (a progress bar's latest state), cut to `width` characters."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return "-"
    parts = [p.strip() for p in tail.replace("\r", "\n").split("\n") if p.strip()]
    text = parts[-1] if parts else "-"
    return text if len(text) <= width else text[: width - 3] + "..."


def _digest(obj) -> str:
    return hashlib.sha256(dumps_json(obj, indent=None).encode()).hexdigest()


def _file_stats(values, produced: Path | None = None) -> dict:
    """Size and mtime of every existing file named by a config value (data files, not folders), but
    those under `produced` (the pipeline's folder): what steps write is covered by their fingerprints."""
    out = {}
    inside = produced.resolve() if produced is not None else None
    for v in values:
        if isinstance(v, str) and v and os.path.isfile(v):
            if inside is not None and Path(v).resolve().is_relative_to(inside):
                continue
            st = os.stat(v)
            out[v] = [st.st_size, st.st_mtime_ns]
    return out


def config_fingerprint(
    cfg: RecipeConfig,
    sections: tuple[str, ...] | None = None,
    keep: tuple[str, ...] = (),
    produced: Path | None = None,
) -> dict:
    """The resolved config a step runs under, minus bookkeeping and the sections read after training
    (but those in `keep`), plus its input files' stats; `sections` limits it to those top-level
    sections. Under "resumable": the same without what may change on resume (train/resume.py), not part of
    the fingerprint but of the step's resume key."""
    every = flatten(config_to_dict(cfg))
    if sections is not None:
        every = {k: v for k, v in every.items() if k.split(".")[0] in sections}
    flat = fingerprint_keys(every, keep)
    return {
        "config": flat,
        "files": _file_stats(flat.values(), produced),
        "resumable": resumable_keys(every, keep),
    }


# ---------------------------------------------------------------------- the step table
@dataclass(frozen=True)
class StepRow:
    """What a step is, whatever the run's config: the steps it reads from, its `l2c` command, what it writes
    and, for a recipe step (`l2c COMMAND --config FILE`), which part of its resolved config its fingerprint
    reads. The rest (the command's values, the other steps' fingerprint inputs) comes from the run's config:
    the part of :class:`Pipeline` named after the step's family."""

    name: str
    title: str
    reads: tuple[str, ...]  # the steps whose outputs it reads (those the run plans), in fingerprint order
    command: str | None  # `l2c COMMAND ...`; None: it runs in this process
    writes: Callable[[L.PipelineRun], list[Path]]  # what it writes; removed when its inputs change
    done: Callable[[L.PipelineRun], Path]  # exists once its work is complete
    launched: bool = False  # runs under the step config's launch words (accelerate launch ...)
    # a recipe step: the config sections its fingerprint reads (None: all), and those read after training
    # that it keeps (config_fingerprint)
    sections: tuple[str, ...] | None = None
    keep: tuple[str, ...] = ()


def _llava_rows(enc: str, tower: str) -> tuple[StepRow, ...]:
    """LLaVA-1.5 on one encoder (its tower written by the step `tower`), then lmms-eval on it."""
    return (
        StepRow(
            f"pretrain_{enc}",
            f"LLaVA ({enc}): pretrain the projector",
            (tower, "data"),
            "mllm pretrain",
            lambda R: [R.llava(enc, "pretrain")],
            lambda R: R.llava_stats(enc, "pretrain"),
            launched=True,
        ),
        StepRow(
            f"finetune_{enc}",
            f"LLaVA ({enc}): instruction-tune",
            (f"pretrain_{enc}",),
            "mllm finetune",
            lambda R: [R.llava(enc, "finetune")],
            lambda R: R.llava_stats(enc, "finetune"),
            launched=True,
        ),
        StepRow(
            f"eval_{enc}",
            f"lmms-eval ({enc})",
            (f"finetune_{enc}",),
            "mllm eval",
            lambda R: [R.eval(enc)],
            lambda R: R.eval_results(enc),
        ),
    )


# the step that writes each encoder's vision tower (none for a baseline CLIP used as is)
TOWER_STEP = {"baseline": "baseline", "llm2clip": "export"}
_BEFORE_REPORT = (
    StepRow("data", "embedded dataset", (), "data synth", lambda R: [R.data], lambda R: R.data / L.MANIFEST),
    StepRow(
        "stage1",
        "stage 1: LLM -> caption encoder",
        ("data",),
        "stage1",
        lambda R: [R.stage1],
        lambda R: R.stage1_metrics,
        launched=True,
        keep=("eval",),
    ),
    StepRow(
        "baseline",
        "baseline CLIP trained from scratch",
        ("data",),
        "clip pretrain",
        lambda R: [R.clip],
        lambda R: R.clip_model / "config.json",
        launched=True,
    ),
    StepRow(
        "text_cache",
        "stage 2: text feature cache",
        ("stage1",),
        "stage2 cache",
        lambda R: [R.text_features],
        lambda R: R.text_features_done,
        sections=("text_encoder", "cache", "data"),
    ),
    StepRow(
        "stage2",
        "stage 2: vision encoder vs cached LLM features",
        ("text_cache", "baseline"),
        "stage2 train",
        lambda R: [R.stage2],
        lambda R: R.stage2_weights,
        launched=True,
    ),
    StepRow(
        "retrieval",
        "retrieval: baseline vs LLM2CLIP",
        ("stage2",),
        "stage2 eval",
        lambda R: [R.retrieval_metrics, R.retrieval_md],
        lambda R: R.retrieval_metrics,
        keep=("eval",),
    ),
    StepRow(
        "export",
        "export the upgraded encoder",
        ("stage2",),
        None,
        lambda R: [R.exports],
        lambda R: R.export("llm2clip") / "config.json",
    ),
    StepRow(
        "health",
        "encoder health: collapse and patch probe, both towers",
        ("export", "baseline", "data"),
        "health",
        lambda R: [R.health],
        lambda R: R.health_json,
    ),
    *(row for enc in ENCODERS for row in _llava_rows(enc, TOWER_STEP[enc])),
)
# name -> row, in the order the steps run one at a time; the report reads every step before it
STEPS: dict[str, StepRow] = {
    row.name: row
    for row in (
        *_BEFORE_REPORT,
        StepRow(
            "report",
            "report",
            tuple(row.name for row in _BEFORE_REPORT),
            None,
            lambda R: [R.report_md, R.plots],
            lambda R: R.report_md,
        ),
    )
}


def l2c_argv(command: str, *options: tuple[str, object]) -> list[str]:
    """A step's command line, ``l2c COMMAND --flag value ...``, each value as text (an option whose value is
    None left out); :func:`command_line` says what runs it."""
    argv = ["l2c", *command.split()]
    for flag, value in options:
        if value is not None:
            argv += [flag, str(value)]
    return argv


def _chain(step: Step, inputs: dict, fingerprints: dict[str, str]) -> None:
    """Set the step's fingerprint (and resume key) from its inputs and the fingerprints of the steps it reads."""
    resumable = inputs.pop("resumable", None)
    ups = {u: fingerprints[u] for u in step.upstream}
    step.fingerprint = _digest({"step": step.name, "inputs": inputs, "upstream": ups})
    inputs = {**inputs, "config": resumable} if resumable is not None else inputs
    step.resume_key = _digest({"step": step.name, "inputs": inputs, "upstream": ups})
    fingerprints[step.name] = step.fingerprint


class Pipeline:
    def __init__(self, cfg: PipelineConfig, source: str = "", overrides: list[str] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.run_folder = L.PipelineRun(self.out)
        self.state_path = self.run_folder.state
        self.source, self.overrides = source, overrides or []
        self._resolve_configs()
        self.data_dir = self._data_dir()
        self.steps = self._plan()
        self.damaged: dict[str, str] = {}  # step -> why its recorded outputs no longer match

    def _resolve_configs(self) -> None:
        """Step configs are paths from the working folder; the shipped ones also resolve from the checkout."""
        c = self.cfg
        for step in (c.stage1, c.stage2, c.mllm.pretrain, c.mllm.finetune, c.baseline.clip):
            if step is None or Path(step.config).is_file():
                continue
            shipped = project_root() / step.config
            if not shipped.is_file():
                raise PipelineError(
                    f"{self.source}: step config {step.config} not found (from {Path.cwd()} "
                    f"or {project_root()})"
                )
            step.config = str(shipped)

    # ------------------------------------------------------------------ the plan
    def _data_dir(self) -> Path | None:
        d = self.cfg.data
        if d.synth_images is not None:
            return self.run_folder.data
        return Path(d.dir) if d.dir else None

    def _plan(self) -> list[Step]:
        """The run's steps in the table's order (:data:`STEPS`), each family's from its part below with the
        inputs its fingerprint reads; each fingerprint chained to those of the steps it reads from."""
        planned = [
            *self._data_step(),
            *self._stage1_step(),
            *self._baseline_step(),
            *self._stage2_steps(),
            *self._health_step(),
            *(part for enc in ENCODERS for part in self._llava_steps(enc)),
            (self._step("report", func=self._report), {"scale": self.cfg.scale}),
        ]
        fingerprints: dict[str, str] = {}
        for step, inputs in planned:
            step.upstream = [u for u in STEPS[step.name].reads if u in fingerprints]
            _chain(step, inputs, fingerprints)
        return [step for step, _ in planned]

    def _step(self, name: str, argv: list[str] | None = None, **how) -> Step:
        """The table's step `name`, run by `argv` (else by `func`, in this process) as `how` says."""
        row = STEPS[name]
        return Step(row.name, row.title, argv, row.writes(self.run_folder), row.done(self.run_folder), **how)

    def _recipe_step(self, name: str, given: PipelineStep, cfg: RecipeConfig) -> tuple[Step, dict]:
        """A step that runs ``l2c COMMAND --config <its resolved config>``; its fingerprint reads that config
        (the table's sections of it) and the input files it names."""
        row, file = STEPS[name], self.run_folder.step_config(name)
        step = self._step(
            name,
            l2c_argv(row.command, ("--config", file)),
            launch=given.launch if row.launched else None,
            config=cfg,
            config_file=file,
            config_origin=given.config + (f" with {' '.join(given.overrides)}" if given.overrides else ""),
        )
        return step, config_fingerprint(cfg, row.sections, row.keep, produced=self.out)

    def _resolve(self, given: PipelineStep, wiring: dict, data: dict[str, str] | None = None) -> RecipeConfig:
        """The step's YAML with its overrides, then the pipeline's wiring, then (with a data folder) config keys
        pointed at files of the embedded layout: validated, every problem named."""
        if self.data_dir is not None:
            wiring = {**wiring, **{k: str(self.data_dir / rel) for k, rel in (data or {}).items()}}
        return load_config(given.config, given.overrides, values=wiring)

    @cached_property
    def baseline_tower(self) -> str:
        """The baseline's vision tower: the CLIP the baseline step trains, else ``baseline.vision``:
        embedded:demo-clip -> the shipped folder, so that every step (and every exported LLaVA) names a folder;
        a Hub id stays an id, each step resolves it through the Hugging Face cache when it runs (planning,
        --dry-run and validation never download)."""
        if self.cfg.baseline.clip is not None:
            return str(self.run_folder.clip_model)
        vision = str(self.cfg.baseline.vision)
        return vision if is_hub_id(vision) else resolve_vision_path(vision)

    def _tower(self, enc: str) -> str:
        """The vision tower of one encoder's LLaVA: the baseline's, or the one the export step writes."""
        return self.baseline_tower if enc == "baseline" else str(self.run_folder.export("vision"))

    def _data_step(self) -> list[tuple[Step, dict]]:
        """`l2c data synth` into the run folder (data.synth_images); none for a data.dir, which must hold
        the embedded dataset's layout."""
        d, D = self.cfg.data, self.data_dir
        if d.synth_images is None:
            if D is not None and not (D / L.MANIFEST).is_file():
                raise PipelineError(
                    f"data.dir {D}: no manifest.json (the embedded dataset's layout; "
                    "`l2c data synth` writes one)"
                )
            return []
        from l2c_llava.data.synthetic import GENERATOR_VERSION

        argv = l2c_argv(
            "data synth",
            ("--out", D),
            ("--images", d.synth_images),
            ("--seed", d.synth_seed),
            ("--size", d.synth_size),
            ("--val-fraction", d.synth_val_fraction),
            ("--test-fraction", d.synth_test_fraction),
        )
        # the generator's version: a dataset of an older generator (without files the steps now read) is
        # made again, and every step after it runs again
        return [(self._step("data", argv), {"synth": d.model_dump(), "generator": GENERATOR_VERSION})]

    def _stage1_step(self) -> list[tuple[Step, dict]]:
        s1 = self.cfg.stage1
        cfg = self._resolve(
            s1,
            {"run.output_dir": str(self.run_folder.stage1)},
            {
                "data.train": L.CAPTION_PAIRS["train"],
                "data.eval": L.RETRIEVAL_SHORT,
                "data.eval_pairs": L.CAPTION_PAIRS["test"],
            },
        )
        return [self._recipe_step("stage1", s1, cfg)]

    def _baseline_step(self) -> list[tuple[Step, dict]]:
        """A CLIP trained from scratch (baseline.clip); none for one used as is (baseline.vision)."""
        b = self.cfg.baseline.clip
        if b is None:
            return []
        cfg = self._resolve(
            b,
            {"run.output_dir": str(self.run_folder.clip)},
            {"data.train": L.RETRIEVAL_SHORT, "data.image_root": L.IMAGES},
        )
        return [self._recipe_step("baseline", b, cfg)]

    def _stage2_steps(self) -> list[tuple[Step, dict]]:
        """Stage 2 from one resolved config: the text feature cache, the training, the retrieval eval; then
        the export of the upgraded encoder (in this process)."""
        s2, R, D = self.cfg.stage2, self.run_folder, self.data_dir
        tower = self.baseline_tower
        eval_sets = {"data.eval_short": L.RETRIEVAL_SHORT, "data.eval_long": L.RETRIEVAL_LONG}
        unset = {}
        if D is not None and (
            self.cfg.data.synth_images is not None or (D / L.RETRIEVAL_LONG_HARD).is_file()
        ):
            eval_sets["data.eval_long_hard"] = L.RETRIEVAL_LONG_HARD
        elif D is not None:  # a dataset written before the hard set existed: scored without it
            unset["data.eval_long_hard"] = None
        cfg = self._resolve(
            s2,
            {
                "run.output_dir": str(R.stage2),
                "text_encoder.path": str(R.stage1_encoder),
                "cache.dir": str(R.text_features),
                "vision.name_or_path": tower,
                **unset,
            },
            {
                "data.train": L.CAPTION_PAIRS["train"],
                "data.image_root": L.IMAGES,
                **eval_sets,
                "data.eval_image_root": L.IMAGES,
            },
        )
        return [
            self._recipe_step("text_cache", s2, cfg),
            self._recipe_step("stage2", s2, cfg),
            self._recipe_step("retrieval", s2, cfg),
            (self._step("export", func=self._export), {}),
        ]

    def _health_step(self) -> list[tuple[Step, dict]]:
        """Encoder health: collapse figures and the patch probe of both towers, read before any LLaVA number
        (with a data folder)."""
        h, R = self.cfg.health, self.run_folder
        if self.data_dir is None:
            return []
        argv = l2c_argv(
            "health",
            *(("--tower", f"{enc}={self._tower(enc)}") for enc in ENCODERS),
            ("--data", self.data_dir),
            ("--probe-train", h.probe_train),
            ("--test", h.test_scenes),
            ("--steps", h.probe_steps),
            ("--out", R.health_json),
        )
        return [(self._step("health", argv), {"health": h.model_dump()})]

    def _llava_steps(self, enc: str) -> list[tuple[Step, dict]]:
        """LLaVA-1.5 on one encoder's tower: pretrain the projector, instruction-tune, then lmms-eval."""
        pre, fin, R = self.cfg.mllm.pretrain, self.cfg.mllm.finetune, self.run_folder
        images = {"data.image_root": L.IMAGES}
        wiring = {"model.vision_tower": self._tower(enc)}
        pre_dir, fin_dir = R.llava(enc, "pretrain"), R.llava(enc, "finetune")
        pre_cfg = self._resolve(
            pre, {"run.output_dir": str(pre_dir), **wiring}, {"data.path": L.LLAVA_PRETRAIN, **images}
        )
        fin_cfg = self._resolve(
            fin,
            {"run.output_dir": str(fin_dir), **wiring, "model.init_from": str(pre_dir)},
            {"data.path": L.LLAVA_INSTRUCT, **images},
        )
        return [
            self._recipe_step(f"pretrain_{enc}", pre, pre_cfg),
            self._recipe_step(f"finetune_{enc}", fin, fin_cfg),
            self._eval_step(enc),
        ]

    def _eval_step(self, enc: str) -> tuple[Step, dict]:
        """lmms-eval on one encoder's finetuned LLaVA; its fingerprint reads the eval settings and the data
        folder's manifest (its size and time)."""
        e, R, D = self.cfg.eval, self.run_folder, self.data_dir
        data = e.data or (str(D) if D else None)
        argv = l2c_argv(
            "mllm eval",
            ("--model", R.llava(enc, "finetune")),
            ("--tasks", ",".join(e.tasks)),
            ("--out", R.eval(enc)),
            ("--device", e.device),
            ("--lmms-model", e.model),
            ("--batch-size", e.batch_size),
            ("--data", data),
            ("--limit", e.limit),
            *(("--task-limit", f"{task}={n}") for task, n in sorted(e.task_limits.items())),
        )
        inputs = {
            "eval": {**e.model_dump(), "data": data},
            "files": _file_stats([data and str(Path(data) / L.MANIFEST)], self.out),
        }
        return self._step(f"eval_{enc}", argv), inputs

    def _export(self) -> None:
        R = self.run_folder
        for what in ("vision", "llm2clip"):
            self._run(l2c_argv(f"export {what}", ("--run", R.stage2), ("--out", R.export(what))))

    def _report(self) -> None:
        write_report(self.out, self.cfg, self.load_state())

    # ------------------------------------------------------------------ state
    def load_state(self) -> dict:
        if self.state_path.is_file():
            try:
                return json.loads(self.state_path.read_text())
            except json.JSONDecodeError as e:
                raise PipelineError(
                    f"{self.state_path}: not JSON ({e}); delete it to re-check every step"
                ) from e
        return {"steps": {}}

    def _save_state(self, state: dict) -> None:
        atomic_write_json(self.state_path, state)

    def decide(self, step: Step, state: dict) -> str:
        """skip (finished, same inputs), resume (started with the same inputs, or with inputs that
        differ only in what may change on resume, e.g. a raised train.max_steps), fresh (new or changed)."""
        rec = state["steps"].get(step.name)
        if rec is None:
            return "fresh"
        if rec.get("fingerprint") != step.fingerprint:
            return "resume" if rec.get("resume_key") == step.resume_key else "fresh"
        if rec.get("status") == "done" and step.done_marker.exists():
            problem = self.outputs_problem(step, rec)
            if problem is None:
                return "skip"
            self.damaged[step.name] = problem
        return "resume"

    # ------------------------------------------------------------------ outputs
    def _weights(self, step: Step) -> list[Path]:
        """The weights a step wrote: every ``*.safetensors`` of its outputs, its checkpoints left out
        (they are the recipe's resume state, checked by the recipe)."""
        found = []
        for out in step.outputs:
            files = [out] if out.is_file() else sorted(out.rglob("*.safetensors")) if out.is_dir() else []
            for f in files:
                parts = f.relative_to(out).parts if f != out else ()
                if f.suffix == ".safetensors" and L.CHECKPOINTS not in parts[:-1]:
                    found.append(f)
        return found

    def _key(self, f: Path) -> str:
        return str(f.relative_to(self.out)) if f.is_relative_to(self.out) else str(f)

    def record_outputs(self, step: Step) -> dict:
        """Size and sha256 of each weights file the step wrote (see :meth:`_weights`)."""
        return {self._key(f): file_record(f) for f in self._weights(step)}

    def outputs_problem(self, step: Step, rec: dict) -> str | None:
        """Why the finished step's outputs are not what it wrote (None: they are): a recorded weights
        file missing, of another size or with another sha256, any weights file not whole, or a dataset
        that no longer matches its SHA256SUMS."""
        recorded = rec.get("outputs") or {}
        problem = records_problem(self.out, recorded, hashes=False)  # sizes first: cheap
        if problem:
            return problem
        for f in self._weights(step):
            problem = safetensors_problem(f)
            if problem:
                return f"{f}: {problem}"
        for out in step.outputs:  # a dataset `l2c data synth` wrote: its own SHA256SUMS
            if (out / L.DATASET_SUMS).is_file() and (out / L.MANIFEST).is_file():
                from l2c_llava.data.synthetic import dataset_problems

                try:
                    manifest = json.loads((out / L.MANIFEST).read_text(encoding="utf-8"))
                    problems = dataset_problems(out, manifest)
                except (OSError, ValueError) as e:
                    problems = [f"{L.MANIFEST} cannot be read ({e})"]
                if problems:
                    return f"the dataset {out}: {'; '.join(problems)}"
        return records_problem(self.out, recorded)

    # ------------------------------------------------------------------ running
    def _run(self, argv: list[str], launch: list[str] | None = None) -> None:
        rc = subprocess.call(command_line(argv, launch))
        if rc != 0:
            raise PipelineError(f"step command failed (exit {rc}): {' '.join(argv)}")

    def run(self, dry_run: bool = False, echo=print) -> dict:
        state = self.load_state()
        state.setdefault("steps", {})
        state.update(config=self.source, overrides=self.overrides, scale=self.cfg.scale)
        plan = [(s, self.decide(s, state)) for s in self.steps]
        n = len(plan)
        if dry_run:
            for i, (s, d) in enumerate(plan, 1):
                echo(f"[{i}/{n}] {s.name:18s} {d:6s} {s.title}")
            return {s.name: d for s, d in plan}
        # one pipeline per folder; the steps it runs lock their own sub-folders, not this one
        with run_lock(self.out, "pipeline"):
            return self._run_plan(plan, state, echo)

    def _run_plan(self, plan: list, state: dict, echo) -> dict:
        """Run the plan's steps in order, up to ``parallel`` at once: a step starts once every step it
        reads from has finished (``upstream``) and no running step writes where it writes. With one at
        a time each step's output goes to this terminal; with more, each step's to its log
        (``pipeline/logs/<step>.log``) and a child gets its share of the CPU threads."""
        n, parallel = len(plan), self.cfg.parallel
        state["versions"] = versions()
        t0 = time.time()
        # the report (the last step) reads it: the run's wall time so far
        state["last_run"] = {"parallel": parallel, "started": t0}
        ran: dict[str, str] = {}
        index = {step.name: i for i, (step, _) in enumerate(plan, 1)}
        pending = []
        for step, decision in plan:
            if decision == "skip":
                rec = state["steps"].get(step.name, {})
                echo(
                    f"== [{index[step.name]}/{n}] {step.title}: done earlier ({_hms(rec.get('seconds', 0))}), "
                    "inputs unchanged: skipped"
                )
                ran[step.name] = "skip"
            else:
                pending.append((step, decision))
        running: dict[str, _Child] = {}
        failed: list[str] = []
        reads: dict[str, set[str]] = {}  # each step's upstream steps, and theirs, and so on
        for step, _ in plan:
            reads[step.name] = set()
            for u in step.upstream:
                reads[step.name] |= {u, *reads.get(u, ())}

        def ready(step: Step) -> bool:
            if any(u not in ran or u in running for u in step.upstream if u in index):
                return False
            mine = [p.resolve() for p in step.outputs]
            theirs = [p.resolve() for c in running.values() for p in c.step.outputs]
            return not any(a.is_relative_to(b) or b.is_relative_to(a) for a in mine for b in theirs)

        def left() -> float:
            """The longest chain of steps still to run, or their sum shared among `parallel`, whichever is
            longer (the estimates: each step's last time, else the config's `estimates`)."""
            todo = {s.name: s for s, _ in pending} | {c.step.name: c.step for c in running.values()}
            chain: dict[str, float] = {}
            for step, _ in plan:  # in plan order: a step's upstream steps come before it
                if step.name in todo:
                    before = [chain[u] for u in step.upstream if u in chain]
                    chain[step.name] = self._estimate(step, state) + max(before, default=0.0)
            total = sum(self._estimate(s, state) for s in todo.values())
            return max(max(chain.values(), default=0.0), total / max(1, parallel))

        try:
            while pending or running:
                while not failed and len(running) < parallel:
                    nxt = next(((s, d) for s, d in pending if ready(s)), None)
                    if nxt is None:
                        break
                    pending.remove(nxt)
                    step, decision = nxt
                    # alone from here to its end (nothing running, everything left reads it): every thread
                    alone = not running and all(step.name in reads[s.name] for s, _ in pending)
                    threads = None if alone else self._threads()
                    head = f"[{index[step.name]}/{n}]"
                    child = self._start(step, decision, state, head, t0, left(), echo, threads)
                    if child is None:  # ran in this process, finished
                        self._finish(step, state, 0.0)
                        ran[step.name] = decision
                    else:
                        running[step.name] = child
                self._share_cores(running, echo)
                if not running:
                    if failed or not pending:
                        break
                    stuck = ", ".join(s.name for s, _ in pending)
                    raise PipelineError(f"no step can start ({stuck}): their upstream steps never finish")
                done = self._wait(running, echo, t0)
                child = running.pop(done)
                head = f"[{index[done]}/{n}] {child.step.title}"
                if child.returncode != 0:
                    failed.append(done)
                    where = f"; its output: {child.log}" if child.log else ""
                    echo(f"== {head}: FAILED (exit {child.returncode}){where}")
                    if child.log:
                        echo(_tail(child.log))
                    if running:
                        echo(
                            f"== waiting for {', '.join(running)} to finish (Ctrl-C stops them; they resume "
                            "from their last checkpoint)"
                        )
                    continue
                self._finish(child.step, state, time.time() - child.started)
                ran[done] = child.decision
                if parallel > 1:
                    echo(
                        f"== {head}: done in {_hms(time.time() - child.started)} | elapsed {_hms(time.time() - t0)}"
                    )
        except BaseException:
            for child in running.values():  # a Ctrl-C reached them too; wait for their checkpoints
                child.proc.wait()
            raise
        if failed:
            step = next(s for s, _ in plan if s.name == failed[0])
            raise PipelineError(
                f"step command failed: {' '.join(step.argv or [step.name])}"
                + (f" (its output: {self.run_folder.step_log(step.name)})" if parallel > 1 else "")
            )
        wall = time.time() - t0
        state["last_run"].update(seconds=round(wall, 1), finished=time.time())
        self._save_state(state)
        echo(
            f"== pipeline finished in {_hms(wall)}: {sum(d != 'skip' for d in ran.values())} step(s) run, "
            f"{sum(d == 'skip' for d in ran.values())} skipped; report: {self.run_folder.report_md}"
        )
        return ran

    def _start(
        self,
        step: Step,
        decision: str,
        state: dict,
        head: str,
        t0: float,
        left: float,
        echo,
        threads: int | None,
    ):
        """Record the step as running and start it: a child process on `threads` CPU threads (None: its
        default, every core; returned), or in this process (run to the end here; None returned)."""
        rec = state["steps"].get(step.name, {})
        if decision == "fresh":
            for p in step.outputs:
                _remove(p)
        head = f"{head} {step.title}"
        if step.name in self.damaged:
            echo(
                f"== {head}: its outputs changed since it finished ({self.damaged[step.name]}): running it again"
            )
        log = None
        if self.cfg.parallel > 1 and step.func is None:
            log = self.run_folder.step_log(step.name)
        echo(
            f"== {head} ({'resuming' if decision == 'resume' else 'running'}) | elapsed {_hms(time.time() - t0)} | "
            f"about {_hms(left)} left" + (f" | log: {log}" if log else "")
        )
        state["steps"][step.name] = {
            "fingerprint": step.fingerprint,
            "resume_key": step.resume_key,
            "status": "running",
            "upstream": step.upstream,
            "started": time.time(),
            "argv": step.argv,
            "seconds": rec.get("seconds", 0) if decision == "resume" else 0,
        }
        self._save_state(state)
        if step.config is not None:
            write_step_config(step)
        if step.func is not None:
            started = time.time()
            step.func()
            state["steps"][step.name]["seconds"] += time.time() - started
            return None
        return _Child.start(step, decision, log, threads)

    def _threads(self, beside: int | None = None) -> int | None:
        """CPU threads of a child with several steps at once: its share of the cores among `beside`
        running steps (default: ``parallel``). None: the child's own default, every core; also where
        OMP_NUM_THREADS is set."""
        if self.cfg.parallel <= 1 or os.environ.get("OMP_NUM_THREADS"):
            return None
        return max(1, (os.cpu_count() or 1) // max(1, beside or self.cfg.parallel))

    def _share_cores(self, running: dict[str, _Child], echo) -> None:
        """The cores shared among the steps running now, once no other step can start: a step whose
        neighbour ended takes the cores it left, from its next training step or batch on
        (:func:`l2c_llava.cpu_threads.follow_share`)."""
        share = self._threads(len(running))
        if share is None:
            return
        for name, child in running.items():
            if child.share(share):
                echo(f"== {name}: now on {share} CPU thread(s)")

    status_every = 60.0  # seconds between two progress lines while steps run beside each other

    def _wait(self, running: dict, echo, t0: float) -> str:
        """The name of the first running child to end; meanwhile, with the steps' output in logs, every
        :attr:`status_every` seconds a line with where each running step is (its log's last line)."""
        last = time.time()
        while True:
            for name, child in running.items():
                if child.poll() is not None:
                    return name
            if time.time() - last >= self.status_every and any(c.log for c in running.values()):
                last = time.time()
                where = " | ".join(
                    f"{name} {_hms(last - c.started)}: {_last_line(c.log)}"
                    for name, c in running.items()
                    if c.log
                )
                echo(f"   elapsed {_hms(last - t0)} | {where}")
            time.sleep(0.2)

    def _finish(self, step: Step, state: dict, seconds: float) -> None:
        """Check what a finished step left and record it as done."""
        if not step.done_marker.exists():
            raise PipelineError(f"step {step.name} finished without writing {step.done_marker}")
        broken = self.outputs_problem(step, {})
        if broken:
            raise PipelineError(
                f"step {step.name} finished, but {broken}; remove {', '.join(map(str, step.outputs))} "
                "to run the step from scratch"
            )
        rec = state["steps"][step.name]
        rec.update(
            status="done",
            seconds=rec["seconds"] + (seconds if step.func is None else 0),
            finished=time.time(),
            outputs=self.record_outputs(step),
        )
        self._save_state(state)

    def _estimate(self, step: Step, state: dict) -> float:
        rec = state["steps"].get(step.name)
        if rec and rec.get("status") == "done" and rec.get("seconds"):
            return float(rec["seconds"])
        return float(self.cfg.estimates.get(step.name, 0.0))


def command_line(argv: list[str], launch: list[str] | None = None) -> list[str]:
    """What runs an `l2c` command line: this Python, or the step's launcher (accelerate launch ...)."""
    return [*(launch or [sys.executable]), "-m", "l2c_llava.cli", *argv[1:]]


def write_step_config(step: Step) -> Path:
    """The step's resolved config, where its command reads it; the file opens with that command. It holds the
    keys the step's YAML, its overrides and the wiring set (validated), not the defaults: loaded, it gives the
    very config the step was planned and fingerprinted with (the run folder's config.yaml spells out all)."""
    under = f" (under {' '.join(step.launch)})" if step.launch else ""
    return write_config(
        step.config,
        step.config_file,
        [
            " ".join(step.argv) + under,
            "resolved by `l2c pipeline` "
            f"from {step.config_origin} and the pipeline's wiring (l2c_llava/pipeline.py); the recipe's "
            "defaults apply to the keys not given",
        ],
        only_given=True,
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def load_pipeline(path: str, overrides: list[str]) -> Pipeline:
    cfg = load_config(path, overrides)
    if not isinstance(cfg, PipelineConfig):
        raise PipelineError(f"{path}: recipe {cfg.RECIPE!r}, not a pipeline config (recipe: pipeline)")
    return Pipeline(cfg, source=str(path), overrides=list(overrides))


__all__ = [
    "ENCODERS",
    "Pipeline",
    "PipelineError",
    "PipelineStep",
    "STEPS",
    "StepRow",
    "command_line",
    "l2c_argv",
    "load_pipeline",
    "write_step_config",
]
