from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from l2c_llava.data.synthetic import SynthOptions, generate

from .recipe_configs import clip_config
from .tiny_llm import save_tiny_llm
from .tiny_models import FakeEncoder, tiny_vision

# one thread in the test process and the commands it starts: its models are tiny, and with two threads
# each small op waits on the other thread (on a 2-core machine shared with other work, 10x slower; the
# patch-probe test: 14 s instead of 136 s). Pipeline steps on SmolLM2 keep their threads (pipeline_env).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SMALL = SynthOptions(images=60, seed=7, size=96)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset, generated once per test session (read-only for tests)."""
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, SMALL, workers=1, progress=False)
    return out


# -- tiny models and what is built from them, shared by the test modules ----------------------------------
# Session-wide where every test only reads them; one per module where tests write into them.


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama folder (tests/tiny_llm.py): the base LLM of stage 1, the encoder of text caches."""
    return save_tiny_llm(tmp_path_factory.mktemp("tiny_llama") / "llama", "llama")


@pytest.fixture(scope="session")
def llava_parts(tmp_path_factory) -> Path:
    """A LLaVA's parts: a tiny random Llama (llm/) and CLIP vision tower (vision/) in one folder."""
    root = tmp_path_factory.mktemp("mllm")
    save_tiny_llm(root / "llm", "llama")
    tiny_vision().save_pretrained(root / "vision")
    return root


@pytest.fixture(scope="session")
def stage2_parts(tmp_path_factory, synth_dir):
    """Stage 2's inputs at toy size: a tiny vision tower, a fake encoder's folder and the training captions'
    feature cache by FakeEncoder (12 dims): (root, the tower's folder, the encoder's folder, the caption
    pairs); recipe_configs.stage2_config trains on them."""
    from l2c_llava.data.readers import read_caption_pairs
    from l2c_llava.stage2.cache import build_cache, pair_captions

    root = tmp_path_factory.mktemp("s2")
    vision_dir = root / "vision"
    tiny_vision().save_pretrained(vision_dir)
    encoder = root / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")  # the fake encoder's identity for the fingerprint
    pairs = read_caption_pairs(synth_dir / "captions" / "train.jsonl", synth_dir / "images")
    build_cache(
        root / "cache" / "train",
        pair_captions(pairs),
        encoder,
        shard_size=32,
        load_encoder=lambda: FakeEncoder(dim=12),
        progress=False,
    )
    return root, vision_dir, encoder, pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_dir):
    """The demo chain at toy size: CLIP from scratch -> caches (fake LLM) -> stage 2 from its tower:
    (root, the stage-2 config file, its config, the encoder folder). One per test module: the tests run
    `l2c stage2 eval` on it, which writes into its run folder."""
    from l2c_llava.cli import main
    from l2c_llava.config import load_config
    from l2c_llava.data.readers import read_caption_pairs, read_karpathy, read_long_captions
    from l2c_llava.stage2.cache import build_cache, pair_captions
    from l2c_llava.stage2.train import Stage2Recipe

    root = tmp_path_factory.mktemp("s2eval")
    path, _ = clip_config(root, synth_dir, root / "clip")
    assert main(["clip", "pretrain", "--config", str(path)]) == 0
    encoder = root / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    fake = lambda: FakeEncoder(dim=12)  # noqa: E731
    pairs = read_caption_pairs(synth_dir / "captions" / "train.jsonl", synth_dir / "images")
    short = read_karpathy(synth_dir / "retrieval" / "karpathy.json", synth_dir / "images", image_check="none")
    long = read_long_captions(
        synth_dir / "retrieval" / "long_test.json", synth_dir / "images", image_check="none"
    )
    for name, caps in (
        ("train", pair_captions(pairs)),
        ("eval_short", short.captions),
        ("eval_long", long.captions),
    ):
        build_cache(root / "cache" / name, caps, encoder, shard_size=32, load_encoder=fake, progress=False)
    cfg_path = root / "s2.yaml"
    cfg_path.write_text(f"""recipe: stage2
run: {{output_dir: {root / "s2"}, seed: 1}}
text_encoder: {{path: {encoder}}}
cache: {{dir: {root / "cache"}}}
vision: {{name_or_path: {root / "clip" / "model"}, image_size: 32, gradient_checkpointing: false}}
adapter: {{num_blocks: 2, projection_dim: 16}}
data: {{train: {synth_dir}/captions/train.jsonl, image_root: {synth_dir}/images, num_workers: 0,
        eval_short: {synth_dir}/retrieval/karpathy.json, eval_long: {synth_dir}/retrieval/long_test.json,
        eval_image_root: {synth_dir}/images}}
train: {{lr: 1.0e-3, batch_size: 4, max_steps: 3, mixed_precision: "no"}}
eval: {{batch_size: 5}}
""")
    cfg = load_config(cfg_path)
    Stage2Recipe(cfg).run()
    return root, cfg_path, cfg, encoder


