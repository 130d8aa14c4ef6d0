"""The benchmark suite cannot rot: its CLI (quick mode) and its pytest-benchmark file run here, against the
installed package, and its self-check catches a wrong implementation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
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
    # A whole training step of both models (quick: R18, batch 1 at 256x256), after the patch's loss check.
    assert [(r["model"], r["batch"], r["image"]) for r in report["training"]] == [("r18vd", 1, 256)]
    assert all(r[f"{name} ms"] > 0 for r in report["training"]
               for name in ("python_model", "transformers", "transformers patched"))
    # Other codebases' detectors, patched vs not, for those installed here; the others skipped by name.
    sys.path.append(str(ROOT))
    try:
        from bench import codebases
    finally:
        sys.path.remove(str(ROOT))

    present = [name for name in codebases.MODELS if name not in codebases.missing_models()]
    assert sorted({r["model"] for r in report["codebases"]}) == sorted(present)
    assert all(r["patched ms"] > 0 and r["speedup"] > 0 for r in report["codebases"])
    assert {f"{codebases.TITLE}: {name}" for name in codebases.missing_models()} <= set(report["skipped"])
    # The exported detector in onnxruntime and OpenVINO (quick: 320x320), after each graph's check.
    assert [(r["method"], r["bilinear"], r["image"]) for r in report["deployment"]] == [
        ("default", "gather", 320), ("default", "grid_sample", 320), ("discrete", "-", 320)]
    assert all(r[f"{name} ms"] > 0 for r in report["deployment"]
               for name in ("python_model (PyTorch)", "onnxruntime", "openvino f32", "openvino default precision"))
    markdown = (out / "benchmark.md").read_text()
    assert "## End-to-end model" in markdown and "## Training step" in markdown
    assert "## Deployment runtimes (CPU)" in markdown
    assert "| tiny | default | float32 | cpu | forward | cpu |" in markdown
    pytest.importorskip("matplotlib")
    for chart in ("speedup_forward.png", "speedup_forward_backward.png", "peak_memory.png", "scaling.png"):
        assert (out / chart).read_bytes()[:4] == b"\x89PNG"


# A module set to None in sys.modules cannot be imported: the run then sees it as not installed.
MISSING_PACKAGE_CASES = {
    # The README's main job died here on a fresh machine: transformers without scipy for its matcher.
    "scipy-and-runtimes": (["scipy", "onnxruntime", "torch_ms_deform_attn"], ["--no-model", "--no-codebases"],
                           ["Training step: scipy", "Deployment runtimes (CPU): onnxruntime",
                            "peer torch-ms-deform-attn: torch_ms_deform_attn"]),
    "transformers": (["transformers", "torch_ms_deform_attn"], ["--no-deployment"],
                     ["End-to-end model: transformers", "Training step: transformers", "peer transformers:",
                      "peer torch-ms-deform-attn:", "Other codebases, patched: ultralytics"]),
    # The main job's virtualenv has none of the other codebases (their own: scripts/test_integrations.sh).
    "codebases": (["ultralytics", "rfdetr", "kernels", "torch_ms_deform_attn"],
                  ["--no-model", "--no-training", "--no-deployment"],
                  ["Other codebases, patched: ultralytics", "peer torch-ms-deform-attn:"]),
}


@pytest.mark.parametrize("case", MISSING_PACKAGE_CASES)
def test_a_missing_optional_package_skips_its_section_in_one_line(tmp_path, case):
    hidden, flags, expected = MISSING_PACKAGE_CASES[case]
    hide = "".join(f"sys.modules[{module!r}] = None; " for module in hidden)
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; {hide}{RUN_BENCH}", "--quick", "--shapes", "tiny", "--devices", "cpu",
         "--methods", "default", "--no-sweep", "--no-fused", *flags, "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("skipped: ")]
    for start in expected:
        assert sum(line.startswith(f"skipped: {start}") for line in lines) == 1, (start, lines)
    skipped = json.loads((tmp_path / "benchmark.json").read_text())["skipped"]
    assert len(skipped) == len(expected) == len(lines)
    assert "## Skipped" in (tmp_path / "benchmark.md").read_text()


def test_a_failed_agreement_check_exits_1_after_writing_the_report(tmp_path, monkeypatch, capsys):
    sys.path.append(str(ROOT))
    try:
        from bench import cli, model
    finally:
        sys.path.remove(str(ROOT))

    def disagree(*args, **kwargs):
        raise AssertionError("python_model and transformers disagree on r18vd (torch.float32): logits")

    monkeypatch.setattr(model, "time_models", disagree)
    monkeypatch.setattr(model, "unavailable_reason", lambda: None)
    status = cli.main(["--quick", "--shapes", "tiny", "--devices", "cpu", "--methods", "default", "--no-sweep",
                       "--no-fused", "--no-training", "--no-deployment", "--no-codebases", "--no-peers", "--no-charts",
                       "--out", str(tmp_path)])
    assert status == 1
    assert "CHECK FAILED: End-to-end model: python_model and transformers disagree" in capsys.readouterr().err
    assert json.loads((tmp_path / "benchmark.json").read_text())["results"]


def test_a_report_without_op_measurements_has_no_empty_op_tables():
    # `--codebases-only` measures no op shapes: its report opens with the codebases, not two empty tables.
    sys.path.append(str(ROOT))
    try:
        from bench import codebases, report
    finally:
        sys.path.remove(str(ROOT))
    row = {"model": "ultralytics RT-DETR-l", "pass": "inference", "image": 640, "batch": 1, "unpatched ms": 2.0,
           "unpatched spread": 0.01, "patched ms": 1.0, "patched spread": 0.01, "speedup": 2.0}
    text = report.markdown({"commit": "x"}, [], [], codebase_rows=[row])
    assert "## Summary" not in text and "## All measurements" not in text
    assert f"## {codebases.TITLE}" in text and "| ultralytics RT-DETR-l | inference |" in text


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


def load_gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_rehearsal_writes_its_report(tmp_path):
    """The GPU check's own logic, without a GPU: every step reported (as not run), within the 9 minutes."""
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--rehearse", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["build", "backends", "tests", "benchmark", "memcheck", "model",
                                                    "training", "original"]
    assert all(s["result"] == "not run (rehearsal: no GPU)" for s in report["steps"])
    assert sum(s["budget"] for s in report["steps"]) <= 9 * 60  # the budgets fit one 10-minute call
    assert report["mode"].startswith("rehearsal") and report["commit"]
    assert "| memcheck | not run (rehearsal: no GPU) |" in (tmp_path / "gpu_check.md").read_text()
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--rehearse", "--steps", "nope", "--out",
                          str(tmp_path / "refused")], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--steps: unknown ['nope']" in bad.stderr
    assert not (tmp_path / "refused").exists()  # a refused call leaves no empty report directory behind


