"""Stage paths from one layout: a stage-2 run's exports go to ``export.dir`` (default <run>/export),
`l2c export` writes there by default and the mllm configs name the stage-2 run, not a path inside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from l2c_llava.errors import MissingFileError
from l2c_llava.layout import PipelineRun, export_dir
from tests.conftest import ROOT


def fake_run(root: Path, export: str | None = None) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    run = root / "s2"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": "stage2", "export": {"dir": export}}))
    torch.manual_seed(0)
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=16,
        )
    ).save_pretrained(export_dir(run) / "vision")
    return run


@pytest.mark.parametrize("elsewhere", [False, True])
def test_a_stage2_run_is_read_as_its_exported_tower(tmp_path, elsewhere):
    from l2c_llava.models.vision import load_vision_tower

    run = fake_run(tmp_path, str(tmp_path / "shared" / "exports") if elsewhere else None)
    want = (tmp_path / "shared" / "exports") if elsewhere else run / "export"
    assert export_dir(run) == want and export_dir(run / "model") == want
    assert load_vision_tower(str(run)).config.hidden_size == 32


def test_a_stage2_run_not_exported_says_the_command(tmp_path):
    from l2c_llava.models.vision import load_vision_tower

    run = tmp_path / "s2"
    run.mkdir()
    (run / "config.yaml").write_text("recipe: stage2\n")
    with pytest.raises(MissingFileError, match=f"l2c export vision --run {run}"):
        load_vision_tower(str(run))


def test_paper_mllm_configs_name_the_stage2_run_not_a_path_inside_it():
    from l2c_llava.config.loader import load_config

    stage2 = load_config(ROOT / "stage2/configs/openai_l14_336.yaml")
    assert stage2.export.dir is None  # the default layout: <run>/export
    for name in ("llava15_7b_pretrain", "llava15_7b_finetune", "llava15_7b_finetune_lora"):
        cfg = load_config(ROOT / f"mllm/configs/{name}.yaml")
        assert cfg.model.vision_tower == stage2.run.output_dir, name


def test_the_run_folder_layout_keeps_its_paths():
    """Run folders written before `layout.PipelineRun` stay readable: the same paths."""
    r = PipelineRun(Path("o"))
    got = [
        r.data,
        r.stage1_encoder,
        r.stage1_metrics,
        r.clip_model,
        r.text_features,
        r.retrieval_metrics,
        r.retrieval_md,
        r.export("vision"),
        r.health_json,
        r.llava("llm2clip", "pretrain"),
        r.eval_results("baseline"),
        r.lmms_eval("baseline"),
        r.report_md,
        r.report_json,
        r.plots,
        r.state,
        r.step_config("stage2"),
        r.connectors,
        r.caption_filter,
        r.search,
        r.demo_search,
    ]
    assert [p.as_posix() for p in got] == [
        "o/data",
        "o/stage1/encoder",
        "o/stage1/metrics.json",
        "o/clip/model",
        "o/text_features",
        "o/stage2/metrics.json",
        "o/stage2/retrieval.md",
        "o/export/vision",
        "o/health/health.json",
        "o/mllm/llm2clip/pretrain",
        "o/eval/baseline/results.json",
        "o/eval/baseline/lmms_eval",
        "o/report.md",
        "o/report.json",
        "o/plots",
        "o/pipeline/state.json",
        "o/pipeline/configs/stage2.yaml",
        "o/connectors",
        "o/filter",
        "o/search",
        "o/demo_search",
    ]
