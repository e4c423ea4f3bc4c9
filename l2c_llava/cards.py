"""Model cards: the ``README.md`` every exported folder carries (Hugging Face card metadata in a YAML
front matter, then what the model is, what it was made from, how it was trained, the numbers this
toolkit measured, and how to load it with stock transformers and with the original LLaVA code).

Everything in a card is read from the run folder the export came from (``config.yaml``,
``metrics.json``, ``train_stats.json``, ``vqa_metrics.json``, ``versions.json``): a card never states
a number the run did not write. Cards are written inside the export's temporary folder, so they are
part of the published output (listed in its marker) like every other file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from l2c_llava.embedded import EMBEDDED_LLM
from l2c_llava.models.reference import is_hub_id

CARD = "README.md"

# kind -> (pipeline tag, what it is in one line)
KINDS = {
    "vision": (
        "image-feature-extraction",
        "the LLM2CLIP-upgraded CLIP vision encoder, as a transformers "
        "`CLIPVisionModel` folder (image processor included)",
    ),
    "vision-open_clip": (
        "image-feature-extraction",
        "the LLM2CLIP-upgraded CLIP vision encoder as an open_clip model folder "
        "(`open_clip_config.json` with its preprocessing, `open_clip_model.safetensors`)",
    ),
    "vision-timm": (
        "image-feature-extraction",
        "the LLM2CLIP-upgraded CLIP vision encoder as a timm model folder "
        "(`config.json` with architecture, model_args and preprocessing, `model.safetensors`)",
    ),
    "llm2clip": (
        "zero-shot-image-classification",
        "the whole LLM2CLIP model: CLIP vision tower and projection "
        "trained against a caption-contrastive LLM, with the adapter that maps the LLM's caption "
        "features into the shared space",
    ),
    "llava": (
        "image-text-to-text",
        "a LLaVA-1.5 model (transformers `LlavaForConditionalGeneration` format)",
    ),
    "llava-original": (
        "image-text-to-text",
        "a LLaVA-1.5 model in the original LLaVA layout (haotian-liu/LLaVA, `LlavaLlamaForCausalLM`)",
    ),
}


@dataclass
class RunFacts:
    """What a card says about the run an export came from (every field may be empty)."""

    run_dir: Path | None = None
    recipe: str | None = None
    config: dict = field(default_factory=dict)
    base_models: list[tuple[str, str]] = field(default_factory=list)  # (role, name or path)
    datasets: list[tuple[str, str]] = field(default_factory=list)  # (role, path or Hub id)
    metrics: dict = field(default_factory=dict)  # file name -> its JSON
    versions: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def find_run_dir(source: str | os.PathLike) -> Path | None:
    """The run folder behind `source`: the folder itself when it holds ``config.yaml``, its parent
    when `source` is the run's ``model/`` folder; None otherwise (an export of an export, a release)."""
    p = Path(source)
    for cand in (p, p.parent):
        if (cand / "config.yaml").is_file() and (_read_yaml(cand / "config.yaml")).get("recipe"):
            return cand
    return None


def _stage1_base(encoder_path: str) -> str | None:
    """The LLM a stage-1 encoder was tuned from, when its run folder is beside it."""
    run = Path(encoder_path).parent
    cfg = _read_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
    return ((cfg.get("model") or {}).get("name_or_path")) if cfg.get("recipe") == "stage1" else None


def run_facts(source: str | os.PathLike | None) -> RunFacts:
    """Base models, datasets, config, metrics and versions of the run behind `source`."""
    run = find_run_dir(source) if source is not None else None
    if run is None:
        return RunFacts()
    cfg = _read_yaml(run / "config.yaml")
    facts = RunFacts(
        run_dir=run, recipe=cfg.get("recipe"), config=cfg, versions=_read_json(run / "versions.json")
    )
    if facts.recipe == "stage2":
        te = (cfg.get("text_encoder") or {}).get("path")
        facts.base_models.append(
            ("CLIP (vision tower fine-tuned)", str((cfg.get("vision") or {}).get("name_or_path")))
        )
        if te:
            facts.base_models.append(("caption encoder (stage-1 LLM, frozen)", str(te)))
            llm = _stage1_base(str(te))
            if llm:
                facts.base_models.append(("LLM the caption encoder was tuned from", str(llm)))
                s1 = _read_json(Path(te).parent / "metrics.json")
                if s1:
                    facts.metrics["stage1 metrics.json"] = s1
        d = cfg.get("data") or {}
        facts.datasets += [
            (k, str(d[k])) for k in ("train", "eval_short", "eval_long", "eval_long_hard") if d.get(k)
        ]
    elif facts.recipe == "mllm":
        m = cfg.get("model") or {}
        facts.base_models.append(("vision tower", str(m.get("vision_tower"))))
        facts.base_models.append(("LLM", str((m.get("llm") or {}).get("name_or_path"))))
        if m.get("init_from"):
            facts.base_models.append(("initialised from (pretrain run)", str(m["init_from"])))
        d = cfg.get("data") or {}
        if d.get("path"):
            facts.datasets.append((f"{(cfg.get('train') or {}).get('stage', 'train')} data", str(d["path"])))
    elif facts.recipe in ("stage1", "clip"):
        m = cfg.get("model") or {}
        if m.get("name_or_path"):
            facts.base_models.append(("base model", str(m["name_or_path"])))
        d = cfg.get("data") or {}
        facts.datasets += [(k, str(d[k])) for k in ("train", "eval") if d.get(k)]
    for name in ("metrics.json", "train_stats.json", "vqa_metrics.json", "model/vqa_metrics.json"):
        if (run / name).is_file():
            facts.metrics[name] = _read_json(run / name)
    return facts


