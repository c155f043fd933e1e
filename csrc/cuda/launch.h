// Launchers of the tsvd CUDA kernels (csrc/cuda/kernels.cu). Raw pointers, sizes and a
// stream only: no ATen here, so kernels.cu compiles with bare nvcc and the ATen glue
// (csrc/cuda/ops_cuda.cpp) stays in plain C++. Every launcher returns the launch status
// (cudaGetLastError after the launch); the glue checks it.
//
// Layouts (all contiguous, B = flattened batch, nf = n3/2 + 1, r = rank):
//   real tensors            (B, n3, n1, n2)
//   complex (interleaved)   (B, nf, E, 2)           E = n1 * n2 (tube_rfft / tube_irfft)
//   a   = Uh diag(Sh)       (B, nf, n1, 2, r)       [re | im] per row
//   bt  = Vh, j fastest     (B, nf, 2, r, n2)       (forward: coalesced along j)
//   bk  = Vh, k fastest     (B, nf, n2, 2, r)       (backward)
//   ga, gb (accumulated)    like a and bk: ga += (c Gh) Vh,  gb += (c Gh)^H A,
//                           Gh = rfft(G), c_f = w_f / n3 (the adjoint of irfft)
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace tsvd {
namespace cuda {

// Largest nf = n3/2 + 1 the fused register kernels handle (n3 <= 63); larger n3 use
// cuFFT through ATen in the glue.
constexpr int64_t kMaxFusedFreq = 32;

template <typename T>
cudaError_t launch_tube_rfft(const T* x, T* xh, int64_t B, int64_t n3, int64_t E, cudaStream_t s);

template <typename T>
cudaError_t launch_tube_irfft(const T* xh, T* x, int64_t B, int64_t n3, int64_t E, cudaStream_t s);

template <typename T>
cudaError_t launch_treconstruct_fwd(const T* a, const T* bt, const T* res, T* out, int64_t B,
                                    int64_t n3, int64_t n1, int64_t n2, int64_t r, int num_sms,
                                    cudaStream_t s);

template <typename T>
cudaError_t launch_treconstruct_bwd(const T* g, const T* a, const T* bk, T* ga, T* gb, int64_t B,
                                    int64_t n3, int64_t n1, int64_t n2, int64_t r, cudaStream_t s);

// ---- v2 kernels (kernels_v2.cu): float32, n3 in {12, 48}; the glue's default where they
// apply (TSVD_CUDA_KERNELS=v1: the kernels above). Layouts: U (B, n3, n1, r), S (B, n3, r), V (B, n3, n2, r) as the op
// takes them; scratch a2 (B, n1, r, nf) and b2 (B, r, nf, n2) complex (2 floats each),
// written by the prep launch and read by the main one; xh (B, nf, E) complex.
bool v2_supported(int64_t n3, int64_t r, int64_t n1, int64_t n2);

cudaError_t launch_treconstruct_fwd_v2(const float* U, const float* S, const float* V,
                                       const float* res, float* out, float* a2, float* b2,
                                       int64_t B, int64_t n3, int64_t n1, int64_t n2, int64_t r,
                                       cudaStream_t s);

// backward: prep writes conj(A) (B, nf, n1, r) and Vh (B, nf, n2, r) (complex) for the glue's
// GEMMs P = Gh Vh (B, nf, n1, r) and Q = Gh^T conj(A) (B, nf, n2, r); post writes gU, gV and
// adds into gS, which the caller zeroes first.
cudaError_t launch_treconstruct_bwd_prep_v2(const float* U, const float* S, const float* V,
                                            float* ca, float* vh, int64_t B, int64_t n3,
                                            int64_t n1, int64_t n2, int64_t r, cudaStream_t s);

cudaError_t launch_treconstruct_bwd_post_v2(const float* P, const float* Q, const float* U,
                                            const float* S, float* gU, float* gS, float* gV,
                                            int64_t B, int64_t n3, int64_t n1, int64_t n2,
                                            int64_t r, cudaStream_t s);

// the fused P/Q (opt-in, TSVD_CUDA_KERNELS=v2pq): P = Gh Vh and Q = Gh^T conj(A) from one read
// of Gh (BF = B * nf matrices, complex); P (BF, n1, r) and Q (BF, n2, r) zeroed by the caller
// and added into. r in {1, 2, 4, 8, 16} (bwd_pq_v2_supported).
bool bwd_pq_v2_supported(int64_t r);
cudaError_t launch_treconstruct_bwd_pq_v2(const float* gh, const float* vh, const float* ca,
                                          float* P, float* Q, int64_t BF, int64_t n1,
                                          int64_t n2, int64_t r, cudaStream_t s);

cudaError_t launch_tube_rfft_v2(const float* x, float* xh, int64_t B, int64_t n3, int64_t E,
                                cudaStream_t s);

cudaError_t launch_tube_irfft_v2(const float* xh, float* x, int64_t B, int64_t n3, int64_t E,
                                 cudaStream_t s);

}  // namespace cuda
}  // namespace tsvd
