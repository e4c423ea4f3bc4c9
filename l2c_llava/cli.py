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

EXIT_BAD_INPUT = 2


def _cmd_ls(args: argparse.Namespace) -> int:
    from l2c_llava.recipes import project_root, shipped_configs

    root = project_root()
    configs = shipped_configs(root)
    if not configs:
        print(f"no shipped configs found under {root} (set L2C_ROOT to the checkout)", file=sys.stderr)
        return 1
    width = max(len(str(c.path.relative_to(root))) for c in configs)
    for c in configs:
        print(f"{str(c.path.relative_to(root)):<{width}}  {c.summary}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from l2c_llava.config import ConfigError, dump_config, load_config

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
    try:
        manifest = generate(
            args.out, opts, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet
        )
    except (ValueError, FileExistsError) as e:
        print(f"l2c data synth: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
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

    try:
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
    except (readers.DataError, FileNotFoundError) as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    for p in skipped:
        print(f"BAD  {p}")
    print(f"{args.file}: {n} good, {len(skipped)} bad of {total}", file=sys.stderr)
    return EXIT_BAD_INPUT if skipped else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2c",
        description="l2c-llava: LLM2CLIP (caption-contrastive LLM -> CLIP vision fine-tuning) and LLaVA-1.5 on top.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("ls", help="list the shipped configs, one line each")
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser(
        "validate", help="validate configs (before anything is loaded) and print them resolved"
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG", type=str)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable (e.g. --set train.lr=1e-4)")  # fmt: skip
    p.add_argument("--print", action="store_true", help="print the resolved config as YAML")
    p.set_defaults(func=_cmd_validate)

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
    p.add_argument("--image-check", default="header", choices=["none", "exists", "header", "decode"])
    p.set_defaults(func=_cmd_check)
    return parser


def _split_overrides(argv: list[str]) -> list[str]:
    """`l2c validate x.yaml train.lr=1e-4` -> move bare key=value words after the config to --set."""
    if not argv or argv[0] != "validate":
        return argv
    out = []
    for word in argv:
        if "=" in word and not word.startswith("-"):
            out += ["--set", word]
        else:
            out.append(word)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_split_overrides(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
