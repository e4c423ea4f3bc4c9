"""Benchmarks see training's pixels: the exported LLaVA's processor, loaded the way lmms-eval's
llava_hf loads it and given the raw image, pads to a square of the mean colour as training does; and
the image path is PIL's whatever is installed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_llm import save_tiny_llm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from l2c_llava.mllm.build import build_llava, save_llava

    root = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=48,
            patch_size=16,
        )
    ).save_pretrained(root / "v")
    save_tiny_llm(root / "llm")
    model, processor = build_llava(root / "v", SimpleNamespace(name_or_path=str(root / "llm")))
    save_llava(model, processor, root / "out")
    return root / "out", processor


def non_square(w: int = 500, h: int = 333) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(500, 333), (333, 500), (48, 48)])
def test_lmms_eval_pixels_equal_training_pixels(exported, size, monkeypatch):
    from transformers import AutoProcessor
    from transformers.models.auto import image_processing_auto as auto

    from l2c_llava.data.images import preprocess_images
    from l2c_llava.mllm.lmms_entry import pin_pil_backend

    folder, train_processor = exported
    img = non_square(*size)
    training = preprocess_images([img], train_processor.image_processor, "pad")  # expand2square, then CLIP
    monkeypatch.setattr(auto, "_resolve_backend", auto._resolve_backend)  # the pin is undone after the test
    pin_pil_backend()  # what `l2c mllm eval` does in lmms-eval's process
    lmms = AutoProcessor.from_pretrained(folder)  # llava_hf: AutoProcessor on the folder, the raw image
    pixels = lmms(images=img, text="<image>", return_tensors="pt")["pixel_values"]
    assert pixels.shape == training.shape
    assert torch.equal(pixels, training)


def test_the_saved_processor_pads_and_names_a_class_every_loader_knows(exported):
    import json

    folder, _ = exported
    cfg = (
        json.loads((folder / "preprocessor_config.json").read_text())
        if (folder / "preprocessor_config.json").is_file()
        else json.loads((folder / "processor_config.json").read_text())["image_processor"]
    )
    assert cfg["do_pad"] is True and cfg["image_processor_type"] == "LlavaImageProcessor"


def test_the_pil_backend_is_pinned_where_torchvision_is_installed(monkeypatch, exported):
    from transformers.models.auto import image_processing_auto as auto

    from l2c_llava.mllm.export import load_trained_llava
    from l2c_llava.mllm.lmms_entry import pin_pil_backend

    monkeypatch.setattr(auto, "is_torchvision_available", lambda: True)  # as on a GPU node
    monkeypatch.setattr(auto, "_resolve_backend", auto._resolve_backend)  # undone after the test
    folder, processor = exported
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil"  # training, build
    assert (
        type(load_trained_llava(folder)[2].image_processor).__name__ == "LlavaImageProcessorPil"
    )  # chat, export, eval-vqa
    assert auto._resolve_backend(None, None, "LlavaImageProcessor") == "torchvision"  # unpinned
    pin_pil_backend()  # lmms-eval's process
    assert auto._resolve_backend(None, None, "LlavaImageProcessor") == "pil"
    assert auto._resolve_backend("torchvision", None, "LlavaImageProcessor") == "torchvision"  # explicit wins
