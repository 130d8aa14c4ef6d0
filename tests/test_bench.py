"""The benchmark suite cannot rot: its CLI (quick mode) and its pytest-benchmark file run here, against the
installed package, and its self-check catches a wrong implementation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The checkout goes last on sys.path so that `bench` comes from it but rtdetrv2_kernels stays the installed one.
RUN_BENCH = f"import runpy, sys; sys.path.append({str(ROOT)!r}); runpy.run_module('bench', run_name='__main__')"


def run(args, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_cli_quick_run_writes_every_report(tmp_path):
    import rtdetrv2_kernels
    from rtdetrv2_kernels.backends import unavailable_reason

    out = tmp_path / "results"
    stdout = run(["-c", RUN_BENCH, "--quick", "--shapes", "tiny", "--devices", "cpu", "--out", str(out)], tmp_path)
    assert "self-check" in stdout and "SELF-CHECK FAILED" not in stdout
    report = json.loads((out / "benchmark.json").read_text())
    assert report["environment"]["commit"] and report["environment"]["cpu_threads"] >= 1
    timed = {(r["implementation"], r["method"], r["pass"]) for r in report["results"]}
    # Triton's interpreter is left out of timings unless asked for (TRITON_INTERPRET=1 is set in tests).
    ours = [b for b in rtdetrv2_kernels.BACKENDS if unavailable_reason(b, "cpu") is None and b != "triton"]
    expected = {(b, m, p) for b in ours for m in ("default", "discrete") for p in ("forward", "forward+backward")}
    assert expected <= timed
    for row in report["results"]:
        assert row["ms"] > 0 and len(row["samples_ms"]) == 3
        assert (row["vs torch"] is None) == (row["implementation"] == "torch")
        assert (row.get("peak_mib") is not None) == (row["pass"] == "forward+backward")
    assert {s["sweep"] for s in report["scaling"]} == {"batch", "queries"}
    fused_timed = {(r["backend"], r["pass"]) for r in report["fused"]}
    assert {(b, p) for b in ours if b != "torch" for p in ("forward", "forward+backward")} <= fused_timed
    assert all(r["fused ms"] > 0 and r["speedup"] > 0 for r in report["fused"])
    # The end-to-end model comparison (quick: R18 at 320x320), after its own agreement check.
    assert [(r["model"], r["image"]) for r in report["model"]] == [("r18vd", 320)]
    assert all(r["python_model ms"] > 0 and r["transformers ms"] > 0 and r["speedup deployed"] > 0
               for r in report["model"])
    markdown = (out / "benchmark.md").read_text()
    assert "## End-to-end model" in markdown
    assert "| tiny | default | float32 | cpu | forward | cpu |" in markdown
    pytest.importorskip("matplotlib")
    for chart in ("speedup_forward.png", "speedup_forward_backward.png", "peak_memory.png", "scaling.png"):
        assert (out / chart).read_bytes()[:4] == b"\x89PNG"


def test_pytest_benchmark_file_runs(tmp_path):
    pytest.importorskip("pytest_benchmark")
    stdout = run(["-m", "pytest", str(ROOT / "bench"), "--benchmark-disable", "--bench-shapes", "tiny",
                  "--bench-devices", "cpu", "--import-mode=append", "-p", "no:cacheprovider", "-q"], tmp_path)
    assert " passed" in stdout and "failed" not in stdout


def test_self_check_reports_a_wrong_implementation(monkeypatch):
    sys.path.append(str(ROOT))
    try:
        from bench import selfcheck
    finally:
        sys.path.remove(str(ROOT))
    from rtdetrv2_kernels import ms_deform_attn_reference

    def off_by_a_bit(*args):
        return ms_deform_attn_reference(*args) * (1 + 1e-3)

    monkeypatch.setattr(selfcheck, "implementations", lambda *args, **kwargs: {"wrong": off_by_a_bit})
    failures = selfcheck.self_check("cpu", [torch.float32], None, log=lambda line: None)
    assert failures and all(f.startswith("wrong on ") for f in failures)
    assert any("output relative error" in f for f in failures)
