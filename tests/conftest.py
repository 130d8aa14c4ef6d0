"""The suite's setup and hooks. Shared test code lives in helpers.py (the op) and model_helpers.py (the detector)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Set before the package
# imports Triton, since @triton.jit reads it when the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import emulated_cuda  # noqa: E402
from helpers import EMULATED_ARCH_OF, EMULATED_ARCHS  # noqa: E402


@pytest.fixture(scope="session")
def emulated_build():
    """emulated_build(arch): the op namespace of the emulated CUDA build for sm_<arch>, which also registers
    its backend. Built when a test first asks (a minute or two on a cold cache), so that runs without the
    emulated backends never compile them; a failed build makes every test that asks error."""
    return emulated_cuda.load


@pytest.fixture(autouse=True)
def _emulated_backends_built(request):
    """Builds the emulated backends a test is parametrized with before it runs them."""
    callspec = getattr(request.node, "callspec", None)
    names = [v for v in callspec.params.values() if isinstance(v, str)] if callspec else []
    archs = sorted({EMULATED_ARCH_OF[name] for name in names if name in EMULATED_ARCH_OF})
    if archs:
        build = request.getfixturevalue("emulated_build")
        for arch in archs:
            build(arch)


@pytest.fixture
def emulated_arch(request, emulated_build):
    """An arch of the emulated builds, parametrized indirectly, built before the test."""
    emulated_build(request.param)
    return request.param


def _launch_counts() -> dict[str, dict[str, int]]:
    """This process's launches of every CUDA kernel instantiation, by emulated arch (as a string) and name."""
    return {str(arch): emulated_cuda.launch_counts(arch) for arch in EMULATED_ARCHS if emulated_cuda.is_loaded(arch)}


_WORKERS_LAUNCH_COUNTS: list[dict[str, dict[str, int]]] = []  # what pytest-xdist's workers reported


def pytest_sessionfinish(session):
    """Under pytest-xdist (scripts/test.sh runs two workers), a worker hands its launch counts to the
    controller, which prints the summary."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["emulated_launch_counts"] = _launch_counts()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _WORKERS_LAUNCH_COUNTS.append(getattr(node, "workeroutput", {}).get("emulated_launch_counts", {}))


def pytest_terminal_summary(terminalreporter):
    """Lists the CUDA kernel instantiations the emulated backends launched in this run (in every worker), and
    those never launched."""
    totals: dict[str, dict[str, int]] = {}
    for counts_by_arch in (_launch_counts(), *_WORKERS_LAUNCH_COUNTS):
        for arch, counts in counts_by_arch.items():
            total = totals.setdefault(arch, {})
            for name, count in counts.items():
                total[name] = total.get(name, 0) + count
    for arch, counts in sorted(totals.items()):
        launched = sorted(name for name, count in counts.items() if count)
        if not launched:
            continue
        missed = sorted(name for name, count in counts.items() if not count)
        terminalreporter.write_sep("-", f"emulated sm_{arch}: {len(launched)} of {len(counts)} CUDA kernel "
                                        "instantiations launched")
        for name in launched:
            terminalreporter.write_line(f"  {counts[name]:6d}  {name}")
        for name in missed:
            terminalreporter.write_line(f"  never   {name}")
