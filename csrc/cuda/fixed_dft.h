// Real DFTs of a tube whose length N is a compile-time constant (the "v2" CUDA kernels,
// issue 13): every twiddle factor is a compile-time constant, the loops over t and f are
// unrolled by templates (no runtime trip counts, no cos/sin tables in shared memory, no
// arrays indexed at run time, so everything stays in registers).
//
// No ATen, no CUDA headers: the functions are __host__ __device__ (TSVD_HOST_DEVICE) and are
// compiled and tested on the CPU too (tests/test_cuda.py builds a host harness of this header
// with the system C++ compiler and compares it with numpy).
//
// Conventions (those of column_dft.h and torch.fft), F = N/2 + 1 stored frequencies:
//   rdft_fixed:  yr[f] + i yi[f] = sum_t x[t] e^{-2 pi i f t / N}          (= rfft)
//   irdft_fixed: x[t] = sum_f (w_f / N) (yr[f] cos th - yi[f] sin th),       (= irfft;
//                th = 2 pi f t / N, w_f = 1 for the DC and Nyquist bins, 2 otherwise;
//                the imaginary parts of the DC and Nyquist bins are ignored)
//
// Operation counts (N = 48, F = 25): the inverse pairs t with N - t (cos even, sin odd) and,
// for even N, t with t + N/2 (a factor (-1)^f), so four outputs share one pass over the
// frequencies: ~13 fused multiply-adds per output instead of 2F = 50 for a plain DFT. The
// forward pairs t with N - t: ~25 per input.
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../kernels/common.h"

#if defined(__CUDACC__)
#define TSVD_FORCEINLINE __forceinline__
#else
#define TSVD_FORCEINLINE inline __attribute__((always_inline))
#endif

