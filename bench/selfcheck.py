"""The correctness self-check that runs before any timing: every implementation about to be timed (our
backends and the installed peers), forward and every gradient, against the fp64 PyTorch reference."""

from __future__ import annotations

import torch

from rtdetrv2_kernels import ms_deform_attn_reference

from .cases import METHODS, Problem, Shape, implementations, make_inputs

# Non-square levels with D-FINE-style points, and equal points (the only layout torch-ms-deform-attn takes).
CHECK_SHAPES = (
    Shape("check-variable-points", 2, 7, ((6, 10), (5, 3), (2, 2)), (3, 6, 3), heads=3, channels=19),
    Shape("check-equal-points", 2, 7, ((6, 10), (5, 3)), (4, 4), heads=2, channels=8),
)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def _outputs_and_grads(fn, shape: Shape, method: str, inputs, grad_output):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(inputs[0], list(shape.levels), inputs[1], inputs[2], list(shape.points), method)
    wrt = inputs if method == "default" else [inputs[0], inputs[2]]  # discrete: no location gradient
    return [out, *torch.autograd.grad(out, wrt, grad_output.to(out))]


def self_check(device: str, dtypes: list[torch.dtype], backends: list[str] | None, with_peers: bool = True,
               log=print) -> list[str]:
    """Returns one line per mismatch (empty when everything agrees)."""
    failures = []
    for shape in CHECK_SHAPES:
        for dtype in dtypes:
            for method in METHODS:
                problem = Problem(shape, dtype, method, device)
                inputs = make_inputs(shape, dtype, device, seed=1)
                grad_output = torch.randn(shape.batch, shape.queries, shape.heads * shape.channels,
                                          dtype=torch.float64)
                expected = _outputs_and_grads(ms_deform_attn_reference, shape, method,
                                              [t.double().cpu() for t in inputs], grad_output)
                for name, fn in implementations(problem, backends, with_peers).items():
                    try:
                        actual = _outputs_and_grads(fn, shape, method, inputs, grad_output)
                        errors = []
                        for what, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights")
                                              if method == "default" else ("output", "grad_value", "grad_weights"),
                                              actual, expected):
                            error = (a.double().cpu() - e).abs().max().item() / max(1.0, e.abs().max().item())
                            if not error <= TOLERANCE[dtype]:  # `not <=` also catches NaN
                                errors.append(f"{what} relative error {error:.3g}")
                    except Exception as error:  # report every broken implementation, not just the first
                        errors = [f"raised {type(error).__name__}: {error}"]
                    failures += [f"{name} on {problem.label}: {e}" for e in errors]
                    log(f"  self-check {name:22s} {problem.label:50s} {'FAIL' if errors else 'ok'}")
    return failures