# -- the quick pipeline, run once for the tests that read it ------------------------------------------

QUICK_PIPELINE = ROOT / "pipeline" / "configs" / "quick.yaml"
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
# the launch words of pipeline/configs/paper.yaml, in the quick pipeline's places (2 CPU processes); the
# baseline CLIP, which the paper pipeline does not train, under FSDP
PAPER_LAUNCHES = {
    "stage1": "stage1/accelerate/deepspeed_zero2.yaml",
    "baseline.clip": "stage2/accelerate/fsdp.yaml",
    "stage2": "stage2/accelerate/deepspeed_zero1.yaml",
    "mllm.pretrain": "mllm/accelerate/deepspeed_zero2.yaml",
    "mllm.finetune": "mllm/accelerate/deepspeed_zero3.yaml",
}
CPU_FSDP = ["--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false"]
# what each training step of the quick pipeline records its launch in (section of the JSON, None: top level)
TRAINING_RECORDS = {
    "stage1": ("stage1/metrics.json", "train"),
    "baseline.clip": ("clip/train_stats.json", None),
    "stage2": ("stage2/train_stats.json", None),
    **{
        f"mllm.{stage}/{enc}": (f"mllm/{enc}/{stage}/train_stats.json", None)
        for enc in ("baseline", "llm2clip")
        for stage in ("pretrain", "finetune")
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_words(yaml: str) -> list[str]:
    """`accelerate launch --config_file yaml` on 2 CPU processes, as the README's CPU line has it."""
    w = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", yaml]
    w += ["--num_processes", "2", "--main_process_port", str(free_port())]
    return w + (CPU_FSDP if "fsdp" in yaml else [])


def pipeline_env(one_thread: bool = False) -> dict:
    """DS_ACCELERATOR: DeepSpeed on the CPU. A launched step's processes get 1 thread each from torchrun;
    a step on one process keeps torch's default (every core), as outside the tests, unless `one_thread`
    (the pipeline runs beside the other tests, which take a core of their own)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    return env


def quick_pipeline(out: Path, *overrides: str, env: dict | None = None, umask: int = -1) -> subprocess.Popen:
    """`l2c pipeline --config pipeline/configs/quick.yaml` into `out`, its output in a log file beside it
    (``proc.log``: a pipe nobody reads while the run goes on would stop it once full)."""
    os.makedirs(out.parent, exist_ok=True)  # (not Path.mkdir: a test may have it patched meanwhile)
    log = out.parent / f"{out.name}-{len(list(out.parent.glob(f'{out.name}-*.log')))}.log"
    cmd = [sys.executable, "-m", "l2c_llava.cli", "pipeline", "--config", str(QUICK_PIPELINE)]
    with open(log, "w") as f:
        proc = _POPEN(
            [*cmd, f"run.output_dir={out}", *overrides],
            cwd=ROOT,
            env=pipeline_env() if env is None else env,
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
            umask=umask,
        )
    proc.log = log  # type: ignore[attr-defined]
    _LIVE.add(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 1800) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        _LIVE.discard(proc)
    text = proc.log.read_text()  # type: ignore[attr-defined]
    assert proc.returncode == 0, text[-6000:]
    return text


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process under it: torchrun starts each worker in a session of its own,
    out of reach of a kill of the process group."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=60)
    proc.wait()
    _LIVE.discard(proc)


@dataclass
class QuickRun:
    """The quick pipeline's run folder and what its first complete run left, read before any later run
    of the same folder changes it."""

    out: Path
    launched: bool  # the training steps ran under the paper's launch words (DeepSpeed installed)
    overrides: list[str]  # the pipeline overrides of both runs (launch words aside)
    resumed_text: str  # the output of the run that resumed the killed one
    state: dict  # pipeline/state.json's steps after it
    records: dict[str, dict]  # each training step's recorded JSON (TRAINING_RECORDS) after it
    report: str  # report.md after it

    def command(self, launch: bool = True) -> list[str]:
        """The overrides of the runs so far; with `launch`, their launch words too (on fresh ports: launch
        words say how a step runs, they are not among its inputs)."""
        return self.overrides + (paper_launches() if launch and self.launched else [])


def paper_launches() -> list[str]:
    return [f"{k}.launch={json.dumps(launch_words(y))}" for k, y in PAPER_LAUNCHES.items()]


QUICK_OVERRIDES = [
    # the LLaVAs' global batch of 4 as 2 rows on each of 2 processes
    "mllm.pretrain.overrides=[train.per_device_batch_size=2]",
    # one instruction-tuning step (the quick config has 2): what is read of it is that it ran, as its
    # launch says, and left a LLaVA the eval answers with; under ZeRO-3 on 2 CPU processes a step of
    # SmolLM2 takes most of a minute
    "mllm.finetune.overrides=[train.per_device_batch_size=2, train.max_steps=1]",
    # stage 1 on captions cut at 64 tokens instead of 128: half the compute of its steps and its CRA
    "stage1.overrides=[model.max_length=64]",
]


def run_quick_pipeline(out: Path, env: dict | None = None, umask: int = -1) -> QuickRun:
    """The quick pipeline with the paper pipeline's launch words when DeepSpeed is installed (the training
    steps on 2 CPU processes; the LLaVAs' global batch of 4 as 2 rows per process), killed while stage 1
    trains (after its first checkpoint: the pipeline and every process under it), then the same command
    again, which resumes stage 1 and runs every step to the report."""
    run = QuickRun(out, DEEPSPEED, list(QUICK_OVERRIDES), "", {}, {}, "")
    proc = quick_pipeline(out, *run.command(), env=env, umask=umask)
    ckpts = out / "stage1" / "checkpoints"
    deadline = time.time() + 1800
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(not p.name.startswith(".") for p in ckpts.iterdir()):
            break
        time.sleep(0.2)
    alive = proc.poll() is None
    kill_tree(proc)
    assert alive, "the pipeline ended before stage 1 wrote a checkpoint:\n" + proc.log.read_text()[-4000:]
    assert not (out / "stage1" / "metrics.json").exists()
    run.resumed_text = finish(quick_pipeline(out, *run.command(), env=env, umask=umask))
    run.state = json.loads((out / "pipeline" / "state.json").read_text())["steps"]
    run.records = {k: json.loads((out / path).read_text()) for k, (path, _) in TRAINING_RECORDS.items()}
    run.report = (out / "report.md").read_text()
    return run


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> QuickRun:
    """The quick pipeline, run once for the tests that read it (tests/test_pipeline.py end to end,
    tests/test_launches.py with the paper's launch words): see run_quick_pipeline. Started in the
    background when collection ends (pytest_collection_finish), while the other tests run; run here
    otherwise."""
    if "quick_run" in _BACKGROUND:
        return _BACKGROUND["quick_run"].result()
    return run_quick_pipeline(tmp_path_factory.mktemp("quick_pipeline") / "quick")


# -- slow work started when collection ends, beside the other tests ---------------------------------------
# The tests run one at a time on one thread, and the machine the suite is sized for has 2 cores: the
# quick pipeline (minutes of SmolLM2 steps and process starts) and the builds of the consumers'
# environments (package downloads) run in threads of this process from the end of collection, on what the
# other tests leave free, and the tests that read them run last (pytest_collection_modifyitems) and wait.

_POPEN = subprocess.Popen  # (a test may patch subprocess meanwhile)
_LIVE: set[subprocess.Popen] = set()  # processes to end with the session
_BACKGROUND: dict[str, Background] = {}
# the environments some tests run a reference in: scripts/<script> <args>, by the test file (or test) that
# needs it; a test that builds one itself (bench/text_encode.py) must be here too, or it would build the
# same environment at the same time as the background build
LLM2VEC_ENV = ("setup_llm2vec_env.sh",)
ENV_SETUPS = {
    "test_compat_matrix.py": [("setup_compat_env.sh", "4.37.2"), ("setup_compat_env.sh", "4.44.2")],
    "test_llm2vec_parity.py": [LLM2VEC_ENV],
    "test_vision_consumers.py::test_open_clip_and_timm_load_the_exports_and_give_the_transformers_features": [
        ("setup_compat_env.sh", "vision")
    ],
    "test_bench.py::test_llava_data_and_text_encode_benchmarks_run": [LLM2VEC_ENV],
}


class Background:
    """A function run in a thread from now on; `result()` waits for it and gives its value or raises its
    exception."""

    def __init__(self, name: str, fn):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=f"suite-{name}", daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 (given to the test that waits for it)
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def env_setup(script: str, *args: str) -> subprocess.CompletedProcess:
    """`bash scripts/<script> <args>` (an environment's idempotent build; its python on the last line of
    stdout), or the build started when collection ended."""
    if "envs" in _BACKGROUND:
        done = _BACKGROUND["envs"].result()
        if (script, *args) in done:
            return done[(script, *args)]
    return _build_env((script, *args))


def _build_env(words: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / words[0]), *words[1:]], capture_output=True, text=True, timeout=1200
    )


# tests whose commands start when collection ends: test -> the module function that runs them, given an
# empty folder and the environment of the session's start (a test may change os.environ meanwhile)
BACKGROUND_TESTS = {
    "test_config_names.py::test_stage1_quick_runs_from_an_empty_folder": "stage1_quick_from_an_empty_folder",
}


def _key(item) -> str:
    return f"{item.path.name}::{getattr(item, 'originalname', item.name)}"


def background_test(request, fn, tmp_path: Path) -> tuple[Path, object]:
    """(folder, fn(folder, environ)): what the background run of this test's commands gave (started
    when collection ended), or fn run here in `tmp_path`."""
    started = _BACKGROUND.get(_key(request.node))
    if started is not None:
        return started.result()
    return tmp_path, fn(tmp_path, dict(os.environ))


def _envs(item) -> list[tuple[str, ...]]:
    """The environments (ENV_SETUPS) a test reads."""
    name = getattr(item, "originalname", item.name)
    return ENV_SETUPS.get(item.path.name, []) + ENV_SETUPS.get(f"{item.path.name}::{name}", [])


def _waits(item) -> int:
    """0: an ordinary test; 1: it reads an environment built in the background; 2: the quick pipeline."""
    if "quick_run" in getattr(item, "fixturenames", ()):
        return 2
    return 1 if _envs(item) or _key(item) in BACKGROUND_TESTS else 0


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items) -> None:
    items.sort(key=_waits)  # (stable: the usual order within each group)


def pytest_collection_finish(session) -> None:
    items = session.items
    if not items or session.config.option.collectonly:
        return
    envs = list(dict.fromkeys(w for i in items for w in _envs(i)))
    if envs:
        _BACKGROUND["envs"] = Background("envs", lambda: {w: _build_env(w) for w in envs})
    for item in items:
        if _key(item) in BACKGROUND_TESTS and _key(item) not in _BACKGROUND:
            fn = getattr(item.module, BACKGROUND_TESTS[_key(item)])
            folder, environ = session.config._tmp_path_factory.mktemp("background"), dict(os.environ)
            _BACKGROUND[_key(item)] = Background(_key(item), lambda fn=fn, d=folder, e=environ: (d, fn(d, e)))
    if any(_waits(i) == 2 for i in items):
        out = session.config._tmp_path_factory.mktemp("quick_pipeline") / "quick"
        # one thread a step while other tests run beside it; every core when it is all there is to run
        env = pipeline_env(one_thread=any(_waits(i) != 2 for i in items))
        umask = os.umask(0o022)
        os.umask(umask)
        _BACKGROUND["quick_run"] = Background("quick_run", lambda: run_quick_pipeline(out, env, umask))


def pytest_sessionfinish(session, exitstatus) -> None:
    """A session that ends early (-x, Ctrl-C) leaves no pipeline running."""
    for proc in list(_LIVE):
        kill_tree(proc)
