"""The ``l2c`` command.

    l2c ls                               the shipped configs, one line each
    l2c validate CONFIG [key=value ...]  load + validate a config (nothing is loaded), print it resolved
    l2c data synth --out DIR ...         the embedded dataset, in the real formats
    l2c data check FILE --format ...     report every bad row of a data file

Each stage adds its own subcommand (stage1, stage2, mllm, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from l2c_llava.cli_help import document, version
from l2c_llava.config import ConfigError, dump_config, load_config
from l2c_llava.errors import EXIT_BAD_INPUT, InputError, L2CError
from l2c_llava.hub_push import add_push_arguments, push_if_asked


def _cmd_ls(args: argparse.Namespace) -> int:
    from l2c_llava.recipes import config_name, project_root, shipped_configs

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


def _cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.configs:
        try:
            cfg = load_config(path, args.overrides)
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        print(f"OK  {path}  (recipe {cfg.recipe})", file=sys.stderr)
        if args.print:
            sys.stdout.write(dump_config(cfg))
    return status


def _cmd_synth(args: argparse.Namespace) -> int:
    from l2c_llava.data.synthetic import SynthOptions, generate

    opts = SynthOptions(
        images=args.images, seed=args.seed, size=args.size, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, max_objects=args.max_objects, jpeg_quality=args.jpeg_quality,
    )  # fmt: skip
    manifest = generate(
        args.out, opts, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet
    )
    if manifest.get("skipped"):
        print(f"{args.out}: already holds this dataset (same options and generator version); nothing to do")
    else:
        print(
            f"wrote {args.images} images and their captions, questions and splits to {args.out} in {manifest['seconds']} s"
        )
    print(json.dumps(manifest["stats"], indent=2))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from l2c_llava.data import readers

    if args.format == "pairs":
        res = readers.read_caption_pairs(
            args.file, args.image_root, on_bad_row="skip", image_check=args.image_check
        )
        n, skipped, total = len(res), res.skipped, res.total
    elif args.format == "llava":
        res = readers.read_llava_json(
            args.file, args.image_root, on_bad_row="skip", image_check=args.image_check
        )
        n, skipped, total = len(res), res.skipped, res.total
    else:
        if args.format == "karpathy":
            rs = readers.read_karpathy(args.file, args.image_root, split=args.split, on_bad_row="skip",
                                       image_check=args.image_check)  # fmt: skip
        else:
            rs = readers.read_long_captions(
                args.file, args.image_root, on_bad_row="skip", image_check=args.image_check
            )
        n, skipped, total = len(rs.images), rs.skipped, len(rs.images) + len(rs.skipped)
    for p in skipped:
        print(f"BAD  {p}")
    for w in getattr(res, "warnings", []) if args.format in ("pairs", "llava") else []:
        print(f"WARNING  {w}", file=sys.stderr)
    print(f"{args.file}: {n} good, {len(skipped)} bad of {total}", file=sys.stderr)
    return EXIT_BAD_INPUT if skipped else 0


def _load(path: str, overrides: list[str], recipe: str):
    """The config at `path` with `overrides`, validated (ConfigError lists every problem), of `recipe`."""
    cfg = load_config(path, overrides)
    if cfg.recipe != recipe:
        raise InputError(
            f"{path}: this is a {cfg.recipe!r} config; `l2c {recipe.replace('_', ' ')}` needs recipe: {recipe}"
        )
    return cfg


def _cmd_stage1_train(args: argparse.Namespace) -> int:
    from l2c_llava.stage1.train import run_stage1

    cfg = _load(args.config, args.overrides, "stage1")
    metrics = run_stage1(cfg, source=args.config, overrides=tuple(args.overrides))
    summary = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_stage1_eval(args: argparse.Namespace) -> int:
    from l2c_llava.io import atomic_write_json
    from l2c_llava.stage1.encoder import TextEncoder
    from l2c_llava.stage1.train import Stage1Recipe

    cfg = _load(args.config, args.overrides, "stage1")
    recipe = Stage1Recipe(cfg)
    _, test, held_out, _ = recipe.load_data()
    if args.base:
        encoder = recipe.load_encoder()
    else:
        path = args.encoder or str(Path(cfg.run.output_dir) / "encoder")
        encoder = TextEncoder.from_pretrained(path, torch_dtype=cfg.model.torch_dtype,
                                              attn_implementation=cfg.model.attn_implementation)  # fmt: skip
    encoder.set_bidirectional(not args.causal)
    result = recipe.evaluate(encoder, test, held_out, "eval")
    print(json.dumps(result, indent=2))
    if args.out:
        atomic_write_json(args.out, result)
    return 0


def _cmd_stage2_cache(args: argparse.Namespace) -> int:
    from l2c_llava.data.readers import read_caption_pairs, read_karpathy, read_long_captions
    from l2c_llava.io import atomic_write_json
    from l2c_llava.stage2.cache import build_cache, pair_captions

    cfg = _load(args.config, args.overrides, "stage2")
    d, te, c = cfg.data, cfg.text_encoder, cfg.cache
    if d.format == "webdataset":
        from l2c_llava.data.webdataset import expand_shards, scan_shards

        scan = scan_shards(expand_shards(d.train), short_key=d.short_key, long_key=d.long_key,
                           image_check=d.image_check, on_bad_row=d.on_bad_row)  # fmt: skip
        if scan.bad:  # on_bad_row=skip: training leaves these samples out
            print(f"l2c stage2 cache: {len(scan.bad)} bad sample(s) of {scan.samples} skipped "
                  f"(listed in {Path(c.dir) / 'train' / 'bad_samples.json'})", file=sys.stderr)  # fmt: skip
        train_captions = scan.captions
    else:
        pairs = read_caption_pairs(
            d.train, None, short_key=d.short_key, long_key=d.long_key, on_bad_row=d.on_bad_row
        )
        train_captions = pair_captions(pairs)
    sets = {"train": train_captions}
    root = d.eval_image_root or "."
    if d.eval_short:
        sets["eval_short"] = read_karpathy(
            d.eval_short, root, split=d.eval_split, image_check="none"
        ).captions
    if d.eval_long:
        sets["eval_long"] = read_long_captions(d.eval_long, root, image_check="none").captions
    encoder = None

    def load():
        nonlocal encoder
        if encoder is None:
            from l2c_llava.stage1.encoder import TextEncoder

            encoder = TextEncoder.from_pretrained(te.path, max_length=te.max_length)
        return encoder

    summary = {}
    for name, captions in sets.items():
        cache = build_cache(Path(c.dir) / name, captions, te.path, instruction=te.instruction, shard_size=c.shard_size,
                            dtype=c.dtype, batch_size=te.batch_size, overwrite=args.overwrite, load_encoder=load)  # fmt: skip
        summary[name] = {"rows": len(cache), "dim": cache.dim, "shards": len(cache.manifest["shards"])}
        if name == "train" and d.format == "webdataset":
            atomic_write_json(cache.folder / "bad_samples.json", scan.bad)
    print(json.dumps(summary, indent=2))
    return 0


def _run_training(args: argparse.Namespace, recipe: str, label: str, run) -> int:

    cfg = _load(args.config, args.overrides, recipe)
    stats = run(cfg, source=args.config, overrides=tuple(args.overrides))
    print(json.dumps(stats, indent=2))
    return 0


def _cmd_stage2_train(args: argparse.Namespace) -> int:
    from l2c_llava.stage2.train import run_stage2

    return _run_training(args, "stage2", "stage2 train", run_stage2)


def _cmd_clip_pretrain(args: argparse.Namespace) -> int:
    from l2c_llava.stage2.clip_baseline import run_clip_pretrain

    return _run_training(args, "clip", "clip pretrain", run_clip_pretrain)


def _cmd_clip_eval(args: argparse.Namespace) -> int:
    from l2c_llava.io import atomic_write_json
    from l2c_llava.stage2.evaluate import evaluate_clip_folder
    from l2c_llava.stage2.health import encoder_health, health_summary

    res = evaluate_clip_folder(args.model, args.data, split=args.split, max_images=args.max_images)
    if not args.no_health:
        res["health"] = encoder_health(args.model, args.data, train_scenes=args.probe_train,
                                       test_scenes=args.max_images or 500)  # fmt: skip
    for name, r in res["sets"].items():
        figs = ", ".join(f"{m} {v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                         for m, v in r.items() if isinstance(v, dict) and m.endswith("@1"))  # fmt: skip
        print(f"{name} ({r['images']} images, {r['captions']} captions): {figs}")
    if "health" in res:
        print(f"health: {health_summary(res['health'])}")
    if args.out:
        atomic_write_json(args.out, res)
        print(f"written: {args.out}")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from l2c_llava.io import atomic_write_json
    from l2c_llava.stage2.health import encoder_health, health_summary

    res = {}
    for spec in args.tower:
        name, _, path = spec.rpartition("=")
        res[name or path] = encoder_health(path, args.data, train_scenes=args.probe_train,
                                           test_scenes=args.test, probe_steps=args.steps)  # fmt: skip
        print(f"{name or path}: {health_summary(res[name or path])}")
    if args.out:
        atomic_write_json(args.out, res)
        print(f"written: {args.out}")
    return 0


def _cmd_stage2_eval(args: argparse.Namespace) -> int:
    from l2c_llava.stage2.evaluate import evaluate, table

    cfg = _load(args.config, args.overrides, "stage2")
    results = evaluate(cfg, model_dir=args.model, baseline=args.baseline, skip_baseline=args.no_baseline)
    print(table(results, tuple(cfg.eval.recall_at)))
    print(
        f"written: {Path(cfg.run.output_dir) / 'metrics.json'}, {Path(cfg.run.output_dir) / 'retrieval.md'}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from l2c_llava.stage2 import export

    if args.out is None:  # the run's own layout: export.dir (default <run>/export) / vision|llm2clip
        args.out = str(export.export_dir(args.run) / args.export_command)
    if args.export_command == "vision":
        out = export.export_vision(args.run, args.out, overwrite=args.overwrite)
        print(
            f"exported the vision encoder to {out} (transformers CLIPVisionModel + preprocessor_config.json)"
        )
    else:
        out = export.export_llm2clip(
            args.run, args.out, text_encoder=args.text_encoder, overwrite=args.overwrite
        )
        print(
            f"exported the whole LLM2CLIP model to {out} (load it with l2c_llava.stage2.llm2clip.LLM2CLIP.from_pretrained)"
        )
    push_if_asked(args, out)  # --push-to-hub (hub_push.py)
    return 0


def _cmd_import_llm2clip(args: argparse.Namespace) -> int:
    from l2c_llava.stage2.export import import_llm2clip

    outs = import_llm2clip(args.source, args.out, text_encoder=args.text_encoder, overwrite=args.overwrite)
    print(json.dumps(outs, indent=2))
    return 0


def _cmd_mllm_train(args: argparse.Namespace) -> int:
    from l2c_llava.mllm.train import run_mllm

    cfg = _load(args.config, args.overrides, "mllm")
    if cfg.train.stage != args.mllm_command:
        raise InputError(
            f"{args.config}: train.stage is {cfg.train.stage!r}; run it with `l2c mllm {cfg.train.stage}`"
        )

    stats = run_mllm(cfg, source=args.config, overrides=tuple(args.overrides))
    print(json.dumps(stats, indent=2))
    return 0


def _cmd_convert_weights(args: argparse.Namespace) -> int:
    from l2c_llava.models.convert import convert_folder

    stats = convert_folder(args.source, args.out, overwrite=args.overwrite)
    print(f"{stats['tensors']} tensors from {len(stats['files'])} pickled file(s) of {args.source} written as "
          f"safetensors to {args.out}")  # fmt: skip
    return 0


def _cmd_mllm_build(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from l2c_llava.io import check_output_folder
    from l2c_llava.mllm.build import LLAVA_KIND, META, build_llava, save_llava

    check_output_folder(args.out, LLAVA_KIND, args.overwrite, legacy_marker=META)  # before the models load
    model, processor = build_llava(args.vision, SimpleNamespace(name_or_path=args.llm, gguf_file=None),
                                   allow_pickle=args.allow_pickle, torch_dtype=args.dtype)  # fmt: skip
    out = save_llava(model, processor, args.out, overwrite=args.overwrite, meta={"stage": "built", "template": "vicuna_v1", "image_aspect_ratio": "pad",
                                                  "vision_tower": args.vision, "llm": args.llm})  # fmt: skip
    n = sum(p.numel() for p in model.parameters())
    print(
        f"LLaVA model ({n / 1e6:.1f}M parameters, {model.config.image_seq_length} image tokens) written to {out}"
    )
    return 0


def _cmd_mllm_eval(args: argparse.Namespace) -> int:
    from l2c_llava.mllm.lmms import run_lmms_eval

    tasks = [t for t in args.tasks.split(",") if t]
    task_limits = {}
    for item in args.task_limit or []:
        name, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise InputError(f"--task-limit {item!r}: use TASK=N with N >= 1")
        task_limits[name] = int(n)
    run_lmms_eval(args.model, tasks, args.out, data_dir=args.data, image_root=args.image_root,
                  device=args.device, batch_size=args.batch_size, limit=args.limit, task_limits=task_limits)  # fmt: skip
    print((Path(args.out) / "results.md").read_text(), end="")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from l2c_llava.pipeline import load_pipeline

    pipe = load_pipeline(args.config, args.overrides)
    if args.report_only:
        from l2c_llava.report import write_report

        print(write_report(pipe.out, pipe.cfg, pipe.load_state()))
        return 0
    pipe.run(dry_run=args.dry_run)  # a PipelineError (a step failed) exits 1: its exit_code
    return 0


def _cmd_mllm_chat(args: argparse.Namespace) -> int:
    from l2c_llava.mllm.chat import chat, chat_session

    if args.interactive:  # the model stays loaded: one question per line on stdin
        return chat_session(args.model, args.image, args.question, max_new_tokens=args.max_new_tokens)
    if not args.question:
        raise InputError("give a question (or --interactive)")
    print(chat(args.model, args.image, args.question, max_new_tokens=args.max_new_tokens))
    return 0


def _cmd_mllm_eval_vqa(args: argparse.Namespace) -> int:
    from l2c_llava.mllm.evaluate import evaluate_vqa

    m = evaluate_vqa(args.model, args.questions, args.image_root, args.out or args.model, train_json=args.train_json,
                     batch_size=args.batch_size, limit=args.limit, shuffled_images=args.shuffled_images)  # fmt: skip
    print(json.dumps(m, indent=2))
    return 0


def _cmd_export_llava(args: argparse.Namespace) -> int:
    from l2c_llava.mllm.export import export_hf, export_original

    out = (export_hf if args.format == "hf" else export_original)(
        args.model, args.out, overwrite=args.overwrite
    )
    print(f"exported ({args.format}) to {out}")
    push_if_asked(args, out)  # --push-to-hub (hub_push.py)
    connector = json.loads((Path(out) / "config.json").read_text()).get("l2c_connector")
    if connector:
        print(f"note: this model uses the {connector['type']} connector ({connector['num_queries']} vision tokens); load "
              "it with l2c_llava.mllm.build.load_llava: transformers' LlavaForConditionalGeneration (and lmms-eval's "
              "llava_hf) take only the MLP connector")  # fmt: skip
    return 0


def _cmd_data_filter(args: argparse.Namespace) -> int:
    from l2c_llava.data.filter import filter_captions
    from l2c_llava.io import check_output_file
    from l2c_llava.search import Encoder

    threshold = None if args.threshold == "auto" else float(args.threshold)
    check_output_file(args.out)  # before the model loads and the rows are scored
    encoder = Encoder(args.model, text_encoder=args.text_encoder, batch_size=args.batch_size)
    r = filter_captions(args.file, args.image_root, encoder, args.out, fmt=args.format,
                        fields=tuple(args.fields.split(",")), threshold=threshold,
                        null_quantile=args.null_quantile, mode=args.mode, on_bad_row=args.on_bad_row,
                        score_kind=args.score, drop_share=args.drop_share)  # fmt: skip
    for w in r.get("warnings", []):
        print(f"WARNING  {w}", file=sys.stderr)
    th = ", ".join(f"{f} {v:.4f}" for f, v in r["threshold"].items())
    print(f"{args.out}: {r['rows']} rows, {r['flagged']} under the threshold ({th}; {r['threshold_from']}), "
          f"{r['kept']} written; report {args.out}.report.md, plot {args.out}.scores.png")  # fmt: skip
    return 0


def _cmd_search_index(args: argparse.Namespace) -> int:
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
    summary = build_index(args.images, encoder, args.out, kind=args.kind, nlist=args.nlist, nprobe=args.nprobe,
                          hnsw_m=args.hnsw_m, ef_search=args.ef_search, overwrite=args.overwrite)  # fmt: skip
    recall = summary["recall_vs_exact"]
    print(f"{args.out}: {summary['count']} images ({summary['embedded']} embedded now, {summary['reused']} kept, "
          f"{summary['removed']} removed, {summary['skipped']} unreadable), {summary['kind']} index"
          + (f" {summary['params']}, recall@10 vs exact {recall:.3f}" if summary["kind"] != "flat" else ""))  # fmt: skip
    return 0


def _cmd_search_query(args: argparse.Namespace) -> int:
    from l2c_llava.io import atomic_write_json, atomic_write_text
    from l2c_llava.search import Encoder, SearchIndex, contact_sheet, hits_table, run_queries

    if not args.text and not args.image:
        raise InputError("give at least one --text or --image")
    panels = []
    for i, folder in enumerate([args.index, *(args.compare or [])]):
        index = SearchIndex(folder)
        path = (args.encoder if i == 0 else None) or index.encoder["path"]
        encoder = Encoder(path, text_encoder=args.text_encoder if i == 0 else None)
        results = run_queries(index, encoder, args.text or [], args.image or [], k=args.k)
        panels.append((f"{encoder.kind}: {Path(folder).name}", index, results))
    table = hits_table(panels)
    print(table)
    if args.sheet:
        print(f"contact sheet: {contact_sheet(panels, args.sheet)}")
        atomic_write_text(Path(args.sheet).with_suffix(".md"), table)
    if args.json:
        atomic_write_json(args.json, [{"index": str(idx.folder), "encoder": idx.encoder,
                                       "results": [{**r, "hits": [h.as_dict() for h in r["hits"]]} for r in res]}
                                      for _, idx, res in panels])  # fmt: skip
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from l2c_llava.webdemo import command

    return command(args)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    """The one override syntax of every command that reads a config: bare KEY=VALUE words or --set KEY=VALUE."""
    p.add_argument("overrides", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.lr=1e-4 run.output_dir=runs/try")  # fmt: skip
    _add_set(p)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted override, repeatable (the same as a bare KEY=VALUE word)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2c",
        description="l2c-llava: LLM2CLIP (caption-contrastive LLM -> CLIP vision fine-tuning) and LLaVA-1.5 on top.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("ls", help="list the shipped configs by name (--config NAME, from any folder)")
    p.add_argument("--paths", action="store_true", help="also print each config's file")
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser(
        "validate", help="validate configs (before anything is loaded) and print them resolved"
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG", type=str)
    _add_set(p)
    p.add_argument("--print", action="store_true", help="print the resolved config as YAML")
    p.set_defaults(func=_cmd_validate)

    s1 = sub.add_parser("stage1", help="stage 1: caption-contrastive fine-tuning of the LLM (train, eval)")
    s1sub = s1.add_subparsers(dest="stage1_command", metavar="ACTION", required=True)
    p = s1sub.add_parser(
        "train", help="MNTP (optional) + supervised contrastive LoRA; CRA before and after (default action)"
    )
    p.add_argument("--config", required=True)
    _add_overrides(p)
    p.set_defaults(func=_cmd_stage1_train)
    p = s1sub.add_parser("eval", help="caption retrieval accuracy (CRA) and short<->long top-1 of an encoder")
    p.add_argument("--config", required=True, help="the stage-1 config (its data.eval / data.eval_pairs)")
    _add_overrides(p)
    p.add_argument("--encoder", default=None, help="encoder folder (default: <run.output_dir>/encoder)")
    p.add_argument("--base", action="store_true", help="evaluate the untuned LLM of the config instead")
    p.add_argument(
        "--causal", action="store_true", help="with causal attention (the LLM as it was pretrained)"
    )
    p.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=_cmd_stage1_eval)

    s2 = sub.add_parser(
        "stage2", help="stage 2: LLM2CLIP (text feature cache, training, retrieval evaluation)"
    )
    s2sub = s2.add_subparsers(dest="stage2_command", metavar="ACTION", required=True)
    p = s2sub.add_parser(
        "cache", help="embed every caption once with the frozen stage-1 encoder (resumable, fingerprinted)"
    )
    p.add_argument("--config", required=True)
    _add_overrides(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild a cache made by another encoder or for other captions",
    )
    p.set_defaults(func=_cmd_stage2_cache)
    p = s2sub.add_parser(
        "train", help="fine-tune the CLIP vision tower against the cached LLM features (CLIP loss)"
    )
    p.add_argument("--config", required=True)
    _add_overrides(p)
    p.set_defaults(func=_cmd_stage2_train)
    p = s2sub.add_parser(
        "eval",
        help="retrieval R@1/5/10, short and long captions: baseline CLIP vs LLM2CLIP (metrics.json, table)",
    )
    p.add_argument("--config", required=True)
    _add_overrides(p)
    p.add_argument("--model", default=None, help="LLM2CLIP model (default: the run's model/)")
    p.add_argument(
        "--baseline",
        default=None,
        help="baseline CLIPModel folder (default: eval.baseline or vision.name_or_path)",
    )
    p.add_argument("--no-baseline", action="store_true", help="evaluate LLM2CLIP only")
    p.set_defaults(func=_cmd_stage2_eval)

    cl = sub.add_parser("clip", help="the demo CLIP baseline (no pretrained CLIP can be downloaded here)")
    clsub = cl.add_subparsers(dest="clip_command", metavar="ACTION", required=True)
    p = clsub.add_parser(
        "pretrain", help="train a small transformers CLIPModel (own 77-token text tower) from scratch"
    )
    p.add_argument("--config", required=True)
    _add_overrides(p)
    p.set_defaults(func=_cmd_clip_pretrain)
    p = clsub.add_parser(
        "eval",
        help="held-out retrieval (R@K with 95%% intervals) and encoder health of a CLIP folder on a synthetic dataset",
    )
    p.add_argument("--model", required=True, help="a transformers CLIPModel folder (with its tokenizer)")
    p.add_argument("--data", required=True, help="a dataset in the embedded layout (l2c data synth)")
    p.add_argument(
        "--split", default="test", help="the Karpathy split of the short-caption set (default: test)"
    )
    p.add_argument("--max-images", type=int, default=None, help="the first N images of each set only")
    p.add_argument("--probe-train", type=int, default=2000, help="train scenes for the patch probe")
    p.add_argument("--no-health", action="store_true", help="retrieval only")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    p.set_defaults(func=_cmd_clip_eval)

    p = sub.add_parser(
        "health",
        help="encoder health of vision towers: image-embedding collapse and a patch probe (existence, position, colour)",
    )
    p.add_argument("--tower", action="append", required=True, metavar="[NAME=]DIR",
                   help="a CLIPVisionModel / CLIPModel folder; repeat for several")  # fmt: skip
    p.add_argument("--data", required=True, help="a synthetic dataset (its scenes.jsonl is the ground truth)")
    p.add_argument("--probe-train", type=int, default=2000, help="train scenes for the patch probe")
    p.add_argument("--test", type=int, default=500, help="test scenes")
    p.add_argument("--steps", type=int, default=2000, help="patch-probe training steps")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    p.set_defaults(func=_cmd_health)

    cv = sub.add_parser("convert", help="convert model files (pickled .bin weights -> safetensors)")
    cvsub = cv.add_subparsers(dest="convert_command", metavar="WHAT", required=True)
    p = cvsub.add_parser("weights", help="a folder or Hub id with pytorch_model*.bin (Vicuna-7B-v1.5) -> the same "
                         "folder with safetensors, read with torch.load(weights_only=True)")  # fmt: skip
    p.add_argument("source", help="model folder or Hub id (lmsys/vicuna-7b-v1.5)")
    p.add_argument("out", help="output folder; point the configs' LLM (or vision) path at it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT that is not a previous output of this command")  # fmt: skip
    p.set_defaults(func=_cmd_convert_weights)

    ex = sub.add_parser("export", help="export trained models (vision encoder, whole LLM2CLIP model)")
    exsub = ex.add_subparsers(dest="export_command", metavar="WHAT", required=True)
    p = exsub.add_parser("vision", help="the stage-2 vision tower as a transformers CLIPVisionModel folder")
    p.add_argument(
        "--run", required=True, help="a stage-2 run folder (or its model/ folder, or an LLM2CLIP export)"
    )
    p.add_argument("--out", default=None, help="output folder (default: the run's export.dir, else "
                   "<run>/export, + /vision: where the mllm configs read a stage-2 run's tower)")  # fmt: skip
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not a previous output of this command",
    )
    add_push_arguments(p)
    p.set_defaults(func=_cmd_export)
    p = exsub.add_parser(
        "llm2clip",
        help="the whole model (vision + projection + adapter + text encoder reference), release layout",
    )
    p.add_argument("--run", required=True, help="a stage-2 run folder (or its model/ folder)")
    p.add_argument("--out", default=None, help="output folder (default: the run's export.dir, else <run>/export, "
                   "+ /llm2clip)")  # fmt: skip
    p.add_argument("--text-encoder", default=None, help="record this text encoder instead of the run's")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not a previous output of this command",
    )
    add_push_arguments(p)
    p.set_defaults(func=_cmd_export)

    p = exsub.add_parser(
        "llava", help="a trained LLaVA: transformers format (hf) or the original LLaVA format"
    )
    p.add_argument("--model", required=True, help="an mllm run folder (or its model/ folder)")
    p.add_argument(
        "--out", required=True, help="output folder (original format: its name must contain 'llava')"
    )
    p.add_argument("--format", choices=["hf", "original"], default="hf")
    add_push_arguments(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not a previous output of this command",
    )
    p.set_defaults(func=_cmd_export_llava)

    mm = sub.add_parser(
        "mllm", help="LLaVA-1.5 with a swapped-in vision encoder: build, pretrain, finetune, chat"
    )
    mmsub = mm.add_subparsers(dest="mllm_command", metavar="ACTION", required=True)
    p = mmsub.add_parser("build", help="assemble a LLaVA model from a vision encoder folder and an LLM")
    p.add_argument("--vision", required=True, help="CLIPVisionModel / CLIPModel folder or Hub id")
    p.add_argument("--llm", required=True,
                   help="LLM folder, Hub id (lmsys/vicuna-7b-v1.5), .gguf file or embedded:smollm2-135m-instruct")  # fmt: skip
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["llm", "float32", "bfloat16", "float16"], default="llm",
                   help="dtype of the built model, made directly in it (no float32 copy); default: the dtype the "
                   "LLM's config.json names (Vicuna-7B-v1.5: float16)")  # fmt: skip
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a tower saved as pytorch_model.bin (a pickle; loaded with weights_only=True); "
                   "only for files from a source you trust")  # fmt: skip
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not a previous output of this command",
    )
    p.set_defaults(func=_cmd_mllm_build)
    for stage, what in (("pretrain", "train the projector on caption pairs (plain template)"),
                        ("finetune", "train projector + LLM (full or LoRA) on instruction data (vicuna_v1)")):  # fmt: skip
        p = mmsub.add_parser(stage, help=what)
        p.add_argument("--config", required=True)
        _add_overrides(p)
        p.set_defaults(func=_cmd_mllm_train)
    p = mmsub.add_parser(
        "eval-vqa", help="short-answer accuracy on held-out questions, beside the answer prior"
    )
    p.add_argument("--model", required=True, help="an mllm run folder or a transformers LLaVA folder")
    p.add_argument("--questions", required=True, help="JSONL: question_id, image, question, answers, type")
    p.add_argument("--image-root", required=True)
    p.add_argument(
        "--train-json", default=None, help="LLaVA training JSON, for the most-frequent-answer prior"
    )
    p.add_argument(
        "--out", default=None, help="folder for vqa_metrics.json / vqa_answers.jsonl (default: --model)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument(
        "--shuffled-images",
        action="store_true",
        help="answer each question again with another question's image: the score without the right "
        "image, and the share of answers the image changed (doubles the time)",
    )
    p.set_defaults(func=_cmd_mllm_eval_vqa)
    p = mmsub.add_parser(
        "eval", help="lmms-eval (llava_hf) on a LLaVA folder: paper benchmarks or the local tasks"
    )
    p.add_argument("--model", required=True, help="an mllm run folder or a transformers LLaVA folder")
    p.add_argument("--tasks", required=True,
                   help="comma-separated: local l2c_vqa,l2c_pope,l2c_caption (offline, need --data; `local` for all "
                   "three) or lmms-eval names (vqav2_val,gqa,...; `paper` for the paper table's, `paper_all` with the "
                   "GPT-judged ones)")  # fmt: skip
    p.add_argument("--out", required=True, help="results folder (lmms_eval/ as written, results.json/.md)")
    p.add_argument("--data", default=None, help="the embedded dataset's folder (for the local tasks)")
    p.add_argument("--image-root", default=None, help="image root of the local tasks (default DATA/images)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 ...")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="first N rows of each task")
    p.add_argument("--task-limit", action="append", metavar="TASK=N", help="first N rows of one local task")
    p.set_defaults(func=_cmd_mllm_eval)
    p = mmsub.add_parser("chat", help="answer a question about an image (greedy); --interactive for many")
    p.add_argument("--model", required=True, help="an mllm run folder or a transformers LLaVA folder")
    p.add_argument("--image", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--interactive", "-i", action="store_true",
                   help="keep the model loaded and answer one question per line of stdin (`/image PATH` changes "
                   "the image, `/image` drops it; an empty line or EOF ends)")  # fmt: skip
    p.add_argument("question", nargs="?", default=None)
    p.set_defaults(func=_cmd_mllm_chat)

    p = sub.add_parser(
        "pipeline", help="every step for both encoders (stage 1, stage 2, LLaVA, lmms-eval), then the report"
    )
    p.add_argument(
        "--config",
        required=True,
        help="a pipeline config (pipeline/configs/demo.yaml, quick.yaml, paper.yaml)",
    )
    _add_overrides(p)
    p.add_argument("--dry-run", action="store_true", help="list each step as skip / resume / fresh and stop")
    p.add_argument("--report-only", action="store_true", help="write the report from what is there and stop")
    p.set_defaults(func=_cmd_pipeline)

    se = sub.add_parser("search", help="similarity search over an image folder with an encoder (faiss)")
    sesub = se.add_subparsers(dest="search_command", metavar="ACTION", required=True)
    p = sesub.add_parser("index", help="embed an image folder (only new or changed files on a re-run)")
    p.add_argument("--images", required=True, help="image folder (searched recursively)")
    p.add_argument(
        "--encoder", required=True, help="LLM2CLIP model (export / stage-2 run) or CLIP model folder"
    )
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument(
        "--text-encoder", default=None, help="LLM2CLIP: its caption encoder, if not the recorded one"
    )
    p.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat",
                   help="flat: exact; ivf / hnsw: approximate, for large collections (recall vs exact reported)")  # fmt: skip
    p.add_argument("--nlist", type=int, default=None, help="ivf: cells (default 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=None, help="ivf: cells searched (default nlist / 8)")
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node")
    p.add_argument("--ef-search", type=int, default=64, help="hnsw: search breadth")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not a previous output of this command",
    )
    p.set_defaults(func=_cmd_search_index)
    p = sesub.add_parser(
        "query", help="top-k images for texts or images; --compare for encoders side by side"
    )
    p.add_argument("--index", required=True, help="index folder (l2c search index)")
    p.add_argument("--text", action="append", help="a text query (repeatable)")
    p.add_argument("--image", action="append", help="an image query (repeatable)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument(
        "--compare", action="append", metavar="INDEX", help="another index (another encoder), side by side"
    )
    p.add_argument("--encoder", default=None, help="query encoder (default: the one the index records; another "
                   "one is refused)")  # fmt: skip
    p.add_argument(
        "--text-encoder", default=None, help="LLM2CLIP: its caption encoder, if not the recorded one"
    )
    p.add_argument("--sheet", default=None, help="write a contact sheet PNG (and a .md table beside it)")
    p.add_argument("--json", default=None, help="write the hits as JSON")
    p.set_defaults(func=_cmd_search_query)

    im = sub.add_parser("import", help="bring released checkpoints in (read as data, no remote code)")
    imsub = im.add_subparsers(dest="import_command", metavar="WHAT", required=True)
    p = imsub.add_parser(
        "llm2clip",
        help="a released LLM2CLIP folder (e.g. LLM2CLIP-Openai-L-14-336) -> OUT/vision + OUT/llm2clip",
    )
    p.add_argument("source", help="the downloaded checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--text-encoder", default=None, help="the caption-contrastive LLM it pairs with (for text features)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not a previous output of this command",
    )
    p.set_defaults(func=_cmd_import_llm2clip)

    p = sub.add_parser("demo", help="web page: both LLaVAs answer the same question side by side; text search "
                       "over an image folder with both encoders (Gradio)")  # fmt: skip
    p.add_argument("--run", default="runs/demo", help="a pipeline run folder to read the models and images from "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--llava", action="append", metavar="[NAME=]DIR",
                   help="a LLaVA (mllm run folder or transformers LLaVA folder) instead of the run's; repeatable")  # fmt: skip
    p.add_argument("--encoder", action="append", metavar="[NAME=]DIR",
                   help="a CLIP or LLM2CLIP model for the search tab instead of the run's; repeatable")  # fmt: skip
    p.add_argument(
        "--images", default=None, help="image folder to pick from and search (default: RUN/data/images)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default: %(default)s, this machine only)"
    )
    p.add_argument(
        "--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)

    data = sub.add_parser("data", help="datasets: the embedded synthetic set, format checks")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = dsub.add_parser("synth", help="generate the embedded dataset in the real formats")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=336, help="image side in pixels")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--max-objects", type=int, default=5, help="most object groups per image (2..9)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=None, help="drawing processes (default: cores, at most 4)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset made with other options")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = dsub.add_parser("check", help="check a data file in one of the real formats; lists every bad row")
    p.add_argument("file", type=Path)
    p.add_argument("--format", required=True, choices=["pairs", "karpathy", "long", "llava"])
    p.add_argument("--image-root", type=Path, default=None)
    p.add_argument("--split", default="test", help="Karpathy split to check")
    p.add_argument("--image-check", default="decode", choices=["none", "exists", "header", "decode"],
                   help="decode (default): every image fully decoded, finds truncated files; header: faster")  # fmt: skip
    p.set_defaults(func=_cmd_check)

    p = dsub.add_parser(
        "filter", help="drop or flag image-caption pairs a trained model scores as mismatched"
    )
    p.add_argument("file", type=Path, help="caption pairs (JSONL/CSV/TSV) or LCS-558K-style LLaVA JSON")
    p.add_argument("--format", required=True, choices=["pairs", "llava"])
    p.add_argument("--image-root", required=True, type=Path)
    p.add_argument(
        "--model", required=True, help="LLM2CLIP model (export / stage-2 run) or a CLIP model folder"
    )
    p.add_argument(
        "--text-encoder", default=None, help="LLM2CLIP: its caption encoder, if not the recorded one"
    )
    p.add_argument("--out", required=True, type=Path, help="the filtered copy (same format as the input)")
    p.add_argument(
        "--threshold", default="auto", help="a cosine, or auto: the --null-quantile of shuffled pairs"
    )
    p.add_argument("--null-quantile", type=float, default=0.95)
    p.add_argument("--drop-share", type=float, default=None,
                   help="instead of a threshold: drop this share of rows, the lowest-scoring (e.g. a known noise rate)")  # fmt: skip
    p.add_argument("--score", choices=["zscore", "cosine"], default="zscore",
                   help="zscore: the cosine against the image's and caption's cosines with other rows; cosine: raw")  # fmt: skip
    p.add_argument("--mode", choices=["drop", "flag"], default="drop")
    p.add_argument("--fields", default="short,long", help="pairs: caption fields scored (comma-separated)")
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_cmd_data_filter)
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


def _resolve_config_names(args: argparse.Namespace) -> None:
    """--config NAME -> the shipped config's file (l2c ls), from any folder; then, when the config sets
    run.root, the command runs in that folder (created if missing): its relative paths are taken there."""
    import os

    from l2c_llava.recipes import resolve_config, run_root

    if args.command == "validate":
        args.configs = [resolve_config(c) for c in args.configs]
    if not getattr(args, "config", None):
        return
    args.config = resolve_config(args.config, args.command)
    root = run_root(args.config, getattr(args, "overrides", []))
    if root:
        args.config = str(Path(args.config).resolve())
        Path(root).expanduser().mkdir(parents=True, exist_ok=True)
        os.chdir(Path(root).expanduser())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        _resolve_config_names(args)
        return args.func(args)
    except (
        L2CError
    ) as e:  # the user can fix it: the message says where and what to do; anything else is a bug
        sub = [v for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str)]
        print(f"l2c {' '.join([args.command, *sub])}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
