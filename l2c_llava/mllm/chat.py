"""Talking to a trained LLaVA: :class:`LlavaChat` keeps one loaded and answers questions about images
(greedy), each image padded to square as in training; ``l2c mllm chat`` (:func:`chat`,
:func:`chat_session` for --interactive) and ``l2c demo`` use it."""

from __future__ import annotations

import json
import os
import sys

import torch

from l2c_llava.data.images import ImageError, load_rgb, pad_images
from l2c_llava.mllm.export import load_trained_llava


class LlavaChat:
    """A transformers-format LLaVA loaded once, answering questions about images (greedy), each image
    padded to square like training: ``l2c mllm chat`` (--interactive keeps it loaded) and ``l2c demo``."""

    def __init__(self, model_dir: str | os.PathLike):
        self.folder, self.model, self.processor = load_trained_llava(model_dir)
        self.model.eval()
        path = self.folder / "l2c_mllm.json"
        self.meta = json.loads(path.read_text()) if path.is_file() else {}

    @property
    def vision_tower(self) -> str:
        """The vision encoder this LLaVA was built on, as recorded at training (else the config's name)."""
        return str(
            self.meta.get("vision_tower") or self.model.config.vision_config._name_or_path or "unknown"
        )

    def answer(self, image: str | os.PathLike | None, question: str, max_new_tokens: int = 64) -> str:
        processor = self.processor
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        if self.meta.get("template") == "plain":
            text = "<image>" if image else ""
        images = None
        if image:
            aspect = self.meta.get("image_aspect_ratio", "pad")
            images = pad_images([load_rgb(image)], processor.image_processor, aspect)[0]
        inputs = processor(images=images, text=text, return_tensors="pt")
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()


def chat(
    model_dir: str | os.PathLike, image: str | os.PathLike | None, question: str, max_new_tokens: int = 64
) -> str:
    """One answer of a transformers-format LLaVA (greedy), the image padded to square like training."""
    return LlavaChat(model_dir).answer(image, question, max_new_tokens)


def chat_session(
    model_dir: str | os.PathLike,
    image: str | os.PathLike | None,
    first: str | None = None,
    max_new_tokens: int = 64,
    lines=None,
    out=None,
) -> int:
    """``l2c mllm chat --interactive``: the model loaded once, then one answer per question line of
    `lines` (stdin); ``/image PATH`` switches the image (``/image`` alone: none), an empty line or the
    end of the input stops. A bad image is reported and the session goes on."""
    lines = sys.stdin if lines is None else lines
    out = sys.stdout if out is None else out
    tty = hasattr(lines, "isatty") and lines.isatty()
    session = LlavaChat(model_dir)
    print(
        f"loaded {session.folder} (vision encoder: {session.vision_tower}); image: {image or 'none'}. "
        "One question per line; /image PATH to change the image; an empty line ends.",
        file=sys.stderr,
    )

    def ask(question: str) -> None:
        try:
            print(session.answer(image, question, max_new_tokens), file=out, flush=True)
        except (ImageError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)

    if first:
        ask(first)
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line or not line.strip():
            return 0
        line = line.strip()
        if line == "/image" or line.startswith("/image "):
            image = line[len("/image") :].strip() or None
            print(f"image: {image or 'none'}", file=sys.stderr)
            continue
        ask(line)
