from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from l2c_llava.config import (
    ConfigError,
    MllmConfig,
    Stage1Config,
    Stage2Config,
    dump_config,
    load_config,
    parse_override,
    save_resolved_config,
    write_config,
)

STAGE1 = """
recipe: stage1
run: {output_dir: runs/x}
model: {name_or_path: embedded:smollm2-135m-instruct}
data: {train: d/train.jsonl, eval: d/karpathy.json}
"""
STAGE2 = """
recipe: stage2
run: {output_dir: runs/y}
text_encoder: {path: runs/x/encoder}
cache: {dir: runs/y/cache}
vision: {name_or_path: ckpt/clip}
data: {train: d/train.jsonl, image_root: d/images}
"""
MLLM = """
recipe: mllm
run: {output_dir: runs/z}
model:
  vision_tower: ckpt/clip
  llm: {name_or_path: ckpt/vicuna}
data: {path: d/pretrain.json, image_root: d/images, template: plain}
train: {stage: pretrain, tune: projector, lr: 1.0e-3, global_batch_size: 256, per_device_batch_size: 32}
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def messages(err: ConfigError) -> list[str]:
    return [str(p) for p in err.problems]


# --- good files and the paper's defaults -----------------------------------------------------


def test_stage1_minimal_file_gets_the_paper_defaults(tmp_path):
    cfg = load_config(write(tmp_path, STAGE1))
    assert isinstance(cfg, Stage1Config)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert cfg.train.lr == 2e-4 and cfg.train.batch_size == 64 and cfg.train.warmup_steps == 300
    assert cfg.train.loss_scale == 50.0 and cfg.model.pooling == "mean" and cfg.model.max_length == 512
    assert cfg.mntp.enabled is False and cfg.mntp.mask_probability == 0.2 and cfg.mntp.mask_token == "_"
    assert not hasattr(cfg.data.instructions, "separator")  # removed (llm2vec's fixed marker, never read)


def test_stage2_minimal_file_gets_the_paper_defaults(tmp_path):
    cfg = load_config(write(tmp_path, STAGE2))
    assert isinstance(cfg, Stage2Config)
    t = cfg.train
    assert (t.lr, t.weight_decay, t.betas, t.eps, t.grad_clip, t.warmup_steps) == (
        1e-5,
        0.05,
        (0.9, 0.999),
        1e-8,
        5.0,
        0,
    )
    assert t.batch_size == 512 and t.schedule == "cosine" and t.local_loss and t.gather_with_grad
    assert cfg.vision.layer_decay == 0.85 and cfg.vision.trainable == "all"
    assert (cfg.adapter.num_blocks, cfg.adapter.expansion, cfg.adapter.projection_dim) == (4, 2, 1280)
    assert cfg.logit_scale.init == pytest.approx(1 / 0.07) and cfg.logit_scale.max == 100
    assert cfg.data.dense_share == 0.5 and cfg.data.rrc_scale == (0.9, 1.0)


def test_mllm_minimal_file_gets_the_paper_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MLLM))
    assert isinstance(cfg, MllmConfig)
    assert cfg.model.vision_feature_layer == -2 and cfg.model.projector_type == "mlp2x_gelu"
    assert cfg.model.image_aspect_ratio == "pad" and cfg.model.vision_feature_select_strategy == "default"
    assert cfg.train.warmup_ratio == 0.03 and cfg.train.schedule == "cosine" and cfg.data.max_length == 2048
    assert (cfg.train.lora.r, cfg.train.lora.alpha) == (128, 256)
    assert cfg.train.freeze_vision_tower


# --- bad files: every problem at once, each naming file, key, value --------------------------


def test_every_problem_is_reported_at_once_with_file_key_and_value(tmp_path):
    path = write(
        tmp_path,
        STAGE1
        + """
