"""The test suite's own machinery: the emulated CUDA builds are made only for the tests that run them (and a
failed build fails those tests), RTDETRV2_EMULATION_ARCHS selects them, and the test paths that the scripts
run exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import emulated_cuda
import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_pytest(tmp_path, *args, **env):
    """pytest on the checkout's tests in a fresh process with `env` set (None: removed). Run from tmp_path, so
    that `-m pytest` does not put the checkout's sources ahead of the package under test."""
    environment = {**os.environ, **env}
    environment = {key: value for key, value in environment.items() if value is not None}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=tmp_path,
                          env=environment, capture_output=True, text=True, timeout=600)


# A sanitized build without libasan preloaded: emulated_cuda.load raises at once, before compiling anything.
UNBUILDABLE = dict(RTDETRV2_EMULATION_SANITIZE="address", LD_PRELOAD=None, RTDETRV2_SKIP_EMULATION=None,
                   RTDETRV2_EMULATION_ARCHS=None)


def test_tests_without_an_emulated_backend_build_nothing(tmp_path):
    result = run_pytest(tmp_path, str(ROOT / "tests" / "detector" / "test_criterion.py"), "-k", "bad_targets",
                        **UNBUILDABLE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 passed" in result.stdout and "emulated sm_" not in result.stdout


def test_a_failed_emulated_build_errors_the_tests_that_run_it(tmp_path):
    result = run_pytest(tmp_path, str(ROOT / "tests" / "op" / "test_kernels.py::test_empty_batch_or_queries"), "-rE",
                        **UNBUILDABLE)
    errors = re.findall(r"^ERROR \S+\[([^\]]+)\]", result.stdout, re.MULTILINE)
    assert sorted(errors) == [f"{batch}-{queries}-cuda-emulated-sm{arch}-cpu" for batch, queries in ((0, 4), (2, 0))
                              for arch in (80, 90)], result.stdout[-3000:]
    assert "skipped" not in result.stdout and result.returncode == 1, result.stdout[-3000:]
    assert "needs LD_PRELOAD" in result.stdout  # the first test of each arch: why
    assert "failed earlier in this process" in result.stdout  # the second: no second attempt


def test_emulation_archs_are_validated(monkeypatch):
    monkeypatch.delenv(emulated_cuda.ARCHS_ENV, raising=False)
    assert emulated_cuda.selected_archs() == (80, 90)
    for value, archs in (("90", (90,)), (" 90, 80 ", (80, 90))):
        monkeypatch.setenv(emulated_cuda.ARCHS_ENV, value)
        assert emulated_cuda.selected_archs() == archs
    for value in ("70", "sm90", "90,90", "80;90", "80,"):
        monkeypatch.setenv(emulated_cuda.ARCHS_ENV, value)
        with pytest.raises(ValueError, match=f"RTDETRV2_EMULATION_ARCHS must be .* out of 80,90, got '{value}'"):
            emulated_cuda.selected_archs()


def test_the_emulation_archs_selection_reaches_every_emulated_test(tmp_path):
    tests = [str(ROOT / "tests" / "op" / name) for name in ("test_kernels.py", "test_emulated_cuda.py")]
    result = run_pytest(tmp_path, "--co", *tests, RTDETRV2_EMULATION_ARCHS="90", RTDETRV2_SKIP_EMULATION=None)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ids = result.stdout.splitlines()
    assert any("cuda-emulated-sm90" in i for i in ids) and any(i.endswith("-90]") for i in ids)
    assert not [i for i in ids if "sm80" in i or re.search(r"[-\[]80\]$", i)]
    bad = run_pytest(tmp_path, "--co", *tests, RTDETRV2_EMULATION_ARCHS="70", RTDETRV2_SKIP_EMULATION=None)
    assert bad.returncode != 0 and "RTDETRV2_EMULATION_ARCHS must be" in bad.stdout + bad.stderr


def test_the_test_paths_the_scripts_run_exist():
    """scripts/test.sh and the GPU check name test files (and tests in them) that must survive moves."""
    named = set()
    for script in (ROOT / "scripts" / "test.sh", ROOT / "bench" / "gpu_check.py"):
        named |= set(re.findall(r"tests/[\w/]+\.py(?:::\w+)?", script.read_text()))
    assert len(named) >= 10, named
    for entry in sorted(named):
        path, _, test = entry.partition("::")
        assert (ROOT / path).is_file(), entry
        assert not test or f"def {test}(" in (ROOT / path).read_text(), entry
