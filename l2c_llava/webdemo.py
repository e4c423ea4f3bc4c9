"""``l2c demo``: a web page (Gradio) to put the two encoders side by side.

- **Ask**: one image (uploaded, or picked from the image folder) and one question; each LLaVA (the
  baseline CLIP's and LLM2CLIP's) answers it, greedy, under the name of its vision encoder.
- **Search**: one text; the top images of the image folder for each encoder (CLIP and LLM2CLIP), side
  by side. The indexes are built on the first search (``l2c search index`` under the hood, kept in
  ``<run>/demo_search/`` and updated for new or changed files only).

Defaults read the demo run folder (``l2c pipeline --config demo``: ``runs/demo``): the LLaVAs of
``mllm/baseline/finetune`` and ``mllm/llm2clip/finetune``, the encoders ``export/llm2clip`` and the
baseline CLIP (``clip/model`` when the run trained one, else the tower the baseline LLaVA was built
on), the images of ``data/images``. Gradio is imported here only: ``pip install gradio``.
The models are loaded once, when the page starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from l2c_llava import layout as L
from l2c_llava.errors import L2CError
from l2c_llava.mllm.chat import LlavaChat
from l2c_llava.models.reference import resolve_vision_path
from l2c_llava.search import Encoder, SearchIndex, build_index, list_images, run_queries


class DemoError(L2CError, ValueError):
    pass


@dataclass
class DemoSetup:
    llavas: dict[str, str] = field(default_factory=dict)  # label -> LLaVA folder (run or model folder)
    encoders: dict[str, str] = field(default_factory=dict)  # label -> CLIP / LLM2CLIP folder
    images: str | None = None  # the image folder (picks and search)
    index_dir: str | None = None  # where the search indexes are kept


def _baseline_clip(run: L.PipelineRun) -> str | None:
    """The baseline CLIP of a demo run: the one it trained, else the tower its baseline LLaVA used."""
    if (run.clip_model / "config.json").is_file():
        return str(run.clip_model)
    import yaml

    cfg_path = run.llava("baseline", "finetune") / "config.yaml"
    if cfg_path.is_file():
        tower = ((yaml.safe_load(cfg_path.read_text()) or {}).get("model") or {}).get("vision_tower")
        if tower:
            try:
                return resolve_vision_path(str(tower))
            except (L2CError, ValueError, OSError):  # a Hub id not in the cache, ...: no baseline search
                return None
    return None


def default_setup(run_dir: str | os.PathLike = "runs/demo") -> DemoSetup:
    """What ``l2c demo`` shows of a pipeline run folder (what is missing is left out)."""
    run = L.PipelineRun(Path(run_dir))
    setup = DemoSetup(index_dir=str(run.demo_search))
    for enc, label in (("baseline", "baseline CLIP"), ("llm2clip", "LLM2CLIP")):
        folder = run.llava(enc, "finetune")
        if (folder / "model" / "config.json").is_file():
            setup.llavas[f"LLaVA on {label}"] = str(folder)
    base = _baseline_clip(run)
    if base:
        setup.encoders["baseline CLIP"] = base
    if (run.export("llm2clip") / "config.json").is_file():
        setup.encoders["LLM2CLIP"] = str(run.export("llm2clip"))
    if (run.data / L.IMAGES).is_dir():
        setup.images = str(run.data / L.IMAGES)
    return setup


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise DemoError("the web demo needs Gradio: pip install gradio (or pip install -e .[demo])") from None
    return gr


class DemoBackend:
    """The models behind the page, loaded once: answers and search hits, without any Gradio."""

    def __init__(self, setup: DemoSetup, max_new_tokens: int = 64):
        if not setup.llavas and not setup.encoders:
            raise DemoError(
                "nothing to show: no LLaVA and no encoder (run `l2c pipeline --config demo`, or give "
                "--llava NAME=DIR / --encoder NAME=DIR)"
            )
        self.setup, self.max_new_tokens = setup, max_new_tokens
        self.chats = {name: LlavaChat(folder) for name, folder in setup.llavas.items()}
        self._encoders: dict = {}
        self._indexes: dict = {}

    def picks(self, n: int = 8) -> list[str]:
        """A few images of the folder to pick from."""
        if not self.setup.images:
            return []
        root = Path(self.setup.images)
        return [str(root / p) for p in list_images(root)[:n]]

    def titles(self) -> list[str]:
        """Each LLaVA's panel title: its name and the vision encoder it was built on."""
        return [f"{name} (vision encoder: {chat.vision_tower})" for name, chat in self.chats.items()]

    def ask(self, image: str | None, question: str, max_new_tokens: int | None = None) -> list[str]:
        if not (question or "").strip():
            return ["(ask a question)"] * len(self.chats)
        n = int(max_new_tokens or self.max_new_tokens)
        return [chat.answer(image, question, n) for chat in self.chats.values()]

    def _encoder(self, name: str):
        if name not in self._encoders:
            self._encoders[name] = Encoder(self.setup.encoders[name])
        return self._encoders[name]

    def _index(self, name: str):
        if name not in self._indexes:
            if not self.setup.images:
                raise DemoError("no image folder to search: give --images DIR")
            slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower())
            out = Path(self.setup.index_dir or ".") / f"index-{slug}"
            build_index(self.setup.images, self._encoder(name), out)  # new or changed files only
            self._indexes[name] = SearchIndex(out)
        return self._indexes[name]

    def search(self, text: str, k: int = 6) -> list[list[tuple[str, str]]]:
        """Per encoder: [(image path, caption "rank. file (score)")] of the top `k` for `text`."""
        out = []
        for name in self.setup.encoders:
            if not (text or "").strip():
                out.append([])
                continue
            index = self._index(name)
            hits = run_queries(index, self._encoder(name), [text], [], k=int(k))[0]["hits"]
            out.append(
                [(str(index.image_root / h.path), f"{h.rank}. {h.path} ({h.score:.3f})") for h in hits]
            )
        return out


