"""The config mechanism every recipe's schema stands on: sections, problems, YAML, overrides, writing.

A config file is a YAML mapping whose top-level ``recipe`` key names its schema (``stage1``,
``stage2``, ``mllm``...; config/schemas.py). Loading (config/loader.py) goes: read YAML (duplicate keys
are an error) -> apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists) -> validate with
the recipe's pydantic schema -> run the schema's cross-field checks. Nothing touches a model or a dataset.
This module knows no recipe.

Every problem becomes one :class:`Problem` line naming the file (or the override that set the value), the
dotted key, the bad value and what is allowed; all lines are raised together in one :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict

from l2c_llava.errors import L2CError
from l2c_llava.io import atomic_write_text
from l2c_llava.layout import RUN_CONFIG

MISSING = object()


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated on assignment."""

    # coerce_numbers_to_str: `revision=1.0` or a folder named 2024 stays a string where a string is expected
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), coerce_numbers_to_str=True
    )


class RecipeConfig(Section):
    """Base of a top-level config. Subclasses set ``recipe`` to a ``Literal`` and may add checks."""

    RECIPE: ClassVar[str] = ""

    def check(self) -> list[tuple[str, Any, str]]:
        """Cross-field checks run after type validation: list of (dotted key, value, message)."""
        return []


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where it came from, which key, which value, what is allowed."""

    source: str  # the YAML file, or "override 'k=v'"
    key: str  # dotted path, "" for the whole file
    value: Any  # the offending value, or MISSING
    message: str  # what is wrong and what is allowed

    def __str__(self) -> str:
        where = f"{self.key}" if self.key else "(top level)"
        val = "" if self.value is MISSING else f" = {_short_repr(self.value)}"
        return f"{self.source}: {where}{val}: {self.message}"


class ConfigError(L2CError, ValueError):
    """Raised with every problem found in a config, one per line."""

    def __init__(self, problems: Sequence[Problem], path: str | os.PathLike | None = None):
        self.problems = list(problems)
        self.path = str(path) if path is not None else None
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in config {self.path or ''}".rstrip()
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


def _short_repr(value: Any, limit: int = 80) -> str:
    """A repr cut to `limit` characters, built with bounded depth and width: a YAML alias bomb (a few
    lines that expand to billions of items) must not take minutes to print."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 4, 8, 8, 8, 8
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# YAML reading
# ---------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1}); keep only one", mark
            )
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; syntax errors and duplicate keys become a ConfigError with the line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            [
                Problem(
                    str(path),
                    "",
                    MISSING,
                    "is a folder, not a YAML file; give the config file (.yaml) itself",
                )
            ],
            path,
        )
    if path.exists() and not path.is_file():
        raise ConfigError(
            [Problem(str(path), "", MISSING, "is not a regular file (a pipe or a device); give a YAML file")],
            path,
        )
    if not path.is_file():
        raise ConfigError(
            [Problem(str(path), "", MISSING, "file not found; `l2c ls` lists the shipped configs")], path
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (strict safe loader)
    except UnicodeDecodeError as e:
        raise ConfigError(
            [
                Problem(
                    str(path),
                    "",
                    MISSING,
                    f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
                )
            ],
            path,
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([Problem(str(path), "", MISSING, f"invalid YAML: {loc}{problem}")], path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [Problem(str(path), "", type(data).__name__, "the file must hold a YAML mapping (key: value)")],
            path,
        )
    return data


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 1e-4)``. The value is read as YAML (numbers, lists,
    null, booleans); ``key=`` gives an empty string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            [
                Problem(
                    f"override {text!r}",
                    key,
                    MISSING,
                    "overrides look like dotted.key=value, e.g. train.lr=1e-4",
                )
            ]
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the raw string, the schema decides
    return key, value


def apply_overrides(
    data: dict, overrides: Sequence[str], values: Mapping[str, Any] | None = None
) -> tuple[dict, dict[str, str], list[Problem]]:
    """Apply dotted overrides to a nested dict (copied), then ``values`` ({dotted key: value}, set as given
    rather than read as YAML: what a program sets, e.g. the pipeline's output folders), which win.
    Returns (data, {key: override text}, problems)."""

    data = copy.deepcopy(data)
    origin: dict[str, str] = {}
    problems: list[Problem] = []
    settings: list[tuple[str, str, Any]] = []  # (override text, key, value)
    for text in overrides:
        try:
            settings.append((text, *parse_override(text)))
        except ConfigError as e:
            problems.extend(e.problems)
    settings += [(f"{key}={value}", key, value) for key, value in (values or {}).items()]
    for text, key, value in settings:
        parts = key.split(".")
        node = data
        ok = True
        for i, part in enumerate(parts[:-1]):
            child = node.get(part, MISSING)
            if child is MISSING or child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(
                    Problem(
                        f"override {text!r}",
                        ".".join(parts[: i + 1]),
                        child,
                        "is a single value, not a section: it has no sub-keys",
                    )
                )
                ok = False
                break
            node = child
        if ok:
            node[parts[-1]] = value
            origin[key] = text
    return data, origin, problems


def source_for(key: str, origin: Mapping[str, str], default: str, message: str = "") -> str:
    """Which override set the value behind a problem: one at the key, under it, above it, or named
    in the message (cross-field checks name every key they involve)."""
    import re

    best = None
    for k, text in origin.items():
        related = (
            key == k
            or key.startswith((k + ".", k + "["))
            or k.startswith(key + ".")
            or (message and re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message))
        )
        if related and (best is None or len(k) > len(best[0])):
            best = (k, text)
    return f"override {best[1]!r}" if best else default


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4} (nested mappings to dotted keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def dump_config(cfg: BaseModel, only_given: bool = False) -> str:
    """The resolved config as YAML (every key, defaults included), in schema order. ``only_given``: only the
    keys its YAML, overrides and values set, so that loading the file gives back the very same config: a
    default is not validated, and one written out would come back validated (an int default of a float key,
    ``lora.alpha: 32``, as 32.0, which a library may write into its own files)."""
    data = cfg.model_dump(mode="json", exclude_unset=True) if only_given else config_to_dict(cfg)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def write_config(
    cfg: BaseModel, path: str | os.PathLike, comments: Sequence[str] = (), only_given: bool = False
) -> Path:
    """Write ``cfg`` resolved (every default spelled out; ``only_given``: see :func:`dump_config`) as a YAML
    file at ``path``, atomically, under ``comments`` (one ``# `` line each). ``load_config(path)`` gives
    ``cfg`` back."""
    header = "".join(f"# {c}\n" for c in comments)
    return atomic_write_text(path, header + dump_config(cfg, only_given))


def save_resolved_config(
    cfg: BaseModel, run_dir: str | os.PathLike, source: str | None = None, overrides: Sequence[str] = ()
) -> Path:
    """Write ``config.yaml`` (resolved, every default spelled out) into a run folder, atomically."""
    comments = ["Resolved config written by l2c-llava"]
    if source:
        comments.append(f"from: {source}")
    if overrides:
        comments.append(f"overrides: {' '.join(overrides)}")
    return write_config(cfg, Path(run_dir) / RUN_CONFIG, comments)
