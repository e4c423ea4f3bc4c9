"""The ``l2c`` command: a table of commands (:data:`COMMANDS`), each a path, its options, the recipe of
the config it reads (if any) and an entry of a few lines that calls the library and prints.

- One override syntax: every command that reads a config takes bare ``KEY=VALUE`` words and
  ``--set KEY=VALUE`` (``l2c validate`` too); the config is loaded and validated before the entry runs.
- One error contract: a failure the user can fix is an :class:`~l2c_llava.errors.L2CError`, caught once
  in :func:`main` and printed with its exit code (2, bad input); anything else is a bug and keeps its
  traceback.
- No stage logic here: what a command does lives in the library or the recipe it names.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from l2c_llava import layout
from l2c_llava.cli_help import document, version
from l2c_llava.config import ConfigError, dump_config, load_config
from l2c_llava.config_names import config_name, project_root, resolve_config, run_root, shipped_configs
from l2c_llava.errors import EXIT_BAD_INPUT, InputError, L2CError
from l2c_llava.hub_push import add_push_arguments, push_if_asked
from l2c_llava.io import atomic_write_json, atomic_write_text

# -- entries: each reads args (and args.cfg, the loaded config), calls the library, prints --------------


def _json(obj) -> int:
    print(json.dumps(obj, indent=2))
    return 0


def _cmd_ls(args) -> int:
    root = project_root()
    configs = shipped_configs(root)
    if not configs:
        print(f"no shipped configs found under {root} (set L2C_ROOT to the checkout)", file=sys.stderr)
        return 1
    names = [config_name(c, root) for c in configs]  # usable from any folder: l2c stage1 --config quick
    width = max(map(len, names))
    for name, c in zip(names, configs):
        print(f"{name:<{width}}  {c.summary}" + (f"\n{'':<{width}}  {c.path}" if args.paths else ""))
    return 0


def _cmd_validate(args) -> int:
    status = 0
    for path in args.configs:
        try:
            cfg = load_config(path, args.overrides)
        except ConfigError as e:  # every config is checked, each failure listed
            print(str(e), file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        print(f"OK  {path}  (recipe {cfg.recipe})", file=sys.stderr)
        if args.print:
            sys.stdout.write(dump_config(cfg))
    return status


def _cmd_synth(args) -> int:
    from l2c_llava.data.synthetic import SynthOptions, generate

    opts = SynthOptions(
        images=args.images,
        seed=args.seed,
        size=args.size,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        max_objects=args.max_objects,
        jpeg_quality=args.jpeg_quality,
    )
    m = generate(args.out, opts, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    if m.get("skipped"):
        print(f"{args.out}: already holds this dataset (same options and generator version); nothing to do")
    else:
        print(
            f"wrote {args.images} images and their captions, questions and splits to {args.out} in {m['seconds']} s"
        )
    return _json(m["stats"])


def _cmd_check(args) -> int:
    from l2c_llava.data.readers import check_file

    good, bad, total, warnings = check_file(
        args.file, args.format, args.image_root, args.split, args.image_check
    )
    for p in bad:
        print(f"BAD  {p}")
    for w in warnings:
        print(f"WARNING  {w}", file=sys.stderr)
    print(f"{args.file}: {good} good, {len(bad)} bad of {total}", file=sys.stderr)
    return EXIT_BAD_INPUT if bad else 0


def _cmd_filter(args) -> int:
    from l2c_llava.data.filter import filter_captions
    from l2c_llava.io import check_output_file
    from l2c_llava.search import Encoder

    threshold = None if args.threshold == "auto" else float(args.threshold)
    check_output_file(args.out)  # before the model loads and the rows are scored
    encoder = Encoder(args.model, text_encoder=args.text_encoder, batch_size=args.batch_size)
    r = filter_captions(
        args.file,
        args.image_root,
        encoder,
        args.out,
        fmt=args.format,
        fields=tuple(args.fields.split(",")),
        threshold=threshold,
        null_quantile=args.null_quantile,
        mode=args.mode,
        on_bad_row=args.on_bad_row,
        score_kind=args.score,
        drop_share=args.drop_share,
    )
    for w in r.get("warnings", []):
        print(f"WARNING  {w}", file=sys.stderr)
    th = ", ".join(f"{f} {v:.4f}" for f, v in r["threshold"].items())
    print(
        f"{args.out}: {r['rows']} rows, {r['flagged']} under the threshold ({th}; {r['threshold_from']}), "
        f"{r['kept']} written; report {args.out}.report.md, plot {args.out}.scores.png"
    )
    return 0


def _training(run: Callable[[], Callable]) -> Callable:
    """The entry of a training command: `run()` gives the recipe's run function (imported when used)."""
    return lambda args: _json(run()(args.cfg, source=args.config, overrides=tuple(args.overrides)))


