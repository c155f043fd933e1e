// Schemas of the tsvd operators (one place; CPU kernels in csrc/cpu/, CUDA kernels in
// csrc/cuda/ register implementations for the same schemas). Fake (meta) kernels and
// autograd formulas are registered from Python, in tsvd/_ext.py.
#include <torch/library.h>

TORCH_LIBRARY(tsvd, m) {
  // U (B,n3,n1,r), S (B,n3,r), V (B,n3,n2,r), residual (B,n3,n1,n2) -> (B,n3,n1,n2)
  m.def("treconstruct(Tensor U, Tensor S, Tensor V, Tensor? residual) -> Tensor");
  // -> (grad_U, grad_S, grad_V)
  m.def("treconstruct_backward(Tensor grad, Tensor U, Tensor S, Tensor V) -> (Tensor, Tensor, Tensor)");
  // (B,n3,n1,n2) x (B,n3,n2,n4) -> (B,n3,n1,n4)
  m.def("tprod(Tensor A, Tensor B) -> Tensor");
  // (B,n3,n1,n2) real -> (B,n3//2+1,n1,n2) complex (== torch.fft.rfft(X, dim=1))
  m.def("tube_rfft(Tensor X) -> Tensor");
  // inverse: (B,nf,n1,n2) complex -> (B,n3,n1,n2) real (== torch.fft.irfft(Xh, n=n3, dim=1))
  m.def("tube_irfft(Tensor Xh, SymInt n3) -> Tensor");
}
