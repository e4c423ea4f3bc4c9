"""The shared training loop (train/loop.py) on a tiny linear model: gradient accumulation equals one pass
over the whole batch, a left-out micro-batch adds nothing, and the loop logs, saves and resumes on the
steps the config names."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from l2c_llava.train.accelerator import make_accelerator
from l2c_llava.train.loop import StepReport, accumulate_gradients, prepare_training, train_loop

TRAIN = dict(
    optimizer="adamw",
    schedule="constant",
    warmup_steps=0,
    warmup_ratio=None,
    grad_clip=1.0,
    log_every=2,
    save_every=3,
)


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)


def _mse(model, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.fixture(scope="module")
def acc():
    return make_accelerator("no", 0)


def test_accumulated_gradients_equal_the_whole_batch(acc):
    x, y = _data()
    whole = torch.nn.Linear(3, 1)
    parts = torch.nn.Linear(3, 1)
    parts.load_state_dict(whole.state_dict())
    _mse(whole, (x, y)).backward()
    micro = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    loss = accumulate_gradients(acc, micro, lambda b: _mse(parts, b), accum=4)
    assert loss == pytest.approx(_mse(whole, (x, y)).item(), rel=1e-6)
    for a, b in zip(whole.parameters(), parts.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    # a micro-batch left out (None: e.g. no supervised token) gets no backward and adds no loss
    parts.zero_grad()
    loss = accumulate_gradients(acc, [*micro[:2], None], lambda b: b and _mse(parts, b), accum=3)
    first = [(x[:4], y[:4])]
    ref = torch.nn.Linear(3, 1)
    ref.load_state_dict(parts.state_dict())
    (_mse(ref, first[0]) * 2 / 3).backward()
    assert loss == pytest.approx(_mse(ref, first[0]).item() * 2 / 3, rel=1e-6)
    assert torch.allclose(ref.weight.grad, parts.weight.grad, atol=1e-6)


def _train(acc, run_dir, total: int, checkpoints: dict, saved: list, asked: list):
    """A run of `total` steps in `run_dir` (resumed from the last of `checkpoints`: step -> states);
    the steps it saves at go to `saved`, the steps it asks the data for to `asked`."""
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.fill_(0.1)
        model.bias.zero_()
    train = SimpleNamespace(**TRAIN)
    run_dir.mkdir(exist_ok=True)  # prepare_run_dir's, in a recipe

    def load(wrapped, opt, sched) -> int:
        if not checkpoints:
            return 0
        step = max(checkpoints)
        model.load_state_dict(checkpoints[step]["model"])
        opt.load_state_dict(checkpoints[step]["opt"])
        sched.load_state_dict(checkpoints[step]["sched"])
        return step

    state = prepare_training(
        acc,
        model,
        list(model.parameters()),
        total,
        train,
        run_dir,
        resume=True,
        load_checkpoint=load,
        micro_batch=2,
        accum=2,
        output=None,
        lr=0.1,
    )
    x, y = _data()

    def steps():
        step = state.start
        while True:
            asked.append(step)
            yield step // 2, [(x[:4], y[:4]), (x[4:], y[4:])]
            step += 1

    def save(step: int) -> None:
        saved.append(step)
        checkpoints[step] = copy.deepcopy(
            {"model": model.state_dict(), "opt": state.opt.state_dict(), "sched": state.sched.state_dict()}
        )

    last = train_loop(
        acc,
        state,
        total,
        steps(),
        lambda micro: accumulate_gradients(acc, micro, lambda b: _mse(model, b), 2),
        lambda loss: StepReport({}, {"extra": 1}, {"tracked_only": 2}),
        params=list(model.parameters()),
        train=train,
        save_checkpoint=save,
        desc="test",
    )
    return model, last


def test_the_loop_logs_saves_and_resumes_on_the_configs_steps(acc, tmp_path):
    checkpoints: dict = {}
    saved, asked = [], []
    straight, last = _train(acc, tmp_path / "run", 5, checkpoints, saved, asked)
    assert saved == [3, 5] and asked == [0, 1, 2, 3, 4]  # a checkpoint every 3 steps and at the end
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 5]
    assert all(r["extra"] == 1 and "tracked_only" not in r for r in log)
    assert log[-1]["loss"] == round(last, 6) and log[-1]["epoch"] == 2
    # a run stopped after its step-3 checkpoint picks up there: the steps before are not asked for again
    saved, asked = [], []
    resumed, last_resumed = _train(acc, tmp_path / "run", 5, {3: checkpoints[3]}, saved, asked)
    assert asked == [3, 4] and saved == [5] and last_resumed == pytest.approx(last, rel=1e-6)
    assert torch.allclose(resumed.weight, straight.weight, atol=1e-6)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 5]  # cut back to step 3, then appended