def _stage1_run():
    from l2c_llava.stage1.train import run_stage1

    return lambda cfg, **kw: {k: v for k, v in run_stage1(cfg, **kw).items() if not isinstance(v, dict)}


def _stage2_run():
    from l2c_llava.stage2.train import run_stage2

    return run_stage2


def _clip_run():
    from l2c_llava.stage2.clip_baseline import run_clip_pretrain

    return run_clip_pretrain


def _mllm_run():
    from l2c_llava.mllm.train import run_mllm

    return run_mllm


def _cmd_stage1_eval(args) -> int:
    from l2c_llava.stage1.train import evaluate_encoder

    result = evaluate_encoder(args.cfg, encoder=args.encoder, base=args.base, causal=args.causal)
    print(json.dumps(result, indent=2))
    if args.out:
        atomic_write_json(args.out, result)
    return 0


def _cmd_stage2_cache(args) -> int:
    from l2c_llava.stage2.cache import cache_text_features

    warn = lambda msg: print(f"l2c stage2 cache: {msg}", file=sys.stderr)  # noqa: E731
    return _json(cache_text_features(args.cfg, overwrite=args.overwrite, warn=warn))


def _cmd_stage2_eval(args) -> int:
    from l2c_llava.stage2.evaluate import evaluate, table

    results = evaluate(args.cfg, model_dir=args.model, baseline=args.baseline, skip_baseline=args.no_baseline)
    print(table(results, tuple(args.cfg.eval.recall_at)))
    out = Path(args.cfg.run.output_dir)
    print(f"written: {out / 'metrics.json'}, {out / 'retrieval.md'}")
    return 0


def _cmd_clip_eval(args) -> int:
    from l2c_llava.stage2.evaluate import evaluate_clip_folder
    from l2c_llava.stage2.health import encoder_health, health_summary

    res = evaluate_clip_folder(args.model, args.data, split=args.split, max_images=args.max_images)
    if not args.no_health:
        res["health"] = encoder_health(
            args.model, args.data, train_scenes=args.probe_train, test_scenes=args.max_images or 500
        )
    for name, r in res["sets"].items():
        figs = ", ".join(
            f"{m} {v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
            for m, v in r.items()
            if isinstance(v, dict) and m.endswith("@1")
        )
        print(f"{name} ({r['images']} images, {r['captions']} captions): {figs}")
    if "health" in res:
        print(f"health: {health_summary(res['health'])}")
    return _write(args.out, res)


def _write(out: str | None, obj) -> int:
    if out:
        atomic_write_json(out, obj)
        print(f"written: {out}")
    return 0


def _cmd_health(args) -> int:
    from l2c_llava.stage2.health import encoder_health, health_summary

    res = {}
    for spec in args.tower:
        name, _, path = spec.rpartition("=")
        res[name or path] = encoder_health(
            path, args.data, train_scenes=args.probe_train, test_scenes=args.test, probe_steps=args.steps
        )
        print(f"{name or path}: {health_summary(res[name or path])}")
    return _write(args.out, res)


def _cmd_convert(args) -> int:
    from l2c_llava.models.convert import convert_folder

    stats = convert_folder(args.source, args.out, overwrite=args.overwrite)
    print(
        f"{stats['tensors']} tensors from {len(stats['files'])} pickled file(s) of {args.source} written as "
        f"safetensors to {args.out}"
    )
    return 0


def _cmd_export(args) -> int:
    from l2c_llava.stage2 import export

    out = args.out or str(
        layout.export_dir(args.run) / args.export_command
    )  # the run's export.dir/vision|llm2clip
    if args.export_command == "vision":
        out = export.export_vision(args.run, out, overwrite=args.overwrite)
        print(
            f"exported the vision encoder to {out} (transformers CLIPVisionModel + preprocessor_config.json)"
        )
    else:
        out = export.export_llm2clip(args.run, out, text_encoder=args.text_encoder, overwrite=args.overwrite)
        print(
            f"exported the whole LLM2CLIP model to {out} (load it with "
            "l2c_llava.stage2.llm2clip.LLM2CLIP.from_pretrained)"
        )
    push_if_asked(args, out)  # --push-to-hub (hub_push.py)
    return 0


