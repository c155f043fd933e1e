// CPU implementations of the tsvd ops (ATen glue over csrc/kernels/*.h).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace tsvd {
namespace cpu {

at::Tensor tube_rfft(const at::Tensor& X);
at::Tensor tube_irfft(const at::Tensor& Xh, int64_t n3);
at::Tensor tprod(const at::Tensor& A, const at::Tensor& B);
at::Tensor treconstruct(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                        const std::optional<at::Tensor>& residual);
std::tuple<at::Tensor, at::Tensor, at::Tensor> treconstruct_backward(
    const at::Tensor& grad, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V);

}  // namespace cpu
}  // namespace tsvd
