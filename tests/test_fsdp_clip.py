"""Gradient clipping under FSDP on 2 CPU processes (gloo) equals one process on the same global batch.

accelerate selects FSDP only on GPUs, so the model is wrapped with torch's FSDP (what accelerate's
FSDP1 plugin does, use_orig_params as in the shipped yamls) and ``clip_gradients`` is given an
accelerator that says FSDP. accelerate's own ``clip_grad_norm_`` falls back to each rank's local shard
when the parameter list is not the wrapped model's (the mllm passes only the trainable ones): that
fallback is run too, and differs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, free_port

WORKER = r"""
import sys
from types import SimpleNamespace
import torch, torch.distributed as dist
from accelerate.utils import DistributedType
from l2c_llava.train.accelerator import clip_gradients

mode, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
x, y = torch.randn(8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
x, y = x[rank::world], y[rank::world]
if world > 1:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False, unscale_gradients=lambda: None,
                          state=SimpleNamespace(deepspeed_plugin=None))
else:
    from accelerate import Accelerator
    wrapped, acc = model, Accelerator(cpu=True)
opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
for _ in range(3):
    loss = (wrapped(x) - y).pow(2).mean()  # FSDP averages the ranks' gradients: the global batch's mean
    loss.backward()
    if mode == "ours":
        clip_gradients(acc, wrapped, list(model.parameters()), 0.05)
    else:  # accelerate's fallback: the norm of this rank's shard only
        torch.nn.utils.clip_grad_norm_([p for p in wrapped.parameters()], 0.05)
    opt.step()
    opt.zero_grad()
if world > 1:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        state = wrapped.state_dict()
else:
    state = model.state_dict()
if rank == 0:
    torch.save({k: v.clone() for k, v in state.items()}, out)
dist.destroy_process_group()
"""


def run(tmp_path, processes: int, mode: str) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{mode}-{processes}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        str(script),
        mode,
        str(out),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_fsdp_clipping_on_two_processes_equals_one(tmp_path):
    one = run(tmp_path, 1, "ours")
    two = run(tmp_path, 2, "ours")
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one), (
        "FSDP clipping is not the global norm's"
    )
    local = run(tmp_path, 2, "local")
    assert not all(torch.allclose(one[k], local[k], atol=1e-6) for k in one)  # the shard-local norm differs
