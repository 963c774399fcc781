"""Runs a test job in real processes: ``launch(job, world, *args)`` spawns ``world`` fresh interpreters (torch
multiprocessing, spawn), joins them in a gloo process group on 127.0.0.1 (a free port found by binding port 0) and
calls ``job(rank, world, *args)`` in each. The first failure is raised here as torch's ProcessRaisedException,
carrying the rank's traceback; the others are then terminated. A job still running after ``timeout`` seconds is
killed and fails the test: a hang never blocks the run. Jobs are module-level functions (spawn pickles them by
name) and run on one thread each (two ranks share two cores)."""

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnopt import backends


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def optim_backend():
    """nnopt's C++ CPU backend when its extension is built, else the plain-PyTorch one."""
    return "cpu" if backends.missing("cpu", "cpu") is None else "torch"


def _entry(rank, world, port, job, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        job(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(job, world, *args, timeout=90):
    """Runs ``job(rank, world, *args)`` on ``world`` ranks; returns the seconds it took."""
    start = time.monotonic()
    ctx = mp.start_processes(_entry, args=(world, free_port(), job, args), nprocs=world, join=False,
                             start_method="spawn")
    try:
        while not ctx.join(timeout=max(0.1, start + timeout - time.monotonic())):
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{job.__name__} did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return time.monotonic() - start
