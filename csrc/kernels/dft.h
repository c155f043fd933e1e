// Real DFT along the tube axis as small dense products, on tiles of JB contiguous
// columns. Shared by the CPU kernels and (as __host__ __device__ functions) the CUDA
// kernels; no ATen headers.
//
// Conventions: n3 = tube length, nf = n3/2 + 1 stored frequencies, h = (n3-1)/2 pairs
// (t, n3-t). Angles th(f, t) = 2*pi*f*t/n3. Tables have (n3/2 + 1) rows t and nf
// columns f, row-major ([t][f]).
//
//   forward tables (rfft):   fc[t][f] = sc_f * cos(th),   fs[t][f] = -sc_f * sin(th)
//     Xr_f = sum_t x_t fc[t][f] (mirrored t folded in), Xi_f = sum_t x_t fs[t][f]
//   inverse tables (irfft):  ic[t][f] = sc_f * cos(th),   is[t][f] = -sc_f * sin(th)
//     x_t = sum_f ic[t][f] Xr_f + is[t][f] Xi_f
// sc_f selects the map: forward sc = 1 is rfft, sc = w_f/n3 its adjoint w.r.t. irfft;
// inverse sc = w_f/n3 is irfft (w_f = 1 for DC and Nyquist, 2 otherwise), sc = 1 the
// adjoint of rfft. The imaginary parts of the DC and Nyquist bins get an exact 0.
#pragma once
#include "common.h"