def _hub_ids(names: list[str]) -> list[str]:
    """The names the Hub's card metadata accepts (``org/name``); local paths stay in the text only."""
    out = []
    for n in names:
        if n == EMBEDDED_LLM:
            n = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded GGUF is this model's weights
        n = n.split("@", 1)[0]
        if is_hub_id(n) and n not in out:
            out.append(n)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _metrics_section(facts: RunFacts) -> str:
    lines: list[str] = []
    m = facts.metrics.get("metrics.json") or {}
    if facts.recipe == "stage2" and m.get("llm2clip"):
        sizes = "; ".join(
            f"{n}: {v.get('images')} images, {v.get('captions')} captions"
            for n, v in (m.get("sets") or {}).items()
        )
        lines += [
            f"Retrieval on the run's held-out sets (`l2c stage2 eval`; {sizes}); recall in [0, 1], "
            "with its 95% bootstrap interval over images:",
            "",
            "| set | direction | metric | baseline CLIP | LLM2CLIP |",
            "|---|---|---|---|---|",
        ]
        ci = m.get("intervals") or {}

        def cell(enc: str, name: str, key: str, value) -> str:
            lo_hi = ((ci.get(enc) or {}).get(name) or {}).get(key)
            return _fmt(value) + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "")

        for name, res in m["llm2clip"].items():
            base = (m.get("baseline") or {}).get(name, {})
            for key, val in res.items():
                if isinstance(val, (int, float)) and "@" in key:
                    direction, _, metric = key.rpartition("_")
                    b = cell("baseline", name, key, base[key]) if key in base else "-"
                    lines.append(
                        f"| {name} | {direction or '-'} | {metric} | {b} | {cell('llm2clip', name, key, val)} |"
                    )
        lines.append("")
    elif facts.recipe == "stage1" or facts.metrics.get("stage1 metrics.json"):
        s1 = m if facts.recipe == "stage1" else facts.metrics["stage1 metrics.json"]
        rows = [(k, s1[k]) for k in sorted(s1) if not isinstance(s1[k], dict) and s1[k] is not None]
        if rows:
            lines += [
                "Stage 1 (caption encoder) caption retrieval, before and after tuning:",
                "",
                "| metric | value |",
                "|---|---|",
                *[f"| {k} | {_fmt(v)} |" for k, v in rows],
                "",
            ]
    for name in ("vqa_metrics.json", "model/vqa_metrics.json"):
        v = facts.metrics.get(name)
        if v:
            rows = [
                (k, x) for k, x in v.items() if isinstance(x, (int, float, str)) and not isinstance(x, bool)
            ]
            lines += [
                f"Short-answer VQA (`l2c mllm eval-vqa`, {name}):",
                "",
                "| metric | value |",
                "|---|---|",
                *[f"| {k} | {_fmt(x)} |" for k, x in rows],
                "",
            ]
    st = facts.metrics.get("train_stats.json")
    if st:
        rows = [(k, x) for k, x in st.items() if isinstance(x, (int, float)) and not isinstance(x, bool)]
        lines += [
            "Training (`train_stats.json`):",
            "",
            "| stat | value |",
            "|---|---|",
            *[f"| {k} | {_fmt(x)} |" for k, x in rows],
            "",
        ]
    if not lines:
        return "No metrics: the run folder this export came from holds none (evaluate it with the commands in its recipe README).\n"
    return "\n".join(lines)


