"""Fake (meta) kernels and the autograd wiring shared by every forward/backward op pair of this package:
the C++ ops (registered in _registration.py) and the Triton ops, plain and fused alike.

Every pair follows one convention: forward(value, <level table>, <per-point tensors>, num_points, ...)
returns (B, Q, H*C), and backward(grad_output, <the forward's arguments>) returns the gradients of the
forward's floating-point tensor arguments, in order. The level table is spatial_shapes as a flat int list, or
(the tensor-levels op) spatial_shapes and level_start_index as integer tensors, which get no gradient.

A forward op's gradient is its backward op: for the C++ ops a C++ autograd kernel calls it
(csrc/ms_deform_attn_autograd.h), for the Triton ops `Gradient` below. The backward kernels compute first
derivatives only; when a backward pass itself builds a graph (create_graph=True: gradient penalties, double
backward), the backward op records `BackwardDerivative`, which differentiates the PyTorch reference twice, so
that the gradients can be differentiated again.
"""

from __future__ import annotations

import operator

import torch

from .reference import levels_in_order, ms_deform_attn_fused_reference, ms_deform_attn_reference


def level_pairs(flat):
    """[(H_0, W_0), ...] from the ops' flat spatial_shapes [H_0, W_0, H_1, W_1, ...]."""
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


# The reference with bilinear sampling by corner gathers, which every torch can differentiate twice.
def plain_reference(value, spatial_shapes, locations, weights, num_points, method):
    """The plain op's forward, as the reference computes it, from the op's own arguments."""
    return ms_deform_attn_reference(value, level_pairs(spatial_shapes), locations, weights, num_points, method,
                                    bilinear="gather")


def tensor_levels_reference(value, spatial_shapes, level_start_index, locations, weights, num_points, method):
    """The tensor-levels op's forward, as the reference computes it. Reads the level table on the host: it
    serves second derivatives only (create_graph=True), never a kernel call."""
    shapes = [tuple(pair) for pair in spatial_shapes.tolist()]
    value = levels_in_order(value, shapes, level_start_index.tolist())
    return ms_deform_attn_reference(value, shapes, locations, weights, num_points, method, bilinear="gather")


def fused_reference(value, spatial_shapes, reference, offsets, logits, num_points, offset_scale, method):
    """The fused op's forward, as the reference computes it, from the op's own arguments."""
    return ms_deform_attn_fused_reference(value, level_pairs(spatial_shapes), reference, offsets, logits,
                                          num_points, offset_scale, method, bilinear="gather")


