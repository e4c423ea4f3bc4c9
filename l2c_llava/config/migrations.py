"""Config migrations: the keys a recipe's schema gained or lost after configs and run folders held them.

Loading drops a removed key that still holds its one old value (:func:`drop_removed_keys`); the resume
rule and the pipeline's fingerprints (train/resume.py) leave an added key at its original value out, and
count a removed key at its old value as before (:func:`without_migrated_keys`, :func:`with_removed_keys`),
so a schema change re-runs and refuses nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from l2c_llava.config.core import ConfigError, Problem, source_for

# Keys removed from a recipe's schema after configs and run folders held them: (recipe, dotted key) ->
# the one value they ever had effect with. A config that still sets one to that value loads (the key is
# dropped); another value is an error that says why. Fingerprints count them as before, so removing a
# key re-runs and refuses nothing.
REMOVED_KEYS: dict[tuple[str, str], tuple[Any, str]] = {
    ("stage1", "data.instructions.separator"): (
        "!@#$%^&*()",
        "llm2vec's fixed marker between instruction and text; the encoder never read this key",
    ),
}
# Keys added after run folders existed, each with the value that does what those runs did: at that
# value the key is left out of every comparison and fingerprint, so adding it re-runs and refuses nothing.
ADDED_KEYS = {
    "text_encoder.torch_dtype": "auto",
    "data.packing": False,
    "data.eval_long_hard": None,
    "data.max_train_rows": None,
}
# The removed keys as {dotted key: old value}: what an old run's flat config.yaml holds.
REMOVED_VALUES = {key: value for (_, key), (value, _) in REMOVED_KEYS.items()}


def drop_removed_keys(data: Mapping[str, Any], recipe: str, source: str, origin: Mapping[str, str]) -> dict:
    """`data` without the :data:`REMOVED_KEYS` of `recipe` that hold their old value; another value is a
    :class:`ConfigError` that says why the key went."""
    out = copy.deepcopy(dict(data))
    problems = []
    for (rec, key), (value, why) in REMOVED_KEYS.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if rec != recipe or not isinstance(node, dict) or parts[-1] not in node:
            continue
        if node[parts[-1]] != value:
            problems.append(
                Problem(
                    source_for(key, origin, source), key, node[parts[-1]], f"removed key ({why}); delete it"
                )
            )
        del node[parts[-1]]
    if problems:
        raise ConfigError(problems, source)
    return out


def without_migrated_keys(flat: Mapping[str, object]) -> dict:
    """`flat` without the :data:`ADDED_KEYS` that hold their original value and without the
    :data:`REMOVED_KEYS` (an old run's config.yaml still holds them)."""
    return {
        k: v
        for k, v in flat.items()
        if not (k in ADDED_KEYS and v == ADDED_KEYS[k])
        and not (k in REMOVED_VALUES and v == REMOVED_VALUES[k])
    }


def with_removed_keys(flat: Mapping[str, object]) -> dict:
    """`flat` with each of the :data:`REMOVED_KEYS` whose section it has, at its one value: what a
    fingerprint counted before the key was removed."""
    out = dict(flat)
    for key, value in REMOVED_VALUES.items():
        if key in out:
            continue
        section = key.rpartition(".")[0] + "."
        items = list(out.items())
        at = [i for i, (k, _) in enumerate(items) if k.startswith(section)]
        if at:  # where it stood: after its section's other keys (fingerprints hash in order)
            out = dict(items[: at[-1] + 1] + [(key, value)] + items[at[-1] + 1 :])
    return out