namespace tsvd {

enum class DftScale : int { kUnit = 0, kIrfft = 1 };

// Fills cos/sin tables (each (n3/2+1) x nf) in double precision then casts to T.
template <typename T>
inline void make_dft_tables(int64_t n3, DftScale scale, T* c, T* s) {
  const int64_t nf = n_freq(n3), nt = n3 / 2 + 1;
  const double two_pi = 6.283185307179586476925286766559;
  for (int64_t t = 0; t < nt; ++t) {
    for (int64_t f = 0; f < nf; ++f) {
      const int64_t m = (f * t) % n3;
      double cv, sv;
      if (m == 0) { cv = 1.0; sv = 0.0; }
      else if (2 * m == n3) { cv = -1.0; sv = 0.0; }
      else { cv = std::cos(two_pi * double(m) / double(n3)); sv = std::sin(two_pi * double(m) / double(n3)); }
      const bool real_bin = (f == 0) || (2 * f == n3);
      if (real_bin) sv = 0.0;
      double sc = 1.0;
      if (scale == DftScale::kIrfft) sc = (real_bin ? 1.0 : 2.0) / double(n3);
      c[t * nf + f] = T(sc * cv);
      s[t * nf + f] = T(-sc * sv);
    }
  }
}

// ---------------------------------------------------------------------------------
// Tile kernels. A tile is JB = NV * L contiguous columns (L lanes per V value); buffers
// of per-frequency or per-t tile rows are laid out [row][JB].
//
// Inverse real DFT of one tile: for t in [0, n3) and j in [0, JB):
//   out[t*os + j] = (res ? res[t*rs + j] : 0) + sum_f ic[t][f] yr[f*JB + j] + is[t][f] yi[f*JB + j]
// using the symmetry of t and n3 - t (cos even, sin odd). TB pairs are register-blocked.
// ---------------------------------------------------------------------------------
template <typename T, typename V, int NV, int TB>
TSVD_HOST_DEVICE inline void irdft_pairs_block(int64_t n3, int64_t nf, int64_t t0,
                                               const T* TSVD_RESTRICT ic, const T* TSVD_RESTRICT is,
                                               const T* TSVD_RESTRICT yr, const T* TSVD_RESTRICT yi,
                                               const T* TSVD_RESTRICT res, int64_t rs,
                                               T* TSVD_RESTRICT out, int64_t os) {
  constexpr int L = lanes<V, T>(), JB = NV * L;
  V ac[TB][NV], as[TB][NV];
  for (int tt = 0; tt < TB; ++tt)
    for (int v = 0; v < NV; ++v) { ac[tt][v] = vzero<V, T>(); as[tt][v] = vzero<V, T>(); }
  for (int64_t f = 0; f < nf; ++f) {
    V pr[NV], pi[NV];
    for (int v = 0; v < NV; ++v) {
      pr[v] = vload<V>(yr + f * JB + v * L);
      pi[v] = vload<V>(yi + f * JB + v * L);
    }
    for (int tt = 0; tt < TB; ++tt) {
      const T c = ic[(t0 + tt) * nf + f];
      const T s = is[(t0 + tt) * nf + f];
      for (int v = 0; v < NV; ++v) {
        ac[tt][v] += c * pr[v];
        as[tt][v] += s * pi[v];
      }
    }
  }
  for (int tt = 0; tt < TB; ++tt) {
    const int64_t ta = t0 + tt, tb = n3 - t0 - tt;
    T* oa = out + ta * os;
    T* ob = out + tb * os;
    for (int v = 0; v < NV; ++v) {
      V x = ac[tt][v] + as[tt][v], y = ac[tt][v] - as[tt][v];
      if (res) {
        x += vload<V>(res + ta * rs + v * L);
        y += vload<V>(res + tb * rs + v * L);
      }
      vstore(oa + v * L, x);
      vstore(ob + v * L, y);
    }
  }
}

template <typename T, typename V, int NV>
TSVD_HOST_DEVICE inline void irdft_real_row(int64_t nf, int64_t t, const T* TSVD_RESTRICT ic,
                                            const T* TSVD_RESTRICT yr, const T* TSVD_RESTRICT res,
                                            int64_t rs, T* TSVD_RESTRICT out, int64_t os) {
  constexpr int L = lanes<V, T>(), JB = NV * L;
  V acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = vzero<V, T>();
  for (int64_t f = 0; f < nf; ++f) {
    const T c = ic[t * nf + f];
    for (int v = 0; v < NV; ++v) acc[v] += c * vload<V>(yr + f * JB + v * L);
  }
  for (int v = 0; v < NV; ++v) {
    V x = acc[v];
    if (res) x += vload<V>(res + t * rs + v * L);
    vstore(out + t * os + v * L, x);
  }
}

template <typename T, typename V, int NV, int TB>
TSVD_HOST_DEVICE inline void irdft_tile(int64_t n3, const T* TSVD_RESTRICT ic, const T* TSVD_RESTRICT is,
                                        const T* TSVD_RESTRICT yr, const T* TSVD_RESTRICT yi,
                                        const T* TSVD_RESTRICT res, int64_t rs,
                                        T* TSVD_RESTRICT out, int64_t os) {
  const int64_t nf = n_freq(n3), h = n_pairs(n3);
  irdft_real_row<T, V, NV>(nf, 0, ic, yr, res, rs, out, os);
  int64_t t = 1;
  for (; t + TB - 1 <= h; t += TB)
    irdft_pairs_block<T, V, NV, TB>(n3, nf, t, ic, is, yr, yi, res, rs, out, os);
  for (; t <= h; ++t)
    irdft_pairs_block<T, V, NV, 1>(n3, nf, t, ic, is, yr, yi, res, rs, out, os);
  if (n3 % 2 == 0 && n3 > 1)
    irdft_real_row<T, V, NV>(nf, n3 / 2, ic, yr, res, rs, out, os);
}

// ---------------------------------------------------------------------------------
// Forward real DFT of one tile: x[t*xs + j] (t < n3, j < JB) ->
//   xr[f*JB + j] = sum_t fc[t][f] x_t,  xi[f*JB + j] = sum_t fs[t][f] x_t
// (tables indexed with t folded into [0, n3/2]). FB frequencies register-blocked.
// ---------------------------------------------------------------------------------
template <typename T, typename V, int NV, int FB>
TSVD_HOST_DEVICE inline void rdft_freq_block(int64_t n3, int64_t nf, int64_t f0,
                                             const T* TSVD_RESTRICT fc, const T* TSVD_RESTRICT fs,
                                             const T* TSVD_RESTRICT ev, const T* TSVD_RESTRICT od,
                                             T* TSVD_RESTRICT xr, T* TSVD_RESTRICT xi) {
  // ev[t*JB + j] (t = 0..n3/2): x_0, x_t + x_{n3-t}, [x_{n3/2}]; od[t*JB + j]: x_t - x_{n3-t}
  constexpr int L = lanes<V, T>(), JB = NV * L;
  const int64_t h = n_pairs(n3), nt = n3 / 2 + 1;
  V ar[FB][NV], ai[FB][NV];
  for (int ff = 0; ff < FB; ++ff)
    for (int v = 0; v < NV; ++v) { ar[ff][v] = vzero<V, T>(); ai[ff][v] = vzero<V, T>(); }
  for (int64_t t = 0; t < nt; ++t) {
    V e[NV];
    for (int v = 0; v < NV; ++v) e[v] = vload<V>(ev + t * JB + v * L);
    for (int ff = 0; ff < FB; ++ff) {
      const T c = fc[t * nf + f0 + ff];
      for (int v = 0; v < NV; ++v) ar[ff][v] += c * e[v];
    }
  }
  for (int64_t t = 1; t <= h; ++t) {
    V o[NV];
    for (int v = 0; v < NV; ++v) o[v] = vload<V>(od + t * JB + v * L);
    for (int ff = 0; ff < FB; ++ff) {
      const T s = fs[t * nf + f0 + ff];
      for (int v = 0; v < NV; ++v) ai[ff][v] += s * o[v];
    }
  }
  for (int ff = 0; ff < FB; ++ff)
    for (int v = 0; v < NV; ++v) {
      vstore(xr + (f0 + ff) * JB + v * L, ar[ff][v]);
      vstore(xi + (f0 + ff) * JB + v * L, ai[ff][v]);
    }
}

// work: 2 * (n3/2 + 1) * JB scratch values.
template <typename T, typename V, int NV, int FB>
TSVD_HOST_DEVICE inline void rdft_tile(int64_t n3, const T* TSVD_RESTRICT fc, const T* TSVD_RESTRICT fs,
                                       const T* TSVD_RESTRICT x, int64_t xs, T* TSVD_RESTRICT work,
                                       T* TSVD_RESTRICT xr, T* TSVD_RESTRICT xi) {
  constexpr int L = lanes<V, T>(), JB = NV * L;
  const int64_t nf = n_freq(n3), h = n_pairs(n3), nt = n3 / 2 + 1;
  T* ev = work;
  T* od = work + nt * JB;
  for (int v = 0; v < NV; ++v) {
    vstore(ev + v * L, vload<V>(x + v * L));
    vstore(od + v * L, vzero<V, T>());
  }
  for (int64_t t = 1; t <= h; ++t) {
    for (int v = 0; v < NV; ++v) {
      const V a = vload<V>(x + t * xs + v * L), b = vload<V>(x + (n3 - t) * xs + v * L);
      vstore(ev + t * JB + v * L, a + b);
      vstore(od + t * JB + v * L, a - b);
    }
  }
  if (n3 % 2 == 0 && n3 > 1) {
    for (int v = 0; v < NV; ++v) {
      vstore(ev + (n3 / 2) * JB + v * L, vload<V>(x + (n3 / 2) * xs + v * L));
      vstore(od + (n3 / 2) * JB + v * L, vzero<V, T>());
    }
  }
  int64_t f = 0;
  for (; f + FB <= nf; f += FB) rdft_freq_block<T, V, NV, FB>(n3, nf, f, fc, fs, ev, od, xr, xi);
  for (; f < nf; ++f) rdft_freq_block<T, V, NV, 1>(n3, nf, f, fc, fs, ev, od, xr, xi);
}

// ---------------------------------------------------------------------------------
// Forward real DFT accumulated row by row, for t-outer loops that stream the input in
// long contiguous runs: xr/xi ([f][JB]) += contributions of rows t0..t0+TB-1 paired
// with their mirrors n3-t0-tt (1 <= t0, t0+TB-1 <= h), or of one real row t (t = 0 or
// the Nyquist row n3/2). With init, the real row overwrites xr and zeroes xi.
// ---------------------------------------------------------------------------------
template <typename T, typename V, int NV, int TB>
TSVD_HOST_DEVICE inline void rdft_pairs_accum(int64_t n3, int64_t nf, int64_t t0,
                                              const T* TSVD_RESTRICT fc, const T* TSVD_RESTRICT fs,
                                              const T* TSVD_RESTRICT x, int64_t xs,
                                              T* TSVD_RESTRICT xr, T* TSVD_RESTRICT xi) {
  constexpr int L = lanes<V, T>(), JB = NV * L;
  V e[TB][NV], o[TB][NV];
  for (int tt = 0; tt < TB; ++tt)
    for (int v = 0; v < NV; ++v) {
      const V a = vload<V>(x + (t0 + tt) * xs + v * L);
      const V b = vload<V>(x + (n3 - t0 - tt) * xs + v * L);
      e[tt][v] = a + b;
      o[tt][v] = a - b;
    }
  for (int64_t f = 0; f < nf; ++f) {
    for (int v = 0; v < NV; ++v) {
      V ar = vload<V>(xr + f * JB + v * L), ai = vload<V>(xi + f * JB + v * L);
      for (int tt = 0; tt < TB; ++tt) {
        ar += fc[(t0 + tt) * nf + f] * e[tt][v];
        ai += fs[(t0 + tt) * nf + f] * o[tt][v];
      }
      vstore(xr + f * JB + v * L, ar);
      vstore(xi + f * JB + v * L, ai);
    }
  }
}

template <typename T, typename V, int NV>
TSVD_HOST_DEVICE inline void rdft_real_accum(int64_t nf, int64_t t, const T* TSVD_RESTRICT fc,
                                             const T* TSVD_RESTRICT xrow, T* TSVD_RESTRICT xr,
                                             T* TSVD_RESTRICT xi, bool init) {
  constexpr int L = lanes<V, T>(), JB = NV * L;
  V xv[NV];
  for (int v = 0; v < NV; ++v) xv[v] = vload<V>(xrow + v * L);
  for (int64_t f = 0; f < nf; ++f)
    for (int v = 0; v < NV; ++v) {
      if (init) {
        vstore(xr + f * JB + v * L, fc[t * nf + f] * xv[v]);
        vstore(xi + f * JB + v * L, vzero<V, T>());
      } else {
        vstore(xr + f * JB + v * L, vload<V>(xr + f * JB + v * L) + fc[t * nf + f] * xv[v]);
      }
    }
}

}  // namespace tsvd
