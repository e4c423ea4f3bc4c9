"""Where things are, stated once: the embedded dataset's files (written by ``data/synthetic.py``, read by
the pipeline, the local lmms-eval tasks, the retrieval and health checks and the report) and where a
stage-2 run keeps its exports (written by ``l2c export``, read wherever a stage-2 run folder is given as
a vision tower).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from l2c_llava.errors import MissingFileError

# -- the embedded dataset (relative to its folder; image paths in every file are relative to IMAGES) -----
IMAGES = "images"
CAPTION_PAIRS = {s: f"captions/{s}.jsonl" for s in ("train", "val", "test")}  # {"image", "short", "long"}
RETRIEVAL_SHORT = "retrieval/karpathy.json"  # Karpathy-style, every split
RETRIEVAL_LONG = "retrieval/long_test.json"  # ShareGPT4V-1K style, test split
LLAVA_PRETRAIN = "llava/pretrain.json"
LLAVA_INSTRUCT = "llava/instruct.json"
VQA = {s: f"eval/vqa_{s}.jsonl" for s in ("val", "test")}
POPE = "eval/pope_test.jsonl"
SCENES = "scenes.jsonl"  # the ground truth scene graph of each image
MANIFEST = "manifest.json"

DATASET_FILES = {  # as the manifest records them
    "caption_pairs": CAPTION_PAIRS,
    "retrieval_short": RETRIEVAL_SHORT,
    "retrieval_long": RETRIEVAL_LONG,
    "llava_pretrain": LLAVA_PRETRAIN,
    "llava_instruct": LLAVA_INSTRUCT,
    "vqa": VQA,
    "pope": POPE,
    "scenes": SCENES,
}


# -- a stage-2 run folder ---------------------------------------------------------------------------------


def export_dir(run_dir: str | os.PathLike) -> Path:
    """Where a stage-2 run's exports go: its config's ``export.dir``, else ``<run>/export``. ``l2c export
    vision|llm2clip --run RUN`` write ``vision`` / ``llm2clip`` under it, and a stage-2 run folder given
    as a vision tower (the mllm configs) is read from ``vision`` under it."""
    run = Path(run_dir)
    if run.name == "model" and (run.parent / "config.yaml").is_file():
        run = run.parent
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    chosen = ((cfg or {}).get("export") or {}).get("dir")
    return Path(chosen) if chosen else run / "export"


def is_stage2_run(folder: str | os.PathLike) -> bool:
    p = Path(folder)
    if not (p / "config.yaml").is_file() or (p / "config.json").is_file():
        return False
    try:
        return (yaml.safe_load((p / "config.yaml").read_text()) or {}).get("recipe") == "stage2"
    except yaml.YAMLError:
        return False


class NotExportedError(MissingFileError):
    """A stage-2 run whose vision tower is asked for before ``l2c export vision`` wrote it."""


def exported_tower(run_dir: str | os.PathLike) -> Path:
    """The vision tower exported from a stage-2 run (``export_dir(run)/vision``), or an error saying
    the command that writes it."""
    folder = export_dir(run_dir) / "vision"
    if not (folder / "config.json").is_file():
        raise NotExportedError(f"{run_dir} is a stage-2 run whose vision tower is not exported yet ({folder}): "
                               f"run `l2c export vision --run {run_dir}`")  # fmt: skip
    return folder
