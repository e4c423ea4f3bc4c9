"""Every shipped config's header is a command line that works as written from a fresh checkout (issue 33).

The header (``l2c_llava.config_names.ShippedConfig``) is the commands that write the config's inputs, then
its own, joined by ``&&``. Here, without training anything: each command parses with the real argument
parsers (``l2c``'s, and accelerate's for a launch line), each ``--config`` file exists and validates, and
the commands are followed one after another through a model of what each one writes (:data:`WRITES`),
so that every input path a command reads is in the checkout, written by an earlier command of the same
header (or by a step of the pipeline it runs), a Hub id of a model, or listed under the header's
``Yours to provide`` (real-scale configs: data and model folders under ``data/`` and ``checkpoints/``).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from l2c_llava import layout as L
from l2c_llava.cli import parse_args
from l2c_llava.config import load_config
from l2c_llava.config.core import config_to_dict, flatten
from l2c_llava.config_names import ShippedConfig, _header, resolve_config, shipped_configs
from l2c_llava.models.reference import is_hub_id

from .conftest import ROOT

CONFIGS = shipped_configs(ROOT)
BY_PATH = {c.path.resolve(): c for c in CONFIGS}

# never part of a checkout: run folders (.gitignore) and the user's data and models
NOT_SHIPPED = ("runs", "data", "checkpoints")
USER_FOLDERS = ("data", "checkpoints")
# keys that name a model: a Hub id (org/name) is fetched there, not provided by hand
MODEL_KEYS = {
    "model.name_or_path",
    "model.adapters",
    "text_encoder.path",
    "vision.name_or_path",
    "model.vision_tower",
    "model.llm.name_or_path",
}
OUTPUT_KEYS = {"run.output_dir", "run.root", "export.dir"}  # what a config's own command writes


def _norm(p: str | Path) -> str:
    return str(PurePosixPath(str(p)))


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def input_paths(cfg, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(key, path) of every path a resolved config reads: each string value (or list item) that names a
    file or folder, the keys its command writes left out."""
    out = []
    for key, value in flatten(config_to_dict(cfg)).items():
        if key in OUTPUT_KEYS or key.startswith(skip):
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and "/" in v and not v.startswith("embedded:"):
                out.append((key, v))
    return out


@dataclass
class Checkout:
    """A fresh checkout as a header's commands run in it, one after another (from its root)."""

    provided: dict[str, str]  # the header's `Yours to provide`: path -> what it is
    files: dict[str, str] = field(default_factory=dict)  # path -> the command that wrote it
    trees: dict[str, str] = field(default_factory=dict)  # folders whose whole content a command wrote
    stage2_runs: set[str] = field(default_factory=set)
    exported: set[str] = field(default_factory=set)  # stage-2 runs whose tower `l2c export vision` wrote
    used: set[str] = field(default_factory=set)  # provided paths some command read
    problems: list[str] = field(default_factory=list)

    def wrote(self, path: str | Path, by: str, tree: bool = True) -> None:
        (self.trees if tree else self.files)[_norm(path)] = by

    def written(self, path: str) -> bool:
        p = _norm(path)
        return p in self.files or any(_under(p, t) for t in self.trees)

    def need(self, key: str, path: str, where: str, provided: dict[str, str] | None = None) -> None:
        """An input `path` (config key `key`) of the command `where`: there, or a problem named."""
        provided = self.provided if provided is None else provided
        p = _norm(path)
        shipped = (ROOT / p).resolve()  # (an embedded name resolves to its folder in the package)
        if p.split("/")[0] not in NOT_SHIPPED and shipped.is_relative_to(ROOT) and shipped.exists():
            return  # shipped in the checkout
        if self.written(p):
            if key == "model.vision_tower" and p in self.stage2_runs and p not in self.exported:
                self.problems.append(
                    f"{where}: {key} = {p} is a stage-2 run whose tower no earlier command exports "
                    f"(`l2c export vision --run {p}`)"
                )
            return
        if key in MODEL_KEYS and p.split("/")[0] not in NOT_SHIPPED and is_hub_id(p):
            return  # fetched from the Hub by the command itself
        if p in provided and p.split("/")[0] in USER_FOLDERS:
            self.used.add(p)
            return
        self.problems.append(
            f"{where}: {key} = {p} is not in the checkout, not written by an earlier command of the header, "
            "and not under its 'Yours to provide' (only data/ and checkpoints/ paths can be)"
        )


def commands(header: str) -> list[list[str]]:
    """The header's commands: shell words, split at `&&` (no other shell syntax is allowed)."""
    words = shlex.split(header)
    bad = [w for w in words if w in (";", "|", "||", "&", ">", "<")]
    assert not bad, f"only `&&` may join a header's commands: {bad}"
    out: list[list[str]] = [[]]
    for w in words:
        if w == "&&":
            out.append([])
        else:
            out[-1].append(w)
    assert all(out), f"an empty command in {header!r}"
    return out


