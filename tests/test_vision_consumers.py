"""The open_clip and timm exports of the upgraded encoder, judged by the libraries themselves (issue 34):
``l2c export vision --format open_clip|timm`` folders loaded in their own environment
(``scripts/setup_compat_env.sh vision``: open_clip 3.3.0, timm 1.0.31, the torchvision their loaders
import) with ``open_clip.create_model_from_pretrained('local-dir:...')`` and
``timm.create_model('local-dir:...', pretrained=True)``, their own preprocessing from the folders'
configs; compared here (transformers 5) with the transformers ``CLIPVisionModel`` export of the same
stage-2 model on the same pixels, and with the transformers image processor on non-square images.

The quick tests below check the files themselves in this environment (no open_clip / timm here):
the weight mapping is exactly invertible, the configs say what the libraries read, and towers the
libraries cannot express are refused with the reason."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from l2c_llava.cli import main

from .conftest import ROOT, env_setup
from .tiny_models import tiny_vision

# non-square sizes (w, h): landscape and portrait, where transformers' centre crop (floor of half the
# excess) and torchvision's (round half to even) start at the same pixel; and one where they do not
SIZES = [(40, 24), (24, 52)]
ODD_SIZE = (37, 50)  # 11 rows of excess after the resize: transformers starts at 5, torchvision at 6


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A stage-2 model (LLM2CLIP release layout: tower + projection + adapter) exported three ways by
    the command itself, images of three shapes and a batch of pixels."""
    from PIL import Image

    from l2c_llava.stage2.llm2clip import LLM2CLIP
    from l2c_llava.stage2.model import LLM2CLIPModel

    root = tmp_path_factory.mktemp("vision_consumers")
    torch.manual_seed(1)
    model = LLM2CLIPModel.from_vision_tower(tiny_vision(), 12, projection_dim=16, num_blocks=2)
    with torch.no_grad():  # not the init's values: every norm and bias matters to the comparison
        for p in model.vision_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    LLM2CLIP(model).save_pretrained(root / "llm2clip")
    for fmt in ("hf", "open_clip", "timm"):
        out = root / f"vision-{fmt}"
        assert (
            main(["export", "vision", "--run", str(root / "llm2clip"), "--format", fmt, "--out", str(out)])
            == 0
        )
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate([*SIZES, ODD_SIZE]):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noise: any shift or resampling shows
        Image.fromarray(arr).save(root / f"image{i}.png")
        images.append(root / f"image{i}.png")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    save_file({"pixels": pixels}, str(root / "inputs.safetensors"))
    return SimpleNamespace(root=root, model=model.eval(), pixels=pixels, images=images)


def test_the_weight_mapping_is_exact_and_the_configs_say_what_the_libraries_read(exported):
    from l2c_llava.models import vision_formats as vf

    tower = exported.model.vision_model
    want = vf._hf_vision_state(tower)
    oc = load_file(str(exported.root / "vision-open_clip" / vf.OPEN_CLIP_WEIGHTS))
    tm = load_file(str(exported.root / "vision-timm" / vf.TIMM_WEIGHTS))
    for back in (vf.hf_from_open_clip(oc, 2), vf.hf_from_timm(tm, 2)):
        assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    proj = exported.model.visual_projection.weight
    assert torch.equal(oc["visual.proj"], proj.T) and torch.equal(tm["head.weight"], proj)
    assert not tm["head.bias"].any()
    text = [k for k in oc if not k.startswith("visual.") and k != "logit_scale"]
    assert text and all(not oc[k].any() for k in text)  # the text tower is zero: encode_text gives zeros
    cfg = json.loads((exported.root / "vision-open_clip" / vf.OPEN_CLIP_CONFIG).read_text())
    assert cfg["model_cfg"]["embed_dim"] == 16 and cfg["model_cfg"]["quick_gelu"] is True
    assert cfg["model_cfg"]["vision_cfg"] == {
        "image_size": 32,
        "patch_size": 8,
        "width": 32,
        "layers": 2,
        "head_width": 8,
        "mlp_ratio": 2.0,
        "pool_type": "tok",
    }
    pre = cfg["preprocess_cfg"]
    assert (pre["size"], pre["interpolation"], pre["resize_mode"]) == (32, "bicubic", "shortest")
    tcfg = json.loads((exported.root / "vision-timm" / "config.json").read_text())
    assert tcfg["architecture"] == "vit_base_patch16_clip_quickgelu_224" and tcfg["num_classes"] == 16
    assert tcfg["model_args"]["act_layer"] == "quick_gelu" and tcfg["model_args"]["depth"] == 2
    p = tcfg["pretrained_cfg"]
    assert (p["input_size"], p["crop_pct"], p["crop_mode"], p["interpolation"]) == (
        [3, 32, 32],
        1.0,
        "center",
        "bicubic",
    )
    for fmt, lib in (("open_clip", "open_clip"), ("timm", "timm")):
        card = (exported.root / f"vision-{fmt}" / "README.md").read_text()
        assert f"library_name: {lib}" in card and "Tested with: " in card and "local-dir:" in card


