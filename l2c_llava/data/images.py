"""Image preprocessing, every stage's, without torchvision (it cannot be installed next to the CPU torch here).

CLIP (stage 2, the baseline, search): evaluation uses transformers' own CLIP image processor with its PIL
backend (resize the shortest side, bicubic; centre crop; rescale; OpenAI mean/std), so features match what
LLaVA and every transformers user feed the tower. Training adds the paper's RandomResizedCrop (scale
0.9-1.0, bicubic) before the same normalisation.

LLaVA: pad to a square of the processor's mean colour (LLaVA's ``image_aspect_ratio: pad``,
:func:`pad_images`), then the same CLIP resize and crop (:func:`llava_image_processor`). Training's data,
chat, the VQA eval, lmms-eval's model and the exported processor all take their pixels from here, so a
benchmark sees training's pixels (tests/test_eval_pixels.py).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from l2c_llava.errors import L2CError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(L2CError, ValueError):
    """An image that cannot be decoded; the message names it."""


def load_rgb(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB image, or raise ImageError naming it."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many kinds
        raise ImageError(f"cannot decode image {label}: {type(e).__name__}: {e}") from None


def clip_image_processor(size: int):
    """transformers' CLIP image processor (PIL backend) at `size` (shortest edge and crop)."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as cls
    return cls(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def llava_image_processor(size: int, pad: bool = True):
    """The LLaVA's image processor: pad to a square of the mean colour (LLaVA's ``image_aspect_ratio:
    pad``, with `pad`), then CLIP's resize (shortest side, bicubic) and centre crop to ``size``, OpenAI
    CLIP's mean / std. Always the PIL backend (``LlavaImageProcessorPil``): transformers 5 picks the
    torchvision one wherever torchvision is installed, and the two resize differently; LLaVA and
    OpenAI used PIL. Saved as ``LlavaImageProcessor`` with ``do_pad``, so lmms-eval's ``llava_hf``
    (processor on the raw image) gets training's pixels."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_pad=pad,
    )


def pil_image_processor(image_processor):
    """The same image processor on the PIL backend (a loaded one may be torchvision's)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    if isinstance(image_processor, LlavaImageProcessorPil):
        return image_processor
    keys = (
        "size",
        "crop_size",
        "image_mean",
        "image_std",
        "do_pad",
        "do_resize",
        "do_center_crop",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "do_convert_rgb",
        "resample",
    )
    d = image_processor.to_dict()
    return LlavaImageProcessorPil(**{k: d[k] for k in keys if d.get(k) is not None})


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square canvas of the background colour, the image centred (LLaVA's "pad")."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The processor's mean as an RGB colour: what LLaVA pads with."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


def pad_images(images: Sequence[Image.Image], image_processor, aspect: str = "pad") -> list[Image.Image]:
    """LLaVA's ``image_aspect_ratio``: ``pad`` -> each image padded to a square of the processor's mean
    colour (the processor then resizes and crops); another value -> the images as they are."""
    if aspect != "pad":
        return list(images)
    bg = mean_colour(image_processor)
    return [expand2square(im, bg) for im in images]


def preprocess_images(images: Sequence[Image.Image], image_processor, aspect: str = "pad") -> torch.Tensor:
    """LLaVA training's pixels: :func:`pad_images`, then the processor. [N, 3, size, size]."""
    return image_processor(images=pad_images(images, image_processor, aspect), return_tensors="pt")[
        "pixel_values"
    ]


def write_preprocessor_config(folder: str | Path, size: int) -> None:
    """``preprocessor_config.json`` of a CLIP image processor at `size`, typed as CLIPImageProcessor
    (the class every loader knows: AutoImageProcessor, LLaVA, lmms-eval)."""
    import json

    processor = clip_image_processor(size).to_dict()
    processor["image_processor_type"] = "CLIPImageProcessor"
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def normalize(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 [3, H, W], rescaled to [0, 1] and normalised with OpenAI's mean/std."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.array(OPENAI_CLIP_MEAN, dtype=np.float32)) / np.array(OPENAI_CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class EvalTransform:
    """Deterministic: the CLIP image processor's resize + centre crop + normalisation."""

    def __init__(self, size: int):
        self.processor = clip_image_processor(size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio 3/4-4/3, bicubic) then normalisation (torchvision's
    sampling: up to 10 tries for an in-bounds crop, else a centre crop of the clamped ratio)."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        rng: random.Random | None = None,
    ):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.rng = rng or random.Random()

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * self.rng.uniform(*self.scale)
            aspect = math.exp(self.rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                x, y = self.rng.randint(0, width - w), self.rng.randint(0, height - h)
                return x, y, x + w, y + h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        x, y = (width - w) // 2, (height - h) // 2
        return x, y, x + w, y + h

    def __call__(self, img: Image.Image) -> torch.Tensor:
        box = self.crop_box(*img.size)
        return normalize(img.resize((self.size, self.size), Image.BICUBIC, box=box))
