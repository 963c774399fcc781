"""A rank that raises inside the optimizer fails the whole job with its error, promptly: the other rank, blocked
in the next collective, is terminated rather than left to hang (torch's spawn here, torchrun's agent in a job)."""

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException
from torch.nn.parallel import DistributedDataParallel

import nnopt.optim

from tests.distributed._launch import launch, optim_backend

TIMEOUT = 60


def _bad_input_job(rank, world):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ddp = DistributedDataParallel(model)
    opt = nnopt.optim.AdamW(model.parameters(), backend=optim_backend())
    for step in range(4):
        opt.zero_grad()
        ddp(torch.randn(8, 4)).sum().backward()
        if rank == 1 and step == 1:
            opt.param_groups[0]["backend"] = "no-such-backend"  # bad input on one rank only
        opt.step()


def test_a_failing_rank_fails_the_job_without_hanging():
    with pytest.raises(ProcessRaisedException, match="unknown backend 'no-such-backend'") as info:
        elapsed = launch(_bad_input_job, 2, timeout=TIMEOUT)
        pytest.fail(f"the job finished in {elapsed:.1f} s instead of failing")
    assert "Process 1 terminated" in str(info.value) and "opt.step()" in str(info.value)
