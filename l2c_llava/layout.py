"""Where things are, stated once: the embedded dataset's files (written by ``data/synthetic.py``, read by
the pipeline, the local lmms-eval tasks, the retrieval and health checks and the report), the files of
a training run's folder (written through ``l2c_llava/train``), of a text feature cache and of an
evaluation folder, where a stage-2 run keeps its exports (written by ``l2c export``, read wherever a
stage-2 run folder is given as a vision tower) and the pipeline's run folder (:class:`PipelineRun`:
written by ``l2c pipeline``'s steps, read by the report, the web demo and the bench scripts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from l2c_llava.errors import MissingFileError

# -- the embedded dataset (relative to its folder; image paths in every file are relative to IMAGES) -----
IMAGES = "images"
CAPTION_PAIRS = {s: f"captions/{s}.jsonl" for s in ("train", "val", "test")}  # {"image", "short", "long"}
RETRIEVAL_SHORT = "retrieval/karpathy.json"  # Karpathy-style, every split
RETRIEVAL_LONG = "retrieval/long_test.json"  # ShareGPT4V-1K style, test split
# the same style, families of test scenes whose captions share their first 77 CLIP tokens (a "family" key per row)
RETRIEVAL_LONG_HARD = "retrieval/long_hard.json"
HARD_IMAGES = "hard"  # under IMAGES: the hard set's redrawn members (hard/<scene index>_<member>.jpg)
LLAVA_PRETRAIN = "llava/pretrain.json"
LLAVA_INSTRUCT = "llava/instruct.json"
VQA = {s: f"eval/vqa_{s}.jsonl" for s in ("val", "test")}
POPE = "eval/pope_test.jsonl"
SCENES = "scenes.jsonl"  # the ground truth scene graph of each image
MANIFEST = "manifest.json"
DATASET_SUMS = "SHA256SUMS"  # `sha256sum -c` list of every file the generator wrote (the manifest aside)

DATASET_FILES = {  # as the manifest records them
    "caption_pairs": CAPTION_PAIRS,
    "retrieval_short": RETRIEVAL_SHORT,
    "retrieval_long": RETRIEVAL_LONG,
    "retrieval_long_hard": RETRIEVAL_LONG_HARD,
    "llava_pretrain": LLAVA_PRETRAIN,
    "llava_instruct": LLAVA_INSTRUCT,
    "vqa": VQA,
    "pope": POPE,
    "scenes": SCENES,
}

# -- a training run folder (every recipe's run.output_dir; l2c_llava/train writes it) ---------------------
RUN_CONFIG = "config.yaml"  # the resolved config the run (and its checkpoints) were written under
RUN_VERSIONS = "versions.json"
TRAIN_LOG = "train_log.jsonl"  # one record per logged step
TRAIN_STATS = "train_stats.json"  # written once training is over
CHECKPOINTS = "checkpoints"
TRAINED_MODEL = "model"  # the trained model (stage 2, the CLIP baseline, LLaVA)
STAGE2_WEIGHTS = "model.safetensors"  # in a stage-2 run's TRAINED_MODEL, beside llm2clip_config.json
RUN_METRICS = "metrics.json"  # evaluation numbers: stage 1's CRA before / after, stage 2's retrieval
STAGE1_ENCODER = "encoder"  # the caption encoder a stage-1 run writes last (stage 2's text_encoder.path)
RETRIEVAL_TABLE = "retrieval.md"  # beside a stage-2 run's RUN_METRICS (`l2c stage2 eval`)

# -- a text feature cache (stage 2's cache.dir; written by `l2c stage2 cache`, stage2/cache.py) ------------
CACHE_MANIFEST = "manifest.json"  # in each of its folders (train, eval_short, eval_long, eval_long_hard)
CACHE_LLM_WINDOW = "llm_window.json"  # in eval_long_hard: what the encoder's window keeps of the hard set

# -- an evaluation folder (`l2c mllm eval --out`; written by mllm/lmms.py) -----------------------------------
EVAL_RESULTS = "results.json"  # the normalized table
EVAL_TASKS = "tasks"  # the local tasks' YAMLs and the rows each was given
LMMS_EVAL_OUTPUT = "lmms_eval"  # lmms-eval's own output (its logged samples)


# -- a stage-2 run folder ---------------------------------------------------------------------------------


def export_dir(run_dir: str | os.PathLike) -> Path:
    """Where a stage-2 run's exports go: its config's ``export.dir``, else ``<run>/export``. ``l2c export
    vision|llm2clip --run RUN`` write ``vision`` / ``llm2clip`` under it, and a stage-2 run folder given
    as a vision tower (the mllm configs) is read from ``vision`` under it."""
    run = Path(run_dir)
    if run.name == TRAINED_MODEL and (run.parent / RUN_CONFIG).is_file():
        run = run.parent
    cfg = yaml.safe_load((run / RUN_CONFIG).read_text()) if (run / RUN_CONFIG).is_file() else {}
    chosen = ((cfg or {}).get("export") or {}).get("dir")
    return Path(chosen) if chosen else run / "export"


def is_stage2_run(folder: str | os.PathLike) -> bool:
    p = Path(folder)
    if not (p / RUN_CONFIG).is_file() or (p / "config.json").is_file():
        return False
    try:
        return (yaml.safe_load((p / RUN_CONFIG).read_text()) or {}).get("recipe") == "stage2"
    except yaml.YAMLError:
        return False


def exported_tower(run_dir: str | os.PathLike) -> Path:
    """The vision tower exported from a stage-2 run (``export_dir(run)/vision``), or an error saying
    the command that writes it."""
    folder = export_dir(run_dir) / "vision"
    if not (folder / "config.json").is_file():
        raise MissingFileError(
            f"{run_dir} is a stage-2 run whose vision tower is not exported yet ({folder}): "
            f"run `l2c export vision --run {run_dir}`"
        )
    return folder


# -- the pipeline's run folder (`l2c pipeline`'s run.output_dir) -------------------------------------------


ENCODERS = ("baseline", "llm2clip")  # the two vision encoders a pipeline run compares, in its folder names


@dataclass(frozen=True)
class PipelineRun:
    """Where each step of ``l2c pipeline`` writes under its ``run.output_dir`` (``root``): one folder per
    step, each encoder's LLaVA and lmms-eval results, the report, and the pipeline's own bookkeeping.
    ``PipelineRun(Path())`` gives the same paths relative to the run folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # the steps' folders
    @property
    def data(self) -> Path:
        """The embedded dataset, when the pipeline synthesizes it (``data.synth_images``)."""
        return self.root / "data"

    @property
    def stage1(self) -> Path:
        return self.root / "stage1"

    @property
    def stage1_encoder(self) -> Path:
        """The caption encoder stage 1 writes: stage 2's ``text_encoder.path``."""
        return self.stage1 / STAGE1_ENCODER

    @property
    def stage1_metrics(self) -> Path:
        return self.stage1 / RUN_METRICS

    @property
    def clip(self) -> Path:
        """The baseline CLIP trained from scratch (``baseline.clip``)."""
        return self.root / "clip"

    @property
    def clip_model(self) -> Path:
        return self.clip / TRAINED_MODEL

    @property
    def text_features(self) -> Path:
        """Stage 2's text feature cache (its ``cache.dir``)."""
        return self.root / "text_features"

    @property
    def text_features_done(self) -> Path:
        """Written last by ``l2c stage2 cache``: the training captions' manifest."""
        return self.text_features / "train" / CACHE_MANIFEST

    @property
    def stage2(self) -> Path:
        return self.root / "stage2"

    @property
    def stage2_weights(self) -> Path:
        """The trained LLM2CLIP model's weights, saved when stage 2's training is over."""
        return self.stage2 / TRAINED_MODEL / STAGE2_WEIGHTS

    @property
    def retrieval_metrics(self) -> Path:
        """``l2c stage2 eval``'s numbers, beside ``retrieval.md`` in the stage-2 folder."""
        return self.stage2 / RUN_METRICS

    @property
    def retrieval_md(self) -> Path:
        return self.stage2 / RETRIEVAL_TABLE

    @property
    def exports(self) -> Path:
        return self.root / "export"

    def export(self, what: str) -> Path:
        """``l2c export vision|llm2clip`` of the stage-2 run."""
        return self.exports / what

    @property
    def health(self) -> Path:
        return self.root / "health"

    @property
    def health_json(self) -> Path:
        return self.health / "health.json"

    def llava(self, encoder: str, stage: str) -> Path:
        """The LLaVA run of one encoder (:data:`ENCODERS`) and stage (pretrain, finetune)."""
        return self.root / "mllm" / encoder / stage

    def llava_stats(self, encoder: str, stage: str) -> Path:
        """Written once that LLaVA run's training is over (after its model)."""
        return self.llava(encoder, stage) / TRAIN_STATS

    @property
    def evals(self) -> Path:
        return self.root / "eval"

    def eval(self, encoder: str) -> Path:
        """``l2c mllm eval``'s output for one encoder's LLaVA (an evaluation folder)."""
        return self.evals / encoder

    def eval_results(self, encoder: str) -> Path:
        return self.eval(encoder) / EVAL_RESULTS

    def eval_tasks(self, encoder: str) -> Path:
        """The local tasks an encoder's LLaVA was evaluated on, with the rows each was given."""
        return self.eval(encoder) / EVAL_TASKS

    def lmms_eval(self, encoder: str) -> Path:
        """lmms-eval's own output (its logged samples) under an encoder's eval folder."""
        return self.eval(encoder) / LMMS_EVAL_OUTPUT

    # the report
    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    # the pipeline's bookkeeping
    @property
    def state(self) -> Path:
        """Each step's fingerprint, resume key, status and time."""
        return self.root / "pipeline" / "state.json"

    def step_config(self, step: str) -> Path:
        """The resolved config a step's command runs under (``l2c ... --config`` this file)."""
        return self.root / "pipeline" / "configs" / f"{step}.yaml"

    def step_log(self, step: str) -> Path:
        """A step's output when the pipeline runs several steps at once (``parallel``)."""
        return self.root / "pipeline" / "logs" / f"{step}.log"

    # written on a run folder by the applications and bench scripts (the report shows the bench sections)
    @property
    def connectors(self) -> Path:
        """``bench/connectors.py``: MLP vs Q-Former vs perceiver resampler."""
        return self.root / "connectors"

    @property
    def caption_filter(self) -> Path:
        """``bench/caption_filter.py``: caption filtering on corrupted pairs."""
        return self.root / "filter"

    @property
    def search(self) -> Path:
        """``bench/search_recall.py``: search recall of both encoders."""
        return self.root / "search"

    @property
    def demo_search(self) -> Path:
        """``l2c demo``: the web demo's search index."""
        return self.root / "demo_search"