def test_a_tower_the_libraries_cannot_express_is_refused_with_the_reason(tmp_path):
    from l2c_llava.errors import InputError
    from l2c_llava.stage2.export import export_vision_library

    tower = tiny_vision()
    tower.config.hidden_act = "gelu_new"
    with pytest.raises(InputError, match="hidden_act is 'gelu_new'.*--format hf"):
        export_vision_library(tower, tmp_path / "x", "timm")
    tower = tiny_vision()
    tower.config.layer_norm_eps = 1e-6
    with pytest.raises(InputError, match="layer_norm_eps 1e-06.*--format open_clip"):
        export_vision_library(tower, tmp_path / "y", "timm")
    out = export_vision_library(tower, tmp_path / "z", "open_clip")  # open_clip can: norm_kwargs
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["norm_kwargs"] == {"eps": 1e-6}


def _consumers_python() -> str:
    setup = env_setup("setup_compat_env.sh", "vision")  # (built in the background while the other tests ran)
    assert setup.returncode == 0, setup.stderr[-3000:]
    return setup.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_open_clip_and_timm_load_the_exports_and_give_the_transformers_features(exported, tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModel

    a = exported
    job = {
        "pixels": str(a.root / "inputs.safetensors"),
        "open_clip": str(a.root / "vision-open_clip"),
        "timm": str(a.root / "vision-timm"),
        "images": [str(p) for p in a.images],
        "layer": 0,  # the second-to-last of 2 blocks: LLaVA's mm_vision_select_layer -2
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    run = subprocess.run(
        [
            _consumers_python(),
            str(ROOT / "tests" / "reference" / "vision_consumers_runner.py"),
            str(tmp_path / "job.json"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert not result["errors"], result["errors"]
    got = load_file(str(tmp_path / "out" / "tensors.safetensors"))

    # the reference: the transformers CLIPVisionModel export, on the same pixels
    hf = CLIPVisionModel.from_pretrained(a.root / "vision-hf").eval()
    with torch.no_grad():
        out = hf(pixel_values=a.pixels, output_hidden_states=True)
        pooled = out.pooler_output
        projected = a.model.visual_projection(pooled)
        post_norm = next(m for n, m in hf.named_modules() if n.endswith("post_layernorm"))
        tokens = post_norm(out.last_hidden_state)  # open_clip and timm norm every token
        layer = out.hidden_states[-2]
    pairs = {
        "open_clip encode_image = pooler_output @ projection": (got["open_clip|image_features"], projected),
        "open_clip visual tokens (output_tokens)": (got["open_clip|tokens"], tokens[:, 1:]),
        "open_clip forward_intermediates (layer -2, patches)": (got["open_clip|layer_patches"], layer[:, 1:]),
        "open_clip forward_intermediates (layer -2, class token)": (got["open_clip|layer_cls"], layer[:, :1]),
        "timm forward_features": (got["timm|tokens"], tokens),
        "timm pre-logits = pooler_output": (got["timm|pooled"], pooled),
        "timm head = pooler_output @ projection": (got["timm|head"], projected),
        "timm get_intermediate_layers (layer -2)": (got["timm|layer_patches"], layer[:, 1:]),
    }
    report, failures = {}, []
    for name, (mine, want) in pairs.items():
        diff = float((mine - want).abs().max()) if mine.shape == want.shape else float("inf")
        report[name] = diff
        if not diff <= 1e-4:
            failures.append(f"{name}: shape {tuple(mine.shape)} vs {tuple(want.shape)}, max diff {diff:.2e}")
    assert result["open_clip"]["text_features_abs_max"] == 0.0  # the empty text tower, as documented
    assert result["timm"]["num_classes"] == 16
    cfg = result["timm"]["data_config"]
    assert (cfg["input_size"], cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == (
        [3, 32, 32],
        "bicubic",
        1.0,
        "center",
    )
    # preprocessing of non-square images: the consumers' own transforms from the exported configs
    # against the transformers export's image processor (what training evaluated with)
    proc = CLIPImageProcessor.from_pretrained(a.root / "vision-hf")
    from PIL import Image

    for i, path in enumerate(a.images):
        want = proc(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        for lib in ("open_clip", "timm"):
            diff = float((got[f"{lib}|pixels|{i}"] - want).abs().max())
            size = Image.open(path).size
            report[f"{lib} preprocessing {size[0]}x{size[1]}"] = diff
            if size != ODD_SIZE and not diff <= 1e-5:
                failures.append(f"{lib} preprocessing of a {size} image differs by {diff:.2e}")
            if size == ODD_SIZE:  # the crop starts one row lower: the rows below the first agree
                shifted = float((got[f"{lib}|pixels|{i}"][:, :-1] - want[:, 1:]).abs().max())
                report[f"{lib} preprocessing {size[0]}x{size[1]}, one row shifted"] = shifted
                if not shifted <= 1e-5:
                    failures.append(f"{lib} preprocessing of {size}: not a one-row shift ({shifted:.2e})")
    print("vision consumers:", json.dumps({"versions": _versions(result), "max_abs_diff": report}, indent=2))
    assert not failures, "\n".join(failures)


def _versions(result: dict) -> dict:
    return {
        "torch": result.get("torch"),
        "torchvision": result.get("torchvision"),
        "open_clip": result.get("open_clip", {}).get("version"),
        "timm": result.get("timm", {}).get("version"),
    }
