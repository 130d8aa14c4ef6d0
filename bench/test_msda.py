"""pytest-benchmark: every available backend and installed peer x method x dtype x pass, on named shapes.

    pytest bench/ --benchmark-only [--bench-shapes rtdetrv2-infer-b1,dfine-infer-b1] [--benchmark-json F]

Results are grouped by problem and pass, so each group compares the implementations of one problem.
The CLI (`python -m bench`) times the same closures, interleaved, and adds the self-check and reports.
"""

from __future__ import annotations

import pytest
import torch

from bench import cases


@pytest.fixture(scope="module")
def runners():
    return {}


def test_msda(benchmark, runners, problem, implementation, pass_):
    if problem not in runners:  # inputs shared by every implementation of the problem
        runners[problem] = cases.Runner(problem)
    fn = runners[problem].closure(cases.implementations(problem)[implementation], pass_)
    if problem.device == "cuda":
        def call():
            fn()
            torch.cuda.synchronize()
    else:
        call = fn
    benchmark.group = f"{problem.label} {pass_}"
    benchmark.extra_info.update(shape=problem.shape.name, implementation=implementation, pass_=pass_)
    call()  # warm-up outside the timing
    benchmark(call)
