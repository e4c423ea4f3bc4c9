"""Stage 1 end to end on a tiny random Llama: train, save, reload, resume; MNTP; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from l2c_llava.cli import main
from l2c_llava.config import load_config
from l2c_llava.stage1.encoder import TextEncoder
from l2c_llava.stage1.train import Stage1Recipe

from .recipe_configs import stage1_config


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "encoder" / "adapter" / "adapter_model.safetensors"))


def test_three_steps_save_reload_and_resume(tmp_path, tiny_llama, synth_dir):
    run = tmp_path / "run"
    cfg_path = stage1_config(tmp_path, tiny_llama, synth_dir, run)
    metrics = Stage1Recipe(load_config(cfg_path)).run()
    # metrics: CRA etc. before (causal and bidirectional) and after
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("cra", "short_to_long_top1", "long_to_short_top1"):
        for when in ("before_causal", "before", "after"):
            assert 0.0 <= saved[f"{key}_{when}"] <= 1.0
    assert saved["train"]["steps"] == 3
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-0000002",
        "step-0000003",
    ]  # keep 2
    assert (run / "config.yaml").is_file() and (run / "versions.json").is_file()
    # the one resume rule (train/resume.py, against config.yaml): no key of stage 1's own in a checkpoint
    trainer_state = torch.load(run / "checkpoints" / "step-0000003" / "trainer_state.pt", weights_only=True)
    assert set(trainer_state) == {"step", "optimizer", "scheduler", "torch_rng", "python_rng", "launch"}

    # the encoder folder reloads, with the trained adapter applied
    enc = TextEncoder.from_pretrained(run / "encoder", device="cpu")
    base = TextEncoder.from_pretrained(tiny_llama, device="cpu")
    texts = ["a red circle", "two blue squares on a beige background"]
    assert not torch.allclose(enc.encode(texts), base.encode(texts))


def test_contrastive_accumulation_matches_the_whole_batch(tmp_path, tiny_llama, synth_dir):
    """4 x 2 with GradCache gives the adapter of one step at 8 x 1 (same examples, all negatives)."""
    runs = {}
    for name, batch, accum, cache in (("whole", 8, 1, True), ("cached", 4, 2, True), ("plain", 4, 2, False)):
        run = tmp_path / name
        cfg = load_config(
            stage1_config(tmp_path, tiny_llama, synth_dir, run),
            [
                f"train.batch_size={batch}",
                f"train.grad_accum={accum}",
                f"train.contrastive_accum={cache}",
                "train.max_steps=1",
                "train.warmup_steps=0",
                "eval.cra=false",
                "data.eval=null",
                "data.eval_pairs=null",
            ],
        )
        Stage1Recipe(cfg).run()
        runs[name] = adapter_weights(run)
    for k, v in runs["whole"].items():
        torch.testing.assert_close(runs["cached"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert any(v.abs().sum() > 0 for k, v in runs["whole"].items() if "lora_B" in k)  # it trained
    # plain accumulation (each micro-batch its own negatives) gives another step
    assert any(not torch.allclose(runs["plain"][k], v, atol=1e-6) for k, v in runs["whole"].items())


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_llama, synth_dir, monkeypatch):
    """A run killed after its step-3 checkpoint and run again ends where an uninterrupted run ends."""
    cfg = load_config(
        stage1_config(tmp_path, tiny_llama, synth_dir, tmp_path / "killed"), ["train.max_steps=5"]
    )
    original = Stage1Recipe.save_checkpoint

    def save_then_die(self, *args):
        original(self, *args)
        step = args[-1]
        if step == 3:
            raise Killed

    monkeypatch.setattr(Stage1Recipe, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        Stage1Recipe(cfg).run()
    monkeypatch.setattr(Stage1Recipe, "save_checkpoint", original)
    assert not (tmp_path / "killed" / "encoder").exists()
    resumed = Stage1Recipe(cfg).run()
    assert resumed["train"]["steps"] == 5
    log = [json.loads(x) for x in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    straight = load_config(
        stage1_config(tmp_path, tiny_llama, synth_dir, tmp_path / "straight"), ["train.max_steps=5"]
    )
    Stage1Recipe(straight).run()
    a, b = adapter_weights(tmp_path / "killed"), adapter_weights(tmp_path / "straight")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # each run's train.log holds its own lines only
    assert str(tmp_path / "straight") not in (tmp_path / "killed" / "train.log").read_text()
    assert "resumed from" in (tmp_path / "killed" / "train.log").read_text()
    # a finished run re-run trains nothing more
    again = Stage1Recipe(cfg).run()
    assert again["train"]["steps"] == 5


def test_mntp_then_contrastive_and_merged_output(tmp_path, tiny_llama, synth_dir):
    run = tmp_path / "mntp_run"
    extra = "mntp: {enabled: true, max_steps: 2, batch_size: 4, lr: 1.0e-3}\noutput: {merge_weights: true}\n"
    cfg = load_config(
        stage1_config(tmp_path, tiny_llama, synth_dir, run, extra), ["eval.causal_baseline=false"]
    )
    metrics = Stage1Recipe(cfg).run()
    assert (run / "mntp" / ".complete").is_file() and (run / "mntp" / "adapter_model.safetensors").is_file()
    meta = json.loads((run / "encoder" / "l2c_encoder.json").read_text())
    assert meta["source"]["adapters"] == [str(run / "mntp")]  # the encoder = base + MNTP + CC adapter
    assert "causal" not in metrics["before"]
    merged = TextEncoder.from_pretrained(run / "encoder_merged", device="cpu")
    adapter = TextEncoder.from_pretrained(run / "encoder", device="cpu")
    texts = ["a red circle", "two blue squares"]
    assert torch.allclose(merged.encode(texts), adapter.encode(texts), atol=1e-5)


def test_cli_train_and_eval(tmp_path, tiny_llama, synth_dir, capsys):
    run = tmp_path / "cli_run"
    cfg = stage1_config(tmp_path, tiny_llama, synth_dir, run)
    assert main(["stage1", "--config", str(cfg), "train.max_steps=1", "eval.causal_baseline=false"]) == 0
    assert json.loads(capsys.readouterr().out)["cra_after"] >= 0
    assert main(["stage1", "eval", "--config", str(cfg), "--out", str(tmp_path / "e.json")]) == 0
    assert set(json.loads((tmp_path / "e.json").read_text())) >= {
        "cra",
        "short_to_long_top1",
        "long_to_short_top1",
    }
    assert main(["stage1", "eval", "--config", str(cfg), "--base", "--causal"]) == 0
    capsys.readouterr()
    # bad data stops before any model loads, naming file and row
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.jpg", "short": "", "long": "y"}\n')
    assert main(["stage1", "--config", str(cfg), f"data.train={bad}"]) == 2
    assert "line 1: 'short' is empty" in capsys.readouterr().err
    # another model on this run's checkpoints is refused (train/resume.py); started over, the folder is named
    assert main(["stage1", "--config", str(cfg), "model.name_or_path=/nonexistent/model"]) == 2
    assert "another config (model.name_or_path:" in capsys.readouterr().err
    assert (
        main(["stage1", "--config", str(cfg), "model.name_or_path=/nonexistent/model", "run.resume=false"])
        == 2
    )
    assert "model folder not found" in capsys.readouterr().err


def test_caption_examples_and_general_text(tmp_path):
    from l2c_llava.data.readers import CaptionPair, DataError
    from l2c_llava.stage1.data import caption_examples, general_text_examples, mix

    pairs = [CaptionPair(f"{i}.jpg", f"short {i}", f"long {i}", f"line {i}") for i in range(50)]
    ex = caption_examples(pairs, "S2L", "L2S", seed=0)
    for p, e in zip(pairs, ex):
        if e.instruction == "S2L":  # query short -> positive its long, negative another long
            assert (
                (e.query, e.positive) == (p.short, p.long)
                and e.negative.startswith("long")
                and e.negative != p.long
            )
        else:
            assert e.instruction == "L2S" and (e.query, e.positive) == (p.long, p.short)
            assert e.negative.startswith("short") and e.negative != p.short
    directions = {e.instruction for e in ex}
    assert directions == {"S2L", "L2S"}  # random order within a pair
    assert caption_examples(pairs, "S2L", "L2S", seed=0) == ex  # fixed by the seed

    path = tmp_path / "general.jsonl"
    path.write_text(
        '{"query": "q1", "positive": "p1", "negative": "n1", "instruction": "Retrieve"}\n'
        '{"query": "q2", "positive": ""}\n\nnot json\n{"query": "q3", "positive": "p3"}\n'
    )
    with pytest.raises(DataError) as ei:
        general_text_examples(path)
    assert [(p.row, p.message) for p in ei.value.problems] == [
        ("line 2", "'positive' is empty"),
        ("line 4", "invalid JSON: Expecting value (column 1)"),
    ]
    path.write_text(
        '{"query": "q1", "positive": "p1", "negative": "n1", "instruction": "Retrieve"}\n{"query": "q3", "positive": "p3"}\n'
    )
    general = general_text_examples(path)
    assert (
        general[0].negative == "n1" and general[0].instruction == "Retrieve" and general[1].negative is None
    )
    mixed = mix(ex[:6], general * 10, share=0.25, seed=0)
    assert len(mixed) == 8 and sum(e in general for e in mixed) == 2  # 2 of 8 = 25%


def test_mntp_masking_is_a_pure_function_of_its_inputs_and_rng():
    from l2c_llava.stage1.mntp import IGNORE, mask_tokens

    ids = torch.randint(5, 100, (64, 48), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1  # a special token (BOS) in every row
    att = torch.ones_like(ids)
    att[:, 40:] = 0  # padding

    def masked(seed):
        return mask_tokens(ids, att, {1}, 2, 100, 0.2, torch.Generator().manual_seed(seed))

    inputs, labels = masked(3)
    again = masked(3)
    assert torch.equal(inputs, again[0]) and torch.equal(labels, again[1])  # same inputs and seed, same batch
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, 40:].any()  # never a special token or padding
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    share = chosen.float().sum() / (att[:, 1:].sum())
    assert 0.15 < share < 0.25
    as_mask = (inputs[chosen] == 2).float().mean()
    assert 0.7 < as_mask < 0.9  # 80% become the mask token
