#pragma once
// The autograd formula of the forward ops, in C++: a forward op's gradients are its backward op, called with
// grad_output and the forward's own arguments (the convention of ms_deform_attn_schema.h). One boxed kernel
// serves every op pair. A Python autograd kernel (torch.library.register_autograd) cost more than the rest of
// a small call that records the graph (docs/semantics.md, "The cost of a call"). The backward ops' own
// derivative, for second derivatives, is registered from Python (rtdetrv2_kernels/_op_formulas.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace rtdetrv2_kernels {
namespace autograd_kernel {

using torch::autograd::Node;
using torch::autograd::variable_list;

// std::shared_ptr<Node> before torch 2.14, c10::intrusive_ptr<Node> from it.
using NodePointer = decltype(torch::autograd::Edge::function);

template <class T, class... Args>
NodePointer make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePointer, std::shared_ptr<Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// The floating-point tensors of a call get gradients: the level table's integer tensors get none.
inline bool gets_gradient(const c10::IValue& argument) {
  return argument.isTensor() && argument.toTensor().is_floating_point();
}

// One call's gradient: the backward op on the forward's arguments. Tensors are kept as SavedVariables, so an
// in-place change before the backward is an error and saved-tensor hooks (offloading, checkpointing) apply.
class BackwardOpNode final : public Node {
 public:
  BackwardOpNode(c10::OperatorHandle backward_op, c10::ArrayRef<c10::IValue> arguments)
      : backward_op_(std::move(backward_op)) {
    options_.reserve(arguments.size());
    for (const c10::IValue& argument : arguments) {
      if (argument.isTensor()) {
        tensors_.emplace_back(argument.toTensor(), /*is_output=*/false);
        options_.emplace_back();  // a tensor's place
      } else {
        options_.push_back(argument);
      }
    }
  }

  variable_list apply(variable_list&& grads) override {
    variable_list gradients(num_outputs());
    if (!grads[0].defined()) return gradients;  // nothing reached the output
    torch::jit::Stack stack;
    stack.reserve(1 + options_.size());
    stack.emplace_back(std::move(grads[0]));
    auto saved = tensors_.begin();
    for (const c10::IValue& option : options_) {
      if (option.isNone()) {  // no argument of these schemas is optional: None marks a tensor
        stack.emplace_back((saved++)->unpack());
      } else {
        stack.push_back(option);
      }
    }
    if (torch::autograd::GradMode::is_enabled()) {
      backward_op_.callBoxed(stack);  // create_graph=True: the backward op records its own derivative
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      backward_op_.callBoxed(stack);
    }
    // One gradient per floating-point tensor argument, in order: the node's outputs.
    for (size_t i = 0; i < gradients.size(); ++i) gradients[i] = std::move(stack[i]).toTensor();
    return gradients;
  }

  std::string name() const override { return backward_op_.schema().name(); }

  // After a backward without retain_graph: a second one then meets autograd's own error.
  void release_variables() override {
    for (auto& tensor : tensors_) tensor.reset_data();
  }

 private:
  c10::OperatorHandle backward_op_;
  std::vector<torch::autograd::SavedVariable> tensors_;
  std::vector<c10::IValue> options_;
};

// The Autograd kernel of a forward op: records a BackwardOpNode when an input needs a gradient, then runs
// the op below autograd.
class ForwardKernel final : public c10::OperatorKernel {
 public:
  explicit ForwardKernel(std::string backward_name) : backward_name_(std::move(backward_name)) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    const auto arguments = torch::jit::last(*stack, op.schema().arguments().size());
    const bool recording = torch::autograd::GradMode::is_enabled();
    torch::autograd::edge_list edges;
    bool needed = false;
    for (const c10::IValue& argument : arguments) {
      if (!gets_gradient(argument)) continue;
      const at::Tensor& tensor = argument.toTensor();
      TORCH_CHECK(!torch::autograd::isFwGradDefined(tensor), "rtdetrv2_kernels: ", op.schema().name(),
                  " has no forward-mode derivative (torch.autograd.forward_ad, torch.func.jvp); the \"torch\" "
                  "backend has one");
      if (!recording) continue;
      edges.push_back(torch::autograd::impl::gradient_edge(tensor));
      needed = needed || tensor.requires_grad();
    }
    NodePointer node;
    if (needed) {
      node = make_node<BackwardOpNode>(backward_op(op), arguments);
      node->set_next_edges(std::move(edges));
    }
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
    }
    if (node) torch::autograd::set_history(stack->back().toTensor(), node);
  }

 private:
  // Looked up at the first call: the schemas may be defined after this kernel is registered.
  const c10::OperatorHandle& backward_op(const c10::OperatorHandle& op) {
    std::call_once(found_, [&] {
      const std::string& name = op.schema().name();
      const std::string qualified = name.substr(0, name.find("::") + 2) + backward_name_;
      backward_op_ = c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "");
    });
    return *backward_op_;
  }

  std::string backward_name_;
  std::once_flag found_;
  std::optional<c10::OperatorHandle> backward_op_;
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
