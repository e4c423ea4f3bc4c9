"""Model cards (issue 19): every export writes README.md with Hub card metadata, the base models,
datasets, the training recipe, the metrics the run folder holds and how to load it; read back here."""

from __future__ import annotations

from l2c_llava.cards import read_card
from l2c_llava.cli import main

from .recipe_configs import mllm_config


def test_vision_and_llm2clip_exports_carry_a_card_with_the_runs_metrics(trained, tmp_path):
    root, cfg_path, _, encoder = trained
    assert main(["stage2", "eval", "--config", str(cfg_path)]) == 0  # metrics.json in the run folder
    for what in ("vision", "llm2clip"):
        out = tmp_path / f"tiny-{what}"
        assert main(["export", what, "--run", str(root / "s2"), "--out", str(out)]) == 0
        meta, text = read_card(out)
        assert (
            meta["pipeline_tag"]
            == {"vision": "image-feature-extraction", "llm2clip": "zero-shot-image-classification"}[what]
        )
        assert "llm2clip" in meta["tags"] and meta["l2c_llava"]["transformers"]
        assert f"# tiny-{what}" in text
        assert str(root / "clip" / "model") in text and str(encoder) in text  # base models by path
        assert "captions/train.jsonl" in text  # the dataset
        assert "lr: 0.001" in text and "max_steps: 3" in text  # the recipe as it ran
        assert (
            "| short | i2t | R@1 | " in text and "| long | t2i | R@10 | " in text and "95% bootstrap" in text
        )  # measured numbers
        assert ("CLIPVisionModel.from_pretrained" if what == "vision" else "LLM2CLIP.from_pretrained") in text
    # a re-export into the same folder is still a previous output of the command (the card is listed)
    assert main(["export", "vision", "--run", str(root / "s2"), "--out", str(tmp_path / "tiny-vision")]) == 0


def test_llava_run_model_and_both_exports_carry_a_card(tmp_path, llava_parts, synth_dir):
    path, _ = mllm_config(tmp_path, llava_parts, synth_dir, "finetune", tmp_path / "ft")
    assert main(["mllm", "finetune", "--config", str(path)]) == 0
    meta, text = read_card(tmp_path / "ft" / "model")
    assert meta["pipeline_tag"] == "image-text-to-text" and "llava" in meta["tags"]
    assert (
        str(llava_parts / "vision") in text and str(llava_parts / "llm") in text and "instruct.json" in text
    )
    assert "| steps | 3 |" in text and "final_loss" in text  # the run's training numbers
    assert "LlavaForConditionalGeneration.from_pretrained" in text
    hf = tmp_path / "tiny-llava-hf"
    assert main(["export", "llava", "--model", str(tmp_path / "ft"), "--out", str(hf)]) == 0
    meta, text = read_card(hf)
    assert "# tiny-llava-hf" in text and "global_batch_size: 4" in text
    orig = tmp_path / "llava-v1.5-tiny"
    assert (
        main(["export", "llava", "--model", str(tmp_path / "ft"), "--out", str(orig), "--format", "original"])
        == 0
    )
    meta, text = read_card(orig)
    assert meta["library_name"] == "transformers" and "llava-1.5" in meta["tags"]
    assert "load_pretrained_model" in text and "--conv-mode vicuna_v1" in text  # the original code's way


def test_hub_ids_become_card_metadata_and_local_paths_stay_in_the_text(tmp_path):
    from l2c_llava.cards import model_card

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "recipe: mllm\nmodel: {vision_tower: openai/clip-vit-large-patch14-336, "
        "llm: {name_or_path: embedded:smollm2-135m-instruct}}\n"
        "data: {path: /data/llava/instruct.json}\ntrain: {stage: finetune}\n"
    )
    text = model_card("llava", "x", run)
    meta, _ = read_card_text(text)
    assert meta["base_model"] == ["openai/clip-vit-large-patch14-336", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert "datasets" not in meta and "/data/llava/instruct.json" in text
    assert "No metrics" in text  # never a number the run did not write


def read_card_text(text):
    import yaml

    head, _, rest = text[4:].partition("\n---\n")
    return yaml.safe_load(head), rest
