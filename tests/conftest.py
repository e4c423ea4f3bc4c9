from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from l2c_llava.data.synthetic import SynthOptions, generate

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


def pipeline_env() -> dict:
    """DS_ACCELERATOR: DeepSpeed on the CPU. A launched step's processes get 1 thread each from torchrun;
    a step on one process keeps torch's default (every core), as outside the tests."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    return env


def quick_pipeline(out: Path, *overrides: str) -> subprocess.Popen:
    """`l2c pipeline --config pipeline/configs/quick.yaml` into `out`, its output in a log file beside it
    (``proc.log``: a pipe nobody reads while the run goes on would stop it once full)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}-{len(list(out.parent.glob(f'{out.name}-*.log')))}.log"
    cmd = [sys.executable, "-m", "l2c_llava.cli", "pipeline", "--config", str(QUICK_PIPELINE)]
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [*cmd, f"run.output_dir={out}", *overrides],
            cwd=ROOT,
            env=pipeline_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 1800) -> str:
    proc.wait(timeout=timeout)
    text = proc.log.read_text()  # type: ignore[attr-defined]
    assert proc.returncode == 0, text[-6000:]
    return text


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process under it: torchrun starts each worker in a session of its own,
    out of reach of a kill of the process group."""
    import psutil

    procs = [psutil.Process(proc.pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=60)
    proc.wait()


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


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> QuickRun:
    """The quick pipeline, run once for the tests that read it (tests/test_pipeline.py end to end,
    tests/test_launches.py with the paper's launch words): with the paper pipeline's launch words when
    DeepSpeed is installed (the training steps on 2 CPU processes; the LLaVAs' global batch of 4 as 2
    rows per process), killed while stage 1 trains (after its first checkpoint: the pipeline and every
    process under it), then the same command again, which resumes stage 1 and runs every step to the
    report."""
    out = tmp_path_factory.mktemp("quick_pipeline") / "quick"
    overrides = [
        # the LLaVAs' global batch of 4 as 2 rows on each of 2 processes
        "mllm.pretrain.overrides=[train.per_device_batch_size=2]",
        # one instruction-tuning step (the quick config has 2): what is read of it is that it ran, as its
        # launch says, and left a LLaVA the eval answers with; under ZeRO-3 on 2 CPU processes a step of
        # SmolLM2 takes most of a minute
        "mllm.finetune.overrides=[train.per_device_batch_size=2, train.max_steps=1]",
        # stage 1 on captions cut at 64 tokens instead of 128: half the compute of its steps and its CRA
        "stage1.overrides=[model.max_length=64]",
    ]

    run = QuickRun(out, DEEPSPEED, overrides, "", {}, {}, "")
    proc = quick_pipeline(out, *run.command())
    ckpts = out / "stage1" / "checkpoints"
    deadline = time.time() + 1200
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(not p.name.startswith(".") for p in ckpts.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, (
        "the pipeline ended before stage 1 wrote a checkpoint:\n" + proc.log.read_text()[-4000:]
    )
    kill_tree(proc)
    assert not (out / "stage1" / "metrics.json").exists()
    run.resumed_text = finish(quick_pipeline(out, *run.command()))
    run.state = json.loads((out / "pipeline" / "state.json").read_text())["steps"]
    run.records = {k: json.loads((out / path).read_text()) for k, (path, _) in TRAINING_RECORDS.items()}
    run.report = (out / "report.md").read_text()
    return run
