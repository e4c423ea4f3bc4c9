"""Experiment tracking (issue 19): ``train.report_to`` sends loss, lr, throughput and the evaluation
numbers of every training recipe to accelerate's trackers, the resolved config as hyper-parameters;
the TensorBoard event files are read back here with TensorBoard's own reader."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from l2c_llava.cli import main
from l2c_llava.config import ConfigError, load_config

from .recipe_configs import clip_config, mllm_config, stage1_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed"
)


def events(run: Path):
    """TensorBoard's reader over the run's event files: {tag: [(step, value)]}, and the reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run / "logs").rglob("events.out.tfevents.*"))
    assert files, f"no event file under {run / 'logs'}"
    out = {}
    for f in files:
        acc = EventAccumulator(str(f)).Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out, files


def test_stage1_reports_loss_lr_throughput_and_cra_before_and_after(tmp_path, tiny_llama, synth_dir):
    run = tmp_path / "s1"
    cfg = stage1_config(tmp_path, tiny_llama, synth_dir, run)
    assert main(["stage1", "--config", str(cfg), "train.report_to=[tensorboard]"]) == 0
    scalars, files = events(run)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3] and all(v > 0 for _, v in scalars["train/loss"])
    assert len(scalars["train/lr"]) == 3 and all(v > 0 for _, v in scalars["train/tokens_per_second"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert scalars["eval/before/bidirectional/cra"] == [(0, pytest.approx(metrics["cra_before"]))]
    assert scalars["eval/after/cra"] == [(3, pytest.approx(metrics["cra_after"]))]
    # the resolved config as hyper-parameters (TensorBoard's hparams plugin and accelerate's yaml copy)
    hp = sorted((run / "logs").rglob("hparams.yml"))
    assert hp and "train.lr: 0.001" in hp[0].read_text()


def test_clip_and_llava_recipes_report_too_and_the_default_writes_nothing(tmp_path, synth_dir, llava_parts):
    path, _ = clip_config(tmp_path, synth_dir, tmp_path / "clip")
    assert main(["clip", "pretrain", "--config", str(path), "train.report_to=[tensorboard]"]) == 0
    scalars, _ = events(tmp_path / "clip")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert {"train/lr", "train/logit_scale", "train/images_per_second"} <= set(scalars)
    path, _ = mllm_config(tmp_path, llava_parts, synth_dir, "pretrain", tmp_path / "pre")
    assert main(["mllm", "pretrain", "--config", str(path), "train.report_to=[tensorboard]"]) == 0
    scalars, _ = events(tmp_path / "pre")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3] and "train/tokens_per_second" in scalars
    # default: no tracker, no logs folder (the JSONL log only, as before)
    path, _ = clip_config(tmp_path, synth_dir, tmp_path / "plain")
    assert main(["clip", "pretrain", "--config", str(path)]) == 0
    assert not (tmp_path / "plain" / "logs").exists() and (tmp_path / "plain" / "train_log.jsonl").is_file()


def test_an_unknown_tracker_is_a_config_error(tmp_path, synth_dir):
    path, _ = clip_config(tmp_path, synth_dir, tmp_path / "x")
    with pytest.raises(ConfigError, match="report_to"):
        load_config(path, ["train.report_to=[tensorbored]"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline(tmp_path, synth_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    path, _ = clip_config(tmp_path, synth_dir, tmp_path / "wb")
    assert main(["clip", "pretrain", "--config", str(path), "train.report_to=[wandb]"]) == 0
    runs = sorted((tmp_path / "wb" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = wandb_records(next(runs[0].glob("run-*.wandb")))
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    steps = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in h.item} for h in history]
    assert [s["_step"] for s in steps] == [1, 2, 3] and all(s["train/loss"] > 0 for s in steps)
    assert all("train/images_per_second" in s and "train/lr" in s for s in steps)
    config = next(r.config for r in records if r.WhichOneof("record_type") == "config")
    assert {u.key or "/".join(u.nested_key) for u in config.update} >= {
        "train.batch_size",
        "train.lr",
        "recipe",
    }


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 32 KiB blocks of
    chunks with a 7-byte header, after W&B's own 7-byte file header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunks, out = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(chunks)
            out.append(rec)
            chunks = b""
    return out


def test_stage2_eval_numbers_join_the_training_curves(trained, capsys):
    root, cfg_path, _, _ = trained
    run = root / "s2"
    assert main(["stage2", "eval", "--config", str(cfg_path), "train.report_to=[tensorboard]"]) == 0
    scalars, _ = events(run)
    metrics = json.loads((run / "metrics.json").read_text())
    for enc in ("llm2clip", "baseline"):
        for s in ("short", "long"):
            assert scalars[f"eval/{enc}/{s}/i2t_R@1"] == [(3, pytest.approx(metrics[enc][s]["i2t_R@1"]))]