# kind -> the consumers whose own loaders the project's tests run on this kind of export
# (tests/test_compat_matrix.py, tests/test_vision_consumers.py) and what they compare
TESTED_WITH = {
    "vision": "transformers 4.37.2, 4.44.2 and 5.x (`CLIPVisionModel.from_pretrained`: no missing or "
    "unexpected keys, the trained tower's features within 1e-5); the original LLaVA code "
    "(llava-torch 1.2.2.post1) as the tower of an original-format LLaVA export",
    "vision-open_clip": "open_clip 3.3.0 (`create_model_from_pretrained('local-dir:...')`: its own loader "
    "and preprocessing; pooled, projected and penultimate-layer features equal to the transformers "
    "`CLIPVisionModel` export within 1e-4 on the same pixels; its preprocessing of non-square images "
    "equal to the transformers image processor's)",
    "vision-timm": "timm 1.0.31 (`create_model('local-dir:...', pretrained=True)` and its "
    "`resolve_data_config` / `create_transform`: pooled, head and penultimate-layer features equal to the "
    "transformers `CLIPVisionModel` export within 1e-4 on the same pixels; its preprocessing of "
    "non-square images equal to the transformers image processor's)",
    "llm2clip": "l2c-llava (`LLM2CLIP.from_pretrained`); its vision part as a `CLIPVisionModel` in "
    "transformers 4.37.2, 4.44.2 and 5.x",
    "llava": "transformers 4.37.2, 4.44.2 and 5.x (`LlavaForConditionalGeneration.from_pretrained`: the "
    "same logits within 1e-3); lmms-eval's `llava_hf` and the project's `l2c_llava` lmms-eval model",
    "llava-original": "the original LLaVA code (llava-torch 1.2.2.post1, transformers 4.37.2): "
    "`load_pretrained_model` from another working directory, and after the folder was moved and "
    "re-pointed (`l2c export repoint`), the transformers export's logits within 1e-3 and its greedy tokens",
}


def _load_section(kind: str, name: str) -> str:
    return f"Tested with: {TESTED_WITH[kind]}.\n\n" + _loading_lines(kind, name)


def _loading_lines(kind: str, name: str) -> str:
    if kind == "vision":
        return f"""```python
from transformers import CLIPImageProcessor, CLIPVisionModel
model = CLIPVisionModel.from_pretrained("{name}")
processor = CLIPImageProcessor.from_pretrained("{name}")
features = model(**processor(images=image, return_tensors="pt")).pooler_output
```

As the vision tower of a LLaVA-1.5 build: `l2c mllm build --vision {name} --llm LLM --out OUT`; with the
original LLaVA code: `--vision_tower /absolute/path/to/{name}` in its training scripts
(`CLIPVisionTower` loads a `CLIPVisionModel` folder; its `build_vision_tower` takes an existing path,
or a Hub id starting with `openai` or `laion`). For open_clip or timm code bases:
`l2c export vision --run RUN --format open_clip|timm`."""
    if kind == "vision-open_clip":
        return f"""```python
import open_clip
model, preprocess = open_clip.create_model_from_pretrained("local-dir:/path/to/{name}")
model.eval()
pixels = preprocess(image).unsqueeze(0)
image_features = model.encode_image(pixels)        # LLM2CLIP's image embedding (its projection)
model.visual.output_tokens = True                  # OpenFlamingo-style: the patch tokens too
pooled, tokens = model.visual(pixels)              # tokens: [B, N, D] after ln_post
penultimate = model.visual.forward_intermediates(pixels, indices=2, intermediates_only=True,
                                                 output_fmt="NLC")["image_intermediates"][0]  # LLaVA's layer
```

Preprocessing (`open_clip_config.json`, `preprocess_cfg`): the shortest side resized to the tower's
size (bicubic), centre crop, OpenAI CLIP mean / std, as the encoder was trained and evaluated. The
text side of LLM2CLIP is an LLM with an adapter (`l2c export llm2clip`): open_clip's loader needs a
text tower, so this folder carries an empty one (every weight zero; `encode_text` returns zeros)."""
    if kind == "vision-timm":
        return f"""```python
import timm
model = timm.create_model("local-dir:/path/to/{name}", pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**config)
pixels = transform(image).unsqueeze(0)
pooled = model.forward_head(model.forward_features(pixels), pre_logits=True)  # class token after the final norm
image_features = model(pixels)      # LLM2CLIP's image embedding (head = its projection; num_classes=0 drops it)
penultimate = model.get_intermediate_layers(pixels, n=[len(model.blocks) - 2])[0]  # prismatic / LLaVA's layer (patch tokens)
```

`config.json` names the architecture (a timm CLIP ViT: pre-norm, class token, QuickGELU where OpenAI
CLIP has it) with `model_args` giving the exact shape, and the preprocessing (`pretrained_cfg`: the
shortest side resized to the tower's size, bicubic, `crop_pct` 1.0 centre crop, OpenAI CLIP mean / std)."""
    if kind == "llm2clip":
        return f"""```python
from l2c_llava.stage2.llm2clip import LLM2CLIP
model = LLM2CLIP.from_pretrained("{name}")   # text side: the caption encoder recorded in config.json
image_features = model.get_image_features(pixel_values)
text_features = model.get_text_features(["a red circle"])
```

The vision part alone loads with stock transformers after `l2c export vision --run {name} --out VISION`
(`CLIPVisionModel.from_pretrained(VISION)`)."""
    if kind == "llava":
        return f"""```python
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained("{name}")
processor = AutoProcessor.from_pretrained("{name}")
prompt = processor.apply_chat_template([{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}], add_generation_prompt=True)
out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=64)
```

Pad the image to a square with the processor's mean colour first (`image_aspect_ratio: pad`, as in
training), or use `l2c mllm chat --model {name} --image IMG "question"`. For the original LLaVA code,
write its layout with `l2c export llava --model {name} --format original --out llava-...`."""
    return """See "Loading it" below: `load_pretrained_model` of the original LLaVA code, from any
working directory (`mm_vision_tower` is an absolute path or a Hub id; `l2c export repoint` after the
folder moves), and `python -m llava.eval.run_llava --conv-mode vicuna_v1`.
Stock transformers loads the transformers-format export (`l2c export llava --format hf`) with
`LlavaForConditionalGeneration.from_pretrained`."""