train: {lr: -1, batch_size: abc}
lora: {target_modules: []}
""".replace("data:", "data:"),
    )
    text = path.read_text().replace(
        "model: {name_or_path: embedded:smollm2-135m-instruct}",
        "model: {name_or_path: x, pooling: max, max_lenght: 12}",
    )
    path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msgs = messages(ei.value)
    assert len(msgs) == 5, msgs
    assert all(m.startswith(str(path)) for m in msgs)
    joined = "\n".join(msgs)
    assert "train.lr = -1: Input should be greater than 0" in joined
    assert "train.batch_size = 'abc'" in joined
    assert "model.pooling = 'max'" in joined and "'mean'" in joined  # allowed values listed
    assert "model.max_lenght = 12: unknown key; did you mean 'max_length'?" in joined
    assert "lora.target_modules = []" in joined


def test_missing_required_key_is_named(tmp_path):
    path = write(tmp_path, STAGE2.replace("cache: {dir: runs/y/cache}\n", ""))
    with pytest.raises(ConfigError, match=r"cache: required key is missing"):
        load_config(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "run: {output_dir: x}\n",
            "recipe: required key is missing; one of: clip, mllm, pipeline, stage1, stage2",
        ),
        (
            "recipe: stage3\n",
            "recipe = 'stage3': unknown recipe; did you mean 'stage2'? Allowed: clip, mllm, pipeline, stage1, stage2",
        ),
        ("recipe: stage1\nrun: [unclosed\n", "invalid YAML: line 3"),
        ("recipe: stage1\nrecipe: stage2\n", "duplicate key 'recipe' (line 2)"),
        ("- a\n- b\n", "must hold a YAML mapping"),
    ],
)
def test_file_level_errors(tmp_path, text, expected):
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text))
    assert expected in str(ei.value)


def test_missing_file_says_how_to_find_configs(tmp_path):
    with pytest.raises(ConfigError, match="file not found; `l2c ls`"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "base, overrides, expected",
    [
        (MLLM, ["train.tune=full"], "train.tune = 'full': the pretrain stage trains the projector only"),
        (MLLM, ["train.global_batch_size=100"], "must be a multiple of train.per_device_batch_size (32)"),
        (MLLM, ["train.warmup_steps=10"], "set either train.warmup_steps or train.warmup_ratio"),
        (MLLM, ["train.projector_lr=2e-5"], "not used with tune=projector"),
        (STAGE2, ["data.rrc_scale=[0.9, 0.5]"], "needs 0 < min <= max <= 1"),
        (STAGE2, ["vision.trainable=last_n"], "vision.trainable=last_n needs a number of blocks > 0"),
        (STAGE2, ["data.image_root=null"], "data.format=jsonl needs the folder"),
        (STAGE1, ["data.general_text_share=0.3"], "needs a data.general_text file"),
        (STAGE1, ["data.eval=null"], "eval.cra is on: give a test set"),
        (STAGE1, ["model.load_in_4bit=true", "output.merge_weights=true"], "4-bit-rounded weights"),
    ],
)
def test_cross_field_checks(tmp_path, base, overrides, expected):
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, base), overrides)
    assert expected in str(ei.value)
    assert "override" in str(ei.value)  # the problem is attributed to the override that caused it


def test_type_and_cross_field_problems_come_in_one_error(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, MLLM), ["model.projector_type=blip2", "train.tune=full"])
    keys = [p.key for p in ei.value.problems]
    assert keys == ["model.projector_type", "train.tune"]


# --- overrides ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("train.lr=1e-4", "train.lr", "1e-4"),  # YAML 1.1 reads this as a string; the schema makes it a float
        ("train.lr=0.0001", "train.lr", 0.0001),
        ("train.max_steps=10", "train.max_steps", 10),
        ("train.max_steps=null", "train.max_steps", None),
        ("eval.cra=false", "eval.cra", False),
        ("lora.target_modules=[q_proj, v_proj]", "lora.target_modules", ["q_proj", "v_proj"]),
        ("run.output_dir=", "run.output_dir", ""),
        ("model.name_or_path=a=b", "model.name_or_path", "a=b"),
    ],
)
def test_parse_override(text, key, value):
    assert parse_override(text) == (key, value)


def test_overrides_change_values_and_are_typed_by_the_schema(tmp_path):
    cfg = load_config(
        write(tmp_path, STAGE1),
        ["train.lr=1e-4", "lora.target_modules=[q_proj,v_proj]", "run.output_dir=2024", "mntp.enabled=true"],
    )
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.run.output_dir == "2024"  # a number where a string is expected stays a string
    assert cfg.mntp.enabled is True


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=abc", "override 'train.lr=abc': train.lr = 'abc': Input should be a valid number"),
        ("train.lrr=1", "train.lrr = 1: unknown key; did you mean 'lr'?"),
        ("nosuch.key=1", "nosuch = {'key': 1}: unknown key"),
        ("run.seed.x=1", "override 'run.seed.x=1': run.seed = {'x': 1}: Input should be a valid integer"),
        (
            "run.output_dir.x=1",
            "override 'run.output_dir.x=1': run.output_dir = 'runs/x': is a single value, not a section",
        ),
        ("justtext", "overrides look like dotted.key=value"),
    ],
)
def test_bad_overrides_are_named(tmp_path, override, expected):
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, STAGE1), [override])
    assert expected in str(ei.value)


# --- resolved config --------------------------------------------------------------------------


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, STAGE2), ["train.lr=3e-5"])
    out = save_resolved_config(cfg, tmp_path / "run", source="c.yaml", overrides=["train.lr=3e-5"])
    text = out.read_text()
    assert text.startswith("# Resolved config written by l2c-llava") and "# overrides: train.lr=3e-5" in text
    again = load_config(out)
    assert again == cfg
    assert "weight_decay: 0.05" in dump_config(cfg)  # defaults are spelled out


def test_values_are_set_as_given_after_the_overrides_and_named_in_problems(tmp_path):
    """What a program sets (the pipeline's wiring) is not read as YAML, wins over the user's overrides, and a
    bad one is named like an override."""
    path = write(tmp_path, STAGE2)
    cfg = load_config(
        path,
        ["run.output_dir=runs/user", "train.lr=3e-5"],
        values={"run.output_dir": "runs/1e3 #x", "cache.dir": "null"},
    )
    assert cfg.run.output_dir == "runs/1e3 #x" and cfg.cache.dir == "null" and cfg.train.lr == 3e-5
    with pytest.raises(ConfigError) as ei:
        load_config(path, values={"train.lrr": 1})
    assert "override 'train.lrr=1': train.lrr = 1: unknown key" in str(ei.value)


def test_write_config_opens_with_its_comments_and_loads_back(tmp_path):
    cfg = load_config(write(tmp_path, STAGE1), ["train.lr=1e-4"])
    out = write_config(cfg, tmp_path / "a" / "b.yaml", ["l2c stage1 --config a/b.yaml", "made by a test"])
    assert out.read_text().startswith("# l2c stage1 --config a/b.yaml\n# made by a test\nrecipe: stage1\n")
    assert load_config(out) == cfg and not list(out.parent.glob(".*"))  # atomic: no temp file left
    # every key written: a default comes back validated (lora.alpha's int default 32 as 32.0); only the keys
    # given: the very same config
    assert repr(cfg.lora.alpha) == "32" and repr(load_config(out).lora.alpha) == "32.0"
    given = write_config(cfg, tmp_path / "given.yaml", only_given=True)
    assert "alpha" not in given.read_text()
    assert repr(load_config(given).model_dump()) == repr(cfg.model_dump())
