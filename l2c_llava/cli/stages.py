"""The method's two stages and the demo CLIP: ``l2c stage1 train|eval``, ``l2c stage2 cache|train|eval``,
``l2c clip pretrain|eval`` and ``l2c health`` (encoder health of vision towers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from l2c_llava.cli.command import PROBE_TRAIN, WRITE_JSON, Command, json_out, option, training, write_out
from l2c_llava.io import atomic_write_json


def _stage1_run():
    from l2c_llava.stage1.train import run_stage1

    return lambda cfg, **kw: {k: v for k, v in run_stage1(cfg, **kw).items() if not isinstance(v, dict)}


def _stage2_run():
    from l2c_llava.stage2.train import run_stage2

    return run_stage2


def _clip_run():
    from l2c_llava.stage2.clip_baseline import run_clip_pretrain

    return run_clip_pretrain


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
    return json_out(cache_text_features(args.cfg, overwrite=args.overwrite, warn=warn))


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
    return write_out(args.out, res)


def _cmd_health(args) -> int:
    from l2c_llava.stage2.health import encoder_health, health_summary

    res = {}
    for spec in args.tower:
        name, _, path = spec.rpartition("=")
        res[name or path] = encoder_health(
            path, args.data, train_scenes=args.probe_train, test_scenes=args.test, probe_steps=args.steps
        )
        print(f"{name or path}: {health_summary(res[name or path])}")
    return write_out(args.out, res)


GROUPS = {  # command group -> (help, metavar of its subcommand)
    "stage1": ("stage 1: caption-contrastive fine-tuning of the LLM (train, eval)", "ACTION"),
    "stage2": ("stage 2: LLM2CLIP (text feature cache, training, retrieval evaluation)", "ACTION"),
    "clip": ("the demo CLIP baseline (no pretrained CLIP can be downloaded here)", "ACTION"),
}
COMMANDS: dict[str, Command] = {
    "stage1 train": Command(
        "MNTP (optional) + supervised contrastive LoRA; CRA before and after (default action)",
        training(_stage1_run),
        config="stage1",
    ),
    "stage1 eval": Command(
        "caption retrieval accuracy (CRA) and short<->long top-1 of an encoder",
        _cmd_stage1_eval,
        [
            option("--encoder", default=None, help="encoder folder (default: <run.output_dir>/encoder)"),
            option("--base", action="store_true", help="evaluate the untuned LLM of the config instead"),
            option(
                "--causal", action="store_true", help="with causal attention (the LLM as it was pretrained)"
            ),
            option("--out", default=None, help="also write the numbers to this JSON file"),
        ],
        config="stage1",
    ),
    "stage2 cache": Command(
        "embed every caption once with the frozen stage-1 encoder (resumable, fingerprinted)",
        _cmd_stage2_cache,
        [
            option(
                "--overwrite",
                action="store_true",
                help="rebuild a cache made by another encoder or for other captions",
            )
        ],
        config="stage2",
    ),
    "stage2 train": Command(
        "fine-tune the CLIP vision tower against the cached LLM features (CLIP loss)",
        training(_stage2_run),
        config="stage2",
    ),
    "stage2 eval": Command(
        "retrieval R@1/5/10, short and long captions: baseline CLIP vs LLM2CLIP (metrics.json, table)",
        _cmd_stage2_eval,
        [
            option("--model", default=None, help="LLM2CLIP model (default: the run's model/)"),
            option(
                "--baseline",
                default=None,
                help="baseline CLIPModel folder (default: eval.baseline or vision.name_or_path)",
            ),
            option("--no-baseline", action="store_true", help="evaluate LLM2CLIP only"),
        ],
        config="stage2",
    ),
    "clip pretrain": Command(
        "train a small transformers CLIPModel (own 77-token text tower) from scratch",
        training(_clip_run),
        config="clip",
    ),
    "clip eval": Command(
        "held-out retrieval (R@K with 95%% intervals) and encoder health of a CLIP folder on a "
        "synthetic dataset",
        _cmd_clip_eval,
        [
            option("--model", required=True, help="a transformers CLIPModel folder (with its tokenizer)"),
            option("--data", required=True, help="a dataset in the embedded layout (l2c data synth)"),
            option(
                "--split", default="test", help="the Karpathy split of the short-caption set (default: test)"
            ),
            option("--max-images", type=int, default=None, help="the first N images of each set only"),
            PROBE_TRAIN,
            option("--no-health", action="store_true", help="retrieval only"),
            WRITE_JSON,
        ],
    ),
    "health": Command(
        "encoder health of vision towers: image-embedding collapse and a patch probe (existence, "
        "position, colour)",
        _cmd_health,
        [
            option(
                "--tower",
                action="append",
                required=True,
                metavar="[NAME=]DIR",
                help="a CLIPVisionModel / CLIPModel folder; repeat for several",
            ),
            option(
                "--data", required=True, help="a synthetic dataset (its scenes.jsonl is the ground truth)"
            ),
            PROBE_TRAIN,
            option("--test", type=int, default=500, help="test scenes"),
            option("--steps", type=int, default=2000, help="patch-probe training steps"),
            WRITE_JSON,
        ],
    ),
}