def model_card(
    kind: str, name: str, source: str | os.PathLike | None = None, body: str = "", metrics: dict | None = None
) -> str:
    """The card (``README.md`` text) of an export of `kind` (vision, llm2clip, llava, llava-original)
    named `name`, made from `source` (a run folder, its model/ folder, or another export); `metrics`
    (file name -> JSON) adds numbers not yet written to the run folder (a recipe's own final save)."""
    tag, what = KINDS[kind]
    facts = run_facts(source)
    facts.metrics.update(metrics or {})
    if facts.run_dir is None and source is not None:  # an export of an export, or a release
        facts.base_models.append(("exported from", str(source)))
    library = {"llm2clip": "l2c-llava", "vision-open_clip": "open_clip", "vision-timm": "timm"}
    front = {
        "library_name": library.get(kind, "transformers"),
        "pipeline_tag": tag,
        "tags": [
            "l2c-llava",
            "llm2clip",
            *(["llava", "llava-1.5"] if kind.startswith("llava") else ["clip"]),
        ],
    }
    base = _hub_ids([n for _, n in facts.base_models])
    if base:
        front["base_model"] = base
    data = _hub_ids([n for _, n in facts.datasets])
    if data:
        front["datasets"] = data
    if facts.versions.get("transformers"):
        front["l2c_llava"] = {
            k: facts.versions[k]
            for k in ("l2c-llava", "transformers", "torch", "git_commit")
            if k in facts.versions
        }
    parts = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"This folder holds {what}. Written by l2c-llava (`l2c export` / the recipe that "
        "trained it) from the run recorded below.",
        "",
    ]
    parts += ["## Base models", ""]
    parts += [f"- {role}: `{n}`" for role, n in facts.base_models] or [
        "- not recorded (not exported from a run folder)"
    ]
    parts += ["", "## Datasets", ""]
    parts += [f"- {role}: `{n}`" for role, n in facts.datasets] or ["- not recorded"]
    parts += ["", "## Training recipe", ""]
    if facts.config:
        parts += [
            f"Recipe `{facts.recipe}`, run folder `{facts.run_dir}`. The resolved config it ran under:",
            "",
            "```yaml",
            yaml.safe_dump(
                {
                    k: facts.config[k]
                    for k in ("recipe", "model", "vision", "adapter", "text_encoder", "train", "data")
                    if k in facts.config
                },
                sort_keys=False,
            ).strip(),
            "```",
            "",
        ]
    else:
        parts += ["Not recorded: the source was not a run folder.", ""]
    parts += [
        "## Metrics (measured by l2c-llava)",
        "",
        _metrics_section(facts),
        "## How to load",
        "",
        _load_section(kind, name),
        "",
    ]
    if body:
        parts += [body.strip(), ""]
    return "\n".join(parts)


def write_card(
    folder: str | os.PathLike,
    kind: str,
    source: str | os.PathLike | None = None,
    name: str | None = None,
    body: str = "",
) -> Path:
    """Write the card into `folder` (an export being built); `name` defaults to the folder's name."""
    out = Path(folder) / CARD
    out.write_text(model_card(kind, name or Path(folder).name, source, body), encoding="utf-8")
    return out


def read_card(folder: str | os.PathLike) -> tuple[dict, str]:
    """(metadata, text) of a folder's card: the YAML front matter and the Markdown after it."""
    text = (Path(folder) / CARD).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}, text
    head, _, rest = text[4:].partition("\n---\n")
    return yaml.safe_load(head) or {}, rest
