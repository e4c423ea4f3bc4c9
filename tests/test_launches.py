"""Every shipped launch config, launched as the README's runbook does it (``accelerate launch
--config_file <yaml> --num_processes 2 -m l2c_llava.cli ...``) on 2 CPU processes: gloo, DeepSpeed with
``DS_ACCELERATOR=cpu``, FSDP with the two CPU overrides accelerate needs. Each launch must run as its
yaml says (both processes in a world of 2 of the yaml's kind, recorded in ``train_stats.json``), log
every step, and give the losses and weights of a 1-process run on the same global batch (fp32). The
ZeRO-3 runs are also killed (SIGKILL of one process after a checkpoint) and launched again, and give
the weights of the uninterrupted run; their exports load whole in transformers.

Tiny models (2-layer Llama, 2-layer CLIP tower at 32 px), 3-4 steps each: about 12-25 s a launch here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import CPU_FSDP, PAPER_LAUNCHES, ROOT, TRAINING_RECORDS, free_port
from .tiny_llm import save_tiny_llm
from .tiny_models import FakeEncoder, tiny_vision

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (pip install -e '.[deepspeed]'; scripts/setup_env.sh installs it)",
    ),
]

KIND = {"ddp": "MULTI_CPU", "fsdp": "FSDP"}  # else DEEPSPEED
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-5  # fp32, 2 processes against 1 on the same global batch


def env() -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
    )


def launch(yaml: str | None, args: list[str], *, kill: str | None = None, expect: int = 0) -> str:
    """`l2c ARGS` on 1 process (yaml None: in this process, on 1 thread as each launched process; no
    interpreter to start) or through ``accelerate launch --config_file yaml`` on 2."""
    if yaml is None:
        from l2c_llava.cli import main

        assert kill is None and expect == 0 and torch.get_num_threads() == 1
        assert main(args) == 0, args
        return ""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", yaml]
    cmd += ["--num_processes", "2", "--main_process_port", str(free_port())]
    cmd += (CPU_FSDP if "fsdp" in yaml else []) + ["-m", "l2c_llava.cli", *args]
    e = env()
    if kill:
        e["L2C_FAULT_KILL_AFTER_CHECKPOINT"] = kill
    out = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    if expect == 0:
        assert out.returncode == 0, text[-6000:]
    else:
        assert out.returncode != 0, text[-3000:]
    return text


def record(name: str, run: Path, ref: Path, a: dict | None = None, b: dict | None = None) -> None:
    """With L2C_LAUNCH_REPORT=FILE: one JSON line per launch (its recorded launch, the largest 1- vs
    2-process loss and weight differences), for the notes and bench/RESULTS.md."""
    path = os.environ.get("L2C_LAUNCH_REPORT")
    if not path:
        return
    stats = json.loads((run / "train_stats.json").read_text())
    diff = max(abs(x - y) for x, y in zip(losses(run), losses(ref)))
    w = None
    if a is not None and b is not None:
        keys = [k for k in a if a[k].numel() and not k.endswith("k_proj.bias")]
        w = max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)
    line = {"launch": name, **stats["launch"], "max_loss_diff": diff, "max_weight_diff": w}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "train_log.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def assert_same_weights(a: dict, b: dict, atol: float = WEIGHT_ATOL) -> None:
    assert a.keys() == b.keys()
    empty = [k for k in b if b[k].numel() == 0 and a[k].numel() != 0]
    assert not empty, f"empty tensors: {empty[:4]}"
    # an attention key bias has a true gradient of 0 (softmax ignores a shift shared by every key): AdamW
    # turns its float noise into updates of lr size, so it is left out, as in test_distributed_training
    far = {
        k: float((a[k].float() - b[k].float()).abs().max())
        for k in a
        if a[k].numel() and not k.endswith("k_proj.bias")
    }
    far = {k: v for k, v in far.items() if v > atol}
    assert not far, far


def check_launch(run: Path, yaml: str, stats_key: str | None = None) -> dict:
    stats = json.loads((run / "train_stats.json").read_text())
    launch_ = stats[stats_key] if stats_key else stats["launch"]
    kind = next((v for k, v in KIND.items() if k in Path(yaml).stem), "DEEPSPEED")
    assert launch_["world_size"] == 2 and launch_["distributed_type"] == kind, launch_
    if kind == "DEEPSPEED":
        assert launch_["zero_stage"] == int(Path(yaml).stem[-1])
    if kind == "FSDP":
        assert launch_["fsdp_sharding"] == "FULL_SHARD"
    return launch_


# -- the tiny world every launch trains in ------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, synth_dir):
    from transformers import CLIPConfig, CLIPModel

    from l2c_llava.data.readers import read_caption_pairs
    from l2c_llava.stage2.cache import build_cache, pair_captions

    root = tmp_path_factory.mktemp("launch")
    save_tiny_llm(root / "llama", "llama")
    vision = tiny_vision()
    vision.save_pretrained(root / "vision")
    # a whole CLIPModel folder with the same tower: OpenAI's layout (its text side and logit_scale are
    # never built; ZeRO-3 could not partition the 0-dim logit_scale)
    clip = CLIPModel(
        CLIPConfig(
            vision_config=vision.config.to_dict(),
            text_config=dict(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
            ),
            projection_dim=16,
        )
    )
    clip.vision_model.load_state_dict(vision.state_dict())
    clip.save_pretrained(root / "clip")
    encoder = root / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    pairs = read_caption_pairs(synth_dir / "captions" / "train.jsonl", synth_dir / "images")
    build_cache(
        root / "cache" / "train",
        pair_captions(pairs),
        encoder,
        shard_size=32,
        load_encoder=lambda: FakeEncoder(dim=12),
        progress=False,
    )
    return root


def stage2_config(world: Path, data: Path, out: Path, per_device: int) -> Path:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(f"""recipe: stage2
run: {{output_dir: {out}, seed: 1}}
text_encoder: {{path: {world}/encoder}}
cache: {{dir: {world}/cache}}
vision: {{name_or_path: {world}/vision, image_size: 32, gradient_checkpointing: false}}
adapter: {{num_blocks: 2, projection_dim: 16}}
data: {{train: {data}/captions/train.jsonl, image_root: {data}/images, num_workers: 0}}
train: {{lr: 1.0e-3, batch_size: {per_device}, max_steps: 4, log_every: 1, save_every: 2, mixed_precision: "no",
         grad_clip: 1.0}}