def build_demo(backend: DemoBackend):
    """The Gradio page over `backend`."""
    gr = _gradio()
    with gr.Blocks(title="l2c-llava: baseline CLIP vs LLM2CLIP") as page:
        gr.Markdown(
            "# Baseline CLIP vs LLM2CLIP\nThe same image and question to both LLaVAs; the same text to "
            "both encoders."
        )
        if backend.chats:
            with gr.Tab("Ask"):
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(
                            type="filepath",
                            format="png",
                            label="image (upload, or pick one below)",
                            elem_id="image",
                        )  # png: lossless, the pixels as picked
                        picks = backend.picks()
                        if picks:
                            gr.Examples(examples=[[p] for p in picks], inputs=[image], label="pick an image")
                    with gr.Column():
                        question = gr.Textbox(
                            label="question", value="What is in the image?", elem_id="question"
                        )
                        tokens = gr.Slider(
                            1, 256, value=backend.max_new_tokens, step=1, label="max new tokens"
                        )
                        ask = gr.Button("Ask both", variant="primary", elem_id="ask")
                with gr.Row():
                    answers = [
                        gr.Textbox(label=title, interactive=False, elem_id=f"answer-{i}")
                        for i, title in enumerate(backend.titles())
                    ]
                ask.click(backend.ask, inputs=[image, question, tokens], outputs=answers)
                question.submit(backend.ask, inputs=[image, question, tokens], outputs=answers)
        if backend.setup.encoders and backend.setup.images:
            with gr.Tab("Search"):
                with gr.Row():
                    text = gr.Textbox(label="text query", value="a red circle", elem_id="query")
                    k = gr.Slider(1, 24, value=6, step=1, label="images per encoder")
                    go = gr.Button("Search both", variant="primary", elem_id="search")
                with gr.Row():
                    galleries = [
                        gr.Gallery(label=f"{name}: {folder}", columns=3, elem_id=f"hits-{i}")
                        for i, (name, folder) in enumerate(backend.setup.encoders.items())
                    ]
                go.click(backend.search, inputs=[text, k], outputs=galleries)
    return page


def serve(backend: DemoBackend, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Start the page; returns (page, url). `block=False` returns at once (tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    page = build_demo(backend)
    allowed = [p for p in (backend.setup.images,) if p]
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        allowed_paths=allowed,
        quiet=not block,
    )
    return page, page.local_url


def command(args) -> int:
    """``l2c demo``: the run's models (or --llava / --encoder / --images), served until Ctrl-C."""
    import sys

    setup = default_setup(args.run)

    def named(items: list[str]) -> dict[str, str]:  # NAME=DIR, or DIR named by its folder
        return dict(item.split("=", 1) if "=" in item else (Path(item).name, item) for item in items)

    if args.llava:
        setup.llavas = named(args.llava)
    if args.encoder:
        setup.encoders = named(args.encoder)
    if args.images:
        setup.images = args.images
    try:
        backend = DemoBackend(setup, max_new_tokens=args.max_new_tokens)
    except (DemoError, FileNotFoundError) as e:
        print(f"l2c demo: {e}", file=sys.stderr)
        return 2
    print(
        f"l2c demo: {', '.join(backend.chats) or 'no LLaVA'}; search: {', '.join(setup.encoders) or 'none'} "
        f"over {setup.images}; serving on http://{args.host}:{args.port or 7860} (Ctrl-C stops)"
    )
    serve(backend, host=args.host, port=args.port, block=True)
    return 0
