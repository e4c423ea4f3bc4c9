"""The exports judged by their consumers, each in its own environment (like the llm2vec parity test):
transformers 4.37.2 with the original LLaVA code (llava-torch 1.2.2.post1, its loader
``load_pretrained_model``, ``process_images``, ``tokenizer_image_token``, ``conv_templates``),
transformers 4.44.2, and the project's own 5.x.

Artefacts (built here, in 5.x, from a Vicuna-like tiny Llama: SentencePiece ``tokenizer.model`` only,
RoPE base 100000 with linear scaling 2): the ``l2c export vision`` folder, the original-format LLaVA
export (moved to another folder after export) with its ``vision_tower/``, the LLM2CLIP export
(release layout), the hf export's tokenizer. Per consumer: the vision folders load with no missing
or unexpected keys and give the trained tower's features (1e-5, fp32); the exported tokenizer gives
the training tokenization of a fixed text set; the original-format LLaVA loads through LLaVA's own
loader from another working directory and gives the hf export's logits (1e-3, fp32) and greedy tokens; a release-layout LLM2CLIP
folder written by the older transformers imports (``l2c import llm2clip``) with the same features.

lmms-eval's own ``llava`` model (LLaVA's code, in the 4.37.2 environment, lmms-eval installed
``--no-deps``) on the original-format export against lmms-eval with the project's ``l2c_llava`` on the
transformers export: the same answers and answer log-likelihoods given the same prompt ids (README,
"lmms-eval on both LLaVA exports").

The model's weights are rounded to float16-exact values before export: LLaVA's loader always loads
in float16, and the test casts back to float32, so the comparison is in float32 on the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import ROOT, env_setup
from .tiny_llm import save_tiny_sp_llama
from .tiny_models import tiny_vision

CONSUMERS = ("4.37.2", "4.44.2", "5.x")
# asserted: prompts as the templates build them, captions, questions, digits, unicode, newlines
TEXTS = [
    "a red circle",
    "Two blue squares and a large green star on a beige background.",
    "USER: <image>\nWhat is 123?",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nhow many shapes are there ? ASSISTANT:",
    "USER: <image>\nhow many? ASSISTANT: three red circles</s>USER: and the background? ASSISTANT:",
    "ünïcode ✓ and émoji 🙂, tabs\tand\nnewlines",
    "1 + 2 = 3; 3.14159",
]
# reported, not asserted (known differences between the consumers' own tokenizer code, see
# mllm/README.md): a leading space (SentencePiece itself, i.e. the slow tokenizers, keeps it as an
# extra "▁"; transformers 5 does not), a text that starts with a special token (tokenizers 0.15 puts
# "▁" before the text after it: the plain template's "<image>\n..." in transformers 4.37's fast
# tokenizer), repeated and trailing spaces
EDGE_TEXTS = [" a leading space", "<image>\nDescribe the image.", "two  spaces", "trailing space "]
VISION_KEYS_NOT_IN_TOWER = ("visual_projection.", "text_adapter.", "logit_scale")
QUESTION = "what shapes are there ?"
NEW_TOKENS = 4
HF_IDS = [1, 355, 400, 13, 90, 367, 359, 358]  # BOS, "▁", <image> (one: 4.x expands it), text


def _env_python(version: str) -> str:
    if version == "5.x":
        return sys.executable
    setup = env_setup("setup_compat_env.sh", version)  # (built in the background while the other tests ran)
    assert setup.returncode == 0, setup.stderr[-3000:]
    return setup.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    from PIL import Image

    from l2c_llava.mllm.build import build_llava, save_llava
    from l2c_llava.mllm.export import export_original
    from l2c_llava.stage2.export import export_vision_tower
    from l2c_llava.stage2.llm2clip import LLM2CLIP
    from l2c_llava.stage2.model import LLM2CLIPModel

    root = tmp_path_factory.mktemp("compat")
    save_tiny_sp_llama(root / "llm", rope_theta=100000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    tiny_vision().save_pretrained(root / "vision")
    model, proc = build_llava(root / "vision", SimpleNamespace(name_or_path=str(root / "llm")))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.2)
        for p in model.parameters():  # float16-exact (LLaVA's loader loads in float16)
            p.copy_(p.half().float())
    save_llava(model, proc, root / "hf", {"template": "vicuna_v1", "image_aspect_ratio": "pad"})
    export_original(root / "hf", root / "placed" / "llava-v1.5-tiny")  # used where it was written
    export_original(root / "hf", root / "first-place" / "llava-v1.5-tiny")
    (root / "moved").mkdir()  # exported in one place, moved, re-pointed with the command
    shutil.move(str(root / "first-place" / "llava-v1.5-tiny"), str(root / "moved" / "llava-v1.5-tiny"))
    shutil.copytree(root / "moved" / "llava-v1.5-tiny", root / "stale" / "llava-v1.5-tiny")  # not re-pointed
    shutil.rmtree(root / "first-place")
    from l2c_llava.cli import main

    assert main(["export", "repoint", str(root / "moved" / "llava-v1.5-tiny")]) == 0
    tower = model.model.vision_tower.eval()
    export_vision_tower(tower, root / "vision-export")
    torch.manual_seed(1)
    l2c = LLM2CLIP(LLM2CLIPModel.from_vision_tower(tiny_vision(), 12, projection_dim=16, num_blocks=2))
    l2c.save_pretrained(root / "llm2clip")
    # the demo's LLM (the embedded SmolLM2: byte-level BPE, tokenizer.json written by transformers 5
    # from the GGUF file): its tokenizer as the exports write it
    from transformers import AutoProcessor, AutoTokenizer

    from l2c_llava.embedded import smollm2_gguf_path
    from l2c_llava.mllm.build import prepare_tokenizer
    from l2c_llava.models.llm import local_llm_folder
    from l2c_llava.models.portable import write_portable_tokenizer

    smol_folder = local_llm_folder(str(smollm2_gguf_path()))
    smol = AutoTokenizer.from_pretrained(smol_folder)
    prepare_tokenizer(smol)
    write_portable_tokenizer(smol, root / "smollm2-tokenizer", smol_folder, "llama")
    tokenizers = {
        "original_export": (
            root / "moved" / "llava-v1.5-tiny",
            AutoProcessor.from_pretrained(root / "hf").tokenizer,
        ),
        "smollm2_export": (root / "smollm2-tokenizer", smol),
    }
    Image.new("RGB", (40, 24), (200, 30, 60)).save(root / "image.png")  # not square: "pad" matters
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    save_file({"pixels": pixels, "text": text}, str(root / "inputs.safetensors"))
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_hidden_states=True)
        l2c_out = l2c.model.vision_model(pixel_values=pixels, output_hidden_states=True)
    want = {
        "export_vision": (out.pooler_output, out.hidden_states[-2]),
        "llava_vision_tower": (out.pooler_output, out.hidden_states[-2]),
        "llm2clip_release": (l2c_out.pooler_output, l2c_out.hidden_states[-2]),
    }
    return SimpleNamespace(
        root=root,
        hf=root / "hf",
        original=root / "moved" / "llava-v1.5-tiny",
        want=want,
        model=model.eval(),
        processor=proc,
        pixels=pixels,
        text=text,
        tokenizers=tokenizers,
    )


def _job(a, version: str, out: Path) -> Path:
    job = {
        "pixels": str(a.root / "inputs.safetensors"),
        "vision": {
            "export_vision": str(a.root / "vision-export"),
            "llava_vision_tower": str(a.original / "vision_tower"),
            "llm2clip_release": str(a.root / "llm2clip"),
        },
        "tokenizers": {name: str(folder) for name, (folder, _) in a.tokenizers.items()},
        "texts": TEXTS + EDGE_TEXTS,
        "llava": {
            "folder": str(a.original),
            "placed": str(a.root / "placed" / "llava-v1.5-tiny"),
            "stale": str(a.root / "stale" / "llava-v1.5-tiny"),
            "image": str(a.root / "image.png"),
            "question": QUESTION,
            "max_new_tokens": NEW_TOKENS,
        }
        if version == "4.37.2"
        else None,
        "hf_llava": {"folder": str(a.hf), "ids": HF_IDS} if version != "5.x" else None,
        "llm2clip_release": {
            "out": str(out / "release"),
            "seed": 4,
            "text_dim": 12,
            "projection_dim": 16,
            "num_blocks": 3,
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 8,
            },
        }
        if version != "5.x"
        else None,
    }
    path = out / "job.json"
    path.write_text(json.dumps(job))
    return path


def _hf_logits_and_greedy(a, ids: list[int], pixels: torch.Tensor):
    """The hf export (transformers 5) on the same ids: LLaVA's IMAGE_TOKEN_INDEX (-200) expanded to
    the model's image tokens, the same pixel values."""
    from l2c_llava.mllm.build import image_tokens_of, load_llava

    model = load_llava(a.hf).eval()
    image_id, n = model.config.image_token_id, image_tokens_of(model.config)
    expanded = []
    for i in ids:
        expanded.extend([image_id] * n if i == -200 else [i])
    input_ids = torch.tensor([expanded])
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixels).logits[0]
        gen = model.generate(
            input_ids=input_ids,
            pixel_values=pixels,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
        )
    return logits, gen[0, input_ids.shape[1] :].tolist()


