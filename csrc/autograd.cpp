// Autograd of tsvd::treconstruct and tsvd::tprod, in C++ (issue 13): one kernel registered
// for the Autograd dispatch key, so that a differentiable call goes from the dispatcher to
// the CPU/CUDA kernel without entering Python (the formulas were Python functions given to
// torch.library.register_autograd). The DFT ops keep their Python formulas (tsvd/_ext.py).
//
//   treconstruct(U, S, V, R) = R + U * fdiag(S) * V^T (t-products)
//     grads: (gU, gS, gV) = treconstruct_backward(G, U, S, V); gR = G
//   tprod(A, B) = A * B
//     grads: gA = G * B^T, gB = A^T * G  (^T: t-transpose)
//
// The forwards call the kernels below the Autograd key (else the dispatcher would come back
// here). Backward dispatches normally, so tprod's backward is itself differentiable;
// treconstruct_backward has no derivative of its own (once differentiable).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace tsvd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_treconstruct(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                             const std::optional<at::Tensor>& R) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tsvd::treconstruct", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&)>();
  return op.call(U, S, V, R);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_treconstruct_backward(
    const at::Tensor& G, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tsvd::treconstruct_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(G, U, S, V);
}

at::Tensor call_tprod(const at::Tensor& A, const at::Tensor& B) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tsvd::tprod", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(A, B);
}

// t-transpose of (B, n3, n1, n2): frontal slice 0 transposed, slices 1..n3-1 transposed and
// taken in reverse order
at::Tensor ttranspose(const at::Tensor& a) {
  const auto n3 = a.size(1);
  at::Tensor t = n3 > 1 ? at::cat({a.narrow(1, 0, 1), a.narrow(1, 1, n3 - 1).flip({1})}, 1)
                        : a;
  return t.transpose(-1, -2);
}

struct TReconstruct : public torch::autograd::Function<TReconstruct> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& U, const at::Tensor& S,
                            const at::Tensor& V, const std::optional<at::Tensor>& R) {
    ctx->save_for_backward({U, S, V});
    ctx->saved_data["has_residual"] = R.has_value() && R->defined();
    at::AutoDispatchBelowADInplaceOrView below;   // to the CPU/CUDA kernel, not back here
    return call_treconstruct(U, S, V, R);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& G = grads[0];
    at::Tensor gU, gS, gV;
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2))
      std::tie(gU, gS, gV) = call_treconstruct_backward(G, saved[0], saved[1], saved[2]);
    at::Tensor gR;
    if (ctx->saved_data["has_residual"].toBool() && ctx->needs_input_grad(3)) gR = G;
    return {ctx->needs_input_grad(0) ? gU : at::Tensor(),
            ctx->needs_input_grad(1) ? gS : at::Tensor(),
            ctx->needs_input_grad(2) ? gV : at::Tensor(), gR};
  }
};

struct TProd : public torch::autograd::Function<TProd> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& A, const at::Tensor& B) {
    ctx->save_for_backward({A, B});
    at::AutoDispatchBelowADInplaceOrView below;
    return call_tprod(A, B);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& G = grads[0];
    at::Tensor gA, gB;
    if (ctx->needs_input_grad(0)) gA = call_tprod(G, ttranspose(saved[1]));
    if (ctx->needs_input_grad(1)) gB = call_tprod(ttranspose(saved[0]), G);
    return {gA, gB};
  }
};

at::Tensor treconstruct_autograd(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                 const std::optional<at::Tensor>& R) {
  return TReconstruct::apply(U, S, V, R);
}

at::Tensor tprod_autograd(const at::Tensor& A, const at::Tensor& B) {
  return TProd::apply(A, B);
}

}  // namespace
}  // namespace tsvd

TORCH_LIBRARY_IMPL(tsvd, Autograd, m) {
  m.impl("treconstruct", &tsvd::treconstruct_autograd);
  m.impl("tprod", &tsvd::tprod_autograd);
}
