"""Run folders describe themselves: resolved config, package versions, input fingerprints."""

from __future__ import annotations

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

TRACKED_PACKAGES = ("l2c-llava", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers",
                    "gguf", "pydantic", "numpy", "pillow", "lmms-eval", "faiss-cpu", "deepspeed")  # fmt: skip


def versions() -> dict[str, str]:
    """Python, platform, the tracked packages that are installed, and the git commit if any."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def prepare_run_dir(cfg: BaseModel, run_dir: str | os.PathLike, source: str | None = None,
                    overrides: Sequence[str] = ()) -> Path:  # fmt: skip
    """Create the run folder and write ``config.yaml`` (resolved) and ``versions.json`` into it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, run_dir, source=source, overrides=overrides)
    atomic_write_json(run_dir / "versions.json", versions())
    return run_dir
