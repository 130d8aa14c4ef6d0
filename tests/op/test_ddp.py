"""DistributedDataParallel: two CPU processes (gloo), each with half the batch, end with the gradients of a
single process on the whole batch."""

from __future__ import annotations

import functools
import os

import torch
from distributed import WORLD, assert_ranks_match, gradients, requires_gloo, save_ddp_gradients, spawn

import rtdetrv2_kernels

SHAPES = [(4, 6), (2, 3), (1, 2)]
POINTS = [3, 6, 3]
DIM, HEADS = 8, 2


class TinyAttention(torch.nn.Module):
    """Projections around the op, as in a deformable-attention layer."""

    def __init__(self, method):
        super().__init__()
        self.method = method
        self.value_proj = torch.nn.Linear(DIM, DIM)
        self.offsets = torch.nn.Linear(DIM, HEADS * sum(POINTS) * 2)
        self.logits = torch.nn.Linear(DIM, HEADS * sum(POINTS))
        self.output_proj = torch.nn.Linear(DIM, DIM)

    def forward(self, memory, queries, reference):
        batch, rows, _ = memory.shape
        value = self.value_proj(memory).view(batch, rows, HEADS, DIM // HEADS)
        offsets = self.offsets(queries).view(batch, queries.shape[1], HEADS, sum(POINTS), 2)
        locations = reference[:, :, None, None, :] + 0.1 * offsets
        weights = self.logits(queries).view(batch, queries.shape[1], HEADS, sum(POINTS)).softmax(-1)
        return self.output_proj(rtdetrv2_kernels.ms_deform_attn(value, SHAPES, locations, weights, POINTS, self.method))


def make_batch(batch=4):
    generator = torch.Generator().manual_seed(0)
    memory = torch.randn(batch, sum(h * w for h, w in SHAPES), DIM, generator=generator, dtype=torch.float64)
    queries = torch.randn(batch, 5, DIM, generator=generator, dtype=torch.float64)
    reference = torch.rand(batch, 5, 2, generator=generator, dtype=torch.float64)
    return memory, queries, reference


def make_model(method):
    torch.manual_seed(0)
    return TinyAttention(method).double()


def loss_of(model, batch):
    return model(*batch).square().mean()


METHODS = ("default", "discrete")


def _worker(rank, steps, out_dir):
    for method in METHODS:  # one spawn for both: starting the processes is most of the cost
        shard = [t.chunk(WORLD)[rank] for t in make_batch()]
        save_ddp_gradients(make_model(method), functools.partial(loss_of, batch=shard),
                           os.path.join(out_dir, f"{method}-rank{rank}.pt"), steps)


@requires_gloo
def test_ddp_gradients_match_single_process(tmp_path):
    spawn(_worker, 2, str(tmp_path))
    for method in METHODS:
        model = make_model(method)
        loss_of(model, make_batch()).backward()
        expected = gradients(model)
        assert expected.keys() == {name for name, _ in model.named_parameters()}
        # Bilinear sampling passes gradients to the offsets; discrete sampling passes zeros (still a gradient,
        # which DDP's second step needs).
        assert (expected["offsets.weight"].abs().sum() > 0) == (method == "default")
        assert_ranks_match(expected, [tmp_path / f"{method}-rank{rank}.pt" for rank in range(WORLD)],
                           rtol=1e-10, atol=1e-12)