""")
    return cfg


def stage1_config(world: Path, data: Path, out: Path, per_device: int, extra: str = "") -> Path:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(f"""{extra}recipe: stage1
run: {{output_dir: {out}, seed: 3}}
model: {{name_or_path: {world}/llama, max_length: 48, gradient_checkpointing: false}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
data: {{train: {data}/captions/train.jsonl, eval: {data}/retrieval/karpathy.json, eval_pairs: {data}/captions/test.jsonl,
       max_samples: 24}}
train: {{lr: 1.0e-3, batch_size: {per_device}, max_steps: 3, warmup_steps: 1, log_every: 1, save_every: 1,
         keep_checkpoints: 3, grad_clip: 1.0, mixed_precision: "no"}}
eval: {{batch_size: 8, max_images: 6, causal_baseline: false}}
""")
    return cfg


# MNTP first, on every process the same batch of 4 texts (the 1-process run's too), as
# stage1/configs/llama3_8b_cc.yaml does under its ZeRO-2 launch
MNTP = "mntp: {enabled: true, max_steps: 2, batch_size: 4, lr: 1.0e-3}\n"


def clip_config(data: Path, out: Path, per_device: int) -> Path:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(f"""recipe: clip
run: {{output_dir: {out}, seed: 3}}
model: {{image_size: 32, patch_size: 16, vision_width: 32, vision_layers: 2, vision_heads: 2, text_width: 32,
         text_layers: 1, text_heads: 2, context_length: 24, projection_dim: 16}}
data: {{train: {data}/retrieval/karpathy.json, image_root: {data}/images, num_workers: 0}}
train: {{batch_size: {per_device}, max_steps: 3, log_every: 1, save_every: 2, mixed_precision: "no"}}
""")
    return cfg


def mllm_config(
    world: Path, data: Path, out: Path, stage: str, tune: str, per_device: int, tower="vision"
) -> Path:
    """Plain shuffled order (the modality-grouped one depends on the number of processes); no LoRA
    dropout (each process draws its own masks)."""
    cfg = out.with_suffix(".yaml")
    src, template = ("pretrain", "plain") if stage == "pretrain" else ("instruct", "vicuna_v1")
    cfg.write_text(f"""recipe: mllm
run: {{output_dir: {out}, seed: 3}}
model: {{vision_tower: {world}/{tower}, llm: {{name_or_path: {world}/llama, torch_dtype: float32}}}}
data: {{path: {data}/llava/{src}.json, image_root: {data}/images, template: {template}, max_length: 120,
        num_workers: 0, group_by_modality_length: false}}
train: {{stage: {stage}, tune: {tune}, lr: 1.0e-3, global_batch_size: 4, per_device_batch_size: {per_device},
         max_steps: 3, mixed_precision: "no", gradient_checkpointing: false, save_every: 1, log_every: 1,
         warmup_ratio: 0.0, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
""")
    return cfg


@pytest.fixture(scope="module")
def one_process(world, synth_dir):
    """The 1-process runs each launch is compared with, made once (lazily)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in made:
            return made[name]
        out = world / "one" / name
        out.parent.mkdir(exist_ok=True)
        if name == "stage2":
            launch(None, ["stage2", "train", "--config", str(stage2_config(world, synth_dir, out, 8))])
        elif name == "stage1":
            launch(None, ["stage1", "--config", str(stage1_config(world, synth_dir, out, 4))])
        elif name == "stage1-mntp":
            cfg = stage1_config(world, synth_dir, out, 4, MNTP)
            launch(None, ["stage1", "--config", str(cfg)])
        elif name == "clip":
            launch(None, ["clip", "pretrain", "--config", str(clip_config(synth_dir, out, 8))])
        elif name == "pretrain":
            # micro-batches of 2, accumulated twice: each micro-batch's loss is its own token mean, as
            # each process's is under a launch
            cfg = mllm_config(world, synth_dir, out, "pretrain", "projector", 2)
            launch(None, ["mllm", "pretrain", "--config", str(cfg)])
        else:  # finetune-full, finetune-lora: from the 1-process pretrain
            tune = name.split("-")[1]
            cfg = mllm_config(world, synth_dir, out, "finetune", tune, 2)
            launch(None, ["mllm", "finetune", "--config", str(cfg), f"model.init_from={get('pretrain')}"])
        made[name] = out
        return out

    return get


def yamls(folder: str) -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder / "accelerate").glob("*.yaml"))


# -- the launches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("yaml", yamls("stage2"))
def test_stage2_launch(yaml, world, synth_dir, one_process, tmp_path):
    out = tmp_path / "run"
    cfg = stage2_config(world, synth_dir, out, 4)
    if yaml.endswith("zero2.yaml"):  # killed after its step-2 checkpoint (process 1), launched again
        launch(yaml, ["stage2", "train", "--config", str(cfg)], kill="2:1", expect=1)
        assert (out / "checkpoints" / "step-0000002").is_dir() and not (out / "model").exists()
    launch(yaml, ["stage2", "train", "--config", str(cfg)])
    check_launch(out, yaml)
    ref = one_process("stage2")
    record(f"stage2 {yaml}", out, ref, weights(ref / "model"), weights(out / "model"))
    assert losses(out) == pytest.approx(losses(ref), rel=LOSS_RTOL)
    assert_same_weights(weights(ref / "model"), weights(out / "model"))


@pytest.mark.parametrize("yaml", yamls("stage1"))
def test_stage1_launch(yaml, world, synth_dir, one_process, tmp_path):
    out = tmp_path / "run"
    cfg = stage1_config(world, synth_dir, out, 2)
    if yaml.endswith("zero3.yaml"):
        launch(yaml, ["stage1", "--config", str(cfg)], kill="2:0", expect=1)
    launch(yaml, ["stage1", "--config", str(cfg)])
    launch_ = check_launch(out, yaml, stats_key=None) if (out / "train_stats.json").is_file() else None
    metrics = json.loads((out / "metrics.json").read_text())
    assert launch_ == metrics["train"]["launch"]
    ref = one_process("stage1")
    adapter = Path("encoder") / "adapter" / "adapter_model.safetensors"
    record(f"stage1 {yaml}", out, ref, weights(ref / adapter), weights(out / adapter))
    assert losses(out) == pytest.approx(losses(ref), rel=LOSS_RTOL)
    assert_same_weights(weights(ref / adapter), weights(out / adapter))
    # the evaluation (CRA, short<->long) before and after training ran on whole models
    ref_metrics = json.loads((ref / "metrics.json").read_text())
    for when in ("before", "after"):
        got = metrics[when]["bidirectional"] if when == "before" else metrics[when]
        want = ref_metrics[when]["bidirectional"] if when == "before" else ref_metrics[when]
        assert got["short_to_long_top1"] == pytest.approx(want["short_to_long_top1"])
        assert got["cra"] == pytest.approx(want["cra"])


def test_stage1_mntp_then_contrastive_under_zero2(world, synth_dir, one_process, tmp_path):
    """MNTP, then the contrastive step, in one ZeRO-2 launch (the paper config's header): the second
    training gets an engine of its own (before, its backward went to MNTP's engine and failed in
    DeepSpeed's gradient reduction); both adapters equal a 1-process run's."""
    yaml = "stage1/accelerate/deepspeed_zero2.yaml"
    out = tmp_path / "run"
    launch(yaml, ["stage1", "--config", str(stage1_config(world, synth_dir, out, 2, MNTP))])
    ref = one_process("stage1-mntp")
    mntp = Path("mntp") / "adapter_model.safetensors"
    adapter = Path("encoder") / "adapter" / "adapter_model.safetensors"
    record(f"stage1 mntp {yaml}", out, ref, weights(ref / adapter), weights(out / adapter))
    assert_same_weights(weights(ref / mntp), weights(out / mntp))
    assert losses(out) == pytest.approx(losses(ref), rel=LOSS_RTOL)
    assert_same_weights(weights(ref / adapter), weights(out / adapter))


def test_clip_baseline_launch(world, synth_dir, one_process, tmp_path):
    yaml = "stage2/accelerate/deepspeed_zero2.yaml"
    out = tmp_path / "run"
    launch(yaml, ["clip", "pretrain", "--config", str(clip_config(synth_dir, out, 4))])
    check_launch(out, yaml)
    ref = one_process("clip")
    record(f"clip baseline {yaml}", out, ref, weights(ref / "model"), weights(out / "model"))
    assert losses(out) == pytest.approx(losses(ref), rel=LOSS_RTOL)
    assert_same_weights(weights(ref / "model"), weights(out / "model"))


@pytest.mark.parametrize("yaml", ["mllm/accelerate/deepspeed_zero2.yaml", "mllm/accelerate/fsdp.yaml"])
def test_mllm_pretrain_launch(yaml, world, synth_dir, one_process, tmp_path):
    out = tmp_path / "run"
    launch(
        yaml,
        ["mllm", "pretrain", "--config", str(mllm_config(world, synth_dir, out, "pretrain", "projector", 2))],
    )
    check_launch(out, yaml)
    ref = one_process("pretrain")
    record(f"mllm pretrain {yaml}", out, ref, weights(ref / "projector"), weights(out / "projector"))
    assert losses(out) == pytest.approx(losses(ref), rel=LOSS_RTOL)
    assert_same_weights(weights(ref / "projector"), weights(out / "projector"))


@pytest.mark.parametrize("tune", ["full", "lora"])
@pytest.mark.parametrize("yaml", yamls("mllm"))
def test_mllm_finetune_launch(yaml, tune, world, synth_dir, one_process, tmp_path):
    out = tmp_path / "run"
    zero3 = yaml.endswith("zero3.yaml")
    # ZeRO-3 loads the tower from a whole CLIPModel folder (OpenAI's layout), the others from a
    # CLIPVisionModel folder: the same weights
    cfg = mllm_config(world, synth_dir, out, "finetune", tune, 2, tower="clip" if zero3 else "vision")
    args = ["mllm", "finetune", "--config", str(cfg), f"model.init_from={one_process('pretrain')}"]
    if zero3 and tune == "full":
        launch(yaml, args, kill="2:1", expect=1)
    launch(yaml, args)
    check_launch(out, yaml)
    ref = one_process(f"finetune-{tune}")
    record(f"mllm finetune {tune} {yaml}", out, ref, weights(ref / "model"), weights(out / "model"))
    assert losses(out) == pytest.approx(losses(ref), rel=LOSS_RTOL)
    assert_same_weights(weights(ref / "model"), weights(out / "model"))
    if zero3 and tune == "full":  # the export of a ZeRO-3 run: whole, equal to the 1-process one
        from transformers import LlavaForConditionalGeneration

        for run, name in ((out, "z3"), (ref, "one")):
            launch(None, ["export", "llava", "--model", str(run), "--out", str(tmp_path / f"export-{name}")])
        loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export-z3")
        assert all(p.numel() > 0 for p in loaded.parameters())
        assert_same_weights(weights(tmp_path / "export-one"), weights(tmp_path / "export-z3"))


def test_stage2_under_zero3_exports_whole(world, synth_dir, one_process, tmp_path):
    """stage 2 under a ZeRO-3 launch (stage 1's yaml): its vision and LLM2CLIP exports load whole in
    transformers and equal the 1-process run's."""
    yaml = "stage1/accelerate/deepspeed_zero3.yaml"
    out = tmp_path / "run"
    launch(yaml, ["stage2", "train", "--config", str(stage2_config(world, synth_dir, out, 4))])
    check_launch(out, yaml)
    ref = one_process("stage2")
    record(f"stage2 {yaml}", out, ref)
    assert losses(out) == pytest.approx(losses(ref), rel=LOSS_RTOL)
    for kind in ("vision", "llm2clip"):
        for run, name in ((out, "z3"), (ref, "one")):
            launch(None, ["export", kind, "--run", str(run), "--out", str(tmp_path / f"{kind}-{name}")])
        assert_same_weights(weights(tmp_path / f"{kind}-one"), weights(tmp_path / f"{kind}-z3"))
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(tmp_path / "vision-z3")
    assert all(p.numel() > 0 for p in tower.parameters())


def test_a_launch_that_would_fall_back_stops_before_writing(world, synth_dir, tmp_path):
    """FSDP on the CPU without the overrides accelerate needs there: one clear error, nothing written
    (before: the run went on as plain DDP, or DeepSpeed was dropped for MULTI_CPU, and exited 0)."""
    out = tmp_path / "run"
    cfg = stage2_config(world, synth_dir, out, 4)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "stage2/accelerate/fsdp.yaml"]
    cmd += ["--num_processes", "2", "--main_process_port", str(free_port()), "-m", "l2c_llava.cli"]
    res = subprocess.run(
        [*cmd, "stage2", "train", "--config", str(cfg)], cwd=ROOT, env=env(), capture_output=True, text=True
    )
    assert res.returncode != 0
    assert "--fsdp_sync_module_states false" in res.stdout + res.stderr
    # at most the run lock's folder: no config.yaml, no log, no checkpoint
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".l2c.lock", ".l2c.lock.json"}