def test_gpu_check_steps_stop_at_their_limit_and_report_as_they_go(tmp_path):
    gpu_check = load_gpu_check()
    slow = gpu_check.Step("slow", 6, [sys.executable, "-c", "import time; time.sleep(30)"], gpu=False)
    fast = gpu_check.Step("fast", 60, [sys.executable, "-c", "print('hello')"], gpu=False)
    result = gpu_check.run_step(slow, 6, tmp_path, rehearse=False)  # limits under 5 s do not start a step
    assert result["result"] == "FAILED (over its 6 s)" and result["seconds"] < 15
    assert gpu_check.run_step(fast, 60, tmp_path, rehearse=False)["result"] == "ok"
    assert (tmp_path / "fast.log").read_text().strip() == "hello"
    assert gpu_check.run_step(fast, 2, tmp_path, rehearse=False)["result"] == "not run (out of time)"
    gpu_check.write_report(tmp_path, {"commit": "abc"}, [result])
    assert "| slow | FAILED (over its 6 s) |" in (tmp_path / "gpu_check.md").read_text()


def test_triton_single_configuration_mode(monkeypatch):
    pytest.importorskip("triton")
    from rtdetrv2_kernels import triton_ms_deform_attn as kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(kernels.AUTOTUNE_ENV, raising=False)
    assert kernels.autotuning()
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")  # what the GPU check's test step sets
    assert not kernels.autotuning()
