// Per-column micro-kernels of the CUDA kernels: one GPU thread owns one column (i, j)
// of a (n3, n1, n2) tensor and keeps its nf = n3/2 + 1 Fourier coefficients in
// registers (arrays of compile-time size MAXF, indexed only inside fully unrolled loops,
// so they stay in registers; frequencies f >= nf are skipped by a guard).
//
// No ATen, no CUDA headers: the functions are __host__ __device__ (TSVD_HOST_DEVICE) and
// are compiled and tested on the CPU too (tests/test_cuda.py builds a small host harness
// of this header with the system C++ compiler and compares it with numpy).
//
// Table conventions are those of csrc/kernels/dft.h (make_dft_tables): (n3/2 + 1) rows t,
// nf columns f, row-major [t][f]; angle th = 2 pi f t / n3;
//   c[t][f] = sc_f cos(th),  s[t][f] = -sc_f sin(th),  sc_f = 1 (kUnit) or w_f / n3
//   (kIrfft; w_f = 1 for the DC and Nyquist bins, 2 otherwise); sin of DC/Nyquist is 0.
// dft_table_entry() computes one entry exactly like make_dft_tables, so a CUDA block can
// fill its shared-memory tables itself (no host-to-device copy per call).
#pragma once
#include "../kernels/common.h"

