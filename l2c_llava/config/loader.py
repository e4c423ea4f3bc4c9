"""Loading a config: read the YAML, apply the overrides, drop the keys a migration retired, validate
against the recipe's schema (named by the top-level ``recipe`` key) and run its cross-field checks.

Every problem becomes one line naming the file (or the override that set the value), the dotted key,
the bad value and what is allowed; all lines are raised together in one :class:`ConfigError`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from l2c_llava.config.core import (
    MISSING,
    ConfigError,
    Problem,
    RecipeConfig,
    apply_overrides,
    read_yaml,
    source_for,
)
from l2c_llava.config.migrations import drop_removed_keys
from l2c_llava.config.schemas import RECIPES


def _field_path(model: type[BaseModel], loc: Sequence[Any]) -> str:
    """Turn a pydantic error location into the dotted config key (dropping union-branch tags)."""
    parts: list[str] = []
    current: Any = model
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None:
            continue  # a union-branch tag such as 'int' or 'list[str]': not part of the key
        parts.append(str(item))
        current = _section_type(fields[item].annotation) if item in fields else None
    return ".".join(parts)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(model: type[BaseModel], dotted_parent: str) -> list[str]:
    current: Any = model
    for part in [p for p in dotted_parent.split(".") if p]:
        part = part.split("[")[0]
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = _section_type(fields[part].annotation)
    return list(getattr(current, "model_fields", {}) or {})


def _problems_from_validation(
    err: ValidationError, model: type[BaseModel], source: str, origin: Mapping[str, str]
) -> list[Problem]:
    problems = []
    for e in err.errors(include_url=False):
        key = _field_path(model, e["loc"])
        src = source_for(key, origin, source)
        if e["type"] == "extra_forbidden":
            parent, _, name = key.rpartition(".")
            allowed = _allowed_keys(model, parent)
            hint = difflib.get_close_matches(name, allowed, n=1)
            msg = "unknown key"
            if hint:
                msg += f"; did you mean {hint[0]!r}?"
            msg += f" Allowed keys{' under ' + parent if parent else ''}: {', '.join(allowed)}"
            problems.append(Problem(src, key, e["input"], msg))
        elif e["type"] == "missing":
            problems.append(Problem(src, key, MISSING, "required key is missing"))
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            problems.append(Problem(src, key, e.get("input", MISSING), msg))
    return problems


def validate_config(
    data: Mapping[str, Any],
    source: str = "<config>",
    origin: Mapping[str, str] | None = None,
    schema: type[RecipeConfig] | None = None,
) -> RecipeConfig:
    """Validate a config mapping against its recipe's schema; raise ConfigError with every problem."""
    origin = origin or {}
    if schema is None:
        recipe = data.get("recipe", MISSING)
        if recipe is MISSING:
            raise ConfigError(
                [
                    Problem(
                        source,
                        "recipe",
                        MISSING,
                        f"required key is missing; one of: {', '.join(sorted(RECIPES))}",
                    )
                ],
                source,
            )
        if recipe not in RECIPES:
            hint = difflib.get_close_matches(str(recipe), list(RECIPES), n=1)
            raise ConfigError(
                [
                    Problem(
                        source_for("recipe", origin, source),
                        "recipe",
                        recipe,
                        f"unknown recipe{'; did you mean ' + repr(hint[0]) + '?' if hint else ''}"
                        f" Allowed: {', '.join(sorted(RECIPES))}",
                    )
                ],
                source,
            )
        schema = RECIPES[recipe]
    data = drop_removed_keys(data, get_args(schema.model_fields["recipe"].annotation)[0], source, origin)
    try:
        cfg = schema.model_validate(dict(data))
    except ValidationError as err:
        problems = _problems_from_validation(err, schema, source, origin)
        # Report the cross-field problems too, in the same error: drop the bad values (their defaults
        # take over), validate again, and run the checks on keys not already reported.
        pruned = _without(data, [e["loc"] for e in err.errors()])
        try:
            partial = schema.model_validate(pruned)
        except ValidationError:
            partial = None
        if partial is not None:
            reported = {p.key for p in problems}
            problems += [
                Problem(source_for(key, origin, source, msg), key, value, msg)
                for key, value, msg in partial.check()
                if key not in reported
            ]
        raise ConfigError(problems, source) from None
    semantic = [
        Problem(source_for(key, origin, source, msg), key, value, msg) for key, value, msg in cfg.check()
    ]
    if semantic:
        raise ConfigError(semantic, source)
    return cfg


def _without(data: Mapping[str, Any], locs: Sequence[Sequence[Any]]) -> dict:
    """A deep copy of `data` with the value at each error location removed."""
    import copy

    out = copy.deepcopy(dict(data))
    for loc in locs:
        node: Any = out
        for item in loc[:-1]:
            if isinstance(node, dict) and item in node:
                node = node[item]
            elif isinstance(node, list) and isinstance(item, int) and item < len(node):
                node = node[item]
            else:
                node = None
                break
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return out


def load_config(
    path: str | os.PathLike,
    overrides: Sequence[str] = (),
    schema: type[RecipeConfig] | None = None,
    values: Mapping[str, Any] | None = None,
) -> RecipeConfig:
    """Read ``path``, apply ``overrides`` then ``values`` (see :func:`apply_overrides`), validate. Raises
    :class:`ConfigError` listing every problem."""
    data = read_yaml(path)
    data, origin, problems = apply_overrides(data, overrides, values)
    try:
        cfg = validate_config(data, source=str(path), origin=origin, schema=schema)
    except ConfigError as e:
        raise ConfigError(problems + e.problems, path) from None
    if problems:
        raise ConfigError(problems, path)
    return cfg