def _differentiable(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def forward_fake(value, *arguments):
    """(B, Q, H*C): Q is the second size of the first per-point tensor (locations or reference points), the
    first floating-point tensor after value. Only sizes are read, never a level table's values."""
    batch, _, heads, channels = value.shape
    per_point = next(x for x in arguments if _differentiable(x))
    return value.new_empty((batch, per_point.shape[1], heads * channels))


def backward_fake(grad_output, *inputs):
    return tuple(t.new_empty(t.shape) for t in inputs if _differentiable(t))


def _overload(op):
    """The default overload (torch.ops.<namespace>.<name>.default) of op: a qualified name or a custom op."""
    namespace, name = (op if isinstance(op, str) else op._qualname).split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def _argument_names(op) -> tuple[str, ...]:
    """The names of an op's arguments, in order, from its schema (op: a qualified name or a custom op)."""
    return tuple(argument.name for argument in _overload(op)._schema.arguments)


def check_one_device(names: tuple[str, ...], arguments) -> None:
    """Every tensor argument on value's device. A direct call mixing a meta tensor with CPU ones reaches the
    fake kernel (Meta outranks CPU in dispatch), which would return uninitialized memory on value's device."""
    value = arguments[names.index("value")]
    for name, argument in zip(names, arguments):
        if isinstance(argument, torch.Tensor) and argument.device != value.device:
            raise ValueError(f"{name} is on {argument.device} but value is on {value.device}; every tensor "
                             "argument must be on value's device")


def register_fakes(forward_op, backward_op) -> None:
    """forward_fake and backward_fake as the fake kernels of an op pair (qualified names or custom ops), each
    checking check_one_device first."""
    for op, fake in ((forward_op, forward_fake), (backward_op, backward_fake)):
        names = _argument_names(op)

        def checked_fake(*arguments, names=names, fake=fake):
            check_one_device(names, arguments)
            return fake(*arguments)

        torch.library.register_fake(op)(checked_fake)


# Tensor arguments that carry the level table, as integers: never differentiated.
LEVEL_TABLE_ARGUMENTS = ("spatial_shapes", "level_start_index")


def _items(positions: tuple[int, ...]):
    """sequence -> the tuple of its items at `positions` (operator.itemgetter, a tuple even for one)."""
    get = operator.itemgetter(*positions)
    return get if len(positions) > 1 else lambda sequence: (get(sequence),)


class _Arguments:
    """Where an op's schema takes tensors and other values; setup_context saves them, rebuild gives the call's
    arguments back in a backward."""

    def __init__(self, op):
        arguments = op._schema.arguments
        self.tensor_positions = tuple(i for i, argument in enumerate(arguments)
                                      if isinstance(argument.type, torch.TensorType))
        self.option_positions = tuple(i for i in range(len(arguments)) if i not in self.tensor_positions)
        self.count = len(arguments)
        # The tensors that get gradients: all but the level table (the ops refuse an integer tensor elsewhere).
        self.gradient_positions = tuple(i for i in self.tensor_positions
                                        if arguments[i].name not in LEVEL_TABLE_ARGUMENTS)
        # Item getters run in C: setup_context runs on every call that records the graph.
        self._tensors, self._options = _items(self.tensor_positions), _items(self.option_positions)

    def setup_context(self, ctx, inputs, output):
        ctx.save_for_backward(*self._tensors(inputs))
        ctx.options = self._options(inputs)

    def rebuild(self, ctx) -> list:
        inputs = [None] * self.count
        for positions, values in ((self.tensor_positions, ctx.saved_tensors), (self.option_positions, ctx.options)):
            for position, value in zip(positions, values):
                inputs[position] = value
        return inputs

    def place(self, found) -> tuple:
        """The gradients `found` for gradient_positions, as one entry per argument (None elsewhere)."""
        grads = [None] * self.count
        for position, grad in zip(self.gradient_positions, found):
            grads[position] = grad
        return tuple(grads)


class Gradient(_Arguments):
    """The autograd formula of a forward op (`op`, an OpOverload) written in Python (the Triton ops):
    backward_op computes its gradients."""

    def __init__(self, op, backward_op):
        super().__init__(op)
        self.op, self.backward_op = op, backward_op

    def backward(self, ctx, grad_output):
        return self.place(self.backward_op(grad_output, *self.rebuild(ctx)))


class BackwardDerivative(_Arguments):
    """The autograd formula of a backward op (`backward_op`, an OpOverload): the forward's second derivatives,
    from `reference` (the forward's output from the forward's arguments, in PyTorch operations) differentiated
    twice. Recorded only by backward passes that build a graph (create_graph=True)."""

    def __init__(self, backward_op, reference):
        super().__init__(backward_op)
        self.reference = reference

    def backward(self, ctx, *upstream):
        inputs = self.rebuild(ctx)
        create_graph = torch.is_grad_enabled()  # a third derivative will be asked for
        with torch.enable_grad():
            for position in self.gradient_positions:  # what did not need a gradient becomes a leaf that does
                if not inputs[position].requires_grad:
                    inputs[position] = inputs[position].detach().requires_grad_()
            grad_output, forward_inputs = inputs[0], inputs[1:]
            differentiated = [inputs[p] for p in self.gradient_positions[1:]]
            first = torch.autograd.grad(self.reference(*forward_inputs), differentiated, grad_output,
                                        create_graph=True, allow_unused=True)
            # A first derivative that is constant (discrete locations: none, or zeros through the rounding) or that
            # got no upstream adds nothing.
            pairs = [(f, u) for f, u in zip(first, upstream) if f is not None and f.requires_grad and u is not None]
            wanted = [inputs[p] for p in self.gradient_positions]
            found = torch.autograd.grad([f for f, _ in pairs], wanted, [u for _, u in pairs], allow_unused=True,
                                        create_graph=create_graph) if pairs else [None] * len(wanted)
        return self.place(found)


# forward op (an OpOverload) -> its Gradient, for EagerCall: the ops whose formula is Python's.
GRADIENTS: dict = {}


def register_backward_derivative(backward_op, reference) -> None:
    """Makes backward_op (a qualified name or a custom op) differentiable, for create_graph=True; `reference`
    computes its forward op's output from the forward's arguments with PyTorch operations."""
    derivative = BackwardDerivative(_overload(backward_op), reference)
    torch.library.register_autograd(backward_op, derivative.backward, setup_context=derivative.setup_context)


def register_autograd(forward_op, backward_op, reference) -> None:
    """Makes backward_op the gradient of forward_op (custom ops defined in Python) and differentiable itself;
    `reference` computes forward_op's output from the same arguments with PyTorch operations."""
    overload = _overload(forward_op)
    gradient = Gradient(overload, _overload(backward_op))
    torch.library.register_autograd(forward_op, gradient.backward, setup_context=gradient.setup_context)
    GRADIENTS[overload] = gradient
    register_backward_derivative(backward_op, reference)


class EagerCall(torch.autograd.Function):
    """An eager call of a Python-defined forward op whose inputs need gradients, with the op's own formula
    (GRADIENTS) but without the dispatcher's round trip through torch.library's Python autograd kernel, which
    costs more than the rest of a small call (bench "The cost of a call"). Only for eager calls of plain
    tensors: traced calls take the op's registered path."""

    @staticmethod
    def forward(ctx, gradient, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = gradient.op(*inputs)
        gradient.setup_context(ctx, inputs, output)
        ctx.gradient = gradient
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return (None, *ctx.gradient.backward(ctx, grad_output))


OP_PAIRS = (
    ("ms_deform_attn_forward", "ms_deform_attn_backward", plain_reference),
    ("ms_deform_attn_forward_tensor_levels", "ms_deform_attn_backward_tensor_levels", tensor_levels_reference),
    ("ms_deform_attn_fused_forward", "ms_deform_attn_fused_backward", fused_reference),
)


def register_op_pairs(namespace: str) -> None:
    """Fake kernels for the op pairs of csrc/ms_deform_attn_schema.h, as defined under `namespace`
    (rtdetrv2_kernels, or the test suite's emulated CUDA builds), and their backward ops' derivative (the
    forward ops' formula is the library's C++ autograd kernel)."""
    for forward, backward, reference in OP_PAIRS:
        register_fakes(f"{namespace}::{forward}", f"{namespace}::{backward}")
        register_backward_derivative(f"{namespace}::{backward}", reference)