namespace tsvd {
namespace cuda_tile {

#if defined(__CUDACC__)
#define TSVD_UNROLL _Pragma("unroll")
#else
#define TSVD_UNROLL
#endif

// One table entry (see above). scale_irfft: false -> sc = 1, true -> sc = w_f / n3.
template <typename T>
TSVD_HOST_DEVICE inline void dft_table_entry(int64_t n3, int64_t t, int64_t f, bool scale_irfft,
                                             T* c, T* s) {
  const int64_t m = (f * t) % n3;
  const double two_pi = 6.283185307179586476925286766559;
  double cv, sv;
  if (m == 0) {
    cv = 1.0; sv = 0.0;
  } else if (2 * m == n3) {
    cv = -1.0; sv = 0.0;
  } else {
    const double th = two_pi * double(m) / double(n3);
    cv = cos(th);
    sv = sin(th);
  }
  const bool real_bin = (f == 0) || (2 * f == n3);
  if (real_bin) sv = 0.0;
  const double sc = scale_irfft ? (real_bin ? 1.0 : 2.0) / double(n3) : 1.0;
  *c = T(sc * cv);
  *s = T(-sc * sv);
}

// Forward real DFT of one column x[t * xs], t < n3, with tables fc/fs:
//   xr[f] = sum_t fc[t][f] x_t (t folded to [0, n3/2]),  xi[f] = sum_t fs[t][f] x_t.
// With kUnit tables this is rfft; with kIrfft tables the adjoint of irfft.
template <typename T, int MAXF>
TSVD_HOST_DEVICE inline void rdft_column(int64_t n3, int nf, const T* TSVD_RESTRICT fc,
                                         const T* TSVD_RESTRICT fs, const T* TSVD_RESTRICT x,
                                         int64_t xs, T (&xr)[MAXF], T (&xi)[MAXF]) {
  const T x0 = x[0];
  TSVD_UNROLL
  for (int f = 0; f < MAXF; ++f) {
    xr[f] = (f < nf) ? fc[f] * x0 : T(0);
    xi[f] = T(0);
  }
  const int64_t h = (n3 - 1) / 2;
  for (int64_t t = 1; t <= h; ++t) {
    const T a = x[t * xs], b = x[(n3 - t) * xs];
    const T e = a + b, o = a - b;
    const T* cr = fc + t * nf;
    const T* sr = fs + t * nf;
    TSVD_UNROLL
    for (int f = 0; f < MAXF; ++f) {
      if (f < nf) {
        xr[f] += cr[f] * e;
        xi[f] += sr[f] * o;
      }
    }
  }
  if (n3 % 2 == 0 && n3 > 1) {
    const T a = x[(n3 / 2) * xs];
    const T* cr = fc + (n3 / 2) * nf;
    TSVD_UNROLL
    for (int f = 0; f < MAXF; ++f)
      if (f < nf) xr[f] += cr[f] * a;
  }
}

// Inverse real DFT of one column from register coefficients, plus an optional residual:
//   out[t * os] = (res ? res[t * rs] : 0) + sum_f ic[t][f] yr[f] + is[t][f] yi[f]
// for all t < n3, using the symmetry of t and n3 - t. With kIrfft tables this is irfft
// (the imaginary parts of the DC and Nyquist bins are ignored), with kUnit tables the
// adjoint of rfft.
template <typename T, int MAXF>
TSVD_HOST_DEVICE inline void irdft_column(int64_t n3, int nf, const T* TSVD_RESTRICT ic,
                                          const T* TSVD_RESTRICT is, const T (&yr)[MAXF],
                                          const T (&yi)[MAXF], const T* TSVD_RESTRICT res,
                                          int64_t rs, T* TSVD_RESTRICT out, int64_t os) {
  {
    T a = T(0);
    TSVD_UNROLL
    for (int f = 0; f < MAXF; ++f)
      if (f < nf) a += ic[f] * yr[f];
    out[0] = res ? res[0] + a : a;
  }
  const int64_t h = (n3 - 1) / 2;
  for (int64_t t = 1; t <= h; ++t) {
    const T* cr = ic + t * nf;
    const T* sr = is + t * nf;
    T c = T(0), s = T(0);
    TSVD_UNROLL
    for (int f = 0; f < MAXF; ++f) {
      if (f < nf) {
        c += cr[f] * yr[f];
        s += sr[f] * yi[f];
      }
    }
    const int64_t tb = n3 - t;
    if (res) {
      out[t * os] = res[t * rs] + (c + s);
      out[tb * os] = res[tb * rs] + (c - s);
    } else {
      out[t * os] = c + s;
      out[tb * os] = c - s;
    }
  }
  if (n3 % 2 == 0 && n3 > 1) {
    const int64_t t = n3 / 2;
    const T* cr = ic + t * nf;
    T a = T(0);
    TSVD_UNROLL
    for (int f = 0; f < MAXF; ++f)
      if (f < nf) a += cr[f] * yr[f];
    out[t * os] = res ? res[t * rs] + a : a;
  }
}

// Fourier-domain rank-r product for one (i, j):
//   yr[f] + i yi[f] = sum_k A_f[i, k] conj(Vh_f[j, k])
// Layouts (as csrc/kernels/treconstruct.h): a_i points at A_0[i, :] of
//   a[(f*n1 + i)*2r + c*r + k]  (c = 0 re, 1 im), so row f is a_i + f*astride (astride = n1*2r);
// b_j points at element j of bt[((f*2 + c)*r + k)*n2 + j] (column j contiguous across
// threads), so (f, c, k) is b_j[((f*2 + c)*r + k) * n2].
template <typename T, int MAXF>
TSVD_HOST_DEVICE inline void yhat_column(int nf, int64_t r, const T* TSVD_RESTRICT a_i,
                                         int64_t astride, const T* TSVD_RESTRICT b_j,
                                         int64_t n2, T (&yr)[MAXF], T (&yi)[MAXF]) {
  TSVD_UNROLL
  for (int f = 0; f < MAXF; ++f) {
    T accr = T(0), acci = T(0);
    if (f < nf) {
      const T* ar = a_i + f * astride;
      const T* br = b_j + (int64_t(f) * 2 * r) * n2;
      const T* bi = br + r * n2;
      for (int64_t k = 0; k < r; ++k) {
        const T xr = ar[k], xi = ar[r + k];
        const T vr = br[k * n2], vi = bi[k * n2];
        accr += xr * vr + xi * vi;
        acci += xi * vr - xr * vi;
      }
    }
    yr[f] = accr;
    yi[f] = acci;
  }
}

// Backward reductions over one tile of c Gh held as planes gr/gi (row pitch `pitch`):
// ga entry (f, i, k):  sum_{jj < w} (gr[jj] + i gi[jj]) * Vh_f[j0 + jj, k]
//   with v pointing at bk[(f*n2 + j0)*2r + k] (bk rows of 2r: [re | im]);
template <typename T>
TSVD_HOST_DEVICE inline void ga_entry(int w, const T* TSVD_RESTRICT gr, const T* TSVD_RESTRICT gi,
                                      const T* TSVD_RESTRICT v, int64_t r, T* sr, T* si) {
  const int64_t R2 = 2 * r;
  T accr = T(0), acci = T(0);
  for (int jj = 0; jj < w; ++jj) {
    const T x = gr[jj], y = gi[jj];
    const T vr = v[jj * R2], vi = v[jj * R2 + r];
    accr += x * vr - y * vi;
    acci += x * vi + y * vr;
  }
  *sr = accr;
  *si = acci;
}

// gb entry (f, j, k):  sum_{ii < rows} conj(gr[ii*pitch] + i gi[ii*pitch]) * A_f[i0 + ii, k]
//   with av pointing at a[(f*n1 + i0)*2r + k].
template <typename T>
TSVD_HOST_DEVICE inline void gb_entry(int rows, const T* TSVD_RESTRICT gr, const T* TSVD_RESTRICT gi,
                                      int64_t pitch, const T* TSVD_RESTRICT av, int64_t r, T* sr,
                                      T* si) {
  const int64_t R2 = 2 * r;
  T accr = T(0), acci = T(0);
  for (int ii = 0; ii < rows; ++ii) {
    const T x = gr[ii * pitch], y = gi[ii * pitch];
    const T ar = av[ii * R2], ai = av[ii * R2 + r];
    accr += x * ar + y * ai;
    acci += x * ai - y * ar;
  }
  *sr = accr;
  *si = acci;
}

// Number of frequencies the register kernels are instantiated for: nf <= 32, n3 <= 63.
constexpr int kMaxRegisterFreq = 32;

// The smallest instantiated MAXF bucket >= nf (8, 16, 32), or 0 when nf is too large.
TSVD_HOST_DEVICE inline int freq_bucket(int64_t nf) {
  return nf <= 8 ? 8 : nf <= 16 ? 16 : nf <= 32 ? 32 : 0;
}

}  // namespace cuda_tile
}  // namespace tsvd
