// Tile micro-kernels of the fused treconstruct op (residual + U * fdiag(S) * V^T) and
// of its backward. Raw pointers and sizes only (no ATen), usable from CUDA as
// __host__ __device__ functions.
//
// Fourier-domain factors (f < nf = n3/2 + 1, r = rank, R2 = 2r):
//   A_f = Uh_f diag(Sh_f)           a [(f*n1 + i)*R2 + c*r + k]   (c = 0 re, 1 im)
//   Vh_f (j contiguous, forward)    bt[((f*2 + c)*r + k)*n2p + j] (n2p >= n2, zero padded)
//   Vh_f (k contiguous, backward)   bk[(f*n2 + j)*R2 + c*r + k]
// Forward:   Yh_f[i, j] = sum_k A_f[i,k] conj(Vh_f[j,k]);  Y = irfft(Yh) (+ residual)
// Backward:  Gh = rfft(G);  gWh_f = Gh_f Vh_f  (n1 x r);  gVh_f = Gh_f^H A_f  (n2 x r)
// (the backward packs rows as [re | im] of a padded rank r', see trec_grad_tile)
#pragma once
#include "common.h"

namespace tsvd {

// Yh for IB rows i0.. and JB = NV * L columns j0..: yr/yi laid out [ib][f][JB].
template <typename T, typename V, int NV, int IB>
TSVD_HOST_DEVICE inline void trec_yhat_tile(int64_t nf, int64_t r, int64_t n1, int64_t n2p,
                                            int64_t i0, int64_t j0, const T* TSVD_RESTRICT a,
                                            const T* TSVD_RESTRICT bt, T* TSVD_RESTRICT yr,
                                            T* TSVD_RESTRICT yi) {
  constexpr int L = lanes<V, T>(), JB = NV * L;
  const int64_t R2 = 2 * r;
  for (int64_t f = 0; f < nf; ++f) {
    V accr[IB][NV], acci[IB][NV];
    for (int ib = 0; ib < IB; ++ib)
      for (int v = 0; v < NV; ++v) { accr[ib][v] = vzero<V, T>(); acci[ib][v] = vzero<V, T>(); }
    const T* arow = a + (f * n1 + i0) * R2;
    for (int64_t k = 0; k < r; ++k) {
      const T* pbr = bt + ((f * 2 + 0) * r + k) * n2p + j0;
      const T* pbi = bt + ((f * 2 + 1) * r + k) * n2p + j0;
      V br[NV], bi[NV];
      for (int v = 0; v < NV; ++v) { br[v] = vload<V>(pbr + v * L); bi[v] = vload<V>(pbi + v * L); }
      for (int ib = 0; ib < IB; ++ib) {
        const T ar = arow[ib * R2 + k];
        const T ai = arow[ib * R2 + r + k];
        for (int v = 0; v < NV; ++v) {
          accr[ib][v] += ar * br[v] + ai * bi[v];
          acci[ib][v] += ai * br[v] - ar * bi[v];
        }
      }
    }
    for (int ib = 0; ib < IB; ++ib)
      for (int v = 0; v < NV; ++v) {
        vstore(yr + (ib * nf + f) * JB + v * L, accr[ib][v]);
        vstore(yi + (ib * nf + f) * JB + v * L, acci[ib][v]);
      }
  }
}

// Backward accumulation for one tile of Gh = x + i y (IB rows, w <= JB valid columns;
// gr/gi laid out [ib][f][JB]), over the k-slice [k0, k0 + NK*L) of the RR = 2r' packed
// [re | im] factor rows (r' = padded rank):
//   ga[(f*n1 + i0+ib)*RR + :] += sum_j x * bk[f,j0+j,:] + y * bk2[f,j0+j,:]   (= Gh_f Vh_f)
//   gb[(f*n2 + j0+j)*RR + :]  += sum_ib x * a[f,i0+ib,:] + y * a2[f,i0+ib,:]  (= Gh_f^H A_f)
// with bk = [Re Vh | Im Vh], bk2 = [-Im Vh | Re Vh], a = [Re A | Im A], a2 = [Im A | -Re A].
template <typename T, typename VK, int NK, int JB, int IB>
TSVD_HOST_DEVICE inline void trec_grad_tile(int64_t nf, int64_t n1, int64_t n2, int64_t RR,
                                            int64_t k0, int64_t i0, int64_t j0, int64_t w,
                                            const T* TSVD_RESTRICT gr, const T* TSVD_RESTRICT gi,
                                            const T* TSVD_RESTRICT a, const T* TSVD_RESTRICT a2,
                                            const T* TSVD_RESTRICT bk, const T* TSVD_RESTRICT bk2,
                                            T* TSVD_RESTRICT ga, T* TSVD_RESTRICT gb) {
  constexpr int L = lanes<VK, T>();
  for (int64_t f = 0; f < nf; ++f) {
    VK av[IB][NK], a2v[IB][NK], s1[IB][NK], s2[IB][NK];
    for (int ib = 0; ib < IB; ++ib)
      for (int v = 0; v < NK; ++v) {
        const int64_t o = (f * n1 + i0 + ib) * RR + k0 + v * L;
        av[ib][v] = vload<VK>(a + o);
        a2v[ib][v] = vload<VK>(a2 + o);
        s1[ib][v] = vzero<VK, T>();
        s2[ib][v] = vzero<VK, T>();
      }
    for (int64_t j = 0; j < w; ++j) {
      VK bv[NK], b2v[NK], t1[NK], t2[NK];
      const int64_t ob = (f * n2 + j0 + j) * RR + k0;
      for (int v = 0; v < NK; ++v) {
        bv[v] = vload<VK>(bk + ob + v * L);
        b2v[v] = vload<VK>(bk2 + ob + v * L);
        t1[v] = vzero<VK, T>();
        t2[v] = vzero<VK, T>();
      }
      for (int ib = 0; ib < IB; ++ib) {
        const T x = gr[(ib * nf + f) * JB + j], y = gi[(ib * nf + f) * JB + j];
        for (int v = 0; v < NK; ++v) {
          s1[ib][v] += x * bv[v];
          s2[ib][v] += y * b2v[v];
          t1[v] += x * av[ib][v];
          t2[v] += y * a2v[ib][v];
        }
      }
      for (int v = 0; v < NK; ++v)
        vstore(gb + ob + v * L, vload<VK>(gb + ob + v * L) + (t1[v] + t2[v]));
    }
    for (int ib = 0; ib < IB; ++ib)
      for (int v = 0; v < NK; ++v) {
        const int64_t o = (f * n1 + i0 + ib) * RR + k0 + v * L;
        vstore(ga + o, vload<VK>(ga + o) + (s1[ib][v] + s2[ib][v]));
      }
  }
}

}  // namespace tsvd
