"""The shared training driver (train/loop.py) running a recipe (train/recipe.py) over a tiny linear model: gradient accumulation equals one pass
over the whole batch, a left-out micro-batch adds nothing, and the loop logs, saves and resumes on the
steps the config names."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from l2c_llava.train.accelerator import make_accelerator
from l2c_llava.train.loop import accumulate_gradients, run_training
from l2c_llava.train.recipe import Plan, StepReport

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


class _LinearRecipe:
    """A recipe (train/recipe.py) over a tiny linear model: its checkpoints kept in `checkpoints` (step ->
    states), the steps it saves at in `saved`, the steps it asks the data for in `asked`."""

    def __init__(self, acc, run_dir, total: int, checkpoints: dict, saved: list, asked: list):
        self.acc, self.run_dir, self.total = acc, run_dir, total
        self.checkpoints, self.saved, self.asked = checkpoints, saved, asked
        self.model = torch.nn.Linear(3, 1)
        with torch.no_grad():
            self.model.weight.fill_(0.1)
            self.model.bias.zero_()

    def setup(self, acc) -> Plan:
        params = list(self.model.parameters())
        return Plan(
            self.model, params, self.total, 2, 2, clip=params, desc="test", adamw={"lr": 0.1}, output=None
        )

    def batches(self, state):
        x, y = _data()
        step = state.start
        while True:
            self.asked.append(step)
            yield step // 2, [(x[:4], y[:4]), (x[4:], y[4:])]
            step += 1

    def step(self, state, micro) -> float:
        return accumulate_gradients(self.acc, micro, lambda b: _mse(self.model, b), 2)

    def report(self, state, loss: float) -> StepReport:
        return StepReport({}, {"extra": 1}, {"tracked_only": 2})

    def save_checkpoint(self, state, step: int) -> None:
        self.saved.append(step)
        self.checkpoints[step] = copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "opt": state.opt.state_dict(),
                "sched": state.sched.state_dict(),
            }
        )

    def load_checkpoint(self, state) -> int:
        if not self.checkpoints:
            return 0
        step = max(self.checkpoints)
        self.model.load_state_dict(self.checkpoints[step]["model"])
        state.opt.load_state_dict(self.checkpoints[step]["opt"])
        state.sched.load_state_dict(self.checkpoints[step]["sched"])
        return step

    def save(self, state, last_loss: float) -> dict:
        return {"final_loss": last_loss}


def _train(acc, run_dir, total: int, checkpoints: dict, saved: list, asked: list):
    """A run of `total` steps in `run_dir` (resumed from the last of `checkpoints`: step -> states);
    the steps it saves at go to `saved`, the steps it asks the data for to `asked`."""
    run_dir.mkdir(exist_ok=True)  # prepare_run_dir's, in a recipe
    recipe = _LinearRecipe(acc, run_dir, total, checkpoints, saved, asked)
    state = run_training(acc, recipe, SimpleNamespace(**TRAIN), resume=True)
    return recipe.model, state.stats["final_loss"]


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