def l2c_words(words: list[str]) -> tuple[list[str], str | None]:
    """The `l2c` arguments of a command: `l2c ...`, or `accelerate launch [opts] -m l2c_llava.cli ...`
    parsed with accelerate's own launcher parser (and its --config_file, which must be shipped)."""
    if words[0] == "l2c":
        return words[1:], None
    assert words[:2] == ["accelerate", "launch"], (
        f"not an l2c command nor an accelerate launch of one: {words}"
    )
    from accelerate.commands.launch import launch_command_parser

    try:
        args = launch_command_parser().parse_args(words[2:])
    except SystemExit as e:
        raise AssertionError(f"accelerate launch does not parse {words}") from e
    assert args.module and args.training_script == "l2c_llava.cli", words
    assert args.config_file and (ROOT / args.config_file).is_file(), f"no launch config {args.config_file}"
    return list(args.training_script_args), args.config_file


def command_path(args) -> str:
    sub = [v for k, v in sorted(vars(args).items()) if k.endswith("_command") and isinstance(v, str)]
    return " ".join([args.command, *sub])


# -- what each command reads and writes --------------------------------------------------------------


def _synth(args, co: Checkout, where: str) -> None:
    d = _norm(args.out)
    for rel in L.DATASET_FILES.values():
        for f in rel.values() if isinstance(rel, dict) else [rel]:
            co.wrote(f"{d}/{f}", where, tree=False)
    for f in (L.MANIFEST, L.DATASET_SUMS):
        co.wrote(f"{d}/{f}", where, tree=False)
    co.wrote(f"{d}/{L.IMAGES}", where)


def _recipe(skip: tuple[str, ...] = ()):
    """A command that runs a config: it reads the config's input paths and writes run.output_dir."""

    def run(args, co: Checkout, where: str) -> None:
        cfg = args.cfg
        for key, path in input_paths(cfg, skip):
            co.need(key, path, where)
        out = _norm(cfg.run.output_dir)
        co.wrote(out, where)
        if cfg.recipe == "stage2" and args.command == "stage2":
            co.stage2_runs.add(out)

    return run


def _export(args, co: Checkout, where: str) -> None:
    run = _norm(args.run)
    if run not in co.stage2_runs:
        co.problems.append(
            f"{where}: --run {run} is not a stage-2 run an earlier command of the header trains"
        )
    out = _norm(args.out or f"{run}/export/{args.export_command}")
    co.wrote(out, where)
    if out == f"{run}/export/vision":  # where a stage-2 run given as a vision tower is read from
        co.exported.add(run)


def _convert(args, co: Checkout, where: str) -> None:
    co.wrote(args.out, where)


def _stage2_cache(args, co: Checkout, where: str) -> None:
    # the cache reads the captions and the encoder, never the vision tower
    for key, path in input_paths(args.cfg, skip=("vision.", "cache.dir")):
        co.need(key, path, where)
    co.wrote(args.cfg.cache.dir, where)


def _pipeline(args, co: Checkout, where: str) -> None:
    """Every step of the pipeline in its order: a step's config reads what the checkout holds, what earlier
    steps wrote, or what its own shipped config's header lists under `Yours to provide`."""
    from l2c_llava.pipeline import Pipeline

    pipe = Pipeline(args.cfg, source=args.config, overrides=list(args.overrides))
    c = pipe.cfg
    step_yaml = {"stage1": c.stage1, "baseline": c.baseline.clip, "text_cache": c.stage2, "stage2": c.stage2}
    step_yaml |= {"retrieval": c.stage2}
    for enc in L.ENCODERS:
        step_yaml |= {f"pretrain_{enc}": c.mllm.pretrain, f"finetune_{enc}": c.mllm.finetune}
    for s in pipe.steps:
        if s.name == "data":
            _synth(parse_args(s.argv[1:]), co, f"{where} (step data)")
        elif s.config is not None:
            own = BY_PATH[Path(step_yaml[s.name].config).resolve()]
            skip = ("vision.", "cache.dir") if s.name == "text_cache" else ()
            for key, path in input_paths(s.config, skip):
                co.need(
                    key, path, f"{where} (step {s.name}, {own.path.relative_to(ROOT)})", dict(own.provided)
                )
        for out in s.outputs:
            co.wrote(out, f"{where} (step {s.name})")


def _nothing(args, co: Checkout, where: str) -> None:
    return None


WRITES = {  # the commands a header may use, by `l2c` command path
    "data synth": _synth,
    "stage1 train": _recipe(),
    "clip pretrain": _recipe(),
    "stage2 cache": _stage2_cache,
    "stage2 train": _recipe(),
    "stage2 eval": _recipe(),
    "export vision": _export,
    "export llm2clip": _export,
    "convert weights": _convert,
    "mllm pretrain": _recipe(),
    "mllm finetune": _recipe(),
    "pipeline": _pipeline,
    "validate": _nothing,
    "ls": _nothing,
}


