"""The shipped recipe configs (stage1/, stage2/, mllm/ beside the package in a checkout)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from l2c_llava.config.core import apply_overrides, read_yaml
from l2c_llava.errors import MissingFileError

RECIPE_FOLDERS = ("stage1", "stage2", "mllm", "pipeline")


def project_root() -> Path:
    """The checkout holding the recipe folders: $L2C_ROOT, else the package's parent folder."""
    env = os.environ.get("L2C_ROOT")
    return Path(env) if env else Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ShippedConfig:
    """A shipped config and its header, the comment lines it opens with::

        # l2c data synth --out runs/quick/data ... \\
        #   && l2c stage1 --config stage1/configs/quick.yaml
        # Quick (CI): what the config is, in one line (`l2c ls`).
        # ... more comment lines ...
        # Yours to provide (README, "Real scale"):
        #   data/cc3m/pairs.jsonl  what it is, where it comes from

    ``command``: the command line that runs it from a fresh checkout (from the repository root): the
    commands that write its inputs, then its own, joined by ``&&``; a line ending in `` \\`` goes on
    in the next comment line, as in a shell. ``summary``: the line after it. ``provided``: the inputs a
    real-scale config reads that the user brings (data, model folders), each with what it is: the
    indented lines under ``Yours to provide``."""

    path: Path
    command: str
    summary: str
    provided: tuple[tuple[str, str], ...] = ()


PROVIDED_HEAD = "Yours to provide"


def _header(path: Path) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    comments = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        comments.append(line[1:])
    parts, i = [], 0
    while i < len(comments):  # the command, with its continuation lines
        text = comments[i].strip()
        i += 1
        parts.append(text.removesuffix("\\").strip())
        if not text.endswith("\\"):
            break
    summary = comments[i].strip() if i < len(comments) else ""
    provided: list[tuple[str, str]] = []
    heads = [j for j, c in enumerate(comments) if c.strip().startswith(PROVIDED_HEAD)]
    for c in comments[heads[0] + 1 :] if heads else []:
        if not c.startswith("   ") or not c.strip():  # the block: lines indented under its head
            break
        what, _, how = c.strip().partition(" ")
        provided.append((what, how.strip()))
    return " ".join(p for p in parts if p), summary, tuple(provided)


def shipped_configs(root: Path | None = None) -> list[ShippedConfig]:
    root = root or project_root()
    out = []
    for folder in RECIPE_FOLDERS:
        for path in sorted((root / folder).rglob("*.yaml")):
            if {"tasks", "accelerate"} & set(path.relative_to(root / folder).parts):
                continue  # lmms-eval task folders and accelerate launch configs are not recipe configs
            out.append(ShippedConfig(path, *_header(path)))
    return out


# the recipe folder whose configs a command's --config names first (clip configs live in stage2/)
COMMAND_FOLDER = {
    "stage1": "stage1",
    "stage2": "stage2",
    "clip": "stage2",
    "mllm": "mllm",
    "pipeline": "pipeline",
}


def config_name(c: ShippedConfig, root: Path | None = None) -> str:
    """A shipped config's name: its recipe folder and file stem (``stage1/quick``); within its own
    command the stem alone (``l2c stage1 --config quick``)."""
    root = root or project_root()
    return f"{c.path.relative_to(root).parts[0]}/{c.path.stem}"


def resolve_config(name_or_path: str | os.PathLike, command: str | None = None) -> str:
    """A config file to read, from what the user typed: an existing file (from the current folder);
    a checkout-relative path (``stage1/configs/quick.yaml``, from any folder); a shipped config's name
    (``stage1/quick``, or ``quick`` for ``command`` stage1). Anything else: an error listing the names."""
    import difflib

    given = str(name_or_path)
    if Path(given).is_file():
        return given
    root = project_root()
    if (root / given).is_file():
        return str(root / given)
    configs = shipped_configs(root)
    names = {config_name(c, root): c for c in configs}
    stem = given.removesuffix(".yaml")
    if stem in names:
        return str(names[stem].path)
    folder = COMMAND_FOLDER.get(command or "")
    found = [
        c
        for n, c in names.items()
        if n.split("/", 1)[1] == stem and (folder is None or n.startswith(folder + "/"))
    ]
    if len(found) == 1:
        return str(found[0].path)
    if len(found) > 1:
        raise MissingFileError(
            f"config {given!r} names several shipped configs: "
            f"{', '.join(config_name(c, root) for c in found)}; give one of these names"
        )
    if Path(given).exists():  # a folder, a pipe: there, but not a file to read
        what = "a folder" if Path(given).is_dir() else "not a regular file"
        inside = sorted(p.name for p in Path(given).glob("*.yaml")) if Path(given).is_dir() else []
        raise MissingFileError(
            f"config {given!r} is {what}, not a YAML file; give the config file itself"
            + (f" (it holds {', '.join(inside[:5])})" if inside else "")
        )
    close = difflib.get_close_matches(stem, list(names) + [n.split("/", 1)[1] for n in names], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise MissingFileError(
        f"config {given!r}: no such file (from {Path.cwd()}) and no shipped config of that name"
        f"{hint}; `l2c ls` lists the names"
    )


def run_root(config: str, overrides: list[str] | tuple[str, ...] = ()) -> str | None:
    """``run.root`` of a config (its override wins), read without validating: the folder the command
    runs in, so that the config's relative paths (runs/quick/..., data) are taken from there."""
    try:
        data, _, _ = apply_overrides(read_yaml(config), list(overrides))
    except Exception:  # noqa: BLE001 - a broken config is reported by the command's own load
        return None
    root = ((data or {}).get("run") or {}).get("root") if isinstance(data, dict) else None
    return str(root) if root else None
