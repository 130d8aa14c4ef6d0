"""The CUDA kernels emulated on the CPU (tests/emulated_cuda/): every kernel instantiation that csrc/cuda/
launches, against the fp64 reference, on each emulated architecture selected (RTDETRV2_EMULATION_ARCHS); the
emulation's own checks on kernels with planted defects; and the sanitizer runs (AddressSanitizer with UBSan,
ThreadSanitizer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import emulated_cuda
import pytest
import torch
from helpers import (
    EMULATED_ARCHS,
    FLAT_SHAPES,
    FUSED_POINTS,
    PLACED_STARTS,
    POINTS,
    SHAPES,
    assert_close,
    make_fused_inputs,
    make_inputs,
    needs_emulation,
    place_levels,
    run_with_grads,
)

from rtdetrv2_kernels import ms_deform_attn, ms_deform_attn_fused, ms_deform_attn_fused_reference, ms_deform_attn_reference
from rtdetrv2_kernels.backends import tensor_levels_implementation

pytestmark = needs_emulation
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TESTS = Path(__file__).resolve().parents[1]  # where emulated_cuda is imported from


def vector_width(dtype):
    """The channels in 16 bytes: what a lane owns when C and the strides allow it."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def channel_counts(dtype):
    """Channel counts selecting every kernel variant: per lane 1 channel (VEC = 1) or 16 bytes of them; lanes
    per (batch, query, head) a power of two up to 32 (shuffle reductions) or not (atomics); and, on the wide
    path, the point lanes that split the 11 points beside them (launch policy: as many as fit in a warp)."""
    wide = vector_width(dtype)
    return {
        "C=1": 1,  # VEC 1, 1 lane: shuffle
        "C=3": 3,  # VEC 1, 3 lanes: atomics
        f"C={10 * wide}": 10 * wide,  # wide, 10 lanes: atomics (fp32: C = 40)
        f"C={12 * wide}": 12 * wide,  # wide, 12 lanes: atomics (fp32: C = 48)
        f"C={4 * wide}": 4 * wide,  # wide, 4 lanes: shuffle, 8 point lanes (fp32: C = 16, DEIMv2's)
        f"C={8 * wide}": 8 * wide,  # wide, 8 lanes: shuffle, 4 point lanes (fp32: C = 32, the models')
        f"C={16 * wide}": 16 * wide,  # wide, 16 lanes: shuffle, 2 point lanes
        f"C={32 * wide}": 32 * wide,  # wide, 32 lanes: a whole warp's shuffle, 1 point lane
    }


def is_shuffle(dtype, channels):
    wide = vector_width(dtype)
    lanes = channels // wide if channels % wide == 0 else channels
    return lanes <= 32 and lanes & (lanes - 1) == 0


def variant_cases():
    cases = []
    for dtype in DTYPES:
        for label, channels in channel_counts(dtype).items():
            for deterministic in [False, True] if is_shuffle(dtype, channels) else [False]:
                for op in ("plain", "tensor-levels", "fused"):
                    for method in ("default", "discrete"):
                        mode = "fixed-point" if deterministic else "atomic"
                        cases.append(pytest.param(dtype, channels, deterministic, op, method,
                                                  id=f"{str(dtype)[6:]}-{label}-{mode}-{op}-{method}"))
    return cases


CASES = variant_cases()