def _training_ids(a, texts, name="original_export"):
    tok = a.tokenizers[name][1]
    return [tok(t).input_ids for t in texts]


@pytest.mark.slow
def test_exports_load_and_agree_in_every_consumer(artefacts, tmp_path):
    from l2c_llava.cli import main
    from l2c_llava.stage2.llm2clip import LLM2CLIP

    a = artefacts
    failures, report = [], {}

    def check(cond, what):
        if not cond:
            failures.append(what)
        return cond

    for version in CONSUMERS:
        py = _env_python(version)
        out = tmp_path / version
        out.mkdir()
        run = subprocess.run(
            [
                py,
                str(ROOT / "tests" / "reference" / "compat_runner.py"),
                str(_job(a, version, out)),
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads((out / "result.json").read_text())
        tensors = load_file(str(out / "tensors.safetensors"))
        check(not result["errors"], f"{version}: runner errors {result['errors']}")
        rep = report[version] = {
            "transformers": result["transformers"],
            "tokenizers": result.get("tokenizers_version"),
        }
        # vision folders: clean load, same features
        for name, (pooler, penult) in a.want.items():
            entry = result["vision"][name]
            if not check(entry.get("loaded"), f"{version} {name}: not loaded: {entry.get('error')}"):
                continue
            info = entry["info"]
            unexpected = [k for k in info["unexpected_keys"] if not k.startswith(VISION_KEYS_NOT_IN_TOWER)]
            clean = not info["missing_keys"] and not unexpected and not info["mismatched_keys"]
            check(clean, f"{version} {name}: loading info {info}")
            diff = max(
                float((tensors[f"vision|{name}|pooler"] - pooler).abs().max()),
                float((tensors[f"vision|{name}|penultimate"] - penult).abs().max()),
            )
            check(diff <= 1e-5, f"{version} {name}: features differ by {diff:.2e}")
            rep[f"vision {name} max diff"] = diff
        # tokenizers: the training tokenization
        for tok_name in a.tokenizers:
            training = _training_ids(a, TEXTS + EDGE_TEXTS, tok_name)
            for kind in ("fast", "slow"):
                entry = result["tokenizers"][f"{tok_name}|{kind}"]
                if not check(entry.get("loaded"), f"{version} {tok_name} {kind}: {entry.get('error')}"):
                    continue
                bad = [TEXTS[i] for i in range(len(TEXTS)) if entry["ids"][i] != training[i]]
                n = len(TEXTS)
                edge = [t for j, t in enumerate(EDGE_TEXTS) if entry["ids"][n + j] != training[n + j]]
                check(not bad, f"{version} {tok_name} {kind} tokenizer ({entry['class']}) differs on {bad}")
                check(entry["len"] == len(a.tokenizers[tok_name][1]), f"{version} {tok_name} {kind}: length")
                rep[f"tokenizer {tok_name} {kind}"] = {
                    "class": entry["class"],
                    "len": entry["len"],
                    "differs_on": bad,
                    "edge_texts_differ": edge,
                }
        # the original LLaVA code
        if version == "4.37.2":
            llava = result.get("llava", {})
            if check(llava.get("loaded"), f"{version}: LLaVA's loader failed"):
                check(
                    llava["len_tokenizer"] == llava["embed_rows"] == a.model.config.text_config.vocab_size,
                    f"tokenizer length {llava['len_tokenizer']} / embeddings {llava['embed_rows']}",
                )
                check(
                    abs(llava["absolute_tower_path_max_diff"]) == 0.0, "absolute mm_vision_tower path differs"
                )
                # loaded from another working directory (the runner's cwd is the test's tmp_path)
                check(
                    llava["mm_vision_tower"] == str(a.original / "vision_tower")
                    and not Path(llava["cwd"]).is_relative_to(a.original),
                    f"re-pointed mm_vision_tower {llava['mm_vision_tower']} (cwd {llava['cwd']})",
                )
                stale = llava.get("stale_error") or ""
                check(
                    "Unknown vision tower" in stale,
                    f"a moved folder not re-pointed should fail in LLaVA's loader, got {stale!r}",
                )
                rep["moved, not re-pointed"] = (
                    stale.split(":")[0] + ": Unknown vision tower" if stale else None
                )
                pixels = tensors["llava|pixels"]
                for key in ("exact", "tokenizer_image_token"):
                    want, greedy = _hf_logits_and_greedy(a, llava[f"ids_{key}"], pixels)
                    got = tensors[f"llava|logits|{key}"]
                    check(got.shape == want.shape, f"logits shape {tuple(got.shape)} != {tuple(want.shape)}")
                    diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
                    check(diff <= 1e-3, f"LLaVA logits ({key} ids) differ by {diff:.2e}")
                    same = llava[f"greedy|{key}"][-NEW_TOKENS:] == greedy
                    check(same, f"greedy tokens ({key} ids): {llava[f'greedy|{key}']} vs {greedy}")
                    rep[f"llava logits max diff ({key} ids)"] = diff
                    rep[f"llava greedy equal ({key} ids)"] = same
                    if key == "exact":  # the export used where it was written, same ids
                        got = tensors["llava|logits|placed"]
                        diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
                        check(diff <= 1e-3, f"LLaVA logits of the never-moved export differ by {diff:.2e}")
                        rep["llava logits max diff (never moved, training ids)"] = diff
                # the token after the image: exact ids are the training ids; tokenizer_image_token adds one
                rep["ids_exact_equal_training"] = (
                    _with_image_id(a, llava["ids_exact"]) == _training_ids(a, [llava["prompt"]])[0]
                )
                check(rep["ids_exact_equal_training"], "README's exact ids differ from the training ids")
                rep["tokenizer_image_token_extra"] = len(llava["ids_tokenizer_image_token"]) - len(
                    llava["ids_exact"]
                )
                rep["pixels_vs_ours"] = float((pixels - _our_pixels(a)).abs().max())
                check(
                    rep["pixels_vs_ours"] <= 1e-5,
                    f"process_images differs from ours by {rep['pixels_vs_ours']}",
                )
        # the transformers-format export through this transformers' own LLaVA class
        if version != "5.x":
            entry = result.get("hf_llava", {})
            if check(entry.get("loaded"), f"{version}: hf export not loaded"):
                info = entry["info"]
                check(not any(info.values()), f"{version} hf export: loading info {info}")
                want = _hf_logits_and_greedy(a, [-200 if i == 400 else i for i in HF_IDS], a.pixels[:1])[0]
                got = tensors["hf_llava|logits"]
                diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
                check(diff <= 1e-3, f"{version} hf export logits differ by {diff:.2e}")
                rep["hf export logits max diff"] = diff
        # a release-layout LLM2CLIP folder written by this transformers, imported here (5.x)
        if version != "5.x":
            imported = out / "imported"
            assert main(["import", "llm2clip", str(out / "release"), "--out", str(imported)]) == 0
            whole = LLM2CLIP.from_pretrained(imported / "llm2clip")
            img = float((whole.get_image_features(a.pixels) - tensors["llm2clip|image"]).abs().max())
            txt = float((whole.get_text_features_from_llm(a.text) - tensors["llm2clip|text"]).abs().max())
            check(
                max(img, txt) <= 1e-5,
                f"{version}: imported LLM2CLIP features differ by {img:.2e} / {txt:.2e}",
            )
            rep["llm2clip import max diff (image, text)"] = (img, txt)
    (tmp_path / "matrix.json").write_text(json.dumps(report, indent=2))
    print("compatibility matrix:\n" + json.dumps(report, indent=2))
    assert not failures, "\n".join(failures)


def _with_image_id(a, ids):
    """LLaVA's ids with IMAGE_TOKEN_INDEX (-200) back to the tokenizer's `<image>` id."""
    return [a.model.config.image_token_id if i == -200 else i for i in ids]


def _our_pixels(a):
    from PIL import Image

    from l2c_llava.data.images import expand2square, mean_colour

    img = expand2square(
        Image.open(a.root / "image.png").convert("RGB"), mean_colour(a.processor.image_processor)
    )
    return a.processor.image_processor(images=img, return_tensors="pt")["pixel_values"]


# -- lmms-eval's own `llava` model (LLaVA's code) on the original export vs lmms-eval with l2c_llava on
# the transformers export -------------------------------------------------------------------------------

PARITY_TASKS = ROOT / "tests" / "reference" / "lmms_parity_task"
# (question, answer scored by the log-likelihood task); each asked about several images
PARITY_QUESTIONS = [
    ("What colour is the shape?", "red"),
    ("How many circles are there?", "two"),
    ("Is there a star in the image?", "yes"),
]
PARITY_IMAGES = [((40, 24), (200, 30, 60)), ((32, 32), (20, 160, 90)), ((24, 48), (240, 240, 40))]


@pytest.fixture(scope="module")
def parity_exports(tmp_path_factory):
    """A tiny Vicuna-like LLaVA whose answers vary from question to question and image to image (every
    matrix redrawn at 0.3; at the default scale it answers everything alike), float16-exact (LLaVA's
    loader loads in float16); its transformers export, its original-format export, and an lmms-eval
    task folder (the questions on non-square and square images, as JSONL)."""
    from PIL import Image, ImageDraw

    from l2c_llava.mllm.build import build_llava, save_llava
    from l2c_llava.mllm.export import export_original

    root = tmp_path_factory.mktemp("lmms-parity")
    save_tiny_sp_llama(root / "llm", rope_theta=100000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    tiny_vision().save_pretrained(root / "vision")
    model, proc = build_llava(root / "vision", SimpleNamespace(name_or_path=str(root / "llm")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            new = torch.randn(p.shape, generator=g) * 0.3 if p.dim() >= 2 else p
            p.copy_(new.half().float())
        # no byte-fallback tokens in the answers (their text is mostly U+FFFD, which would hide
        # differences): their output rows to zero, the other pieces' logits are larger
        tok = proc.tokenizer
        byte_ids = [i for t, i in tok.get_vocab().items() if t.startswith("<0x")]
        model.get_output_embeddings().weight[byte_ids] = 0.0
    save_llava(model, proc, root / "hf", {"template": "vicuna_v1", "image_aspect_ratio": "pad"})
    export_original(root / "hf", root / "llava-v1.5-parity")
    rows = []
    for i, (size, colour) in enumerate(PARITY_IMAGES):
        image = Image.new("RGB", size, colour)
        ImageDraw.Draw(image).ellipse((4, 4, size[0] // 2, size[1] // 2), fill=(10, 10, 200))
        image.save(root / f"image{i}.png")
        for question, answer in PARITY_QUESTIONS:
            rows.append({"image_path": str(root / f"image{i}.png"), "question": question, "answer": answer})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    shutil.copytree(PARITY_TASKS, tasks, ignore=shutil.ignore_patterns("__pycache__"))
    for yaml in tasks.glob("*.yaml"):
        yaml.write_text(yaml.read_text().replace("__DATA_FILE__", str(root / "rows.jsonl")))
    return SimpleNamespace(
        root=root, hf=root / "hf", original=root / "llava-v1.5-parity", tasks=tasks, rows=rows
    )


def _lmms_args(model: str, model_args: str, tasks: Path, out: Path) -> list[str]:
    return [
        "eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        "parity_answer,parity_loglikelihood",
        "--include_path",
        str(tasks),
        "--batch_size",
        "1",
        "--output_path",
        str(out),
        "--log_samples",
    ]


def _lmms_samples(out: Path) -> dict[str, dict[int, object]]:
    """{task: {doc_id: the answer (generation) or the log-likelihood}} from lmms-eval's per-sample logs."""
    got = {}
    for task, key in (("parity_answer", "filtered_resps"), ("parity_loglikelihood", "loglikelihood")):
        (path,) = out.rglob(f"*samples_{task}.jsonl")
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        got[task] = {r["doc_id"]: r[key] for r in rows}
    return got


def _run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout[-3000:] + done.stderr[-6000:]
    # lmms-eval 0.7.3 logs an error in the evaluation and exits 0
    assert done.returncode == 0 and "Error during evaluation" not in done.stderr + done.stdout, log


@pytest.mark.slow
def test_lmms_eval_llava_on_the_original_export_answers_like_l2c_llava(parity_exports, tmp_path):
    """issue 34: lmms-eval's own ``llava`` model (the original LLaVA code, in the 4.37.2 environment) on the
    original-format export, and lmms-eval with the project's ``l2c_llava`` on the transformers export,
    on the same questions (greedy, 6 new tokens) and the same answers' log-likelihoods.

    Three runs of lmms-eval's ``llava``, through ``tests/reference/lmms_llava_runner.py`` (it records
    the prompt ids; see there for its two options): as users run it (float16, LLaVA's
    ``tokenizer_image_token``); float32; float32 with the training's prompt ids. The last one is the
    fair comparison and must agree; the first two are reported (their differences are the float16
    compute and the one extra ``▁`` after the image, which the test checks is the only token
    difference)."""
    p = parity_exports
    py = _env_python("4.37.2")
    l2c_out = tmp_path / "l2c_llava"
    # the project's side: lmms-eval's command line with l2c_llava (--force_simple: the simple class,
    # the one lmms-eval gives loglikelihood requests to), float32
    _run(
        [sys.executable, "-m", "l2c_llava.mllm.lmms_entry"]
        + _lmms_args("l2c_llava", f"pretrained={p.hf},device=cpu,dtype=float32", p.tasks, l2c_out)
        + ["--force_simple"],
        cwd=ROOT,
    )
    ours = _lmms_samples(l2c_out)
    runs = {
        "as_users_run_it": [],
        "float32": ["--float32"],
        "float32_training_ids": ["--float32", "--exact-ids"],
    }
    theirs, records = {}, {}
    for name, flags in runs.items():
        out = tmp_path / name
        record = tmp_path / f"{name}.json"
        model_args = f"pretrained={p.original},conv_template=vicuna_v1,device_map=auto,device=cpu"
        cmd = [py, str(ROOT / "tests" / "reference" / "lmms_llava_runner.py"), str(record), *flags, "--"]
        _run(cmd + _lmms_args("llava", model_args, p.tasks, out), cwd=tmp_path)
        theirs[name], records[name] = _lmms_samples(out), json.loads(record.read_text())
    # the prompts: LLaVA's vicuna_v1 conversation is our chat template's text; the training ids (the
    # whole text through the exported tokenizer) are what l2c_llava feeds; LLaVA's tokenizer_image_token
    # gives the same ids with one "▁" more right after the image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(p.hf)
    image_id, space = processor.tokenizer.convert_tokens_to_ids(["<image>", "▁"])
    ours_text = {
        q: processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q, _ in PARITY_QUESTIONS
    }
    contexts = {
        name: {r["prompt"]: r["ids"] for r in rec["prompts"] if r["prompt"].endswith("ASSISTANT:")}
        for name, rec in records.items()
    }
    for name, ctx in contexts.items():
        assert set(ctx) == set(ours_text.values()), (name, sorted(ctx), ours_text)
    for text, ids in contexts["float32_training_ids"].items():
        training = [-200 if i == image_id else i for i in processor.tokenizer(text).input_ids]
        assert ids == training, (text, ids, training)
        k = ids.index(-200)
        assert contexts["as_users_run_it"][text] == ids[: k + 1] + [space] + ids[k + 1 :], text
        assert contexts["float32"][text] == contexts["as_users_run_it"][text]
    assert records["as_users_run_it"]["dtype_run"] == "torch.float16"
    assert records["float32"]["dtype_run"] == records["float32_training_ids"]["dtype_run"] == "torch.float32"
    # lmms-eval's llava returns the mean cross-entropy of the answer's tokens (a positive number; as
    # llava_hf), l2c_llava their summed log-probability: -mean * count is the sum
    n = len(p.rows)
    report = {}
    for name in runs:
        lengths = _continuation_lengths(records[name])
        answers, lls = theirs[name]["parity_answer"], theirs[name]["parity_loglikelihood"]
        ll_sums = [-lls[i] * lengths[p.rows[i]["answer"]] for i in range(n)]
        report[name] = {
            "answers_equal": sum(answers[i] == ours["parity_answer"][i] for i in range(n)),
            "loglikelihood_max_diff": max(
                abs(ll_sums[i] - ours["parity_loglikelihood"][i]) for i in range(n)
            ),
            "answers": [answers[i] for i in range(n)],
        }
    report["l2c_llava"] = {
        "answers": [ours["parity_answer"][i] for i in range(n)],
        "loglikelihoods": [ours["parity_loglikelihood"][i] for i in range(n)],
    }
    report["float16_vs_float32_answers_equal"] = sum(
        theirs["as_users_run_it"]["parity_answer"][i] == theirs["float32"]["parity_answer"][i]
        for i in range(n)
    )
    (tmp_path / "lmms_parity.json").write_text(json.dumps(report, indent=1))
    print(
        "lmms-eval llava (original export) vs l2c_llava (transformers export):\n"
        + json.dumps(report, indent=1)
    )
    assert len(set(report["l2c_llava"]["answers"])) >= n - 2  # the answers vary: equality means something
    fair = report["float32_training_ids"]
    assert fair["answers_equal"] == n, (fair["answers"], report["l2c_llava"]["answers"])
    # sums of about -20; what remains is lmms-eval llava's float16 pixels (it casts them before the
    # model; --float32 casts back, the rounding stays): the transformers export given the same
    # rounded pixels differs from its float32 self by the same 1.75e-3 on the worst row (measured)
    assert fair["loglikelihood_max_diff"] <= 5e-3, fair


def _continuation_lengths(record: dict) -> dict[str, int]:
    """{answer: its token count} from the prompt pairs of lmms-eval llava's loglikelihood requests
    (the context ending in "ASSISTANT:", then the context with the answer and "</s>")."""
    prompts = record["prompts"]
    lengths = {}
    for a, b in zip(prompts, prompts[1:]):
        if b["prompt"] != a["prompt"] and b["prompt"].startswith(a["prompt"]):
            assert b["ids"][: len(a["ids"])] == a["ids"]
            answer = b["prompt"][len(a["prompt"]) :].strip().removesuffix("</s>")
            lengths[answer] = len(b["ids"]) - len(a["ids"])
    return lengths
