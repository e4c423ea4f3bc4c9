"""The ``l2c`` command's documentation: help for the options whose definition gives none, and an
example (or a few) per command, shown as the command's epilog (``l2c COMMAND --help``).

Kept beside the command table (the modules of this package) so that every command is documented in one place; ``document(parser)``
fills in what is missing after the parser is built, and tests/test_cli_help.py walks the whole tree:
every option has help, every command an example, and every example parses.
"""

from __future__ import annotations

import argparse
from importlib import metadata

# help of options whose add_argument gives none: (command path, option) -> help
OPTION_HELP: dict[tuple[str, str], str] = {
    ("validate", "configs"): "config files or shipped config names (l2c ls), validated one after the other",
    ("*", "--config"): "a config file, or a shipped config's name (l2c ls): quick, demo, stage2/quick, ...",
    ("*", "overrides"): "dotted overrides KEY=VALUE, e.g. train.lr=1e-4 run.output_dir=runs/try",
    ("export llava", "--format"): "hf: the transformers LLaVA folder (lmms-eval's llava_hf); original: the "
    "haotian-liu/LLaVA layout (default: %(default)s)",
    ("mllm build", "--out"): "output folder of the assembled LLaVA (transformers format)",
    ("mllm eval-vqa", "--image-root"): "folder the questions' image paths are relative to",
    ("*", "--batch-size"): "rows per forward pass (default: %(default)s)",
    ("mllm chat", "--image"): "the image the question is about (none: a text-only question)",
    ("mllm chat", "--max-new-tokens"): "longest answer, in tokens (default: %(default)s)",
    ("mllm chat", "question"): "the question (with --interactive: optional, the first one; the next ones are "
    "read from stdin)",
    ("search query", "--k"): "hits per query (default: %(default)s)",
    ("data synth", "--images"): "how many images to draw (default: %(default)s)",
    ("data synth", "--seed"): "seed of the generator: the same seed and options give the same files "
    "(default: %(default)s)",
    ("data synth", "--val-fraction"): "share of the images held out for validation (default: %(default)s)",
    (
        "data synth",
        "--test-fraction",
    ): "share of the images held out for the test sets (default: %(default)s)",
    ("data synth", "--jpeg-quality"): "JPEG quality of the images, 1-95 (default: %(default)s)",
    ("data check", "file"): "the data file: caption pairs (JSONL/CSV/TSV), Karpathy JSON, long captions or "
    "LLaVA JSON",
    ("data check", "--format"): "the file's format: pairs, karpathy, long (dense captions) or llava",
    (
        "data check",
        "--image-root",
    ): "folder the rows' image paths are relative to (default: the file's folder)",
    ("data filter", "--format"): "pairs: caption pairs; llava: LCS-558K-style JSON (first gpt turn scored)",
    ("data filter", "--image-root"): "folder the rows' image paths are relative to",
    ("data filter", "--null-quantile"): "auto threshold: keep a pair when it scores above this quantile of "
    "shuffled pairs (default: %(default)s)",
    ("data filter", "--mode"): "drop: write the kept rows; flag: write every row with its scores and flag",
    (
        "data filter",
        "--on-bad-row",
    ): "error: stop at the first bad row; skip: leave it out, listed in the report",
}