def run_case(backend, dtype, channels, deterministic, op, method):
    """Output and gradients from `backend` and from the fp64 reference on the same (rounded) inputs."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        if op in ("plain", "tensor-levels"):
            inputs = make_inputs(batch=2, queries=3, heads=2, channels=channels, dtype=dtype)
            expected = run_with_grads(lambda v, l, w: ms_deform_attn_reference(v, SHAPES, l, w, POINTS, method),
                                      *(t.double() for t in inputs))
            if op == "plain":
                actual = run_with_grads(lambda v, l, w: ms_deform_attn(v, SHAPES, l, w, POINTS, method,
                                                                       backend=backend), *inputs)
            else:  # the levels out of order in a padded value, the table in tensors
                run = tensor_levels_implementation(backend)
                table = torch.tensor(SHAPES), torch.tensor(PLACED_STARTS)
                actual = run_with_grads(lambda v, l, w: run(place_levels(v), *table, l, w, POINTS, method), *inputs)
            return actual, expected
        inputs = make_fused_inputs(batch=2, queries=3, heads=2, channels=channels, dtype=dtype,
                                   reference="boxes" if method == "default" else "points", per_level=method == "discrete")
        expected = run_with_grads(
            lambda v, r, o, a: ms_deform_attn_fused_reference(v, SHAPES, r, o, a, FUSED_POINTS, 0.5, method),
            *(t.double() for t in inputs))
        actual = run_with_grads(
            lambda v, r, o, a: ms_deform_attn_fused(v, SHAPES, r, o, a, FUSED_POINTS, 0.5, method, backend=backend),
            *inputs)
        return actual, expected
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("emulated_arch", EMULATED_ARCHS, indirect=True)
@pytest.mark.parametrize("dtype,channels,deterministic,op,method", CASES)
def test_kernel_variant_matches_the_reference(emulated_arch, dtype, channels, deterministic, op, method):
    actual, expected = run_case(emulated_cuda.backend_name(emulated_arch), dtype, channels, deterministic, op, method)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == dtype, index
        assert_close(a, e, dtype, f"sm_{emulated_arch} result {index}")


@pytest.mark.parametrize("emulated_arch", EMULATED_ARCHS, indirect=True)
def test_the_variant_matrix_launches_every_instantiation(emulated_arch):
    # Every kernel instantiation the CUDA sources can launch (registered as the library loads) must be
    # launched by the cases above, so that none goes untested; a new template argument needs a new case.
    before = emulated_cuda.launch_counts(emulated_arch)
    for case in CASES:
        run_case(emulated_cuda.backend_name(emulated_arch), *case.values)
    after = emulated_cuda.launch_counts(emulated_arch)
    missed = sorted(name for name in after if after[name] == before.get(name, 0))
    assert not missed, f"{len(missed)} of {len(after)} instantiations never launched: {missed}"
    assert len(after) >= 393  # the registry itself works: 393 instantiations (the forward stops at 4 point lanes)


@pytest.mark.parametrize("emulated_arch", EMULATED_ARCHS, indirect=True)
@pytest.mark.parametrize("op", ["plain", "tensor-levels", "fused"])
def test_opcheck(emulated_arch, op, emulated_build):
    ops = emulated_build(emulated_arch)
    if op == "plain":
        value, locations, weights = make_inputs(batch=2, queries=3, heads=2, channels=5, borders=False)
        torch.library.opcheck(ops.ms_deform_attn_forward.default, (value.requires_grad_(), FLAT_SHAPES,
                              locations.requires_grad_(), weights.requires_grad_(), POINTS, "default"))
    elif op == "tensor-levels":
        value, locations, weights = make_inputs(batch=2, queries=3, heads=2, channels=5, borders=False)
        torch.library.opcheck(ops.ms_deform_attn_forward_tensor_levels.default, (
            place_levels(value).requires_grad_(), torch.tensor(SHAPES), torch.tensor(PLACED_STARTS),
            locations.requires_grad_(), weights.requires_grad_(), POINTS, "default"))
    else:
        value, ref, offsets, logits = make_fused_inputs(batch=2, queries=3, heads=2, channels=5)
        torch.library.opcheck(ops.ms_deform_attn_fused_forward.default, (value.requires_grad_(), FLAT_SHAPES,
                              ref.requires_grad_(), offsets.requires_grad_(), logits.requires_grad_(), FUSED_POINTS,
                              0.5, "default"))


@pytest.fixture
def planted(emulated_build):
    """planted(name): the floats 0..31 after the planted kernel `name` ran on them, in the newest selected
    build (the planted kernels do not depend on the arch)."""
    ops = emulated_build(EMULATED_ARCHS[-1])

    def run(name):
        data = torch.arange(32, dtype=torch.float32)
        ops.planted_kernel(name, data)
        return data

    return run


def test_half_warp_shuffles_from_divergent_branches_pass(planted):
    lanes = torch.arange(32)
    expected = torch.where(lanes < 16, lanes ^ 1, lanes ^ 2).float()
    assert torch.equal(planted("half_warp_shuffles"), expected)


@pytest.mark.parametrize("name,message", [
    ("shuffle_after_return", r"planted_kernels.h:\d+ with mask 0xffffffff.*lane 5 of the mask exited before it"),
    ("shuffle_at_two_sites", r"lanes 16, .*, 31 of the mask wait elsewhere \(lane 16: __shfl_xor_sync at "
                             r".*planted_kernels.h:\d+"),
    ("shuffle_outside_mask", r"mask 0xffff .*lane 0 reads lane 16, outside the mask"),
], ids=["exited-lane", "two-call-sites", "outside-the-mask"])
def test_divergent_shuffles_raise_instead_of_hanging(planted, name, message):
    with pytest.raises(RuntimeError, match=f"convergence error in kernel planted::{name}, block .*{message}"):
        planted(name)
    # The emulation recovers: the next launch runs normally.
    test_half_warp_shuffles_from_divergent_branches_pass(planted)


@pytest.mark.parametrize("name,message", [
    ("throws", "lane 0: planted exception"),
    ("misaligned_atomic", "lane 0: misaligned address in an atomic at .*planted_kernels.h:"),
])
def test_device_faults_raise(planted, name, message):
    with pytest.raises(RuntimeError, match=f"device fault in kernel planted::{name}, block .*{message}"):
        planted(name)
    test_half_warp_shuffles_from_divergent_branches_pass(planted)


def sanitized_environment():
    return {**os.environ, emulated_cuda.SANITIZE_ENV: "address", "LD_PRELOAD": emulated_cuda.asan_preload(),
            "ASAN_OPTIONS": "detect_leaks=0", "PYTHONPATH": str(TESTS)}


@pytest.mark.slow
def test_address_sanitizer_reports_a_planted_out_of_bounds_read():
    script = (f"import emulated_cuda, torch; emulated_cuda.load({EMULATED_ARCHS[-1]})"
              ".planted_kernel('read_past_end', torch.zeros(64))")
    result = subprocess.run([sys.executable, "-c", script], env=sanitized_environment(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "heap-buffer-overflow" in result.stderr and "read_past_end" in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def race_check():
    """The ThreadSanitizer executable (tests/emulated_cuda/race_check.cpp), built once per session."""
    from emulated_cuda import race_check

    return race_check.build()


@pytest.mark.slow
def test_thread_sanitizer_reports_a_planted_race(race_check):
    result = subprocess.run([str(race_check), "planted"], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ThreadSanitizer: data race" in result.stderr and "racing_store" in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_kernels_are_race_free_under_thread_sanitizer(race_check):
    result = subprocess.run([str(race_check)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ThreadSanitizer" not in result.stderr, result.stderr[-4000:]
    assert "launches checked" in result.stdout, result.stdout[-2000:]
    print(result.stdout.strip().splitlines()[-1])
