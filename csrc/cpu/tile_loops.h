// The loops of the CPU kernels over ranges of tasks, written once and compiled once per
// ISA: included only by isa_<name>.cpp, after `#define TSVD_CPU_ISA_NS <name>` and
// `#define TSVD_CPU_VBYTES <bytes of one vector register>`, under that ISA's
// `#pragma GCC target`. No ATen and no standard-library templates here (see isa.h).
//
// Tiles are JB = one vector of columns; IB rows share each load of Vh in treconstruct;
// TB (t, n3-t) pairs and FB frequencies are register-blocked in the DFTs. Work on a
// block of rows goes in two phases over chunks of tiles: (1) the spectrum of every tile
// of the chunk into a per-thread buffer (kept under kChunkBytes, i.e. in L2), (2) the
// DFT with t outermost, so the big tensor is read and written in long contiguous runs.
#pragma once
#include <cstdint>
#include <cstring>

#include "isa.h"
#include "simd.h"
#include "../kernels/dft.h"
#include "../kernels/treconstruct.h"

#ifndef TSVD_CPU_ISA_NS
#error "define TSVD_CPU_ISA_NS and TSVD_CPU_VBYTES before including tile_loops.h"
#endif

namespace tsvd {
namespace cpu {
namespace TSVD_CPU_ISA_NS {

template <typename T> struct Tile {
  using V = typename Vec<T, TSVD_CPU_VBYTES>::type;
  static constexpr int L = int(sizeof(V) / sizeof(T));
  static constexpr int NV = 1, JB = NV * L, IB = 4, TB = 4, FB = 4;
};

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Every tile kernel is inlined into the loops (as it was when the loops lived in the ATen
// glue): GCC otherwise keeps some of them out of line under `#pragma GCC target`, which
// cost ~6% on treconstruct's forward (measured, 1 thread, (48,768,768)).
#define TSVD_LOOP __attribute__((flatten))

template <typename T>
TSVD_LOOP void trec_forward(const TrecForwardArgs<T>& p, int64_t begin, int64_t end, T* scratch) {
  using V = typename Tile<T>::V;
  constexpr int NV = Tile<T>::NV, JB = Tile<T>::JB, IB = Tile<T>::IB, TB = Tile<T>::TB;
  const int64_t n3 = p.n3, n1 = p.n1, n2 = p.n2, n2p = p.n2p, r = p.r, cjb = p.cjb;
  const int64_t nf = n_freq(n3), h = n_pairs(n3);
  const int64_t nblk = (n1 + IB - 1) / IB, plane = n1 * n2, njb = (n2 + JB - 1) / JB;
  T* yrb = scratch;
  T* yib = yrb + cjb * IB * nf * JB;
  T* tin = yib + cjb * IB * nf * JB;
  T* tout = tin + n3 * JB;
  const T* icp = p.ic;
  const T* isp = p.is;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / nblk, i0 = (task % nblk) * IB;
    const int64_t rows = imin(IB, n1 - i0);
    const T* ab = p.a + b * nf * n1 * 2 * r;
    const T* bb = p.bt + b * nf * 2 * r * n2p;
    const T* rb = p.res ? p.res + b * n3 * plane + i0 * n2 : nullptr;
    T* ob = p.out + b * n3 * plane + i0 * n2;
    for (int64_t jc = 0; jc < njb; jc += cjb) {
      const int64_t nj = imin(cjb, njb - jc);
      // phase 1: Yh of every tile of the chunk
      for (int64_t q = 0; q < nj; ++q) {
        const int64_t j0 = (jc + q) * JB;
        T* yr = yrb + q * IB * nf * JB;
        T* yi = yib + q * IB * nf * JB;
        if (rows == IB) {
          trec_yhat_tile<T, V, NV, IB>(nf, r, n1, n2p, i0, j0, ab, bb, yr, yi);
        } else {
          for (int64_t ib = 0; ib < rows; ++ib)
            trec_yhat_tile<T, V, NV, 1>(nf, r, n1, n2p, i0 + ib, j0, ab, bb, yr + ib * nf * JB,
                                        yi + ib * nf * JB);
        }
      }
      // phase 2: inverse DFT, t outermost, full tiles
      const bool tail = (jc + nj == njb) && (n2 % JB != 0);
      const int64_t nfull = tail ? nj - 1 : nj;
#define TSVD_TILE(q, ib)                                          \
  const T* yr = yrb + ((q) * IB + (ib)) * nf * JB;                \
  const T* yi = yib + ((q) * IB + (ib)) * nf * JB;                \
  const int64_t off = (ib) * n2 + (jc + (q)) * JB;                \
  const T* rp = rb ? rb + off : nullptr;                          \
  (void)yi;
      for (int64_t ib = 0; ib < rows; ++ib)
        for (int64_t q = 0; q < nfull; ++q) {
          TSVD_TILE(q, ib)
          irdft_real_row<T, V, NV>(nf, 0, icp, yr, rp, plane, ob + off, plane);
        }
      int64_t t = 1;
      for (; t + TB - 1 <= h; t += TB)
        for (int64_t ib = 0; ib < rows; ++ib)
          for (int64_t q = 0; q < nfull; ++q) {
            TSVD_TILE(q, ib)
            irdft_pairs_block<T, V, NV, TB>(n3, nf, t, icp, isp, yr, yi, rp, plane, ob + off, plane);
          }
      for (; t <= h; ++t)
        for (int64_t ib = 0; ib < rows; ++ib)
          for (int64_t q = 0; q < nfull; ++q) {
            TSVD_TILE(q, ib)
            irdft_pairs_block<T, V, NV, 1>(n3, nf, t, icp, isp, yr, yi, rp, plane, ob + off, plane);
          }
      if (n3 % 2 == 0 && n3 > 1)
        for (int64_t ib = 0; ib < rows; ++ib)
          for (int64_t q = 0; q < nfull; ++q) {
            TSVD_TILE(q, ib)
            irdft_real_row<T, V, NV>(nf, n3 / 2, icp, yr, rp, plane, ob + off, plane);
          }
      if (tail) {  // last, partial tile: through a padded copy
        const int64_t q = nj - 1, w = n2 - (jc + q) * JB;
        for (int64_t ib = 0; ib < rows; ++ib) {
          TSVD_TILE(q, ib)
          const T* rpad = nullptr;
          if (rp) {
            std::memset(tin, 0, sizeof(T) * n3 * JB);
            for (int64_t tt = 0; tt < n3; ++tt)
              std::memcpy(tin + tt * JB, rp + tt * plane, w * sizeof(T));
            rpad = tin;
          }
          irdft_tile<T, V, NV, TB>(n3, icp, isp, yr, yi, rpad, JB, tout, JB);
          for (int64_t tt = 0; tt < n3; ++tt)
            std::memcpy(ob + off + tt * plane, tout + tt * JB, w * sizeof(T));
        }
      }
#undef TSVD_TILE
    }
  }
}

// k-slices of the packed rank dimension: 2 and then 1 vector(s) of L lanes at a time.
template <typename T, int IB>
static inline void grad_tile_all_k(int64_t nf, int64_t n1, int64_t n2, int64_t RR, int64_t i0,
                                   int64_t j0, int64_t w, const T* gr, const T* gi, const T* a,
                                   const T* a2, const T* bk, const T* bk2, T* ga, T* gb) {
  using V = typename Tile<T>::V;
  constexpr int L = Tile<T>::L, JB = Tile<T>::JB;
  int64_t k0 = 0;
  for (; k0 + 2 * L <= RR; k0 += 2 * L)
    trec_grad_tile<T, V, 2, JB, IB>(nf, n1, n2, RR, k0, i0, j0, w, gr, gi, a, a2, bk, bk2, ga, gb);
  if (k0 < RR)
    trec_grad_tile<T, V, 1, JB, IB>(nf, n1, n2, RR, k0, i0, j0, w, gr, gi, a, a2, bk, bk2, ga, gb);
}

template <typename T>
TSVD_LOOP void trec_backward(const TrecBackwardArgs<T>& p, int64_t begin, int64_t end, T* gbuf, T* scratch) {
  using V = typename Tile<T>::V;
  constexpr int NV = Tile<T>::NV, JB = Tile<T>::JB, IB = Tile<T>::IB, TB = Tile<T>::TB,
                FB = Tile<T>::FB;
  const int64_t n3 = p.n3, n1 = p.n1, n2 = p.n2, RR = p.RR, cjb = p.cjb;
  const int64_t nf = n_freq(n3), nt = n3 / 2 + 1, h = n_pairs(n3);
  const int64_t plane = n1 * n2, njb = (n2 + JB - 1) / JB;
  const T* fcp = p.fc;
  const T* fsp = p.fs;
  T* grb = scratch;
  T* gib = grb + cjb * IB * nf * JB;
  T* work = gib + cjb * IB * nf * JB;
  T* tin = work + 2 * nt * JB;  // zero beyond the w columns ever copied in
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t i0 = blk * IB;
    const int64_t rows = imin(IB, n1 - i0);
    const T* gbase = p.g + i0 * n2;
    for (int64_t jc = 0; jc < njb; jc += cjb) {
      const int64_t nj = imin(cjb, njb - jc);
      const bool tail = (jc + nj == njb) && (n2 % JB != 0);
      const int64_t nfull = tail ? nj - 1 : nj;
#define TSVD_TILE(q, ib)                                 \
  T* xr = grb + ((q) * IB + (ib)) * nf * JB;             \
  T* xi = gib + ((q) * IB + (ib)) * nf * JB;             \
  const int64_t off = (ib) * n2 + (jc + (q)) * JB;
      // phase 1: Gh of every tile of the chunk, t outermost
      for (int64_t ib = 0; ib < rows; ++ib)
        for (int64_t q = 0; q < nfull; ++q) {
          TSVD_TILE(q, ib)
          rdft_real_accum<T, V, NV>(nf, 0, fcp, gbase + off, xr, xi, true);
        }
      int64_t t = 1;
      for (; t + TB - 1 <= h; t += TB)
        for (int64_t ib = 0; ib < rows; ++ib)
          for (int64_t q = 0; q < nfull; ++q) {
            TSVD_TILE(q, ib)
            rdft_pairs_accum<T, V, NV, TB>(n3, nf, t, fcp, fsp, gbase + off, plane, xr, xi);
          }
      for (; t <= h; ++t)
        for (int64_t ib = 0; ib < rows; ++ib)
          for (int64_t q = 0; q < nfull; ++q) {
            TSVD_TILE(q, ib)
            rdft_pairs_accum<T, V, NV, 1>(n3, nf, t, fcp, fsp, gbase + off, plane, xr, xi);
          }
      if (n3 % 2 == 0 && n3 > 1)
        for (int64_t ib = 0; ib < rows; ++ib)
          for (int64_t q = 0; q < nfull; ++q) {
            TSVD_TILE(q, ib)
            rdft_real_accum<T, V, NV>(nf, n3 / 2, fcp, gbase + off + (n3 / 2) * plane, xr, xi, false);
          }
      if (tail) {  // partial tile through a zero-padded copy
        const int64_t q = nj - 1, w = n2 - (jc + q) * JB;
        for (int64_t ib = 0; ib < rows; ++ib) {
          TSVD_TILE(q, ib)
          for (int64_t tt = 0; tt < n3; ++tt)
            std::memcpy(tin + tt * JB, gbase + off + tt * plane, w * sizeof(T));
          rdft_tile<T, V, NV, FB>(n3, fcp, fsp, tin, JB, work, xr, xi);
        }
      }
#undef TSVD_TILE
      // phase 2: accumulate Gh Vh (rows owned here) and Gh^H A (per-thread buffer)
      for (int64_t q = 0; q < nj; ++q) {
        const int64_t j0 = (jc + q) * JB;
        const int64_t w = imin(JB, n2 - j0);
        const T* gr = grb + q * IB * nf * JB;
        const T* gi = gib + q * IB * nf * JB;
        if (rows == IB) {
          grad_tile_all_k<T, IB>(nf, n1, n2, RR, i0, j0, w, gr, gi, p.a, p.a2, p.bk, p.bk2, p.ga, gbuf);
        } else {
          for (int64_t ib = 0; ib < rows; ++ib)
            grad_tile_all_k<T, 1>(nf, n1, n2, RR, i0 + ib, j0, w, gr + ib * nf * JB,
                                  gi + ib * nf * JB, p.a, p.a2, p.bk, p.bk2, p.ga, gbuf);
        }
      }
    }
  }
}

template <typename T>
TSVD_LOOP void rfft(const RfftArgs<T>& p, int64_t begin, int64_t end, T* scratch) {
  using V = typename Tile<T>::V;
  constexpr int NV = Tile<T>::NV, JB = Tile<T>::JB, TB = Tile<T>::TB, FB = Tile<T>::FB;
  const int64_t n3 = p.n3, P = p.P, cj = p.cj;
  const int64_t nf = n_freq(n3), nt = n3 / 2 + 1, h = n_pairs(n3);
  const int64_t ntile = (P + JB - 1) / JB, nchunk = (ntile + cj - 1) / cj;
  const T* fcp = p.fc;
  const T* fsp = p.fs;
  T* xrb = scratch;
  T* xib = xrb + cj * nf * JB;
  T* work = xib + cj * nf * JB;
  T* tin = work + 2 * nt * JB;  // zero beyond the w columns ever copied in
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / nchunk, q0 = (task % nchunk) * cj;
    const int64_t nq = imin(cj, ntile - q0);
    const bool tail = (q0 + nq == ntile) && (P % JB != 0);
    const int64_t nfull = tail ? nq - 1 : nq;
    const T* xb = p.x + b * n3 * P;
    for (int64_t q = 0; q < nfull; ++q)
      rdft_real_accum<T, V, NV>(nf, 0, fcp, xb + (q0 + q) * JB, xrb + q * nf * JB, xib + q * nf * JB, true);
    int64_t t = 1;
    for (; t + TB - 1 <= h; t += TB)
      for (int64_t q = 0; q < nfull; ++q)
        rdft_pairs_accum<T, V, NV, TB>(n3, nf, t, fcp, fsp, xb + (q0 + q) * JB, P, xrb + q * nf * JB,
                                       xib + q * nf * JB);
    for (; t <= h; ++t)
      for (int64_t q = 0; q < nfull; ++q)
        rdft_pairs_accum<T, V, NV, 1>(n3, nf, t, fcp, fsp, xb + (q0 + q) * JB, P, xrb + q * nf * JB,
                                      xib + q * nf * JB);
    if (n3 % 2 == 0 && n3 > 1)
      for (int64_t q = 0; q < nfull; ++q)
        rdft_real_accum<T, V, NV>(nf, n3 / 2, fcp, xb + (n3 / 2) * P + (q0 + q) * JB,
                                  xrb + q * nf * JB, xib + q * nf * JB, false);
    if (tail) {
      const int64_t q = nq - 1, w = P - (q0 + q) * JB;
      for (int64_t tt = 0; tt < n3; ++tt)
        std::memcpy(tin + tt * JB, xb + tt * P + (q0 + q) * JB, w * sizeof(T));
      rdft_tile<T, V, NV, FB>(n3, fcp, fsp, tin, JB, work, xrb + q * nf * JB, xib + q * nf * JB);
    }
    for (int64_t f = 0; f < nf; ++f)
      for (int64_t q = 0; q < nq; ++q) {
        const int64_t p0 = (q0 + q) * JB, w = imin(JB, P - p0);
        T* o = p.out + ((b * nf + f) * P + p0) * 2;
        const T* a = xrb + (q * nf + f) * JB;
        const T* c = xib + (q * nf + f) * JB;
        for (int64_t j = 0; j < w; ++j) { o[2 * j] = a[j]; o[2 * j + 1] = c[j]; }
      }
  }
}

template <typename T>
TSVD_LOOP void irfft(const IrfftArgs<T>& p, int64_t begin, int64_t end, T* scratch, int64_t* offs) {
  using V = typename Tile<T>::V;
  constexpr int NV = Tile<T>::NV, JB = Tile<T>::JB, TB = Tile<T>::TB;
  const int64_t n3 = p.n3, n2 = p.n2, P = p.P, cj = p.cj;
  const int64_t sb = p.sb, sf = p.sf, s1 = p.s1, s2 = p.s2;
  const int64_t nf = n_freq(n3), h = n_pairs(n3);
  const int64_t ntile = (P + JB - 1) / JB, nchunk = (ntile + cj - 1) / cj;
  const T* icp = p.ic;
  const T* isp = p.is;
  T* yrb = scratch;
  T* yib = yrb + cj * nf * JB;
  T* tout = yib + cj * nf * JB;
  const bool f_inner = (sf < 0 ? -sf : sf) < (s2 < 0 ? -s2 : s2);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / nchunk, q0 = (task % nchunk) * cj;
    const int64_t nq = imin(cj, ntile - q0);
    const bool tail = (q0 + nq == ntile) && (P % JB != 0);
    const int64_t nfull = tail ? nq - 1 : nq;
    const int64_t np = imin(nq * JB, P - q0 * JB);
    for (int64_t q = 0; q < np; ++q) {
      const int64_t pp = q0 * JB + q;
      offs[q] = b * sb + (pp / n2) * s1 + (pp % n2) * s2;
    }
    if (np < nq * JB) {
      std::memset(yrb + (nq - 1) * nf * JB, 0, sizeof(T) * nf * JB);
      std::memset(yib + (nq - 1) * nf * JB, 0, sizeof(T) * nf * JB);
    }
    if (f_inner) {
      for (int64_t q = 0; q < np; ++q) {
        const T* s = p.xh + offs[q];
        T* a = yrb + (q / JB) * nf * JB + q % JB;
        T* c = yib + (q / JB) * nf * JB + q % JB;
        for (int64_t f = 0; f < nf; ++f) { a[f * JB] = s[f * sf]; c[f * JB] = s[f * sf + 1]; }
      }
    } else {
      for (int64_t f = 0; f < nf; ++f)
        for (int64_t q = 0; q < np; ++q) {
          const T* s = p.xh + offs[q] + f * sf;
          const int64_t o = ((q / JB) * nf + f) * JB + q % JB;
          yrb[o] = s[0];
          yib[o] = s[1];
        }
    }
    T* ob = p.out + b * n3 * P + q0 * JB;
    for (int64_t q = 0; q < nfull; ++q)
      irdft_real_row<T, V, NV>(nf, 0, icp, yrb + q * nf * JB, nullptr, 0, ob + q * JB, P);
    int64_t t = 1;
    for (; t + TB - 1 <= h; t += TB)
      for (int64_t q = 0; q < nfull; ++q)
        irdft_pairs_block<T, V, NV, TB>(n3, nf, t, icp, isp, yrb + q * nf * JB, yib + q * nf * JB,
                                        nullptr, 0, ob + q * JB, P);
    for (; t <= h; ++t)
      for (int64_t q = 0; q < nfull; ++q)
        irdft_pairs_block<T, V, NV, 1>(n3, nf, t, icp, isp, yrb + q * nf * JB, yib + q * nf * JB,
                                       nullptr, 0, ob + q * JB, P);
    if (n3 % 2 == 0 && n3 > 1)
      for (int64_t q = 0; q < nfull; ++q)
        irdft_real_row<T, V, NV>(nf, n3 / 2, icp, yrb + q * nf * JB, nullptr, 0, ob + q * JB, P);
    if (tail) {
      const int64_t q = nq - 1, w = P - (q0 + q) * JB;
      irdft_tile<T, V, NV, TB>(n3, icp, isp, yrb + q * nf * JB, yib + q * nf * JB, nullptr, 0, tout, JB);
      for (int64_t tt = 0; tt < n3; ++tt)
        std::memcpy(ob + q * JB + tt * P, tout + tt * JB, w * sizeof(T));
    }
  }
}

template <typename T>
constexpr Kernels<T> make_kernels() {
  return Kernels<T>{Tile<T>::JB, Tile<T>::IB, Tile<T>::L / 2 > 0 ? Tile<T>::L / 2 : 1,
                    &trec_forward<T>, &trec_backward<T>, &rfft<T>, &irfft<T>};
}

}  // namespace TSVD_CPU_ISA_NS
}  // namespace cpu
}  // namespace tsvd