# examples per command path ("" is the top level)
EXAMPLES: dict[str, list[str]] = {
    "": [
        "l2c ls",
        "l2c pipeline --config quick --dry-run",
        "l2c stage1 --config quick",
        "l2c stage1 --config quick run.root=/scratch/me  # its runs/quick/... under /scratch/me",
    ],
    "ls": ["l2c ls", "l2c ls --paths"],
    "validate": ["l2c validate stage1/quick train.lr=1e-4 --print", "l2c validate stage2/configs/demo.yaml"],
    "stage1 train": ["l2c stage1 train --config quick train.max_steps=20"],
    "stage1 eval": [
        "l2c stage1 eval --config quick --out cra.json",
        "l2c stage1 eval --config quick --base --causal",
    ],
    "stage2 cache": ["l2c stage2 cache --config quick"],
    "stage2 train": ["l2c stage2 train --config quick train.max_steps=100"],
    "stage2 eval": ["l2c stage2 eval --config quick"],
    "clip pretrain": ["l2c clip pretrain --config clip_quick"],
    "clip eval": ["l2c clip eval --model runs/quick/clip/model --data runs/quick/data --out clip_eval.json"],
    "health": [
        "l2c health --tower baseline=runs/demo/clip/model --tower llm2clip=runs/demo/export/vision "
        "--data runs/demo/data --out health.json"
    ],
    "convert weights": ["l2c convert weights lmsys/vicuna-7b-v1.5 models/vicuna-7b-v1.5"],
    "export vision": [
        "l2c export vision --run runs/quick/stage2",
        "l2c export vision --run runs/quick/stage2 --out my-llm2clip-vision",
        "l2c export vision --run runs/quick/stage2 --format open_clip --out my-llm2clip-open_clip",
        "l2c export vision --run runs/quick/stage2 --format timm --out my-llm2clip-timm",
    ],
    "export llm2clip": ["l2c export llm2clip --run runs/quick/stage2 --out my-llm2clip"],
    "export llava": [
        "l2c export llava --model runs/quick/mllm/llm2clip/finetune --out llava-hf",
        "l2c export llava --model runs/quick/mllm/llm2clip/finetune --format original "
        "--out llava-v1.5-llm2clip",
        "l2c export llava --model runs/quick/mllm/baseline/finetune --format original "
        "--out llava-v1.5-baseline --vision-tower openai/clip-vit-large-patch14-336",
    ],
    "export repoint": [
        "l2c export repoint /new/place/llava-v1.5-llm2clip",
        "l2c export repoint llava-v1.5-baseline --vision-tower /models/clip-vit-large-patch14-336",
    ],
    "mllm build": [
        "l2c mllm build --vision runs/quick/export/vision --llm embedded:smollm2-135m-instruct "
        "--out llava-built"
    ],
    "mllm pretrain": ["l2c mllm pretrain --config quick_pretrain"],
    "mllm finetune": ["l2c mllm finetune --config quick_finetune train.lr=2e-5"],
    "mllm eval-vqa": [
        "l2c mllm eval-vqa --model runs/quick/mllm/llm2clip/finetune --questions "
        "runs/quick/data/llava/vqa_test.jsonl --image-root runs/quick/data/images"
    ],
    "mllm eval": [
        "l2c mllm eval --model runs/quick/mllm/llm2clip/finetune --tasks local --data runs/quick/data "
        "--out eval/llm2clip"
    ],
    "mllm chat": [
        'l2c mllm chat --model runs/demo/mllm/llm2clip/finetune --image cat.jpg "What is in the image?"'
    ],
    "pipeline": [
        "l2c pipeline --config quick",
        "l2c pipeline --config demo --dry-run",
    ],
    "search index": [
        "l2c search index --images photos --encoder runs/demo/export/llm2clip --out index-llm2clip"
    ],
    "search query": [
        'l2c search query --index index-llm2clip --compare index-clip --text "two red circles" --k 5'
    ],
    "import llm2clip": [
        "l2c import llm2clip LLM2CLIP-Openai-L-14-336 --out imported --text-encoder llm2clip-llama3-8b-cc"
    ],
    "demo": [
        "l2c demo",
        "l2c demo --run runs/demo --port 7861",
        "l2c demo --llava base=runs/demo/mllm/baseline/finetune --llava ours=runs/demo/mllm/llm2clip/finetune "
        "--images photos",
    ],
    "data synth": ["l2c data synth --out runs/quick/data --images 40 --size 64"],
    "data check": ["l2c data check data/pairs.jsonl --format pairs --image-root data/images"],
    "data filter": [
        "l2c data filter data/pairs.jsonl --format pairs --image-root data/images "
        "--model runs/demo/export/llm2clip --out data/pairs.clean.jsonl"
    ],
}


def version() -> str:
    try:
        v = metadata.version("l2c-llava")
    except metadata.PackageNotFoundError:  # run from a checkout without an install
        v = "unknown"
    return f"l2c-llava {v}"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's direct subcommands by name (empty for a leaf command)."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def walk(parser: argparse.ArgumentParser, path: str = ""):
    """(command path, parser) for the parser and every subcommand below it, depth first."""
    yield path, parser
    for name, sub in subcommands(parser).items():
        yield from walk(sub, f"{path} {name}".strip())


def _key(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def document(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Fill in the missing option help (OPTION_HELP) and put each command's examples in its epilog;
    a command group lists its subcommands' examples."""
    for path, p in walk(parser):
        for a in p._actions:
            if a.help or isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            a.help = OPTION_HELP.get((path, _key(a))) or OPTION_HELP.get(("*", _key(a)))
        lines = EXAMPLES.get(path)
        if lines is None:  # a group: its subcommands' first examples
            lines = [
                EXAMPLES[k][0]
                for k in EXAMPLES
                if k.startswith(f"{path} ") and k.count(" ") == path.count(" ") + 1
            ]
        if lines:
            p.epilog = "examples:\n" + "\n".join(f"  {x}" for x in lines)
            p.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser
