"""Runs in the vision consumers' environment (open_clip, timm and the torchvision their loaders import,
``scripts/setup_compat_env.sh vision``) and reads the ``l2c export vision --format open_clip|timm``
folders with each library's own loader and preprocessing; writes what it got to OUT/result.json and
OUT/tensors.safetensors for tests/test_vision_consumers.py to compare. Imports nothing from l2c_llava.

    python vision_consumers_runner.py JOB.json OUT_DIR

JOB: {"pixels": safetensors file with "pixels" [B, 3, S, S], "open_clip": folder, "timm": folder,
"images": [image files], "layer": index of the block whose output is compared (LLaVA's -2)}
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def run_open_clip(job, tensors, result):
    import open_clip
    from PIL import Image

    entry = result["open_clip"] = {"version": open_clip.__version__}
    model, preprocess = open_clip.create_model_from_pretrained("local-dir:" + job["open_clip"])
    model.eval()
    entry["preprocess"] = repr(preprocess)
    pixels = load_file(job["pixels"])["pixels"]
    with torch.no_grad():
        tensors["open_clip|image_features"] = model.encode_image(pixels).contiguous()
        model.visual.output_tokens = True  # OpenFlamingo's way to the patch tokens
        _, tokens = model.visual(pixels)
        tensors["open_clip|tokens"] = tokens.contiguous()
        inter = model.visual.forward_intermediates(
            pixels,
            indices=[job["layer"]],
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        tensors["open_clip|layer_patches"] = inter["image_intermediates"][0].contiguous()
        tensors["open_clip|layer_cls"] = inter["image_intermediates_prefix"][0].contiguous()
        text = model.encode_text(open_clip.get_tokenizer("local-dir:" + job["open_clip"])(["a red circle"]))
        entry["text_features_abs_max"] = float(text.abs().max())
    for i, f in enumerate(job["images"]):
        tensors[f"open_clip|pixels|{i}"] = preprocess(Image.open(f)).contiguous()
    entry["loaded"] = True


def run_timm(job, tensors, result):
    import timm
    from PIL import Image

    entry = result["timm"] = {"version": timm.__version__}
    model = timm.create_model("local-dir:" + job["timm"], pretrained=True).eval()
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    entry["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    entry["transform"] = repr(transform)
    entry["num_classes"] = model.num_classes
    pixels = load_file(job["pixels"])["pixels"]
    with torch.no_grad():
        features = model.forward_features(pixels)
        tensors["timm|tokens"] = features.contiguous()
        tensors["timm|pooled"] = model.forward_head(features, pre_logits=True).contiguous()
        tensors["timm|head"] = model(pixels).contiguous()
        # prismatic's featurizer: the patch tokens of the second-to-last block
        (patches,) = model.get_intermediate_layers(pixels, n=[job["layer"]])
        tensors["timm|layer_patches"] = patches.contiguous()
    for i, f in enumerate(job["images"]):
        tensors[f"timm|pixels|{i}"] = transform(Image.open(f).convert("RGB")).contiguous()
    entry["loaded"] = True


def main(job_path: str, out_dir: str) -> int:
    job = json.loads(Path(job_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    result: dict = {"torch": torch.__version__, "errors": {}}
    try:
        import torchvision

        result["torchvision"] = torchvision.__version__
    except Exception as e:  # recorded, judged by the test
        result["errors"]["torchvision"] = f"{type(e).__name__}: {e}"
    for name, fn in (("open_clip", run_open_clip), ("timm", run_timm)):
        try:
            fn(job, tensors, result)
        except Exception:
            result["errors"][name] = traceback.format_exc()[-4000:]
    save_file(tensors, str(out / "tensors.safetensors"))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
