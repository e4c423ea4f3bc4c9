"""``l2c data synth|check|filter``: the embedded synthetic dataset, format checks of real data files,
and the caption filter."""

from __future__ import annotations

import sys
from pathlib import Path

from l2c_llava.cli.command import TEXT_ENCODER, Command, json_out, option
from l2c_llava.errors import EXIT_BAD_INPUT


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
        print(
            f"{args.out}: already holds this dataset (same options and generator version, every file as "
            "written); nothing to do"
        )
    else:
        print(
            f"wrote {args.images} images and their captions, questions and splits to {args.out} in {m['seconds']} s"
        )
    return json_out(m["stats"])


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


GROUPS = {  # command group -> (help, metavar of its subcommand)
    "data": ("datasets: the embedded synthetic set, format checks", "DATA_COMMAND"),
}
COMMANDS: dict[str, Command] = {
    "data synth": Command(
        "generate the embedded dataset in the real formats",
        _cmd_synth,
        [
            option("--out", required=True, type=Path, help="output folder"),
            option("--images", type=int, default=1000),
            option("--seed", type=int, default=0),
            option("--size", type=int, default=336, help="image side in pixels"),
            option("--val-fraction", type=float, default=0.1),
            option("--test-fraction", type=float, default=0.1),
            option("--max-objects", type=int, default=5, help="most object groups per image (2..9)"),
            option("--jpeg-quality", type=int, default=90),
            option("--workers", type=int, default=None, help="drawing processes (default: cores, at most 4)"),
            option(
                "--overwrite",
                action="store_true",
                help="replace a dataset `l2c data synth` made with other options (a folder holding its "
                "manifest.json and nothing else); a folder of anything else is never replaced",
            ),
            option("--quiet", action="store_true", help="no progress bar"),
        ],
    ),
    "data check": Command(
        "check a data file in one of the real formats; lists every bad row",
        _cmd_check,
        [
            option("file", type=Path),
            option("--format", required=True, choices=["pairs", "karpathy", "long", "llava"]),
            option("--image-root", type=Path, default=None),
            option("--split", default="test", help="Karpathy split to check"),
            option(
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
            option("file", type=Path, help="caption pairs (JSONL/CSV/TSV) or LCS-558K-style LLaVA JSON"),
            option("--format", required=True, choices=["pairs", "llava"]),
            option("--image-root", required=True, type=Path),
            option(
                "--model", required=True, help="LLM2CLIP model (export / stage-2 run) or a CLIP model folder"
            ),
            TEXT_ENCODER,
            option("--out", required=True, type=Path, help="the filtered copy (same format as the input)"),
            option(
                "--threshold", default="auto", help="a cosine, or auto: the --null-quantile of shuffled pairs"
            ),
            option("--null-quantile", type=float, default=0.95),
            option(
                "--drop-share",
                type=float,
                default=None,
                help="instead of a threshold: drop this share of rows, the "
                "lowest-scoring (e.g. a known noise rate)",
            ),
            option(
                "--score",
                choices=["zscore", "cosine"],
                default="zscore",
                help="zscore: the cosine against the image's "
                "and caption's cosines with other rows; cosine: raw",
            ),
            option("--mode", choices=["drop", "flag"], default="drop"),
            option("--fields", default="short,long", help="pairs: caption fields scored (comma-separated)"),
            option("--on-bad-row", choices=["error", "skip"], default="error"),
            option("--batch-size", type=int, default=32),
        ],
    ),
}
