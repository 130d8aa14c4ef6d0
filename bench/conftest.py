"""Options of the pytest-benchmark suite (`pytest bench/ --benchmark-only`)."""

from __future__ import annotations

import torch

from bench import cases, timing


def pytest_configure(config):
    timing.pin_malloc_thresholds()  # as `python -m bench` does: timings must not depend on allocator history


def pytest_addoption(parser):
    group = parser.getgroup("rtdetrv2_kernels benchmarks")
    group.addoption("--bench-shapes", default=None,
                    help="comma-separated named shapes (python -m bench --list); default: the quick set per device")
    group.addoption("--bench-devices", default=None,
                    help="comma-separated devices (default: cpu, and cuda when present)")
    group.addoption("--bench-dtypes", default=None,
                    help="comma-separated dtypes (default: float32 on cpu; bfloat16,float32 on cuda)")


def pytest_generate_tests(metafunc):
    if "problem" not in metafunc.fixturenames:
        return
    option = metafunc.config.getoption
    devices = (option("--bench-devices") or ",".join(["cpu"] + (["cuda"] if torch.cuda.is_available() else [])))
    params = []
    for device in devices.split(","):
        names = option("--bench-shapes").split(",") if option("--bench-shapes") else cases.QUICK_SHAPES[device]
        dtypes = option("--bench-dtypes").split(",") if option("--bench-dtypes") else cases.DEFAULT_DTYPES[device]
        for name in names:
            for dtype in dtypes:
                for method in cases.METHODS:
                    problem = cases.Problem(cases.SHAPES[name], getattr(torch, dtype), method, device)
                    for implementation in cases.implementations(problem):
                        for pass_ in cases.PASSES:
                            params.append((problem, implementation, pass_))
    metafunc.parametrize("problem,implementation,pass_", params,
                         ids=[f"{p.label.replace(' ', '-')}-{i}-{s}" for p, i, s in params])