def _cmd_export_llava(args) -> int:
    from l2c_llava.mllm.export import export_hf, export_original

    out = (export_hf if args.format == "hf" else export_original)(
        args.model, args.out, overwrite=args.overwrite
    )
    print(f"exported ({args.format}) to {out}")
    push_if_asked(args, out)
    connector = json.loads((Path(out) / "config.json").read_text()).get("l2c_connector")
    if connector:
        print(
            f"note: this model uses the {connector['type']} connector ({connector['num_queries']} vision tokens); load "
            "it with l2c_llava.mllm.build.load_llava: transformers' LlavaForConditionalGeneration (and lmms-eval's "
            "llava_hf) take only the MLP connector"
        )
    return 0


def _cmd_import(args) -> int:
    from l2c_llava.stage2.export import import_llm2clip

    return _json(
        import_llm2clip(args.source, args.out, text_encoder=args.text_encoder, overwrite=args.overwrite)
    )


def _cmd_mllm_build(args) -> int:
    from l2c_llava.mllm.build import build_and_save

    model, out = build_and_save(
        args.vision,
        args.llm,
        args.out,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
    )
    n = sum(p.numel() for p in model.parameters())
    print(
        f"LLaVA model ({n / 1e6:.1f}M parameters, {model.config.image_seq_length} image tokens) written to {out}"
    )
    return 0


def _cmd_mllm_train(args) -> int:
    if args.cfg.train.stage != args.mllm_command:
        raise InputError(
            f"{args.config}: train.stage is {args.cfg.train.stage!r}; run it with "
            f"`l2c mllm {args.cfg.train.stage}`"
        )
    return _training(_mllm_run)(args)


def _cmd_eval_vqa(args) -> int:
    from l2c_llava.mllm.evaluate import evaluate_vqa

    return _json(
        evaluate_vqa(
            args.model,
            args.questions,
            args.image_root,
            args.out or args.model,
            train_json=args.train_json,
            batch_size=args.batch_size,
            limit=args.limit,
            shuffled_images=args.shuffled_images,
        )
    )


def _cmd_mllm_eval(args) -> int:
    from l2c_llava.mllm.lmms import run_lmms_eval

    limits = {}
    for item in args.task_limit or []:
        name, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise InputError(f"--task-limit {item!r}: use TASK=N with N >= 1")
        limits[name] = int(n)
    run_lmms_eval(
        args.model,
        [t for t in args.tasks.split(",") if t],
        args.out,
        data_dir=args.data,
        image_root=args.image_root,
        device=args.device,
        batch_size=args.batch_size,
        limit=args.limit,
        task_limits=limits,
    )
    print((Path(args.out) / "results.md").read_text(), end="")
    return 0


def _cmd_chat(args) -> int:
    from l2c_llava.mllm.chat import chat, chat_session

    if args.interactive:  # the model stays loaded: one question per line on stdin
        return chat_session(args.model, args.image, args.question, max_new_tokens=args.max_new_tokens)
    if not args.question:
        raise InputError("give a question (or --interactive)")
    print(chat(args.model, args.image, args.question, max_new_tokens=args.max_new_tokens))
    return 0


def _cmd_pipeline(args) -> int:
    from l2c_llava.pipeline import Pipeline
    from l2c_llava.report import write_report

    pipe = Pipeline(args.cfg, source=str(args.config), overrides=list(args.overrides))
    if args.report_only:
        print(write_report(pipe.out, pipe.cfg, pipe.load_state()))
    else:
        pipe.run(dry_run=args.dry_run)  # a PipelineError (a step failed) exits 1: its exit_code
    return 0


def _cmd_search_index(args) -> int:
    from l2c_llava.io import check_output_folder
    from l2c_llava.search import INDEX_KIND, Encoder, SearchError, build_index

    if Path(args.images).resolve().is_relative_to(Path(args.out).resolve()):
        raise SearchError(
            f"--out {args.out} is the image folder (or holds it); the index needs a folder of its own"
        )
    check_output_folder(
        args.out, INDEX_KIND, args.overwrite, legacy_marker="index.json"
    )  # before the encoder loads
    encoder = Encoder(args.encoder, text_encoder=args.text_encoder, batch_size=args.batch_size)
    s = build_index(
        args.images,
        encoder,
        args.out,
        kind=args.kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=args.hnsw_m,
        ef_search=args.ef_search,
        overwrite=args.overwrite,
    )
    print(
        f"{args.out}: {s['count']} images ({s['embedded']} embedded now, {s['reused']} kept, {s['removed']} removed, "
        f"{s['skipped']} unreadable), {s['kind']} index"
        + (f" {s['params']}, recall@10 vs exact {s['recall_vs_exact']:.3f}" if s["kind"] != "flat" else "")
    )
    return 0


