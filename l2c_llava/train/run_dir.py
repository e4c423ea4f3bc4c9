"""A training run's folder (every recipe's ``run.output_dir``; the names are in :mod:`l2c_llava.layout`):
it describes itself (the resolved ``config.yaml``, ``versions.json``), logs each step to
``train_log.jsonl``, keeps its checkpoints (:mod:`l2c_llava.train.checkpoints`) and, once training is
over, ``train_stats.json``. Whether its checkpoints may be resumed under a new config is decided by the
one rule of :mod:`l2c_llava.train.resume`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel

from l2c_llava.config import save_resolved_config
from l2c_llava.io import atomic_write_json
from l2c_llava.layout import RUN_VERSIONS, TRAIN_STATS

logger = logging.getLogger(__name__)

TRACKED_PACKAGES = (
    "l2c-llava",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "tokenizers",
    "gguf",
    "pydantic",
    "numpy",
    "pillow",
    "lmms-eval",
    "faiss-cpu",
    "deepspeed",
)


def versions() -> dict[str, str]:
    """Python, platform, the tracked packages that are installed, and the git commit if any."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def prepare_run_dir(
    cfg: BaseModel, run_dir: str | os.PathLike, source: str | None = None, overrides: Sequence[str] = ()
) -> Path:
    """Create the run folder and write ``config.yaml`` (resolved) and ``versions.json`` into it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, run_dir, source=source, overrides=overrides)
    atomic_write_json(run_dir / RUN_VERSIONS, versions())
    return run_dir


def truncate_log(path: Path, step: int) -> None:
    """Keep the JSONL training-log records up to `step` (a resumed run appends after them)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= step))


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def finished_stats(run_dir: Path, start: int, total: int, output: str | None) -> dict | None:
    """The saved train_stats.json when the run already trained all `total` steps and (unless `output` is
    None) saved its model in the folder `output`."""
    stats = Path(run_dir) / TRAIN_STATS
    if start < total or not stats.is_file() or (output is not None and not (Path(run_dir) / output).is_dir()):
        return None
    logger.info("%s: training already complete (%d steps)", run_dir, total)
    return json.loads(stats.read_text())


def write_train_stats(run_dir: Path, stats: dict) -> None:
    atomic_write_json(Path(run_dir) / TRAIN_STATS, stats)
