"""The applications and the config tools: ``l2c ls``, ``l2c validate``, ``l2c pipeline`` (every step,
then the report), ``l2c search index|query`` and ``l2c demo`` (the web page)."""

from __future__ import annotations

import sys
from pathlib import Path

from l2c_llava.cli.command import OVERWRITE, TEXT_ENCODER, Command, option
from l2c_llava.config import ConfigError, dump_config, load_config
from l2c_llava.config_names import config_name, project_root, shipped_configs
from l2c_llava.errors import EXIT_BAD_INPUT, InputError
from l2c_llava.io import atomic_write_json, atomic_write_text


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


GROUPS = {  # command group -> (help, metavar of its subcommand)
    "search": ("similarity search over an image folder with an encoder (faiss)", "ACTION"),
}
COMMANDS: dict[str, Command] = {
    "ls": Command(
        "list the shipped configs by name (--config NAME, from any folder)",
        _cmd_ls,
        [option("--paths", action="store_true", help="also print each config's file")],
    ),
    "validate": Command(
        "validate configs (before anything is loaded) and print them resolved",
        _cmd_validate,
        [
            option("configs", nargs="+", metavar="CONFIG"),
            option("--print", action="store_true", help="print the resolved config as YAML"),
        ],
    ),
    "pipeline": Command(
        "every step for both encoders (stage 1, stage 2, LLaVA, lmms-eval), then the report",
        _cmd_pipeline,
        [
            option("--dry-run", action="store_true", help="list each step as skip / resume / fresh and stop"),
            option("--report-only", action="store_true", help="write the report from what is there and stop"),
        ],
        config="pipeline",
    ),
    "search index": Command(
        "embed an image folder (only new or changed files on a re-run)",
        _cmd_search_index,
        [
            option("--images", required=True, help="image folder (searched recursively)"),
            option(
                "--encoder", required=True, help="LLM2CLIP model (export / stage-2 run) or CLIP model folder"
            ),
            option("--out", required=True, help="index folder"),
            TEXT_ENCODER,
            option(
                "--kind",
                choices=["flat", "ivf", "hnsw"],
                default="flat",
                help="flat: exact; ivf / hnsw: approximate, for large collections (recall vs exact reported)",
            ),
            option("--nlist", type=int, default=None, help="ivf: cells (default 4 sqrt(N))"),
            option("--nprobe", type=int, default=None, help="ivf: cells searched (default nlist / 8)"),
            option("--hnsw-m", type=int, default=32, help="hnsw: links per node"),
            option("--ef-search", type=int, default=64, help="hnsw: search breadth"),
            option("--batch-size", type=int, default=32),
            OVERWRITE,
        ],
    ),
    "search query": Command(
        "top-k images for texts or images; --compare for encoders side by side",
        _cmd_search_query,
        [
            option("--index", required=True, help="index folder (l2c search index)"),
            option("--text", action="append", help="a text query (repeatable)"),
            option("--image", action="append", help="an image query (repeatable)"),
            option("--k", type=int, default=5),
            option(
                "--compare",
                action="append",
                metavar="INDEX",
                help="another index (another encoder), side by side",
            ),
            option(
                "--encoder",
                default=None,
                help="query encoder (default: the one the index records; another one is refused)",
            ),
            TEXT_ENCODER,
            option("--sheet", default=None, help="write a contact sheet PNG (and a .md table beside it)"),
            option("--json", default=None, help="write the hits as JSON"),
        ],
    ),
    "demo": Command(
        "web page: both LLaVAs answer the same question side by side; text search over an image folder "
        "with both encoders (Gradio)",
        _cmd_demo,
        [
            option(
                "--run",
                default="runs/demo",
                help="a pipeline run folder to read the models and images from (default: %(default)s)",
            ),
            option(
                "--llava",
                action="append",
                metavar="[NAME=]DIR",
                help="a LLaVA (mllm run folder or transformers LLaVA "
                "folder) instead of the run's; repeatable",
            ),
            option(
                "--encoder",
                action="append",
                metavar="[NAME=]DIR",
                help="a CLIP or LLM2CLIP model for the search tab instead of the run's; repeatable",
            ),
            option(
                "--images",
                default=None,
                help="image folder to pick from and search (default: RUN/data/images)",
            ),
            option(
                "--host",
                default="127.0.0.1",
                help="address to serve on (default: %(default)s, this machine only)",
            ),
            option(
                "--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)"
            ),
            option("--max-new-tokens", type=int, default=64, help="longest answer (default: %(default)s)"),
        ],
    ),
}