def _cmd_search_query(args) -> int:
    from l2c_llava.search import contact_sheet, hits_table, query_indexes

    if not args.text and not args.image:
        raise InputError("give at least one --text or --image")
    panels = query_indexes(
        args.index,
        args.text or [],
        args.image or [],
        k=args.k,
        compare=args.compare or [],
        encoder=args.encoder,
        text_encoder=args.text_encoder,
    )
    table = hits_table(panels)
    print(table)
    if args.sheet:
        print(f"contact sheet: {contact_sheet(panels, args.sheet)}")
        atomic_write_text(Path(args.sheet).with_suffix(".md"), table)
    if args.json:
        atomic_write_json(
            args.json,
            [
                {
                    "index": str(idx.folder),
                    "encoder": idx.encoder,
                    "results": [{**r, "hits": [h.as_dict() for h in r["hits"]]} for r in res],
                }
                for _, idx, res in panels
            ],
        )
    return 0


def _cmd_demo(args) -> int:
    from l2c_llava.webdemo import command

    return command(args)


# -- the table -------------------------------------------------------------------------------------------


def A(*flags: str, **kw) -> tuple:
    """One option or positional, as argparse's add_argument takes it."""
    return flags, kw


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[argparse.Namespace], int]
    options: list[tuple] = field(default_factory=list)
    config: str | None = None  # the recipe of the config it reads: adds --config, KEY=VALUE words and --set
    push: bool = False  # --push-to-hub / --private (hub_push.py)


OVERWRITE = A(
    "--overwrite",
    action="store_true",
    help="replace an existing --out that is not a previous output of this command",
)
TEXT_ENCODER = A(
    "--text-encoder", default=None, help="LLM2CLIP: its caption encoder, if not the recorded one"
)
LLAVA_MODEL = A("--model", required=True, help="an mllm run folder or a transformers LLaVA folder")
PROBE_TRAIN = A("--probe-train", type=int, default=2000, help="train scenes for the patch probe")
WRITE_JSON = A("--out", default=None, help="write the figures to this JSON file")

GROUPS = {  # command groups: help, the name of their subcommand in args
    "stage1": "stage 1: caption-contrastive fine-tuning of the LLM (train, eval)",
    "stage2": "stage 2: LLM2CLIP (text feature cache, training, retrieval evaluation)",
    "clip": "the demo CLIP baseline (no pretrained CLIP can be downloaded here)",
    "convert": "convert model files (pickled .bin weights -> safetensors)",
    "export": "export trained models (vision encoder, whole LLM2CLIP model, LLaVA)",
    "mllm": "LLaVA-1.5 with a swapped-in vision encoder: build, pretrain, finetune, chat",
    "search": "similarity search over an image folder with an encoder (faiss)",
    "import": "bring released checkpoints in (read as data, no remote code)",
    "data": "datasets: the embedded synthetic set, format checks",
}
METAVARS = {
    "stage1": "ACTION",
    "stage2": "ACTION",
    "clip": "ACTION",
    "mllm": "ACTION",
    "search": "ACTION",
    "convert": "WHAT",
    "export": "WHAT",
    "import": "WHAT",
    "data": "DATA_COMMAND",
}