@pytest.mark.timeout(3600)  # the shared run (conftest.quick_run) starts in the first test that reads it
def test_paper_shaped_pipeline_with_launch_words(quick_run):
    """The quick pipeline with launch words in the paper pipeline's places (stage 1 ZeRO-2, stage 2
    ZeRO-1, the LLaVA pretrain ZeRO-2 and finetune ZeRO-3; the baseline CLIP FSDP): the training steps
    run on 2 processes as their yaml says, the single-process steps (data, text cache, retrieval, exports,
    health, lmms-eval) do not, and the pipeline ends with its report. The run is conftest.quick_run, which
    tests/test_pipeline.py's end-to-end test reads too (killed in stage 1 and resumed)."""
    assert quick_run.launched
    state = quick_run.state
    assert all(rec["status"] == "done" for rec in state.values()), state
    for key, (_, section) in TRAINING_RECORDS.items():
        stats = quick_run.records[key]
        recorded = (stats[section] if section else stats)["launch"]
        yaml = PAPER_LAUNCHES[key.split("/")[0]]
        kind = next((v for k, v in KIND.items() if k in Path(yaml).stem), "DEEPSPEED")
        assert recorded["world_size"] == 2 and recorded["distributed_type"] == kind, (key, recorded)
    assert "## Stage 2" in quick_run.report
