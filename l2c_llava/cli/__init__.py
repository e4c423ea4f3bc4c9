"""The ``l2c`` command: a table of commands (:data:`COMMANDS`), each a path, its options, the recipe of
the config it reads (if any) and an entry of a few lines that calls the library and prints. This file is
the contract every command keeps; the commands sit in one module per family, each entry beside its
options: ``apps`` (ls, validate, pipeline, search, demo), ``data``, ``stages`` (stage 1, stage 2, the
demo CLIP, health), ``models`` (convert, export, import, mllm build), ``mllm`` (LLaVA train, eval,
chat); ``command`` says what a command is, ``help`` adds the help the options lack and the examples.

- One override syntax: every command that reads a config takes bare ``KEY=VALUE`` words and
  ``--set KEY=VALUE`` (``l2c validate`` too); the config is loaded and validated before the entry runs.
- One error contract: a failure the user can fix is an :class:`~l2c_llava.errors.L2CError`, caught once
  in :func:`main` and printed with its exit code (2, bad input); so is a system error (``OSError``: no
  permission, a read-only or full disk, a file in the way, a busy file), printed as one line naming the
  file and what to do (``-v`` adds its traceback); anything else is a bug and keeps its traceback.
- No stage logic here: what a command does lives in the library or the recipe it names.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from l2c_llava.cli import apps, data, mllm, models, stages
from l2c_llava.cli.command import Command
from l2c_llava.cli.help import document, version
from l2c_llava.config import load_config
from l2c_llava.config_names import resolve_config, run_root
from l2c_llava.errors import EXIT_BAD_INPUT, InputError, L2CError
from l2c_llava.hub_push import add_push_arguments

FAMILIES = (apps, data, stages, models, mllm)  # the order of `l2c --help`
COMMANDS: dict[str, Command] = {path: c for m in FAMILIES for path, c in m.COMMANDS.items()}
GROUPS: dict[str, tuple[str, str]] = {g: v for m in FAMILIES for g, v in getattr(m, "GROUPS", {}).items()}


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
            help_, metavar = GROUPS[group]
            g = sub.add_parser(group, help=help_)
            groups[group] = g.add_subparsers(dest=f"{group}_command", metavar=metavar, required=True)
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
    return document(parser)  # help of the options that lack it, an example per command (help.py)


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
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        # past `ulimit -f` a write fails with EFBIG (a message below) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    completed = False  # the command ran to its end (under a launcher: every rank is past its collectives)
    try:
        _prepare(args)
        code = args.func(args)
        completed = True
        return code
    # a failure the user can fix: its message says where and what to do; anything else is a bug
    except L2CError as e:
        sub = [v for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str)]
        print(f"l2c {' '.join([args.command, *sub])}: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `l2c ls | head`: the reader left; no traceback (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command cut off by a closed pipe
    # the system refused a read or a write (permissions, a read-only or full disk, a file in the way):
    # the user's to fix, not a bug; -v keeps the traceback
    except OSError as e:
        if e.errno is None:  # raised by code, not by the system: a bug
            raise
        sub = [v for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str)]
        logging.getLogger(__name__).debug("the system error, with its traceback", exc_info=True)
        print(f"l2c {' '.join([args.command, *sub])}: {os_error_message(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        _end_process_group(wait_for_all=completed)


def _end_process_group(wait_for_all: bool = False) -> None:
    """Under a launcher: leave the process group before the interpreter exits, as torch asks. Left to the
    interpreter's exit, a rank's communication threads can be torn down mid-flight (a rank aborting with
    "terminate called without an active exception" after its work was done, seen twice in the launch
    tests, once with this call already made). `wait_for_all` (the command ran to its end): a barrier
    first, so that no rank leaves while another still has a collective in flight; after a failure there
    is none (a rank that failed may never reach it)."""
    import importlib.util

    if "torch" not in sys.modules or importlib.util.find_spec("torch.distributed") is None:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


_OS_ADVICE = {
    errno.EACCES: "no permission; choose a path you can write to (or read), or fix its permissions",
    errno.EPERM: "the operation is not permitted there (an immutable file, or no permission); choose another path",
    errno.EROFS: "the file system is read-only; choose an output folder on a writable disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder, where a file was expected; give a file's path",
    errno.ENOENT: "it does not exist; check the path",
    errno.EEXIST: "it exists already; choose another path",
    errno.ENOSPC: "the disk is full; free some space or choose another disk, then run the command again "
    "(a training run resumes from its last checkpoint)",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another disk, then run the command again",
    errno.EFBIG: "the file grew past the size limit for files (`ulimit -f`) or the file system's; raise the "
    "limit or choose another disk, then run the command again",
    errno.EBUSY: "it is busy (in use by another program, or a mount point); wait for it, or choose another path",
    errno.ETXTBSY: "it is busy (in use by another program); wait for it, or choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.ELOOP: "the path holds a loop of symbolic links; fix the links or give another path",
    errno.EMFILE: "too many open files; raise `ulimit -n`, or use fewer data workers",
    errno.EIO: "an input/output error of the disk; check the disk, then run the command again",
}


def os_error_message(e: OSError) -> str:
    """One line for a system error: the file(s) it names, what the system said, and what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e) or type(e).__name__
    advice = _OS_ADVICE.get(e.errno, "check the path and the disk, then run the command again")
    return f"{where + ': ' if where else ''}{what}: {advice}"