COMMANDS: dict[str, Command] = {
    "ls": Command(
        "list the shipped configs by name (--config NAME, from any folder)",
        _cmd_ls,
        [A("--paths", action="store_true", help="also print each config's file")],
    ),
    "validate": Command(
        "validate configs (before anything is loaded) and print them resolved",
        _cmd_validate,
        [
            A("configs", nargs="+", metavar="CONFIG"),
            A("--print", action="store_true", help="print the resolved config as YAML"),
        ],
    ),
    "stage1 train": Command(
        "MNTP (optional) + supervised contrastive LoRA; CRA before and after (default action)",
        _training(_stage1_run),
        config="stage1",
    ),
    "stage1 eval": Command(
        "caption retrieval accuracy (CRA) and short<->long top-1 of an encoder",
        _cmd_stage1_eval,
        [
            A("--encoder", default=None, help="encoder folder (default: <run.output_dir>/encoder)"),
            A("--base", action="store_true", help="evaluate the untuned LLM of the config instead"),
            A("--causal", action="store_true", help="with causal attention (the LLM as it was pretrained)"),
            A("--out", default=None, help="also write the numbers to this JSON file"),
        ],
        config="stage1",
    ),
    "stage2 cache": Command(
        "embed every caption once with the frozen stage-1 encoder (resumable, fingerprinted)",
        _cmd_stage2_cache,
        [
            A(
                "--overwrite",
                action="store_true",
                help="rebuild a cache made by another encoder or for other captions",
            )
        ],
        config="stage2",
    ),
    "stage2 train": Command(
        "fine-tune the CLIP vision tower against the cached LLM features (CLIP loss)",
        _training(_stage2_run),
        config="stage2",
    ),
    "stage2 eval": Command(
        "retrieval R@1/5/10, short and long captions: baseline CLIP vs LLM2CLIP (metrics.json, table)",
        _cmd_stage2_eval,
        [
            A("--model", default=None, help="LLM2CLIP model (default: the run's model/)"),
            A(
                "--baseline",
                default=None,
                help="baseline CLIPModel folder (default: eval.baseline or vision.name_or_path)",
            ),
            A("--no-baseline", action="store_true", help="evaluate LLM2CLIP only"),
        ],
        config="stage2",
    ),
    "clip pretrain": Command(
        "train a small transformers CLIPModel (own 77-token text tower) from scratch",
        _training(_clip_run),
        config="clip",
    ),
    "clip eval": Command(
        "held-out retrieval (R@K with 95%% intervals) and encoder health of a CLIP folder on a "
        "synthetic dataset",
        _cmd_clip_eval,
        [
            A("--model", required=True, help="a transformers CLIPModel folder (with its tokenizer)"),
            A("--data", required=True, help="a dataset in the embedded layout (l2c data synth)"),
            A("--split", default="test", help="the Karpathy split of the short-caption set (default: test)"),
            A("--max-images", type=int, default=None, help="the first N images of each set only"),
            PROBE_TRAIN,
            A("--no-health", action="store_true", help="retrieval only"),
            WRITE_JSON,
        ],
    ),
    "health": Command(
        "encoder health of vision towers: image-embedding collapse and a patch probe (existence, "
        "position, colour)",
        _cmd_health,
        [
            A(
                "--tower",
                action="append",
                required=True,
                metavar="[NAME=]DIR",
                help="a CLIPVisionModel / CLIPModel folder; repeat for several",
            ),
            A("--data", required=True, help="a synthetic dataset (its scenes.jsonl is the ground truth)"),
            PROBE_TRAIN,
            A("--test", type=int, default=500, help="test scenes"),
            A("--steps", type=int, default=2000, help="patch-probe training steps"),
            WRITE_JSON,
        ],
    ),
    "convert weights": Command(
        "a folder or Hub id with pytorch_model*.bin (Vicuna-7B-v1.5) -> the same folder with "
        "safetensors, read with torch.load(weights_only=True)",
        _cmd_convert,
        [
            A("source", help="model folder or Hub id (lmsys/vicuna-7b-v1.5)"),
            A("out", help="output folder; point the configs' LLM (or vision) path at it"),
            A(
                "--overwrite",
                action="store_true",
                help="replace an existing OUT that is not a previous output of this command",
            ),
        ],
    ),
    "export vision": Command(
        "the stage-2 vision tower as a transformers CLIPVisionModel folder",
        _cmd_export,
        [
            A(
                "--run",
                required=True,
                help="a stage-2 run folder (or its model/ folder, or an LLM2CLIP export)",
            ),
            A(
                "--out",
                default=None,
                help="output folder (default: the run's export.dir, else <run>/export, + /vision: "
                "where the mllm configs read a stage-2 run's tower)",
            ),
            OVERWRITE,
        ],
        push=True,
    ),
    "export llm2clip": Command(
        "the whole model (vision + projection + adapter + text encoder reference), release layout",
        _cmd_export,
        [
            A("--run", required=True, help="a stage-2 run folder (or its model/ folder)"),
            A(
                "--out",
                default=None,
                help="output folder (default: the run's export.dir, else <run>/export, + /llm2clip)",
            ),
            A("--text-encoder", default=None, help="record this text encoder instead of the run's"),
            OVERWRITE,
        ],
        push=True,
    ),
    "export llava": Command(
        "a trained LLaVA: transformers format (hf) or the original LLaVA format",
        _cmd_export_llava,
        [
            A("--model", required=True, help="an mllm run folder (or its model/ folder)"),
            A("--out", required=True, help="output folder (original format: its name must contain 'llava')"),
            A("--format", choices=["hf", "original"], default="hf"),
            OVERWRITE,
        ],
        push=True,
    ),
    "mllm build": Command(
        "assemble a LLaVA model from a vision encoder folder and an LLM",
        _cmd_mllm_build,
        [
            A("--vision", required=True, help="CLIPVisionModel / CLIPModel folder or Hub id"),
            A(
                "--llm",
                required=True,
                help="LLM folder, Hub id (lmsys/vicuna-7b-v1.5), .gguf file or "
                "embedded:smollm2-135m-instruct",
            ),
            A("--out", required=True),
            A(
                "--dtype",
                choices=["llm", "float32", "bfloat16", "float16"],
                default="llm",
                help="dtype of the built "
                "model, made directly in it (no float32 copy); default: the dtype the LLM's config.json names "
                "(Vicuna-7B-v1.5: float16)",
            ),
            A(
                "--allow-pickle",
                action="store_true",
                help="accept a tower saved as pytorch_model.bin (a pickle; loaded "
                "with weights_only=True); only for files from a source you trust",
            ),
            OVERWRITE,
        ],
    ),
    "mllm pretrain": Command(
        "train the projector on caption pairs (plain template)", _cmd_mllm_train, config="mllm"
    ),
    "mllm finetune": Command(
        "train projector + LLM (full or LoRA) on instruction data (vicuna_v1)", _cmd_mllm_train, config="mllm"
    ),
    "mllm eval-vqa": Command(
        "short-answer accuracy on held-out questions, beside the answer prior",
        _cmd_eval_vqa,
        [
            LLAVA_MODEL,
            A("--questions", required=True, help="JSONL: question_id, image, question, answers, type"),
            A("--image-root", required=True),
            A("--train-json", default=None, help="LLaVA training JSON, for the most-frequent-answer prior"),
            A(
                "--out",
                default=None,
                help="folder for vqa_metrics.json / vqa_answers.jsonl (default: --model)",
            ),
            A("--batch-size", type=int, default=8),
            A("--limit", type=int, default=None, help="first N questions only"),
            A(
                "--shuffled-images",
                action="store_true",
                help="answer each question again with another question's "
                "image: the score without the right image, and the share of answers the image changed (doubles the time)",
            ),
        ],
    ),
    "mllm eval": Command(
        "lmms-eval (llava_hf) on a LLaVA folder: paper benchmarks or the local tasks",
        _cmd_mllm_eval,
        [
            LLAVA_MODEL,
            A(
                "--tasks",
                required=True,
                help="comma-separated: local l2c_vqa,l2c_pope,l2c_caption (offline, "
                "need --data; `local` for all three) or lmms-eval names (vqav2_val,gqa,...; `paper` for the "
                "paper table's, `paper_all` with the GPT-judged ones)",
            ),
            A("--out", required=True, help="results folder (lmms_eval/ as written, results.json/.md)"),
            A("--data", default=None, help="the embedded dataset's folder (for the local tasks)"),
            A("--image-root", default=None, help="image root of the local tasks (default DATA/images)"),
            A("--device", default="cpu", help="cpu, cuda, cuda:0 ..."),
            A("--batch-size", type=int, default=1),
            A("--limit", type=int, default=None, help="first N rows of each task"),
            A("--task-limit", action="append", metavar="TASK=N", help="first N rows of one local task"),
        ],
    ),
    "mllm chat": Command(
        "answer a question about an image (greedy); --interactive for many",
        _cmd_chat,
        [
            LLAVA_MODEL,
            A("--image", default=None),
            A("--max-new-tokens", type=int, default=64),
            A(
                "--interactive",
                "-i",
                action="store_true",
                help="keep the model loaded and answer one question per line "
                "of stdin (`/image PATH` changes the image, `/image` drops it; an empty line or EOF ends)",
            ),
            A("question", nargs="?", default=None),
        ],
    ),
    "pipeline": Command(
        "every step for both encoders (stage 1, stage 2, LLaVA, lmms-eval), then the report",
        _cmd_pipeline,
        [
            A("--dry-run", action="store_true", help="list each step as skip / resume / fresh and stop"),
            A("--report-only", action="store_true", help="write the report from what is there and stop"),
        ],
        config="pipeline",
    ),
    "search index": Command(
        "embed an image folder (only new or changed files on a re-run)",
        _cmd_search_index,
        [
            A("--images", required=True, help="image folder (searched recursively)"),
            A("--encoder", required=True, help="LLM2CLIP model (export / stage-2 run) or CLIP model folder"),
            A("--out", required=True, help="index folder"),
            TEXT_ENCODER,
            A(
                "--kind",
                choices=["flat", "ivf", "hnsw"],
                default="flat",
                help="flat: exact; ivf / hnsw: approximate, for large collections (recall vs exact reported)",
            ),
            A("--nlist", type=int, default=None, help="ivf: cells (default 4 sqrt(N))"),
            A("--nprobe", type=int, default=None, help="ivf: cells searched (default nlist / 8)"),
            A("--hnsw-m", type=int, default=32, help="hnsw: links per node"),
            A("--ef-search", type=int, default=64, help="hnsw: search breadth"),
            A("--batch-size", type=int, default=32),
            OVERWRITE,
        ],
    ),
    "search query": Command(
        "top-k images for texts or images; --compare for encoders side by side",
        _cmd_search_query,
        [
            A("--index", required=True, help="index folder (l2c search index)"),
            A("--text", action="append", help="a text query (repeatable)"),
            A("--image", action="append", help="an image query (repeatable)"),
            A("--k", type=int, default=5),
            A(
                "--compare",
                action="append",
                metavar="INDEX",
                help="another index (another encoder), side by side",
            ),
            A(
                "--encoder",
                default=None,
                help="query encoder (default: the one the index records; another one is refused)",
            ),
            TEXT_ENCODER,
            A("--sheet", default=None, help="write a contact sheet PNG (and a .md table beside it)"),
            A("--json", default=None, help="write the hits as JSON"),
        ],
    ),
    "import llm2clip": Command(
        "a released LLM2CLIP folder (e.g. LLM2CLIP-Openai-L-14-336) -> OUT/vision + OUT/llm2clip",
        _cmd_import,
        [
            A("source", help="the downloaded checkpoint folder"),
            A("--out", required=True, help="output folder"),
            A(
                "--text-encoder",
                default=None,
                help="the caption-contrastive LLM it pairs with (for text features)",
            ),
            OVERWRITE,
        ],
    ),
    "demo": Command(
        "web page: both LLaVAs answer the same question side by side; text search over an image folder "
        "with both encoders (Gradio)",
        _cmd_demo,
        [
            A(
                "--run",
                default="runs/demo",
                help="a pipeline run folder to read the models and images from (default: %(default)s)",
            ),
            A(
                "--llava",
                action="append",
                metavar="[NAME=]DIR",
                help="a LLaVA (mllm run folder or transformers LLaVA "
                "folder) instead of the run's; repeatable",
            ),
            A(
                "--encoder",
                action="append",
                metavar="[NAME=]DIR",
                help="a CLIP or LLM2CLIP model for the search tab instead of the run's; repeatable",
            ),
            A(
                "--images",
                default=None,
                help="image folder to pick from and search (default: RUN/data/images)",
            ),
            A(
                "--host",
                default="127.0.0.1",
                help="address to serve on (default: %(default)s, this machine only)",
            ),
            A("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)"),
            A("--max-new-tokens", type=int, default=64, help="longest answer (default: %(default)s)"),
        ],
    ),
    "data synth": Command(
        "generate the embedded dataset in the real formats",
        _cmd_synth,
        [
            A("--out", required=True, type=Path, help="output folder"),
            A("--images", type=int, default=1000),
            A("--seed", type=int, default=0),
            A("--size", type=int, default=336, help="image side in pixels"),
            A("--val-fraction", type=float, default=0.1),
            A("--test-fraction", type=float, default=0.1),
            A("--max-objects", type=int, default=5, help="most object groups per image (2..9)"),
            A("--jpeg-quality", type=int, default=90),
            A("--workers", type=int, default=None, help="drawing processes (default: cores, at most 4)"),
            A("--overwrite", action="store_true", help="replace a dataset made with other options"),
            A("--quiet", action="store_true", help="no progress bar"),
        ],
    ),
    "data check": Command(
        "check a data file in one of the real formats; lists every bad row",
        _cmd_check,
        [
            A("file", type=Path),
            A("--format", required=True, choices=["pairs", "karpathy", "long", "llava"]),
            A("--image-root", type=Path, default=None),
            A("--split", default="test", help="Karpathy split to check"),
            A(
                "--image-check",
                default="decode",
                choices=["none", "exists", "header", "decode"],
                help="decode (default): every image fully decoded, finds truncated files; header: faster",
            ),
        ],
    ),
    "data filter": Command(
        "drop or flag image-caption pairs a trained model scores as mismatched",
        _cmd_filter,
        [
            A("file", type=Path, help="caption pairs (JSONL/CSV/TSV) or LCS-558K-style LLaVA JSON"),
            A("--format", required=True, choices=["pairs", "llava"]),
            A("--image-root", required=True, type=Path),
            A("--model", required=True, help="LLM2CLIP model (export / stage-2 run) or a CLIP model folder"),
            TEXT_ENCODER,
            A("--out", required=True, type=Path, help="the filtered copy (same format as the input)"),
            A("--threshold", default="auto", help="a cosine, or auto: the --null-quantile of shuffled pairs"),
            A("--null-quantile", type=float, default=0.95),
            A(
                "--drop-share",
                type=float,
                default=None,
                help="instead of a threshold: drop this share of rows, the "
                "lowest-scoring (e.g. a known noise rate)",
            ),
            A(
                "--score",
                choices=["zscore", "cosine"],
                default="zscore",
                help="zscore: the cosine against the image's "
                "and caption's cosines with other rows; cosine: raw",
            ),
            A("--mode", choices=["drop", "flag"], default="drop"),
            A("--fields", default="short,long", help="pairs: caption fields scored (comma-separated)"),
            A("--on-bad-row", choices=["error", "skip"], default="error"),
            A("--batch-size", type=int, default=32),
        ],
    ),
}