namespace tsvd {
namespace cuda_fixed {

// ---------------------------------------------------------------------------------------
// compile-time cos / sin of pi * num / den (double; |error| < 1e-16)
// ---------------------------------------------------------------------------------------
constexpr double kPi = 3.14159265358979323846264338327950288;

// Taylor series, |x| <= pi/4: 12 terms put the remainder below 1e-25.
constexpr double poly_sin(double x) {
  double x2 = x * x, term = x, sum = x;
  for (int k = 1; k < 12; ++k) {
    term *= -x2 / double((2 * k) * (2 * k + 1));
    sum += term;
  }
  return sum;
}
constexpr double poly_cos(double x) {
  double x2 = x * x, term = 1.0, sum = 1.0;
  for (int k = 1; k < 12; ++k) {
    term *= -x2 / double((2 * k - 1) * (2 * k));
    sum += term;
  }
  return sum;
}

// cos(pi num / den), den > 0: reduced with integers to an angle in [0, pi/4], so that the
// zeros and the +-1 of the multiples of pi/2 are exact.
constexpr double cospi(long long num, long long den) {
  long long n = num % (2 * den);
  if (n < 0) n += 2 * den;           // [0, 2 den): angle in [0, 2 pi)
  if (n > den) n = 2 * den - n;      // cos(2 pi - y) = cos y: [0, den]
  double sign = 1.0;
  if (2 * n > den) {                 // cos(pi - y) = -cos y: [0, den / 2]
    n = den - n;
    sign = -1.0;
  }
  if (4 * n > den)                   // cos y = sin(pi/2 - y), pi/2 - y in [0, pi/4)
    return sign * poly_sin(kPi * double(den - 2 * n) / double(2 * den));
  return sign * poly_cos(kPi * double(n) / double(den));
}
// sin(pi num / den) = cos(pi (2 num - den) / (2 den))
constexpr double sinpi(long long num, long long den) { return cospi(2 * num - den, 2 * den); }

// cos / sin of 2 pi m / N as compile-time constants (static constexpr scalars may be used in
// device code).
template <int N, int M>
struct Twiddle {
  static constexpr double c = cospi(2LL * (M % N), N);
  static constexpr double s = sinpi(2LL * (M % N), N);
};

// ---------------------------------------------------------------------------------------
// compile-time loops: fn(std::integral_constant<int, I>{}) for I = 0 .. N-1
// ---------------------------------------------------------------------------------------
template <typename Fn, int... Is>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void static_for_impl(Fn& fn, std::integer_sequence<int, Is...>) {
  (fn(std::integral_constant<int, Is>{}), ...);
}
template <int N, typename Fn>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void static_for(Fn&& fn) {
  static_for_impl(fn, std::make_integer_sequence<int, N>{});
}

template <int N>
struct Sizes {
  static constexpr int F = N / 2 + 1;                 // stored frequencies
  static constexpr bool even = N % 2 == 0;
  static constexpr int H = N / 2;
  // weight w_f / N of the inverse (irfft) for frequency f
  template <int f>
  TSVD_HOST_DEVICE static constexpr double inv_weight() {
    return (f == 0 || (even && 2 * f == N)) ? 1.0 / N : 2.0 / N;
  }
  // does the sin term of frequency f exist (not DC, not Nyquist)?
  template <int f>
  TSVD_HOST_DEVICE static constexpr bool has_sin() { return !(f == 0 || (even && 2 * f == N)); }
};

// ---------------------------------------------------------------------------------------
// forward: rfft of x[0..N) -> yr, yi [0..F)
// ---------------------------------------------------------------------------------------
template <int N, typename T>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void rdft_fixed(const T (&x)[N], T (&yr)[N / 2 + 1],
                                                  T (&yi)[N / 2 + 1]) {
  using Z = Sizes<N>;
  // e_t = x_t + x_{N-t}, o_t = x_t - x_{N-t} for 1 <= t < N - t
  constexpr int P = (N - 1) / 2;
  T e[P > 0 ? P : 1], o[P > 0 ? P : 1];
  static_for<P>([&](auto tt) {
    constexpr int t = decltype(tt)::value + 1;
    e[t - 1] = x[t] + x[N - t];
    o[t - 1] = x[t] - x[N - t];
  });
  static_for<Z::F>([&](auto ff) {
    constexpr int f = decltype(ff)::value;
    T re = x[0];
    if constexpr (Z::even && N > 1) re += ((f % 2) ? -x[Z::H] : x[Z::H]);
    T im = T(0);
    static_for<P>([&](auto tt) {
      constexpr int t = decltype(tt)::value + 1;
      constexpr double c = Twiddle<N, f * t>::c;
      if constexpr (c == 1.0) re += e[t - 1];
      else if constexpr (c == -1.0) re -= e[t - 1];
      else if constexpr (c != 0.0) re += T(c) * e[t - 1];
      if constexpr (Z::template has_sin<f>()) {
        constexpr double s = Twiddle<N, f * t>::s;
        if constexpr (s == 1.0) im -= o[t - 1];
        else if constexpr (s == -1.0) im += o[t - 1];
        else if constexpr (s != 0.0) im -= T(s) * o[t - 1];
      }
    });
    yr[f] = re;
    yi[f] = im;
  });
}

// ---------------------------------------------------------------------------------------
// inverse: irfft of yr, yi [0..F) -> emit(std::integral_constant<int, t>, x_t) for every t
// (each t exactly once; the order is not t's)
// ---------------------------------------------------------------------------------------
namespace detail {
// partial sums over the frequencies f with f % 2 == parity (parity -1: all f) of
//   c = sum (w_f/N) cos(2 pi f t / N) yr[f],  s = -sum (w_f/N) sin(2 pi f t / N) yi[f]
template <int N, int t, int parity, typename T>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void inv_sums(const T (&yr)[N / 2 + 1], const T (&yi)[N / 2 + 1],
                                                T& c, T& s) {
  using Z = Sizes<N>;
  c = T(0);
  s = T(0);
  static_for<Z::F>([&](auto ff) {
    constexpr int f = decltype(ff)::value;
    if constexpr (parity < 0 || f % 2 == parity) {
      constexpr double w = Z::template inv_weight<f>();
      constexpr double cv = Twiddle<N, f * t>::c * w;
      constexpr double sv = -Twiddle<N, f * t>::s * w;
      if constexpr (cv != 0.0) c += T(cv) * yr[f];
      if constexpr (Z::template has_sin<f>() && sv != 0.0) s += T(sv) * yi[f];
    }
  });
}
}  // namespace detail

template <int N, typename T, typename Emit>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void irdft_fixed(const T (&yr)[N / 2 + 1], const T (&yi)[N / 2 + 1],
                                                   Emit&& emit) {
  using Z = Sizes<N>;
  if constexpr (Z::even && Z::H % 2 == 0 && N >= 4) {
    // t and t + H: cos/sin of f (t + H) are (-1)^f times those of f t, so the even- and
    // odd-f partial sums of t give both; with the pairing t <-> N - t, one t in [0, H/2]
    // gives the outputs t, N - t, H + t, H - t.
    constexpr int Q = Z::H / 2;
    static_for<Q + 1>([&](auto tt) {
      constexpr int t = decltype(tt)::value;
      T ce, se, co, so;
      detail::inv_sums<N, t, 0>(yr, yi, ce, se);
      detail::inv_sums<N, t, 1>(yr, yi, co, so);
      const T c0 = ce + co, s0 = se + so;     // t
      const T c1 = ce - co, s1 = se - so;     // t + H
      if constexpr (t == 0) {
        emit(std::integral_constant<int, 0>{}, c0 + s0);
        emit(std::integral_constant<int, Z::H>{}, c1 + s1);
      } else if constexpr (t == Q) {          // t + H = N - t: the same two outputs
        emit(std::integral_constant<int, t>{}, c0 + s0);
        emit(std::integral_constant<int, N - t>{}, c0 - s0);
      } else {
        emit(std::integral_constant<int, t>{}, c0 + s0);
        emit(std::integral_constant<int, N - t>{}, c0 - s0);
        emit(std::integral_constant<int, Z::H + t>{}, c1 + s1);
        emit(std::integral_constant<int, Z::H - t>{}, c1 - s1);
      }
    });
  } else {
    // pairing t <-> N - t only
    static_for<N / 2 + 1>([&](auto tt) {
      constexpr int t = decltype(tt)::value;
      T c, s;
      detail::inv_sums<N, t, -1>(yr, yi, c, s);
      emit(std::integral_constant<int, t>{}, c + s);
      if constexpr (t != 0 && 2 * t != N) emit(std::integral_constant<int, N - t>{}, c - s);
    });
  }
}

// ---------------------------------------------------------------------------------------
// the forward treconstruct's per-column product, v2 layouts (see launch.h):
//   y_f = sum_k A_f[i, k] conj(Vh_f[j, k]),
// V2: a struct of two T (.x real, .y imaginary): float2 / double2 on the GPU, so that each
// complex entry is one 8- or 16-byte load;
// a_i: A of row i, [k][f];
// b_j: Vh of column j, [k][f] with `bstride` V2 entries between consecutive (k, f) entries
// (the shared-memory strip of the CUDA kernel: 32, one per column of the strip).
// ---------------------------------------------------------------------------------------
template <int N, typename T, typename V2>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void yhat_fixed(int r, const V2* TSVD_RESTRICT a_i,
                                                  const V2* TSVD_RESTRICT b_j, int bstride,
                                                  T (&yr)[N / 2 + 1], T (&yi)[N / 2 + 1]) {
  constexpr int F = N / 2 + 1;
  static_for<F>([&](auto ff) {
    constexpr int f = decltype(ff)::value;
    yr[f] = T(0);
    yi[f] = T(0);
  });
  for (int k = 0; k < r; ++k) {
    const V2* ak = a_i + k * F;
    const V2* bk = b_j + k * F * bstride;
    static_for<F>([&](auto ff) {
      constexpr int f = decltype(ff)::value;
      const V2 av = ak[f];
      const V2 bv = bk[f * bstride];
      yr[f] += av.x * bv.x + av.y * bv.y;
      yi[f] += av.y * bv.x - av.x * bv.y;
    });
  }
}

// ---------------------------------------------------------------------------------------
// the v2 backward's per-tube bodies (kernels_v2.cu trec_bwd_prep_v2 / trec_bwd_post_v2; the
// host harness of tests/test_cuda.py calls the same functions). With A_f = Uh_f diag(Sh_f),
// Gh = rfft(G) and c_f = w_f / N (the adjoint of irfft), the two batched GEMMs between the
// launches give
//   P_f = Gh_f Vh_f          (n1 x r)      so gA_f = c_f P_f,
//   Q_f = Gh_f^T conj(A_f)   (n2 x r)      so gB_f = (c Gh)^H A = c_f conj(Q_f),
// and the factor gradients are adjoint rffts (sum_f Re(g_f e^{+i th}), the DC and Nyquist
// imaginary parts dropped) of: gUh = gA conj(Sh), gSh = sum_i conj(Uh) gA, gVh = gB. Since
// irdft_fixed applies the weights c_f itself, each is one irdft_fixed of an unweighted
// product:
//   gU[:, i, k]  = irdft(P[:, i, k] conj(Sh[:, k])),
//   gS[:, k]     = sum_i irdft(conj(Uh[:, i, k]) P[:, i, k]),
//   gV[:, j, k]  = irdft(conj(Q[:, j, k])).
// V2: a struct of two T (.x, .y); tubes are read with stride `ts` (elements between t and
// t + 1), spectra written / read with stride `fs` (entries between f and f + 1).
// ---------------------------------------------------------------------------------------
template <int N, typename T, typename V2>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void load_tube_rdft(const T* TSVD_RESTRICT x, int64_t ts,
                                                      T (&yr)[N / 2 + 1], T (&yi)[N / 2 + 1]) {
  T v[N];
  static_for<N>([&](auto tt) {
    constexpr int t = decltype(tt)::value;
    v[t] = x[t * ts];
  });
  rdft_fixed<N, T>(v, yr, yi);
}

// prep (forward and backward), U tube (b, i, k): A_f = Uh_f Sh_f at a[f * fs], or its
// conjugate (Conj: the backward's conj(A))
template <int N, typename T, typename V2, bool Conj>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void prep_u(const T* u, int64_t us, const T* s, int64_t ss,
                                              V2* a, int64_t fs) {
  constexpr int F = N / 2 + 1;
  T ur[F], ui[F], sr[F], si[F];
  load_tube_rdft<N, T, V2>(u, us, ur, ui);
  load_tube_rdft<N, T, V2>(s, ss, sr, si);
  static_for<F>([&](auto ff) {
    constexpr int f = decltype(ff)::value;
    V2 o;
    o.x = ur[f] * sr[f] - ui[f] * si[f];
    o.y = ur[f] * si[f] + ui[f] * sr[f];
    if constexpr (Conj) o.y = -o.y;
    a[f * fs] = o;
  });
}

// prep (forward and backward), V tube (b, j, k): Vh_f at vh[f * fs]
template <int N, typename T, typename V2>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void prep_v(const T* v, int64_t vs, V2* vh, int64_t fs) {
  constexpr int F = N / 2 + 1;
  T vr[F], vi[F];
  load_tube_rdft<N, T, V2>(v, vs, vr, vi);
  static_for<F>([&](auto ff) {
    constexpr int f = decltype(ff)::value;
    V2 o;
    o.x = vr[f];
    o.y = vi[f];
    vh[f * fs] = o;
  });
}

// post, U tube (b, i, k): gU[t * gs] = irdft(P conj(Sh))[t]; and its term of gS: for each t,
// add(t, irdft(conj(Uh) P)[t]) (the caller sums over i, e.g. with atomicAdd)
template <int N, typename T, typename V2, typename AddS>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void bwd_post_u(const V2* p, int64_t fs, const T* u, int64_t us,
                                                  const T* s, int64_t ss, T* gu, int64_t gs,
                                                  AddS&& add_s) {
  constexpr int F = N / 2 + 1;
  T ur[F], ui[F], sr[F], si[F];
  load_tube_rdft<N, T, V2>(u, us, ur, ui);
  load_tube_rdft<N, T, V2>(s, ss, sr, si);
  T ar[F], ai[F], br[F], bi[F];
  static_for<F>([&](auto ff) {
    constexpr int f = decltype(ff)::value;
    const V2 pv = p[f * fs];
    ar[f] = pv.x * sr[f] + pv.y * si[f];      // P conj(Sh)
    ai[f] = pv.y * sr[f] - pv.x * si[f];
    br[f] = ur[f] * pv.x + ui[f] * pv.y;      // conj(Uh) P
    bi[f] = ur[f] * pv.y - ui[f] * pv.x;
  });
  irdft_fixed<N, T>(ar, ai, [&](auto tt, T val) {
    constexpr int t = decltype(tt)::value;
    gu[t * gs] = val;
  });
  irdft_fixed<N, T>(br, bi, [&](auto tt, T val) { add_s(decltype(tt)::value, val); });
}

// post, V tube (b, j, k): gV[t * gs] = irdft(conj(Q))[t]
template <int N, typename T, typename V2>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void bwd_post_v(const V2* q, int64_t fs, T* gv, int64_t gs) {
  constexpr int F = N / 2 + 1;
  T yr[F], yi[F];
  static_for<F>([&](auto ff) {
    constexpr int f = decltype(ff)::value;
    const V2 qv = q[f * fs];
    yr[f] = qv.x;
    yi[f] = -qv.y;
  });
  irdft_fixed<N, T>(yr, yi, [&](auto tt, T val) {
    constexpr int t = decltype(tt)::value;
    gv[t * gs] = val;
  });
}

// ---------------------------------------------------------------------------------------
// the fused P/Q products of the v2 backward (kernels_v2.cu trec_bwd_pq_v2, opt-in with
// TSVD_CUDA_KERNELS=v2pq; the host harness of tests/test_cuda.py calls the same function):
// one element t = Gh_f[i, j] adds t conj(A_f)[i, k] to the thread's Q accumulators and gives
// its P terms t Vh_f[j, k], k < R (reduced over j by the caller). ca_i: conj(A_f)[i, :]
// (stride 1), vj: Vh_f[j, :].
// ---------------------------------------------------------------------------------------
template <int R, typename T, typename V2>
TSVD_HOST_DEVICE TSVD_FORCEINLINE void pq_element(V2 t, const V2* TSVD_RESTRICT ca_i,
                                                  const V2 (&vj)[R], T (&qr)[R], T (&qi)[R],
                                                  T (&pr)[R], T (&pi)[R]) {
  static_for<R>([&](auto kk) {
    constexpr int k = decltype(kk)::value;
    const V2 c = ca_i[k];
    qr[k] += t.x * c.x - t.y * c.y;
    qi[k] += t.x * c.y + t.y * c.x;
    pr[k] = t.x * vj[k].x - t.y * vj[k].y;
    pi[k] = t.x * vj[k].y + t.y * vj[k].x;
  });
}

}  // namespace cuda_fixed
}  // namespace tsvd
