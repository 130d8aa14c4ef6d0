#pragma once
// The autograd formula of the forward ops, in C++: a forward op's gradients are its backward op, called with
// grad_output and the forward's own arguments (the convention of ms_deform_attn_schema.h). One boxed kernel
// serves every op pair. A Python autograd kernel (torch.library.register_autograd) cost more than the rest of
// a small call that records the graph (docs/semantics.md, "The cost of a call"). The backward ops' own
// derivative, for second derivatives, is registered from Python (rtdetrv2_kernels/_op_formulas.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <string>
#include <utility>

namespace rtdetrv2_kernels {
namespace autograd_kernel {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The floating-point tensors of a call get gradients: the level table's integer tensors get none.
inline bool gets_gradient(const c10::IValue& argument) {
  return argument.isTensor() && argument.toTensor().is_floating_point();
}

// One call of a forward op that records the graph, as a torch::autograd::Function, whose node autograd
// treats as its own: saved tensors checked for in-place changes and passed through saved-tensor hooks, freed
// after a backward, and supported by compiled autograd. Its inputs are the call's floating-point tensors; the
// whole call is on the boxed stack.
struct BackwardOp : public torch::autograd::Function<BackwardOp> {
  // Compiled autograd may trace backward: it only calls the backward op, whose fake kernel it sees.
  static constexpr bool is_traceable = true;

  static at::Tensor forward(AutogradContext* ctx, const c10::OperatorHandle* op, c10::DispatchKeySet keys,
                            torch::jit::Stack* stack, const std::string* backward_name, at::TensorList inputs) {
    const auto arguments = torch::jit::last(*stack, op->schema().arguments().size());
    variable_list tensors;
    // The backward op's name, then the call's other arguments, None in a tensor's place (none is optional).
    c10::impl::GenericList call(c10::AnyType::get());
    call.reserve(1 + arguments.size());
    call.push_back(*backward_name);
    for (const c10::IValue& argument : arguments) {
      if (argument.isTensor()) tensors.push_back(argument.toTensor());
      call.push_back(argument.isTensor() ? c10::IValue() : argument);
    }
    ctx->save_for_backward(tensors);
    ctx->saved_data["call"] = std::move(call);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op->redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);  // arguments -> the output
    return torch::jit::pop(*stack).toTensor();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list tensors = ctx->get_saved_variables();
    const auto call = ctx->saved_data["call"].toListRef();
    const c10::OperatorHandle backward_op =
        c10::Dispatcher::singleton().findSchemaOrThrow(call[0].toStringRef().c_str(), "");
    torch::jit::Stack stack;
    stack.reserve(call.size());
    stack.emplace_back(std::move(grads[0]));
    auto tensor = tensors.begin();
    for (const c10::IValue& argument : call.slice(1)) {
      stack.push_back(argument.isNone() ? c10::IValue(*tensor++) : argument);
    }
    if (torch::autograd::GradMode::is_enabled()) {
      backward_op.callBoxed(stack);  // create_graph=True: the backward op records its own derivative
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      backward_op.callBoxed(stack);
    }
    // The gradients of forward's arguments: none for the four that are not tensors, then the backward op's
    // returns, one per floating-point tensor argument.
    variable_list gradients(4);
    for (c10::IValue& gradient : stack) gradients.push_back(std::move(gradient).toTensor());
    return gradients;
  }
};

// The Autograd kernel of a forward op: through BackwardOp where an input needs a gradient, else straight
// below autograd.
class ForwardKernel final : public c10::OperatorKernel {
 public:
  explicit ForwardKernel(std::string backward_name) : backward_name_(std::move(backward_name)) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    const auto arguments = torch::jit::last(*stack, op.schema().arguments().size());
    const bool recording = torch::autograd::GradMode::is_enabled();
    variable_list inputs;
    bool needed = false;
    for (const c10::IValue& argument : arguments) {
      if (!gets_gradient(argument)) continue;
      const at::Tensor& tensor = argument.toTensor();
      TORCH_CHECK(!torch::autograd::isFwGradDefined(tensor), "rtdetrv2_kernels: ", op.schema().name(),
                  " has no forward-mode derivative (torch.autograd.forward_ad, torch.func.jvp); the \"torch\" "
                  "backend has one");
      inputs.push_back(tensor);
      needed = needed || (recording && tensor.requires_grad());
    }
    if (needed) {
      stack->emplace_back(BackwardOp::apply(&op, keys, stack, &qualified_backward_name(op), at::TensorList(inputs)));
      return;
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }

 private:
  // "<namespace>::<backward op>", made at the first call: the namespace is the forward op's.
  const std::string& qualified_backward_name(const c10::OperatorHandle& op) {
    std::call_once(named_, [&] {
      const std::string& name = op.schema().name();
      qualified_ = name.substr(0, name.find("::") + 2) + backward_name_;
    });
    return qualified_;
  }

  std::string backward_name_, qualified_;
  std::once_flag named_;
};

}  // namespace autograd_kernel

// The Autograd kernels of the forward ops of ms_deform_attn_schema.h, for TORCH_LIBRARY_IMPL(<ns>, Autograd, m).
inline void register_autograd_kernels(torch::Library& m) {
  const std::pair<const char*, const char*> pairs[] = {
      {"ms_deform_attn_forward", "ms_deform_attn_backward"},
      {"ms_deform_attn_forward_tensor_levels", "ms_deform_attn_backward_tensor_levels"},
      {"ms_deform_attn_fused_forward", "ms_deform_attn_fused_backward"},
  };
  for (const auto& [forward, backward] : pairs) {
    m.impl(forward, torch::CppFunction::makeFromBoxedFunctor(
                        std::make_unique<autograd_kernel::ForwardKernel>(backward)));
  }
}

}  // namespace rtdetrv2_kernels