def _add_overrides(p: argparse.ArgumentParser, positional: bool = True) -> None:
    """The one override syntax of every command that reads a config: bare KEY=VALUE words or --set KEY=VALUE."""
    if positional:
        p.add_argument(
            "overrides",
            nargs="*",
            action="extend",
            default=[],
            metavar="KEY=VALUE",
            help="dotted overrides, e.g. train.lr=1e-4 run.output_dir=runs/try",
        )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted override, repeatable (the same as a bare KEY=VALUE word)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2c",
        description="l2c-llava: LLM2CLIP (caption-contrastive LLM -> CLIP "
        "vision fine-tuning) and LLaVA-1.5 on top.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, c in COMMANDS.items():
        group, _, name = path.rpartition(" ")
        if group and group not in groups:
            g = sub.add_parser(group, help=GROUPS[group])
            groups[group] = g.add_subparsers(dest=f"{group}_command", metavar=METAVARS[group], required=True)
        p = (groups[group] if group else sub).add_parser(name, help=c.help)
        if c.config:
            p.add_argument("--config", required=True)
        for flags, kw in c.options:
            p.add_argument(*flags, **kw)
        if c.config or path == "validate":
            _add_overrides(p, positional=path != "validate")  # validate's CONFIG list takes KEY=VALUE words
        if c.push:
            add_push_arguments(p)
        p.set_defaults(func=c.run, recipe=c.config)
    return document(parser)  # help of the options that lack it, an example per command (cli_help.py)


