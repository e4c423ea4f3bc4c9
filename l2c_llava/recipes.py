"""The shipped recipe configs (stage1/, stage2/, mllm/ beside the package in a checkout)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RECIPE_FOLDERS = ("stage1", "stage2", "mllm", "pipeline")


def project_root() -> Path:
    """The checkout holding the recipe folders: $L2C_ROOT, else the package's parent folder."""
    env = os.environ.get("L2C_ROOT")
    return Path(env) if env else Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ShippedConfig:
    path: Path
    command: str  # first comment line: the exact command that runs it
    summary: str  # second comment line: what it is


def _header(path: Path) -> tuple[str, str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    comments = []
    for line in lines:
        if not line.startswith("#"):
            break
        comments.append(line.lstrip("#").strip())
    return (comments[0] if comments else "", comments[1] if len(comments) > 1 else "")


def shipped_configs(root: Path | None = None) -> list[ShippedConfig]:
    root = root or project_root()
    out = []
    for folder in RECIPE_FOLDERS:
        for path in sorted((root / folder).rglob("*.yaml")):
            if {"tasks", "accelerate"} & set(path.relative_to(root / folder).parts):
                continue  # lmms-eval task folders and accelerate launch configs are not recipe configs
            cmd, summary = _header(path)
            out.append(ShippedConfig(path, cmd, summary))
    return out