def header_problems(shipped: ShippedConfig) -> list[str]:
    """Everything that keeps `shipped`'s header from working as written on a fresh checkout."""
    from l2c_llava.cli import _prepare

    rel = shipped.path.relative_to(ROOT).as_posix()
    co = Checkout(provided=dict(shipped.provided))
    assert shipped.command, f"{rel}: the first comment line must be the command line that runs it"
    runs_it = None
    for i, words in enumerate(commands(shipped.command), 1):
        where = f"{rel}, command {i} (`{' '.join(words[:6])} ...`)"
        argv, _ = l2c_words(words)
        try:
            args = parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{where}: `l2c {' '.join(argv)}` does not parse") from e
        path = command_path(args)
        assert path in WRITES, f"{where}: what `l2c {path}` reads and writes is not modelled here (WRITES)"
        if getattr(args, "config", None):
            file = Path(resolve_config(args.config, args.command))
            assert file.is_file(), f"{where}: --config {args.config} is not a file"
            cwd = Path.cwd()
            try:
                _prepare(
                    args
                )  # the command's own loading: resolved, validated (ConfigError names the problem)
            finally:
                assert Path.cwd() == cwd, f"{where}: sets run.root; header paths are from the checkout"
            runs_it = (file.resolve(), args.recipe) if file.resolve() == shipped.path.resolve() else runs_it
        for c in getattr(args, "configs", None) or []:
            load_config(resolve_config(c), args.overrides)
        WRITES[path](args, co, where)
    if runs_it is None:
        co.problems.append(f"{rel}: no command of its header runs it (--config {rel})")
    for p, _ in shipped.provided:
        if p.split("/")[0] not in USER_FOLDERS:
            co.problems.append(
                f"{rel}: 'Yours to provide' lists {p}: only data/ and checkpoints/ paths are yours"
            )
        elif p not in co.used:
            co.problems.append(f"{rel}: 'Yours to provide' lists {p}, which no command of the header reads")
    return co.problems


@pytest.mark.parametrize("shipped", CONFIGS, ids=lambda c: c.path.relative_to(ROOT).as_posix())
def test_header_works_as_written_on_a_fresh_checkout(shipped):
    problems = header_problems(shipped)
    assert not problems, "\n".join(problems)


def test_the_last_command_of_each_header_runs_the_config():
    for c in CONFIGS:
        argv, _ = l2c_words(commands(c.command)[-1])
        args = parse_args(argv)
        assert Path(resolve_config(args.config, args.command)).resolve() == c.path.resolve(), c.path


def test_a_header_that_reads_what_nothing_wrote_fails(tmp_path):
    """The check can fail: stage 1's demo config under its old header (the pipeline's data, never drawn),
    a stage-2 train without its cache, an mllm run on a stage-2 run nobody exported, a real-scale config
    without its provided inputs, and a provided entry nothing reads."""
    original = next(c for c in CONFIGS if c.path == ROOT / "stage1/configs/demo.yaml")
    old = ShippedConfig(original.path, "l2c stage1 --config stage1/configs/demo.yaml", original.summary)
    problems = "\n".join(header_problems(old))
    assert "data.train = runs/demo/data/captions/train.jsonl is not in the checkout" in problems, problems

    stage2 = next(c for c in CONFIGS if c.path == ROOT / "stage2/configs/quick.yaml")
    words = stage2.command.replace("&& l2c stage2 cache --config stage2/configs/quick.yaml", "")
    problems = "\n".join(header_problems(ShippedConfig(stage2.path, words, stage2.summary)))
    assert "cache.dir = runs/quick/stage2/text_features is not" in problems, problems

    real = next(c for c in CONFIGS if c.path == ROOT / "mllm/configs/llava15_7b_pretrain.yaml")
    no_export = real.command.replace("&& l2c export vision --run runs/llama3_8b_cc/stage2_openai_l14_336", "")
    problems = "\n".join(header_problems(ShippedConfig(real.path, no_export, real.summary, real.provided)))
    assert "is a stage-2 run whose tower no earlier command exports" in problems, problems
    problems = "\n".join(header_problems(ShippedConfig(real.path, real.command, real.summary)))
    assert "data.path = data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json is not in the checkout" in problems
    extra = (*real.provided, ("data/nothing/reads/this.json", "x"), ("runs/x", "y"))
    problems = "\n".join(header_problems(ShippedConfig(real.path, real.command, real.summary, extra)))
    assert "lists data/nothing/reads/this.json, which no command" in problems
    assert "lists runs/x: only data/ and checkpoints/" in problems
    # a command that does not parse, an unknown launch config
    with pytest.raises(AssertionError, match="does not parse"):
        header_problems(ShippedConfig(original.path, "l2c stage1 --confg x.yaml", ""))
    with pytest.raises(AssertionError, match="no launch config"):
        header_problems(
            ShippedConfig(original.path, "accelerate launch --config_file no.yaml -m l2c_llava.cli ls", "")
        )


def test_header_lines_continue_and_list_what_the_user_provides(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text(
        "# l2c data synth --out d \\\n#   && l2c stage1 --config x.yaml\n# What it is.\n# more text\n"
        "# Yours to provide (README):\n#   data/a.json  the a file\n#   checkpoints/m  a model\n# after\nrecipe: stage1\n"
    )
    command, summary, provided = _header(f)
    assert command == "l2c data synth --out d && l2c stage1 --config x.yaml" and summary == "What it is."
    assert provided == (("data/a.json", "the a file"), ("checkpoints/m", "a model"))