def _default_action(argv: list[str]) -> list[str]:
    """`l2c stage1 --config x` -> `l2c stage1 train --config x` (train is stage 1's default action)."""
    if argv[:1] == ["stage1"] and (len(argv) < 2 or argv[1] not in ("train", "eval", "-h", "--help")):
        return ["stage1", "train", *argv[1:]]
    return argv


def _is_override(word: str) -> bool:
    return "=" in word and not word.startswith("-") and not Path(word).exists()


def parse_args(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line, with one override syntax everywhere: bare `KEY=VALUE` words and `--set KEY=VALUE`
    both land in `args.overrides` (in the order given) for every command that reads a config."""
    parser = parser or build_parser()
    args, extra = parser.parse_known_args(_default_action(list(argv)))
    if hasattr(args, "configs"):  # l2c validate A.yaml B.yaml k=v: the positional list takes both
        args.overrides = [c for c in args.configs if _is_override(c)] + args.overrides
        args.configs = [c for c in args.configs if not _is_override(c)]
        if not args.configs:
            parser.error("l2c validate: give at least one config")
    if extra and hasattr(args, "overrides") and all(_is_override(w) for w in extra):
        args.overrides = [*args.overrides, *extra]  # bare words after a --set or another option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _prepare(args: argparse.Namespace) -> None:
    """--config NAME -> the shipped config's file (l2c ls), from any folder; when the config sets run.root,
    the command runs in that folder (created if missing); then the config, loaded and validated."""
    if args.command == "validate":
        args.configs = [resolve_config(c) for c in args.configs]
    if not getattr(args, "config", None):
        return
    args.config = resolve_config(args.config, args.command)
    root = run_root(args.config, args.overrides)
    if root:
        args.config = str(Path(args.config).resolve())
        Path(root).expanduser().mkdir(parents=True, exist_ok=True)
        os.chdir(Path(root).expanduser())
    args.cfg = load_config(args.config, args.overrides)
    if args.cfg.recipe != args.recipe:
        raise InputError(
            f"{args.config}: this is a {args.cfg.recipe!r} config; `l2c {args.command}` needs recipe: "
            f"{args.recipe}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        _prepare(args)
        return args.func(args)
    except (
        L2CError
    ) as e:  # the user can fix it: the message says where and what to do; anything else is a bug
        sub = [v for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str)]
        print(f"l2c {' '.join([args.command, *sub])}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
