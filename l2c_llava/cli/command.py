"""What a command of the ``l2c`` table is: its help, its entry (``run(args) -> exit code``), its options
(as argparse's ``add_argument`` takes them), the recipe of the config it reads, whether it can push to
the Hub; and what several entries share."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from l2c_llava.io import atomic_write_json


def option(*flags: str, **kw) -> tuple:
    """One option or positional, as argparse's add_argument takes it."""
    return flags, kw


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[argparse.Namespace], int]
    options: list[tuple] = field(default_factory=list)
    config: str | None = None  # the recipe of the config it reads: adds --config, KEY=VALUE words and --set
    push: bool = False  # --push-to-hub / --private (hub_push.py)


def json_out(obj) -> int:
    print(json.dumps(obj, indent=2))
    return 0


def write_out(out: str | None, obj) -> int:
    if out:
        atomic_write_json(out, obj)
        print(f"written: {out}")
    return 0


def training(run: Callable[[], Callable]) -> Callable:
    """The entry of a training command: `run()` gives the recipe's run function (imported when used).
    Under a launcher every process runs it and the main one (rank 0) prints the run's summary."""

    def entry(args) -> int:
        stats = run()(args.cfg, source=args.config, overrides=tuple(args.overrides))
        return json_out(stats) if int(os.environ.get("RANK", "0") or 0) == 0 else 0

    return entry


OVERWRITE = option(
    "--overwrite",
    action="store_true",
    help="replace an existing --out that is not a previous output of this command",
)
TEXT_ENCODER = option(
    "--text-encoder", default=None, help="LLM2CLIP: its caption encoder, if not the recorded one"
)
LLAVA_MODEL = option("--model", required=True, help="an mllm run folder or a transformers LLaVA folder")
PROBE_TRAIN = option("--probe-train", type=int, default=2000, help="train scenes for the patch probe")
WRITE_JSON = option("--out", default=None, help="write the figures to this JSON file")
