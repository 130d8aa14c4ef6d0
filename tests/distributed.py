"""Runs training code in two CPU processes under DistributedDataParallel (gloo) and compares their gradients
with a single process's on the whole batch (tests/op/test_ddp.py for the op, tests/detector/test_model_export.py for
python_model)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2

requires_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                   reason="needs torch.distributed with gloo")


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_process_group(rank, port, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(worker, *args):
    """Runs worker(rank, *args) in WORLD processes joined in a gloo process group. worker must be a
    module-level function (the processes import it by name). Starting them costs seconds: run every case in
    one spawn."""
    mp.spawn(_in_process_group, args=(_free_port(), worker, args), nprocs=WORLD, join=True)


def save_ddp_gradients(model, loss_of_model, path, steps=2):
    """Wraps model in DDP, runs `steps` backward passes of loss_of_model(ddp_model) (a second one fails if a
    parameter got no gradient in the first) and saves the gradients (all ranks' mean) to path."""
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    for _ in range(steps):
        ddp.zero_grad()
        loss_of_model(ddp).backward()
    torch.save(gradients(model), path)


def assert_ranks_match(expected, paths, **tolerance):
    """Each rank's saved gradients equal `expected`, parameter by parameter."""
    for rank, path in enumerate(paths):
        actual = torch.load(path)
        assert actual.keys() == expected.keys(), f"rank {rank}: {sorted(actual.keys() ^ expected.keys())}"
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], **tolerance,
                                       msg=lambda message, name=name: f"{path}: {name}: {message}")
