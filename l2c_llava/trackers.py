"""Experiment tracking through accelerate's trackers: ``train.report_to: [tensorboard, wandb, ...]``.

Every training recipe creates its Accelerator with ``log_with=report_to`` (:func:`accelerator_kwargs`),
then :func:`start` opens the trackers with the resolved config as hyper-parameters, :func:`log` sends
what the recipe writes to ``train_log.jsonl`` (loss, lr, throughput) and its evaluation numbers (stage
1's CRA before and after), and :func:`finish` closes them; ``l2c stage2 eval`` adds its retrieval
numbers at the run's last step (:func:`report_results`). With the default ``report_to: []`` nothing here does anything: the JSONL
log stays the record either way.

Where it goes: TensorBoard event files under ``<run>/logs/l2c-llava/``; Weights & Biases in project
``l2c-llava`` (``WANDB_PROJECT`` overrides), run name ``<recipe>:<run folder name>``, its local files
under ``<run>/logs`` (``WANDB_MODE=offline`` keeps them there). The packages are the trackers' own
(``pip install tensorboard`` / ``wandb``); a missing one is named before any model loads.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from l2c_llava.config.core import config_to_dict, flatten
from l2c_llava.errors import InputError

PROJECT = "l2c-llava"
LOG_DIR = "logs"
# accelerate's tracker names -> the module that must be importable
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def check_report_to(report_to: Sequence[str]) -> list[str]:
    """The trackers, checked: known to accelerate and installed (else an error naming the install)."""
    out = []
    for name in report_to:
        if name not in TRACKERS:
            raise InputError(
                f"train.report_to: unknown tracker {name!r}; accelerate knows {', '.join(TRACKERS)}"
            )
        if importlib.util.find_spec(TRACKERS[name]) is None and not (
            name == "tensorboard" and importlib.util.find_spec("tensorboardX")
        ):
            extra = " (or pip install -e .[dev])" if name == "tensorboard" else ""
            raise InputError(
                f"train.report_to lists {name}, which is not installed: pip install {name}{extra}"
            )
        out.append(name)
    return out


def accelerator_kwargs(report_to: Sequence[str], run_dir: str | os.PathLike | None) -> dict:
    """What the Accelerator needs for the trackers: nothing when there are none."""
    names = check_report_to(report_to)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    root = Path(run_dir or ".")
    return {
        "log_with": names,
        "project_config": ProjectConfiguration(project_dir=str(root), logging_dir=str(root / LOG_DIR)),
    }


def hparams(cfg) -> dict[str, int | float | str | bool]:
    """The resolved config as flat hyper-parameters (TensorBoard's hparams take only scalars and
    strings: lists and None become their text)."""
    out: dict[str, int | float | str | bool] = {}
    for k, v in flatten(config_to_dict(cfg)).items():
        out[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def active(acc) -> bool:
    return bool(getattr(acc, "log_with", None))


def start(acc, cfg, run_dir: str | os.PathLike) -> None:
    """Open the trackers of `acc` (a no-op without any) with `cfg` as the run's hyper-parameters."""
    if not active(acc):
        return
    run_dir = Path(run_dir)
    (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    name = f"{getattr(cfg, 'recipe', 'run')}:{run_dir.name}"
    acc.init_trackers(
        os.environ.get("WANDB_PROJECT", PROJECT),
        config=hparams(cfg),
        init_kwargs={"wandb": {"name": name, "dir": str(run_dir / LOG_DIR)}},
    )


def numbers(values: Mapping, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) record, keys joined with '/' (eval/after/cra)."""
    out: dict[str, float] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(numbers(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def log(acc, values: Mapping, step: int, prefix: str = "train/") -> None:
    """Send a record's numbers (loss, lr, throughput, metrics) to every tracker at `step`."""
    if not active(acc):
        return
    flat = numbers({k: v for k, v in values.items() if k != "step"}, prefix)
    if flat:
        acc.log(flat, step=step)


def finish(acc) -> None:
    if active(acc) and getattr(acc, "trackers", None):
        acc.end_training()


def report_results(cfg, run_dir: str | os.PathLike, values: Mapping, prefix: str = "eval/") -> None:
    """Evaluation numbers computed after training, by their own command (``l2c stage2 eval``), sent to
    the run's trackers at its last training step (TensorBoard: beside the training curves, in the
    same logs folder; W&B: a run of its own). Nothing without ``train.report_to``."""
    report_to = getattr(getattr(cfg, "train", None), "report_to", None)
    if not report_to:
        return
    import json

    from accelerate import Accelerator

    run_dir = Path(run_dir)
    stats = run_dir / "train_stats.json"
    step = int(json.loads(stats.read_text()).get("steps") or 0) if stats.is_file() else 0
    acc = Accelerator(cpu=True, **accelerator_kwargs(report_to, run_dir))
    start(acc, cfg, run_dir)
    log(acc, values, step, prefix=prefix)
    finish(acc)
