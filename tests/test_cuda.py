"""Tests of the CUDA kernels (csrc/cuda/).

Two parts:

* Host-harness tests (run everywhere, no GPU): the per-column arithmetic of the CUDA
  kernels (csrc/cuda/column_dft.h, ``__host__ __device__``) is compiled with the system
  C++ compiler into a small shared library whose functions replay each kernel's thread
  and tile mapping on the CPU; results are compared with float64 numpy oracles
  (``numpy.fft``, the Fourier-domain definition of the t-product). The DFT tables the
  kernels fill in shared memory are checked bit for bit against csrc/kernels/dft.h.
* ``@pytest.mark.cuda`` tests (skipped without a CUDA device and a CUDA build of
  ``tsvd._C``): every op on the GPU against the CPU path and float64 references,
  gradients (gradcheck in float64), ``torch.library.opcheck``, outputs allocated over
  NaN-poisoned memory, shapes with n3 = 1, odd n3, n3 beyond the fused kernels (cuFFT
  path), batch dims.
"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import tsvd
from tsvd import _lowrank

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

# --------------------------------------------------------------------------------------
# float64 numpy oracles (definitions, independent of the kernels)
# --------------------------------------------------------------------------------------


def np_trec(u, s, v, res=None):
    """residual + U * fdiag(S) * V^T for (B,n3,n1,r), (B,n3,r), (B,n3,n2,r) float64 arrays:
    slice-wise products of the full DFT spectrum, then the inverse DFT."""
    n3 = u.shape[1]
    uh, sh, vh = (np.fft.fft(x, axis=1) for x in (u, s, v))
    ch = np.einsum("bfik,bfk,bfjk->bfij", uh, sh, vh.conj())
    out = np.fft.ifft(ch, n=n3, axis=1).real
    return out if res is None else out + res


def half_weights(n3):
    nf = n3 // 2 + 1
    w = np.full(nf, 2.0)
    w[0] = 1.0
    if n3 % 2 == 0:
        w[-1] = 1.0
    return w


def pack_a(ah):
    """(B,nf,n1,r) complex -> (B,nf,n1,2,r) real ([re | im] rows)."""
    return np.ascontiguousarray(np.stack([ah.real, ah.imag], axis=3))


def pack_bt(vh):
    """(B,nf,n2,r) complex -> (B,nf,2,r,n2) real (column j fastest)."""
    return np.ascontiguousarray(np.stack([vh.real, vh.imag], axis=2).transpose(0, 1, 2, 4, 3))


# --------------------------------------------------------------------------------------
# host harness of csrc/cuda/column_dft.h
# --------------------------------------------------------------------------------------
HARNESS = r"""
#include "cuda/column_dft.h"
#include "kernels/dft.h"
#include <vector>

using namespace tsvd;
using namespace tsvd::cuda_tile;

template <typename T>
static void tables(int64_t n3, bool irfft, std::vector<T>& c, std::vector<T>& s) {
  const int64_t nt = n3 / 2 + 1, nf = n3 / 2 + 1;
  c.assign(nt * nf, T(0)); s.assign(nt * nf, T(0));
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t f = 0; f < nf; ++f) dft_table_entry<T>(n3, t, f, irfft, &c[t * nf + f], &s[t * nf + f]);
}

template <int MAXF, typename T>
static void rfft_m(int64_t B, int64_t n3, int64_t E, const T* x, T* xh) {
  std::vector<T> fc, fs; tables<T>(n3, false, fc, fs);
  const int nf = int(n3 / 2 + 1);
  for (int64_t b = 0; b < B; ++b) for (int64_t e = 0; e < E; ++e) {   // one thread each
    T xr[MAXF], xi[MAXF];
    rdft_column<T, MAXF>(n3, nf, fc.data(), fs.data(), x + b * n3 * E + e, E, xr, xi);
    for (int f = 0; f < nf; ++f) {
      xh[((b * nf + f) * E + e) * 2] = xr[f]; xh[((b * nf + f) * E + e) * 2 + 1] = xi[f];
    }
  }
}

template <int MAXF, typename T>
static void irfft_m(int64_t B, int64_t n3, int64_t E, const T* xh, T* x) {
  std::vector<T> ic, is; tables<T>(n3, true, ic, is);
  const int nf = int(n3 / 2 + 1);
  for (int64_t b = 0; b < B; ++b) for (int64_t e = 0; e < E; ++e) {
    T yr[MAXF], yi[MAXF];
    for (int f = 0; f < MAXF; ++f) {
      yr[f] = f < nf ? xh[((b * nf + f) * E + e) * 2] : T(0);
      yi[f] = f < nf ? xh[((b * nf + f) * E + e) * 2 + 1] : T(0);
    }
    irdft_column<T, MAXF>(n3, nf, ic.data(), is.data(), yr, yi, nullptr, 0, x + b * n3 * E + e, E);
  }
}

template <int MAXF, typename T>
static void fwd_m(int64_t B, int64_t n3, int64_t n1, int64_t n2, int64_t r, const T* a,
                  const T* bt, const T* res, T* out) {
  std::vector<T> ic, is; tables<T>(n3, true, ic, is);
  const int nf = int(n3 / 2 + 1);
  const int64_t R2 = 2 * r, plane = n1 * n2;
  for (int64_t b = 0; b < B; ++b) for (int64_t i = 0; i < n1; ++i) for (int64_t j = 0; j < n2; ++j) {
    T yr[MAXF], yi[MAXF];
    yhat_column<T, MAXF>(nf, r, a + (b * nf * n1 + i) * R2, n1 * R2, bt + b * nf * R2 * n2 + j, n2, yr, yi);
    const int64_t off = b * n3 * plane + i * n2 + j;
    irdft_column<T, MAXF>(n3, nf, ic.data(), is.data(), yr, yi, res ? res + off : nullptr, plane,
                          out + off, plane);
  }
}

// The backward kernel's blocks: a strip of 32 columns, `ntiles` row tiles of 8 rows, gs planes
// with row pitch 33, gb accumulated per block (acc) or added per row tile.
template <int MAXF, typename T>
static void bwd_m(int64_t B, int64_t n3, int64_t n1, int64_t n2, int64_t r, const T* g, const T* a,
                  const T* bk, T* ga, T* gb, int ntiles, int acc) {
  const int TY = 8, TX = 32, P = 33;
  std::vector<T> fc, fs; tables<T>(n3, true, fc, fs);
  const int nf = int(n3 / 2 + 1);
  const int64_t R2 = 2 * r, plane = n1 * n2;
  std::vector<T> gs(size_t(nf) * 2 * TY * P);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s0 = 0; s0 < n1; s0 += int64_t(TY) * ntiles)
      for (int64_t j0 = 0; j0 < n2; j0 += TX) {
        const int w = int(n2 - j0 < TX ? n2 - j0 : TX);
        std::vector<T> gacc(size_t(nf) * w * 2 * r, T(0));
        for (int rt = 0; rt < ntiles; ++rt) {
          const int64_t i0 = s0 + int64_t(rt) * TY;
          if (i0 >= n1) break;
          const int hrows = int(n1 - i0 < TY ? n1 - i0 : TY);
          for (int ty = 0; ty < TY; ++ty) for (int tx = 0; tx < TX; ++tx) {
            T xr[MAXF], xi[MAXF];
            for (int f = 0; f < MAXF; ++f) { xr[f] = T(0); xi[f] = T(0); }
            if (tx < w && ty < hrows)
              rdft_column<T, MAXF>(n3, nf, fc.data(), fs.data(),
                                   g + b * n3 * plane + (i0 + ty) * n2 + j0 + tx, plane, xr, xi);
            for (int f = 0; f < nf; ++f) {
              gs[((f * 2 + 0) * TY + ty) * P + tx] = xr[f];
              gs[((f * 2 + 1) * TY + ty) * P + tx] = xi[f];
            }
          }
          for (int f = 0; f < nf; ++f) for (int ii = 0; ii < hrows; ++ii) for (int64_t k = 0; k < r; ++k) {
            T sr, si;
            ga_entry<T>(w, &gs[((f * 2 + 0) * TY + ii) * P], &gs[((f * 2 + 1) * TY + ii) * P],
                        bk + ((b * nf + f) * n2 + j0) * R2 + k, r, &sr, &si);
            T* d = ga + ((b * nf + f) * n1 + i0 + ii) * R2 + k;
            d[0] += sr; d[r] += si;
          }
          for (int64_t idx = 0; idx < int64_t(nf) * w * r; ++idx) {
            const int64_t k = idx % r, rest = idx / r;
            const int jj = int(rest % w), f = int(rest / w);
            T sr, si;
            gb_entry<T>(hrows, &gs[((f * 2 + 0) * TY) * P + jj], &gs[((f * 2 + 1) * TY) * P + jj], P,
                        a + ((b * nf + f) * n1 + i0) * R2 + k, r, &sr, &si);
            if (acc) { gacc[2 * idx] += sr; gacc[2 * idx + 1] += si; }
            else { T* d = gb + ((b * nf + f) * n2 + j0 + jj) * R2 + k; d[0] += sr; d[r] += si; }
          }
        }
        if (acc)
          for (int64_t idx = 0; idx < int64_t(nf) * w * r; ++idx) {
            const int64_t k = idx % r, rest = idx / r;
            const int jj = int(rest % w), f = int(rest / w);
            T* d = gb + ((b * nf + f) * n2 + j0 + jj) * R2 + k;
            d[0] += gacc[2 * idx]; d[r] += gacc[2 * idx + 1];
          }
      }
}

#define BUCKET(fn, n3, ...)                                        \
  switch (freq_bucket((n3) / 2 + 1)) {                             \
    case 8: fn<8>(__VA_ARGS__); return 0;                          \
    case 16: fn<16>(__VA_ARGS__); return 0;                        \
    case 32: fn<32>(__VA_ARGS__); return 0;                        \
    default: return 1;                                             \
  }

#define API(T, sfx)                                                                             \
extern "C" int tables_##sfx(int64_t n3, int irfft, T* c, T* s, T* cref, T* sref) {             \
  std::vector<T> a, b; tables<T>(n3, irfft != 0, a, b);                                         \
  std::copy(a.begin(), a.end(), c); std::copy(b.begin(), b.end(), s);                          \
  make_dft_tables<T>(n3, irfft ? DftScale::kIrfft : DftScale::kUnit, cref, sref);              \
  return 0;                                                                                     \
}                                                                                               \
extern "C" int rfft_##sfx(int64_t B, int64_t n3, int64_t E, const T* x, T* xh) {               \
  BUCKET(rfft_m, n3, B, n3, E, x, xh) }                                                         \
extern "C" int irfft_##sfx(int64_t B, int64_t n3, int64_t E, const T* xh, T* x) {              \
  BUCKET(irfft_m, n3, B, n3, E, xh, x) }                                                        \
extern "C" int fwd_##sfx(int64_t B, int64_t n3, int64_t n1, int64_t n2, int64_t r, const T* a,  \
                         const T* bt, const T* res, T* out) {                                   \
  BUCKET(fwd_m, n3, B, n3, n1, n2, r, a, bt, res, out) }                                        \
extern "C" int bwd_##sfx(int64_t B, int64_t n3, int64_t n1, int64_t n2, int64_t r, const T* g,  \
                         const T* a, const T* bk, T* ga, T* gb, int ntiles, int acc) {          \
  BUCKET(bwd_m, n3, B, n3, n1, n2, r, g, a, bk, ga, gb, ntiles, acc) }

API(double, d)
API(float, f)
"""


def build_harness(tmp_path_factory, name: str, source: str, header: str, functions,
                  opt: str = "-O2"):
    """Compiles ``source`` (a host harness of ``header``) with the system C++ compiler into a
    shared library; its ``functions`` return int. Skips without a compiler."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip(f"no C++ compiler to build the host harness of {header}")
    d = tmp_path_factory.mktemp(name)
    src, lib = d / f"{name}.cpp", d / f"{name}.so"
    src.write_text(source)
    subprocess.run([cxx, "-std=c++17", opt, "-shared", "-fPIC", f"-I{CSRC}", str(src), "-o",
                    str(lib)], check=True, capture_output=True, text=True)
    h = ctypes.CDLL(str(lib))
    for f in functions:
        getattr(h, f).restype = ctypes.c_int
    return h


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build_harness(tmp_path_factory, "cuda_harness", HARNESS, "csrc/cuda/column_dft.h",
                         [f"{n}_{sfx}" for n in ("tables", "rfft", "irfft", "fwd", "bwd")
                          for sfx in ("d", "f")])


def _p(a):
    return a.ctypes.data_as(ctypes.c_void_p) if a is not None else None


def _i(*xs):
    return [ctypes.c_int64(int(x)) for x in xs]


NPDT = {"d": np.float64, "f": np.float32}
TOL = {"d": 1e-12, "f": 2e-5}


def relerr(x, ref):
    x = np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


N3S = [1, 2, 3, 5, 12, 13, 16, 31, 48, 63]


@pytest.mark.parametrize("n3", [1, 2, 3, 4, 7, 12, 48, 63])
@pytest.mark.parametrize("irfft", [0, 1])
def test_harness_tables_match_cpu_tables(harness, n3, irfft):
    """The kernels' shared-memory tables == csrc/kernels/dft.h's make_dft_tables, bit for bit,
    and == the definition (cos, -sin, weights) in float64."""
    nf = n3 // 2 + 1
    c, s, cr, sr = (np.full(nf * nf, np.nan) for _ in range(4))
    assert harness.tables_d(*_i(n3), ctypes.c_int(irfft), _p(c), _p(s), _p(cr), _p(sr)) == 0
    np.testing.assert_array_equal(c, cr)
    np.testing.assert_array_equal(s, sr)
    t, f = np.meshgrid(np.arange(nf), np.arange(nf), indexing="ij")
    th = 2 * np.pi * ((f * t) % n3) / n3
    sc = half_weights(n3)[None, :] / n3 if irfft else np.ones((1, nf))
    np.testing.assert_allclose(c.reshape(nf, nf), sc * np.cos(th), atol=1e-15)
    ref_s = -sc * np.sin(th)
    ref_s[:, 0] = 0
    if n3 % 2 == 0:
        ref_s[:, -1] = 0
    np.testing.assert_allclose(s.reshape(nf, nf), ref_s, atol=1e-15)


@pytest.mark.parametrize("sfx", ["d", "f"])
@pytest.mark.parametrize("n3", N3S)
def test_harness_rfft_irfft(harness, sfx, n3):
    rng = np.random.default_rng(n3)
    B, E = 2, 5
    x64 = rng.standard_normal((B, n3, E))
    x = x64.astype(NPDT[sfx])
    nf = n3 // 2 + 1
    xh = np.full((B, nf, E, 2), np.nan, NPDT[sfx])
    assert harness.__getattr__(f"rfft_{sfx}")(*_i(B, n3, E), _p(x), _p(xh)) == 0
    ref = np.fft.rfft(x.astype(np.float64), axis=1)
    assert relerr(xh[..., 0] + 1j * xh[..., 1], ref) < TOL[sfx]
    # inverse of a random half spectrum (DC / Nyquist imaginary parts must be ignored)
    yh64 = rng.standard_normal((B, nf, E, 2))
    yh = yh64.astype(NPDT[sfx])
    out = np.full((B, n3, E), np.nan, NPDT[sfx])
    assert harness.__getattr__(f"irfft_{sfx}")(*_i(B, n3, E), _p(yh), _p(out)) == 0
    ref = np.fft.irfft(yh.astype(np.float64)[..., 0] + 1j * yh.astype(np.float64)[..., 1],
                       n=n3, axis=1)
    assert relerr(out, ref) < TOL[sfx]


def test_harness_rejects_long_tubes(harness):
    x = np.zeros((1, 64, 1))
    xh = np.zeros((1, 33, 1, 2))
    assert harness.rfft_d(*_i(1, 64, 1), _p(x), _p(xh)) == 1  # nf = 33 > 32: no kernel


def _factors(rng, B, n3, n1, n2, r, dt):
    u = rng.standard_normal((B, n3, n1, r)).astype(dt).astype(np.float64)
    s = rng.standard_normal((B, n3, r)).astype(dt).astype(np.float64)
    v = rng.standard_normal((B, n3, n2, r)).astype(dt).astype(np.float64)
    uh, sh, vh = (np.fft.rfft(x, axis=1) for x in (u, s, v))
    ah = uh * sh[:, :, None, :]
    return u, s, v, ah, vh


@pytest.mark.parametrize("sfx", ["d", "f"])
@pytest.mark.parametrize("n3,n1,n2,r,B", [(1, 5, 7, 3, 1), (12, 9, 40, 4, 2), (13, 17, 33, 2, 1),
                                          (48, 10, 37, 8, 1), (63, 3, 4, 1, 2), (2, 1, 1, 1, 1)])
@pytest.mark.parametrize("with_res", [True, False])
def test_harness_treconstruct_forward(harness, sfx, n3, n1, n2, r, B, with_res):
    """The forward kernel's per-thread arithmetic over every (i, j) == the definition."""
    rng = np.random.default_rng(7 * n3 + n1)
    dt = NPDT[sfx]
    u, s, v, ah, vh = _factors(rng, B, n3, n1, n2, r, dt)
    res = rng.standard_normal((B, n3, n1, n2)).astype(dt) if with_res else None
    a, bt = pack_a(ah).astype(dt), pack_bt(vh).astype(dt)
    out = np.full((B, n3, n1, n2), np.nan, dt)
    assert harness.__getattr__(f"fwd_{sfx}")(*_i(B, n3, n1, n2, r), _p(a), _p(bt), _p(res),
                                             _p(out)) == 0
    ref = np_trec(u, s, v, None if res is None else res.astype(np.float64))
    assert np.isfinite(out).all()
    assert relerr(out, ref) < TOL[sfx] * 10


@pytest.mark.parametrize("sfx", ["d", "f"])
@pytest.mark.parametrize("n3,n1,n2,r,B", [(1, 5, 7, 3, 1), (12, 9, 40, 4, 2), (13, 17, 70, 2, 1),
                                          (48, 10, 37, 8, 1), (6, 8, 32, 3, 1), (5, 41, 33, 2, 2)])
@pytest.mark.parametrize("ntiles,acc", [(1, 0), (3, 1)])
def test_harness_treconstruct_backward(harness, sfx, n3, n1, n2, r, B, ntiles, acc):
    """The backward kernel's tiles (transform of G on chip, reductions) == the gradients of
    the Fourier-domain factors: ga = (c Gh) Vh, gb = (c Gh)^H A with c_f = w_f / n3."""
    rng = np.random.default_rng(11 * n3 + n2)
    dt = NPDT[sfx]
    _, _, _, ah, vh = _factors(rng, B, n3, n1, n2, r, dt)
    g = rng.standard_normal((B, n3, n1, n2)).astype(dt)
    a = pack_a(ah).astype(dt)
    bk = np.ascontiguousarray(np.stack([vh.real, vh.imag], axis=3)).astype(dt)
    nf = n3 // 2 + 1
    ga = np.zeros((B, nf, n1, 2, r), dt)
    gb = np.zeros((B, nf, n2, 2, r), dt)
    assert harness.__getattr__(f"bwd_{sfx}")(*_i(B, n3, n1, n2, r), _p(g), _p(a), _p(bk), _p(ga),
                                             _p(gb), ctypes.c_int(ntiles), ctypes.c_int(acc)) == 0
    gh = np.fft.rfft(g.astype(np.float64), axis=1) * (half_weights(n3) / n3)[None, :, None, None]
    ref_a = gh @ vh
    ref_b = np.conj(np.swapaxes(gh, -1, -2)) @ ah
    assert relerr(ga[:, :, :, 0] + 1j * ga[:, :, :, 1], ref_a) < TOL[sfx] * 10
    assert relerr(gb[:, :, :, 0] + 1j * gb[:, :, :, 1], ref_b) < TOL[sfx] * 10


def test_harness_backward_is_adjoint_of_forward(harness):
    """<G, fwd(A, B)> is linear in A and B: its derivative along a random direction dA equals
    Re<dA, ga> (the kernel's ga is the gradient of the forward kernel's output)."""
    rng = np.random.default_rng(3)
    B, n3, n1, n2, r = 1, 10, 6, 9, 3
    nf = n3 // 2 + 1
    _, _, _, ah, vh = _factors(rng, B, n3, n1, n2, r, np.float64)
    g = rng.standard_normal((B, n3, n1, n2))
    a, bt = pack_a(ah), pack_bt(vh)
    bk = np.ascontiguousarray(np.stack([vh.real, vh.imag], axis=3))
    ga = np.zeros((B, nf, n1, 2, r))
    gb = np.zeros((B, nf, n2, 2, r))
    harness.bwd_d(*_i(B, n3, n1, n2, r), _p(g), _p(a), _p(bk), _p(ga), _p(gb), ctypes.c_int(2),
                  ctypes.c_int(1))

    def f(a_):
        out = np.empty((B, n3, n1, n2))
        harness.fwd_d(*_i(B, n3, n1, n2, r), _p(np.ascontiguousarray(a_)), _p(bt), None, _p(out))
        return float((g * out).sum())

    da = rng.standard_normal(a.shape)
    # only the imaginary parts of real bins (DC, Nyquist) do not reach the output
    da[:, 0, :, 1] = 0
    if n3 % 2 == 0:
        da[:, -1, :, 1] = 0
    lhs = f(a + da) - f(a)
    assert abs(lhs - float((da * ga).sum())) < 1e-9 * (1 + abs(lhs))


# --------------------------------------------------------------------------------------
# host harness of csrc/cuda/fixed_dft.h (the v2 kernels of csrc/cuda/kernels_v2.cu)
# --------------------------------------------------------------------------------------
V2_NS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 16, 31, 48, 63, 64]
V2_KERNEL_NS = [12, 48]   # the lengths kernels_v2.cu instantiates
HARNESS_V2 = r"""
#include "cuda/fixed_dft.h"
#include <cmath>
#include <vector>
using namespace tsvd::cuda_fixed;

template <typename T> struct C2 { T x, y; };

extern "C" int twiddle(long long num, long long den, double* c, double* s) {
  *c = cospi(num, den); *s = sinpi(num, den); return 0;
}

// rfft of each of E tubes x[e][t] -> yh[e][f][2]; irfft of yh2[e][f][2] -> out[e][t];
// cnt[e][t] = how often irdft_fixed emitted t
template <int N, typename T>
static int dfts(int64_t E, const T* x, T* yh, const T* yh2, T* out, int* cnt) {
  constexpr int F = N / 2 + 1;
  for (int64_t e = 0; e < E; ++e) {
    T v[N];
    for (int t = 0; t < N; ++t) v[t] = x[e * N + t];
    T yr[F], yi[F];
    rdft_fixed<N, T>(v, yr, yi);
    for (int f = 0; f < F; ++f) { yh[(e * F + f) * 2] = yr[f]; yh[(e * F + f) * 2 + 1] = yi[f]; }
    for (int f = 0; f < F; ++f) { yr[f] = yh2[(e * F + f) * 2]; yi[f] = yh2[(e * F + f) * 2 + 1]; }
    irdft_fixed<N, T>(yr, yi, [&](auto tt, T val) {
      constexpr int t = decltype(tt)::value;
      out[e * N + t] = val; cnt[e * N + t] += 1;
    });
  }
  return 0;
}

// trec_prep_v2 + trec_fwd_v2 of kernels_v2.cu, thread by thread: the prep's two thread
// ranges, then the main kernel's blocks (strip of 32 columns staged like the shared memory,
// zero past n2; rows of a block in passes of 8; `rows` rows per block). sa: trec_fwd_v2_sa,
// which stages each pass's 8 rows of a2 (fewer in the last pass) like its shared memory.
template <int N, typename T>
static int fwd2(int64_t B, int64_t n1, int64_t n2, int64_t r, const T* U, const T* S, const T* V,
                const T* res, T* out, int rows, int sa) {
  constexpr int F = N / 2 + 1, STRIP = 32, PASS = 8;
  std::vector<C2<T>> a2(size_t(B * n1 * r * F)), b2(size_t(B * r * F * n2));
  const int64_t nU = B * n1 * r, nV = B * n2 * r;
  for (int64_t idx = 0; idx < nU + nV; ++idx) {       // trec_prep_v2's two thread ranges
    if (idx < nU) {
      const int64_t k = idx % r, bi = idx / r, i = bi % n1, b = bi / n1;
      prep_u<N, T, C2<T>, false>(U + (b * N * n1 + i) * r + k, n1 * r, S + b * N * r + k, r,
                                 &a2[((b * n1 + i) * r + k) * F], 1);
    } else {
      const int64_t q = idx - nU, j = q % n2, rest = q / n2, k = rest % r, b = rest / r;
      prep_v<N, T, C2<T>>(V + (b * N * n2 + j) * r + k, n2 * r, &b2[(b * r + k) * F * n2 + j], n2);
    }
  }
  const int64_t plane = n1 * n2;
  std::vector<C2<T>> sb(size_t(r * F * STRIP));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j0 = 0; j0 < n2; j0 += STRIP)
      for (int64_t i0 = 0; i0 < n1; i0 += rows) {
        for (int64_t q = 0; q < r * F * STRIP; ++q) {
          const int64_t kf = q / STRIP, j = j0 + q % STRIP;
          sb[q] = j < n2 ? b2[(b * r * F + kf) * n2 + j] : C2<T>{T(0), T(0)};
        }
        const int64_t i_end = i0 + rows < n1 ? i0 + rows : n1;
        std::vector<C2<T>> sa_rows(size_t(PASS * r * F), C2<T>{T(NAN), T(NAN)});
        for (int64_t ib = i0; ib < i_end; ib += PASS) {        // passes (sa: staged rows)
          if (sa) {
            const int64_t nrows = i_end - ib < PASS ? i_end - ib : PASS;
            for (int64_t q = 0; q < nrows * r * F; ++q) sa_rows[q] = a2[(b * n1 + ib) * r * F + q];
          }
          for (int ty = 0; ty < PASS; ++ty)
          for (int tx = 0; tx < STRIP; ++tx) {
            const int64_t j = j0 + tx, i = ib + ty;
            if (j >= n2 || i >= i_end) continue;
            {
              const int64_t off = b * N * plane + i * n2 + j;
              T yr[F], yi[F];
              const C2<T>* arow = sa ? &sa_rows[ty * r * F] : &a2[(b * n1 + i) * r * F];
              yhat_fixed<N, T, C2<T>>(int(r), arow, &sb[tx], STRIP, yr, yi);
              irdft_fixed<N, T>(yr, yi, [&](auto tt, T val) {
                constexpr int t = decltype(tt)::value;
                out[off + t * plane] = val + (res ? res[off + t * plane] : T(0));
              });
            }
          }
        }
      }
  return 0;
}

// trec_bwd_pq_v2 of kernels_v2.cu (the fused P/Q, TSVD_CUDA_KERNELS=v2pq), block by block
// and thread by thread: 64 x 64 tiles of each Gh_f, thread (tj, ti) = (tid % 64, tid / 64)
// on column j0 + tj and rows i0 + ti + 4 m; P's terms of a row summed over each warp's 32
// lanes, Q over the 4 row groups; both added into P, Q (zeroed here), as the atomics do.
template <int R, typename T>
static int pq2(int64_t BF, int64_t n1, int64_t n2, const T* gh, const T* vh, const T* ca, T* P,
               T* Q) {
  constexpr int TILE = 64, GROUPS = 4, ROWS = 16, THREADS = 256;
  using V = C2<T>;
  const V* g = reinterpret_cast<const V*>(gh);
  const V* vhc = reinterpret_cast<const V*>(vh);
  const V* cac = reinterpret_cast<const V*>(ca);
  for (int64_t q = 0; q < BF * n1 * R * 2; ++q) P[q] = T(0);
  for (int64_t q = 0; q < BF * n2 * R * 2; ++q) Q[q] = T(0);
  std::vector<V> sca(TILE * R);
  for (int64_t bf = 0; bf < BF; ++bf)
    for (int64_t i0 = 0; i0 < n1; i0 += TILE)
      for (int64_t j0 = 0; j0 < n2; j0 += TILE) {
        for (int q = 0; q < TILE * R; ++q) {
          const int64_t i = i0 + q / R;
          sca[q] = i < n1 ? cac[(bf * n1 + i0) * R + q] : V{T(0), T(0)};
        }
        std::vector<T> qr(THREADS * R, T(0)), qi(THREADS * R, T(0));
        for (int m = 0; m < ROWS; ++m)
          for (int w = 0; w < THREADS / 32; ++w) {          // warps: 32 lanes, one ti
            T sr[R] = {}, si[R] = {};
            int64_t i = 0;
            for (int lane = 0; lane < 32; ++lane) {
              const int tid = w * 32 + lane, tj = tid % TILE, ti = tid / TILE;
              const int ii = ti + GROUPS * m;
              i = i0 + ii;
              const int64_t j = j0 + tj;
              const bool jok = j < n2;
              V vj[R];
              for (int k = 0; k < R; ++k) vj[k] = jok ? vhc[(bf * n2 + j) * R + k] : V{T(0), T(0)};
              const V t = (jok && i < n1) ? g[(bf * n1 + i) * n2 + j] : V{T(0), T(0)};
              T a[R], b[R], pr[R], pi[R];
              for (int k = 0; k < R; ++k) { a[k] = qr[tid * R + k]; b[k] = qi[tid * R + k]; }
              pq_element<R, T, V>(t, &sca[ii * R], vj, a, b, pr, pi);
              for (int k = 0; k < R; ++k) {
                qr[tid * R + k] = a[k]; qi[tid * R + k] = b[k];
                sr[k] += pr[k]; si[k] += pi[k];
              }
            }
            if (i < n1)
              for (int k = 0; k < R; ++k) {
                P[((bf * n1 + i) * R + k) * 2] += sr[k];
                P[((bf * n1 + i) * R + k) * 2 + 1] += si[k];
              }
          }
        for (int tj = 0; tj < TILE; ++tj) {
          const int64_t j = j0 + tj;
          if (j >= n2) continue;
          for (int k = 0; k < R; ++k) {
            T sr = T(0), si = T(0);
            for (int gi = 0; gi < GROUPS; ++gi) {
              sr += qr[(gi * TILE + tj) * R + k];
              si += qi[(gi * TILE + tj) * R + k];
            }
            Q[((bf * n2 + j) * R + k) * 2] += sr;
            Q[((bf * n2 + j) * R + k) * 2 + 1] += si;
          }
        }
      }
  return 0;
}

// the v2 backward: prep and post threads (fixed_dft.h bodies, the kernels' index arithmetic),
// Gh = rfft(G) per tube and the glue's two GEMMs as plain loops
template <int N, typename T>
static int bwd2(int64_t B, int64_t n1, int64_t n2, int64_t r, const T* G, const T* U, const T* S,
                const T* V, T* gU, T* gS, T* gV) {
  constexpr int F = N / 2 + 1;
  std::vector<C2<T>> ca(size_t(B * F * n1 * r)), vh(size_t(B * F * n2 * r));
  const int64_t us = n1 * r, vs = n2 * r;
  for (int64_t b = 0; b < B; ++b) for (int64_t i = 0; i < n1; ++i) for (int64_t k = 0; k < r; ++k)
    prep_u<N, T, C2<T>, true>(U + (b * N * n1 + i) * r + k, us, S + b * N * r + k, r,
                            &ca[(b * F * n1 + i) * r + k], us);
  for (int64_t b = 0; b < B; ++b) for (int64_t j = 0; j < n2; ++j) for (int64_t k = 0; k < r; ++k)
    prep_v<N, T, C2<T>>(V + (b * N * n2 + j) * r + k, vs, &vh[(b * F * n2 + j) * r + k], vs);
  const int64_t E = n1 * n2;
  std::vector<C2<T>> gh(size_t(B * F * E));
  for (int64_t b = 0; b < B; ++b) for (int64_t e = 0; e < E; ++e) {
    T yr[F], yi[F];
    load_tube_rdft<N, T, C2<T>>(G + b * N * E + e, E, yr, yi);
    for (int f = 0; f < F; ++f) gh[(b * F + f) * E + e] = {yr[f], yi[f]};
  }
  std::vector<C2<T>> P(size_t(B * F * n1 * r)), Q(size_t(B * F * n2 * r));
  for (int64_t b = 0; b < B; ++b) for (int f = 0; f < F; ++f) {
    const C2<T>* g = &gh[(b * F + f) * E];
    for (int64_t i = 0; i < n1; ++i) for (int64_t k = 0; k < r; ++k) {     // P = Gh Vh
      T xr = 0, xi = 0;
      for (int64_t j = 0; j < n2; ++j) {
        const C2<T> a = g[i * n2 + j], v = vh[((b * F + f) * n2 + j) * r + k];
        xr += a.x * v.x - a.y * v.y; xi += a.x * v.y + a.y * v.x;
      }
      P[((b * F + f) * n1 + i) * r + k] = {xr, xi};
    }
    for (int64_t j = 0; j < n2; ++j) for (int64_t k = 0; k < r; ++k) {     // Q = Gh^T conj(A)
      T xr = 0, xi = 0;
      for (int64_t i = 0; i < n1; ++i) {
        const C2<T> a = g[i * n2 + j], c = ca[((b * F + f) * n1 + i) * r + k];
        xr += a.x * c.x - a.y * c.y; xi += a.x * c.y + a.y * c.x;
      }
      Q[((b * F + f) * n2 + j) * r + k] = {xr, xi};
    }
  }
  for (int64_t q = 0; q < B * N * r; ++q) gS[q] = T(0);
  for (int64_t b = 0; b < B; ++b) for (int64_t i = 0; i < n1; ++i) for (int64_t k = 0; k < r; ++k) {
    T* gs = gS + b * N * r + k;
    bwd_post_u<N, T, C2<T>>(&P[(b * F * n1 + i) * r + k], us, U + (b * N * n1 + i) * r + k, us,
                            S + b * N * r + k, r, gU + (b * N * n1 + i) * r + k, us,
                            [&](int t, T v) { gs[t * r] += v; });
  }
  for (int64_t b = 0; b < B; ++b) for (int64_t j = 0; j < n2; ++j) for (int64_t k = 0; k < r; ++k)
    bwd_post_v<N, T, C2<T>>(&Q[(b * F * n2 + j) * r + k], vs, gV + (b * N * n2 + j) * r + k, vs);
  return 0;
}

#define DFTS(T, sfx, N) \
  case N: return dfts<N, T>(E, x, yh, yh2, out, cnt);
#define API(T, sfx)                                                                        \
extern "C" int dfts_##sfx(int n, int64_t E, const T* x, T* yh, const T* yh2, T* out, int* cnt) { \
  switch (n) {                                                                             \
    DFTS(T, sfx, 1) DFTS(T, sfx, 2) DFTS(T, sfx, 3) DFTS(T, sfx, 4) DFTS(T, sfx, 5)        \
    DFTS(T, sfx, 6) DFTS(T, sfx, 7) DFTS(T, sfx, 8) DFTS(T, sfx, 12) DFTS(T, sfx, 13)      \
    DFTS(T, sfx, 16) DFTS(T, sfx, 31) DFTS(T, sfx, 48) DFTS(T, sfx, 63) DFTS(T, sfx, 64)   \
    default: return 1;                                                                     \
  }                                                                                        \
}                                                                                          \
extern "C" int fwd2_##sfx(int n, int64_t B, int64_t n1, int64_t n2, int64_t r, const T* U, \
                          const T* S, const T* V, const T* res, T* out, int rows, int sa) { \
  switch (n) {                                                                             \
    case 12: return fwd2<12, T>(B, n1, n2, r, U, S, V, res, out, rows, sa);                \
    case 48: return fwd2<48, T>(B, n1, n2, r, U, S, V, res, out, rows, sa);                \
    default: return 1;                                                                     \
  }                                                                                        \
}                                                                                          \
extern "C" int pq2_##sfx(int64_t BF, int64_t n1, int64_t n2, int64_t r, const T* gh,       \
                         const T* vh, const T* ca, T* P, T* Q) {                          \
  switch (r) {                                                                             \
    case 1: return pq2<1, T>(BF, n1, n2, gh, vh, ca, P, Q);                                \
    case 2: return pq2<2, T>(BF, n1, n2, gh, vh, ca, P, Q);                                \
    case 4: return pq2<4, T>(BF, n1, n2, gh, vh, ca, P, Q);                                \
    case 8: return pq2<8, T>(BF, n1, n2, gh, vh, ca, P, Q);                                \
    case 16: return pq2<16, T>(BF, n1, n2, gh, vh, ca, P, Q);                              \
    default: return 1;                                                                     \
  }                                                                                        \
}                                                                                          \
extern "C" int bwd2_##sfx(int n, int64_t B, int64_t n1, int64_t n2, int64_t r, const T* G,  \
                          const T* U, const T* S, const T* V, T* gU, T* gS, T* gV) {       \
  switch (n) {                                                                             \
    case 12: return bwd2<12, T>(B, n1, n2, r, G, U, S, V, gU, gS, gV);                     \
    case 48: return bwd2<48, T>(B, n1, n2, r, G, U, S, V, gU, gS, gV);                     \
    default: return 1;                                                                     \
  }                                                                                        \
}
API(double, d)
API(float, f)
"""


@pytest.fixture(scope="module")
def harness_v2(tmp_path_factory):
    # -O1: the fully unrolled templates compile several times faster than at -O2
    return build_harness(tmp_path_factory, "cuda_harness_v2", HARNESS_V2,
                         "csrc/cuda/fixed_dft.h", ["twiddle", "dfts_d", "dfts_f", "fwd2_d",
                                                   "fwd2_f", "bwd2_d", "bwd2_f", "pq2_d",
                                                   "pq2_f"], opt="-O1")


def test_harness_v2_compile_time_twiddles(harness_v2):
    """cospi / sinpi (the constexpr twiddles) == numpy's cos / sin of pi num / den, with the
    zeros and +-1 of multiples of pi/2 exact."""
    c, s = ctypes.c_double(), ctypes.c_double()
    worst = 0.0
    for den in (1, 2, 3, 5, 12, 24, 48, 63, 96, 128):
        for num in range(-2 * den - 3, 4 * den + 4):
            assert harness_v2.twiddle(ctypes.c_longlong(num), ctypes.c_longlong(den),
                                      ctypes.byref(c), ctypes.byref(s)) == 0
            worst = max(worst, abs(c.value - math.cos(math.pi * num / den)),
                        abs(s.value - math.sin(math.pi * num / den)))
            if (2 * num) % den == 0:                       # multiple of pi/2: exact values
                q = (2 * num // den) % 4
                assert (c.value, s.value) == [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)][q]
    assert worst < 1e-14


@pytest.mark.parametrize("sfx", ["d", "f"])
@pytest.mark.parametrize("n3", V2_NS)
def test_harness_v2_rfft_irfft(harness_v2, sfx, n3):
    """rdft_fixed == numpy.fft.rfft; irdft_fixed == numpy.fft.irfft (the imaginary parts of
    the DC and Nyquist bins ignored) and emits every t exactly once."""
    rng = np.random.default_rng(100 + n3)
    E, nf, dt = 6, n3 // 2 + 1, NPDT[sfx]
    x = rng.standard_normal((E, n3)).astype(dt)
    yh = np.full((E, nf, 2), np.nan, dt)
    yh2 = rng.standard_normal((E, nf, 2)).astype(dt)
    out = np.full((E, n3), np.nan, dt)
    cnt = np.zeros((E, n3), np.int32)
    assert harness_v2.__getattr__(f"dfts_{sfx}")(ctypes.c_int(n3), ctypes.c_int64(E), _p(x),
                                                 _p(yh), _p(yh2), _p(out), _p(cnt)) == 0
    assert (cnt == 1).all()
    ref = np.fft.rfft(x.astype(np.float64), axis=1)
    assert relerr(yh[..., 0] + 1j * yh[..., 1], ref) < TOL[sfx]
    spec = yh2.astype(np.float64)[..., 0] + 1j * yh2.astype(np.float64)[..., 1]
    spec[:, 0] = spec[:, 0].real
    if n3 % 2 == 0:
        spec[:, -1] = spec[:, -1].real
    ref = np.fft.irfft(spec, n=n3, axis=1)
    assert relerr(out, ref) < TOL[sfx]


@pytest.mark.parametrize("sfx", ["d", "f"])
@pytest.mark.parametrize("n3", V2_KERNEL_NS)
@pytest.mark.parametrize("B,n1,n2,r,rows", [(1, 9, 40, 4, 8), (2, 19, 33, 1, 16),
                                            (1, 70, 65, 8, 24), (1, 3, 5, 3, 8)])
@pytest.mark.parametrize("with_res", [True, False])
@pytest.mark.parametrize("sa", [0, 1])
def test_harness_v2_treconstruct_forward(harness_v2, sfx, n3, B, n1, n2, r, rows, with_res, sa):
    """The v2 forward (prep launch + main launch, replayed thread by thread with the kernels'
    index arithmetic and shared-memory strip; sa: the rows of a2 staged per pass, as
    trec_fwd_v2_sa does, NaN where a pass has fewer rows) == the definition of the t-product."""
    rng = np.random.default_rng(n3 * 1000 + n1 * 10 + r)
    dt = NPDT[sfx]
    u, s, v = (rng.standard_normal(sh).astype(dt) for sh in
               [(B, n3, n1, r), (B, n3, r), (B, n3, n2, r)])
    res = rng.standard_normal((B, n3, n1, n2)).astype(dt) if with_res else None
    out = np.full((B, n3, n1, n2), np.nan, dt)
    assert harness_v2.__getattr__(f"fwd2_{sfx}")(
        ctypes.c_int(n3), *_i(B, n1, n2, r), _p(u), _p(s), _p(v), _p(res), _p(out),
        ctypes.c_int(rows), ctypes.c_int(sa)) == 0
    ref = np_trec(*(a.astype(np.float64) for a in (u, s, v)),
                  None if res is None else res.astype(np.float64))
    assert np.isfinite(out).all()
    assert relerr(out, ref) < TOL[sfx] * 10


@pytest.mark.parametrize("sfx", ["d", "f"])
@pytest.mark.parametrize("BF,n1,n2,r", [(1, 64, 64, 8), (3, 70, 130, 4), (2, 5, 9, 1),
                                         (1, 129, 65, 16), (2, 33, 200, 2)])
def test_harness_v2_fused_pq(harness_v2, sfx, BF, n1, n2, r):
    """The fused P/Q kernel of the backward (trec_bwd_pq_v2, tiles, row groups, warp sums,
    edges past n1 and n2, replayed thread by thread) == P = Gh Vh, Q = Gh^T conj(A) in
    float64 numpy."""
    rng = np.random.default_rng(BF * 1000 + n1 + n2 + r)
    dt = NPDT[sfx]

    def cplx(*shape):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex128)

    gh, vh, ca = cplx(BF, n1, n2), cplx(BF, n2, r), cplx(BF, n1, r)
    as_real = lambda z: np.ascontiguousarray(np.stack([z.real, z.imag], -1)).astype(dt)  # noqa: E731
    P = np.full((BF, n1, r, 2), np.nan, dt)
    Q = np.full((BF, n2, r, 2), np.nan, dt)
    assert harness_v2.__getattr__(f"pq2_{sfx}")(*_i(BF, n1, n2, r), _p(as_real(gh)), _p(as_real(vh)),
                                                _p(as_real(ca)), _p(P), _p(Q)) == 0
    got_p, got_q = P[..., 0] + 1j * P[..., 1], Q[..., 0] + 1j * Q[..., 1]
    assert relerr(got_p, gh @ vh) < TOL[sfx] * 10
    assert relerr(got_q, np.swapaxes(gh, -1, -2) @ ca) < TOL[sfx] * 10
    assert harness_v2.__getattr__(f"pq2_{sfx}")(*_i(BF, n1, n2, 3), _p(as_real(gh)), _p(as_real(vh)),
                                                _p(as_real(ca)), _p(P), _p(Q)) == 1


@pytest.mark.parametrize("sfx", ["d", "f"])
@pytest.mark.parametrize("n3", V2_KERNEL_NS)
@pytest.mark.parametrize("B,n1,n2,r", [(1, 9, 14, 4), (2, 7, 5, 1), (1, 16, 11, 8)])
def test_harness_v2_treconstruct_backward(harness_v2, sfx, n3, B, n1, n2, r):
    """The v2 backward (prep, rfft of G, the two GEMMs, post with the sum over i of gS) ==
    float64 autograd of the reference t-product (tsvd.reference.treconstruct)."""
    rng = np.random.default_rng(n3 * 100 + n1 + r)
    dt = NPDT[sfx]
    g, u, s, v = (rng.standard_normal(sh).astype(dt) for sh in
                  [(B, n3, n1, n2), (B, n3, n1, r), (B, n3, r), (B, n3, n2, r)])
    gu, gs, gv = (np.full(a.shape, np.nan, dt) for a in (u, s, v))
    assert harness_v2.__getattr__(f"bwd2_{sfx}")(
        ctypes.c_int(n3), *_i(B, n1, n2, r), _p(g), _p(u), _p(s), _p(v), _p(gu), _p(gs),
        _p(gv)) == 0
    leaves = [torch.from_numpy(a.astype(np.float64)).requires_grad_() for a in (u, s, v)]
    out = tsvd.reference.treconstruct(*leaves)
    refs = torch.autograd.grad(out, leaves, torch.from_numpy(g.astype(np.float64)))
    for got, ref in zip((gu, gs, gv), refs):
        assert np.isfinite(got).all()
        assert relerr(got, ref.numpy()) < TOL[sfx] * 10


# --------------------------------------------------------------------------------------
# GPU tests
# --------------------------------------------------------------------------------------
HAS_CUDA = torch.cuda.is_available() and tsvd.compiled_available("cuda")
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and tsvd._C built with CUDA")
DEV = "cuda"
GTOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def trel(x, ref):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def poison(nbytes: int):
    """Fill a freed block of the CUDA caching allocator with NaN so that the next
    allocation of a similar size (an op's output) starts as NaN, not as zeros."""
    n = max(int(nbytes) // 4, 1)
    x = torch.full((n,), float("nan"), device=DEV)
    torch.cuda.synchronize()
    del x


def rnd(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


OPS = torch.ops.tsvd if HAS_CUDA else None
GPU_N3 = [1, 2, 5, 12, 13, 48, 63, 64, 70]  # 64, 70: beyond the fused kernels (cuFFT path)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n3", GPU_N3)
def test_gpu_tube_dfts(dtype, n3):
    X = rnd(3, n3, 17, 45, dtype=dtype, seed=n3)
    nf = n3 // 2 + 1
    poison(X.numel() * 2 * X.element_size())
    Xh = OPS.tube_rfft(X.to(DEV))
    ref = torch.fft.rfft(X.double(), dim=1)
    assert Xh.shape == ref.shape and torch.isfinite(torch.view_as_real(Xh)).all()
    assert trel(torch.view_as_real(Xh), torch.view_as_real(ref)) < GTOL[dtype]
    Yh = torch.complex(rnd(3, nf, 17, 45, seed=1), rnd(3, nf, 17, 45, seed=2)).to(
        torch.complex128 if dtype == torch.float64 else torch.complex64)
    if n3 > 63:  # cuFFT path: keep the input Hermitian-representable (DC, Nyquist real); the
        # own kernels' dropping of those imaginary parts is tested by the host harness
        Yh[:, 0].imag.zero_()
        if n3 % 2 == 0:
            Yh[:, -1].imag.zero_()
    poison(X.numel() * X.element_size())
    Y = OPS.tube_irfft(Yh.to(DEV), n3)
    ref = torch.fft.irfft(Yh.to(torch.complex128), n=n3, dim=1)
    assert Y.shape == ref.shape and torch.isfinite(Y).all()
    assert trel(Y, ref) < GTOL[dtype]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n3", GPU_N3)
@pytest.mark.parametrize("with_res", [True, False])
def test_gpu_treconstruct_forward(dtype, n3, with_res):
    B, n1, n2, r = 2, 37, 70, 5
    U, S, V = rnd(B, n3, n1, r, seed=1), rnd(B, n3, r, seed=2), rnd(B, n3, n2, r, seed=3)
    R = rnd(B, n3, n1, n2, seed=4) if with_res else None
    ref = torch.from_numpy(np_trec(U.numpy(), S.numpy(), V.numpy(),
                                   None if R is None else R.numpy()))
    args = [t.to(dtype) for t in (U, S, V)]
    poison(B * n3 * n1 * n2 * torch.tensor([], dtype=dtype).element_size())
    out = OPS.treconstruct(*[t.to(DEV) for t in args], None if R is None else R.to(dtype).to(DEV))
    assert out.shape == (B, n3, n1, n2) and torch.isfinite(out).all()
    assert trel(out, ref) < GTOL[dtype] * 10
    if tsvd.compiled_available("cpu"):  # the CPU path of the same op
        cpu = OPS.treconstruct(*args, None if R is None else R.to(dtype))
        assert trel(out, cpu) < GTOL[dtype] * 10


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n3", [1, 4, 12, 13, 48, 70])
def test_gpu_treconstruct_backward(dtype, n3):
    B, n1, n2, r = 2, 19, 41, 3
    U, S, V = (rnd(*s, seed=i) for i, s in enumerate([(B, n3, n1, r), (B, n3, r), (B, n3, n2, r)]))
    G = rnd(B, n3, n1, n2, seed=9)
    ref_in = [t.clone().requires_grad_() for t in (U, S, V)]
    out = tsvd.reference.treconstruct(*ref_in)
    refs = torch.autograd.grad(out, ref_in, G)
    poison(B * n3 * n2 * r * 8)
    got = OPS.treconstruct_backward(*[t.to(dtype).to(DEV) for t in (G, U, S, V)])
    for g_, ref in zip(got, refs):
        assert g_.shape == ref.shape and torch.isfinite(g_).all()
        assert trel(g_, ref) < GTOL[dtype] * 50


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n3", [1, 6, 7, 66])
def test_gpu_gradcheck(n3):
    B, n1, n2, r = 1, 4, 5, 2
    U, S, V, R = (rnd(*s, seed=i).to(DEV).requires_grad_() for i, s in
                  enumerate([(B, n3, n1, r), (B, n3, r), (B, n3, n2, r), (B, n3, n1, n2)]))
    # the backward kernel sums with atomicAdd: reentrant only up to rounding
    assert torch.autograd.gradcheck(lambda *a: OPS.treconstruct(*a), (U, S, V, R),
                                    nondet_tol=1e-10)
    A, Bm = rnd(B, n3, 3, 4, seed=5).to(DEV).requires_grad_(), \
        rnd(B, n3, 4, 2, seed=6).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: OPS.tprod(a, b), (A, Bm))
    X = rnd(B, n3, 3, 2, seed=7).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: torch.view_as_real(OPS.tube_rfft(x)), (X,))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n3", [1, 3, 12, 48, 80])
def test_gpu_tprod(dtype, n3):
    A, Bm = rnd(2, n3, 9, 14, seed=1), rnd(2, n3, 14, 6, seed=2)
    ref = tsvd.reference.tprod(A, Bm)
    poison(2 * n3 * 9 * 6 * 8)
    out = OPS.tprod(A.to(dtype).to(DEV), Bm.to(dtype).to(DEV))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert trel(out, ref) < GTOL[dtype] * 10


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n3", [1, 5, 12, 70])
def test_gpu_opcheck(n3):
    from torch.library import opcheck
    U, S, V, R = (rnd(*s, dtype=torch.float32, seed=i).to(DEV) for i, s in
                  enumerate([(2, n3, 6, 3), (2, n3, 3), (2, n3, 7, 3), (2, n3, 6, 7)]))
    G = rnd(2, n3, 6, 7, dtype=torch.float32, seed=5).to(DEV)
    opcheck(OPS.treconstruct, (U.requires_grad_(), S.requires_grad_(), V.requires_grad_(), R))
    opcheck(OPS.treconstruct, (U.detach(), S.detach(), V.detach(), None))
    opcheck(OPS.treconstruct_backward, (G, U.detach(), S.detach(), V.detach()))
    opcheck(OPS.tprod, (U.detach(), V.detach().transpose(-1, -2).contiguous()))
    opcheck(OPS.tube_rfft, (R,))
    opcheck(OPS.tube_irfft, (OPS.tube_rfft(R), n3))


@cuda
@pytest.mark.cuda
def test_gpu_public_api_batch_dims_and_backend():
    """tsvd.treconstruct / tprod / tsvd on CUDA tensors with batch dims use the compiled
    kernels and agree with the float64 reference (the t-SVD by Eckart-Young)."""
    U, S, V = rnd(2, 3, 12, 20, 4, seed=1), rnd(2, 3, 12, 4, seed=2), rnd(2, 3, 12, 25, 4, seed=3)
    R = rnd(2, 3, 12, 20, 25, seed=4)
    out = tsvd.treconstruct(*(t.float().to(DEV) for t in (U, S, V)), residual=R.float().to(DEV))
    assert tsvd.last_backend("treconstruct") == "compiled" and out.is_cuda
    assert trel(out, tsvd.reference.treconstruct(U, S, V, R)) < 2e-4
    C = tsvd.tprod(U.float().to(DEV), V.float().to(DEV).transpose(-1, -2))
    assert tsvd.last_backend("tprod") == "compiled"
    assert trel(C, tsvd.reference.tprod(U, V.transpose(-1, -2))) < 2e-4
    X = rnd(2, 12, 30, 22, seed=5)
    k = 4
    Uk, Sk, Vk = tsvd.tsvd(X.to(DEV), k)
    assert tsvd.last_backend("tsvd") == "compiled" and Uk.is_cuda
    err = (tsvd.reference.treconstruct(Uk.cpu(), Sk.cpu(), Vk.cpu()) - X).norm()
    sv = torch.linalg.svdvals(torch.fft.fft(X, dim=-3))   # (2, 12, p) full spectrum
    best = torch.sqrt((sv[..., k:] ** 2).sum() / X.shape[-3])
    assert abs(float(err) - float(best)) <= 1e-8 * float(best)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("algorithm", ["krylov", "subspace"])
def test_gpu_iterated_topk_meets_the_contract(algorithm, monkeypatch):
    """The iterated truncated SVD on CUDA tensors (its small factorisations, bounds and
    per-slice decisions on the host: SMALL_LINALG "auto"), against float64 LAPACK on the CPU:
    slices with different spectra leave the batch at different steps, a small thick-restart
    cap forces restarts (krylov), and a budget too short for a Gaussian slice sends it to the
    full SVD. Contract (a) and (b) hold for every slice and the outputs are on the device."""
    k = 4
    g = torch.Generator().manual_seed(3)
    i = torch.arange(1, 151, dtype=torch.float64)

    def make(s):
        q1 = torch.linalg.qr(torch.randn(200, 150, dtype=torch.complex128, generator=g)).Q
        q2 = torch.linalg.qr(torch.randn(150, 150, dtype=torch.complex128, generator=g)).Q
        return (q1 * s.to(torch.complex128)) @ q2.mH

    gapped = torch.where(i <= k, 2.0 - i / 150, 0.1 * (1.0 - i / 300))
    x = torch.stack([make(gapped), make(i ** -0.7), make(i ** -1.0),
                     torch.randn(200, 150, dtype=torch.complex128, generator=g)])
    if algorithm == "krylov":
        monkeypatch.setattr(_lowrank, "restart_size", lambda k_, b: (48, 2 * k_ + 8))
    tol = 1e-4
    xd = x.to(torch.complex64).to(DEV)
    for max_iter, want_fallback in ((40, False), (2, True)):
        u, s, v, info = _lowrank.topk_svd(xd, k, tol=tol, max_iter=max_iter, cost_model=False,
                                          algorithm=algorithm)
        assert u.is_cuda and s.is_cuda and v.is_cuda
        assert (info["fallback"] > 0) == want_fallback, info
        sv = torch.linalg.svdvals(x)
        xt = (u.cpu().to(torch.complex128) * s.cpu().double()[..., None, :]) \
            @ v.cpu().to(torch.complex128).mH
        err2 = torch.linalg.matrix_norm(x - xt) ** 2
        a = (err2 - (sv[..., k:] ** 2).sum(-1)) / (sv[..., :k] ** 2).sum(-1)
        b = (s.cpu().double() - sv[..., :k]).abs().amax(-1) / sv[..., 0]
        assert (a <= tol).all() and (b <= tol).all(), (max_iter, a, b, info)


@cuda
@pytest.mark.cuda
def test_gpu_tsvd_real_slices_merged():
    """On CUDA tensors (REAL_SLICES "auto" = "merged") the FFT's DC and Nyquist slices iterate
    in the complex batch: one block Krylov run, real singular vectors for those slices
    (imaginary part at most rounding inside topk_svd, exactly 0 from hat_topk_svd), and
    every slice meets the contract against float64 LAPACK on the CPU."""
    k, tol, n3 = 4, 1e-4, 6
    g = torch.Generator().manual_seed(5)
    i = torch.arange(1, 121, dtype=torch.float64)
    m = n3 // 2 + 1
    q1 = torch.linalg.qr(torch.randn(m, 150, 120, dtype=torch.complex128, generator=g)).Q
    q2 = torch.linalg.qr(torch.randn(m, 120, 120, dtype=torch.complex128, generator=g)).Q
    xh = (q1 * (i ** -0.8).to(torch.complex128)) @ q2.mH
    xh[0], xh[-1] = xh[0].real.to(xh.dtype), xh[-1].real.to(xh.dtype)
    xd = xh.to(torch.complex64).to(DEV)
    tr = tsvd.transforms.get_transform("fft")
    uh, sh, vh = _lowrank.hat_topk_svd(xd, k, tr, n3, tol=tol, cost_model=False)
    info = _lowrank.last_info()
    assert len(info["parts"]) == 1 and info["iterations"] > 0 and info["fallback"] == 0, info
    assert uh.is_cuda and float(uh[[0, -1]].imag.abs().max()) == 0.0
    assert float(vh[[0, -1]].imag.abs().max()) == 0.0
    real = torch.tensor([True] + [False] * (m - 2) + [True])
    u, s, v, _ = _lowrank.topk_svd(xd, k, tol=tol, cost_model=False, real=real)
    assert float(u[real].imag.abs().max()) <= 1e-6 and float(v[real].imag.abs().max()) <= 1e-6
    sv = torch.linalg.svdvals(xh)
    xt = (uh.cpu().to(torch.complex128) * sh.cpu().double()[..., None, :]) \
        @ vh.cpu().to(torch.complex128).mH
    a = (torch.linalg.matrix_norm(xh - xt) ** 2 - (sv[..., k:] ** 2).sum(-1)) \
        / (sv[..., :k] ** 2).sum(-1)
    b = (sh.cpu().double() - sv[..., :k]).abs().amax(-1) / sv[..., 0]
    assert (a <= tol).all() and (b <= tol).all(), (a, b)


@cuda
@pytest.mark.cuda
def test_gpu_autograd_through_public_api():
    U, S, V, R = (rnd(*s, seed=i) for i, s in
                  enumerate([(12, 30, 8), (12, 8), (12, 40, 8), (12, 30, 40)]))
    cu = [t.float().to(DEV).requires_grad_() for t in (U, S, V, R)]
    out = tsvd.treconstruct(cu[0], cu[1], cu[2], residual=cu[3])
    G = rnd(12, 30, 40, seed=8)
    out.backward(G.float().to(DEV))
    rf = [t.clone().requires_grad_() for t in (U, S, V, R)]
    tsvd.reference.treconstruct(rf[0], rf[1], rf[2], rf[3]).backward(G)
    for a, b in zip(cu, rf):
        assert trel(a.grad, b.grad) < 1e-4


@cuda
@pytest.mark.cuda
def test_gpu_results_do_not_depend_on_poison():
    """Two runs, one over NaN-poisoned memory, one over zeroed memory, give the same result
    up to the order of the backward's atomic sums."""
    U, S, V, R = (rnd(*s, dtype=torch.float32, seed=i).to(DEV) for i, s in
                  enumerate([(1, 48, 64, 8), (1, 48, 8), (1, 48, 96, 8), (1, 48, 64, 96)]))
    poison(R.numel() * 4)
    a = OPS.treconstruct(U, S, V, R)
    z = torch.zeros(R.numel(), device=DEV)
    del z
    b = OPS.treconstruct(U, S, V, R)
    assert torch.equal(a, b)
    G = torch.randn_like(R)
    poison(U.numel() * 4)
    ga = OPS.treconstruct_backward(G, U, S, V)
    gb = OPS.treconstruct_backward(G, U, S, V)
    for x, y in zip(ga, gb):
        assert torch.isfinite(x).all() and trel(x, y) < 1e-5


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 12, 200, 2100, 8), (1, 48, 768, 768, 8),
                                   (1, 12, 3072, 768, 8), (2, 5, 130, 1500, 3)])
def test_gpu_treconstruct_large_tiles(shape):
    """Shapes big enough for the backward's multi-row-tile blocks (gb reduced in shared
    memory, a partial last strip) and the UNETR-Base LoRA-PT shapes; float32 kernels
    against float64 autograd of the reference, both on the GPU."""
    B, n3, n1, n2, r = shape
    g = torch.Generator(device=DEV).manual_seed(n1 + n2)
    U, S, V, R, G = (torch.randn(*s, generator=g, device=DEV, dtype=torch.float64) for s in
                     [(B, n3, n1, r), (B, n3, r), (B, n3, n2, r), (B, n3, n1, n2), (B, n3, n1, n2)])
    ref_in = [t.clone().requires_grad_() for t in (U, S, V)]
    ref = tsvd.reference.treconstruct(*ref_in, R)
    ref_g = torch.autograd.grad(ref, ref_in, G)
    poison(R.numel() * 4)
    out = OPS.treconstruct(U.float(), S.float(), V.float(), R.float())
    assert torch.isfinite(out).all() and trel(out, ref) < 1e-5
    got = OPS.treconstruct_backward(G.float(), U.float(), S.float(), V.float())
    for x, y in zip(got, ref_g):
        assert torch.isfinite(x).all() and trel(x, y) < 1e-4


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 48, 768, 768, 8), (1, 12, 3072, 768, 8),
                                   (2, 12, 70, 130, 4), (1, 48, 65, 129, 16), (3, 12, 5, 9, 1),
                                   (1, 48, 40, 50, 3)])
def test_gpu_fused_pq_backward(shape, monkeypatch):
    """TSVD_CUDA_KERNELS=v2pq: the v2 backward with the fused P/Q kernel in place of its two
    cuBLAS GEMMs (r in 1, 2, 4, 8, 16; r = 3 keeps the GEMMs) gives the float64 gradients,
    over NaN-poisoned memory, and agrees with the default v2 backward."""
    B, n3, n1, n2, r = shape
    g = torch.Generator(device=DEV).manual_seed(n1 * 7 + r)
    U, S, V, G = (torch.randn(*s, generator=g, device=DEV, dtype=torch.float64) for s in
                  [(B, n3, n1, r), (B, n3, r), (B, n3, n2, r), (B, n3, n1, n2)])
    ref_in = [t.clone().requires_grad_() for t in (U, S, V)]
    ref_g = torch.autograd.grad(tsvd.reference.treconstruct(*ref_in), ref_in, G)
    args = [t.float() for t in (G, U, S, V)]
    monkeypatch.setenv("TSVD_CUDA_KERNELS", "v2")
    base = OPS.treconstruct_backward(*args)
    monkeypatch.setenv("TSVD_CUDA_KERNELS", "v2pq")
    poison(B * n3 * (n1 + n2) * r * 16)
    got = OPS.treconstruct_backward(*args)
    for x, y, z in zip(got, ref_g, base):
        assert torch.isfinite(x).all() and trel(x, y) < 1e-4
        assert trel(x, z) < 1e-5


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 48, 768, 768, 8), (1, 12, 3072, 768, 8),
                                   (2, 48, 70, 130, 4), (1, 12, 19, 33, 2)])
def test_gpu_forward_kernel_settings_agree(shape, monkeypatch):
    """The v2 forward's kernels (TSVD_V2_FWD_SA=0: a2 from global memory; 1: staged in shared
    memory; 2: staged, no residual prefetch, 3 blocks per SM) and rows per block
    (TSVD_V2_FWD_PASSES) give bit-identical outputs, over NaN-poisoned memory, equal to the
    float64 definition to float32 rounding."""
    B, n3, n1, n2, r = shape
    g = torch.Generator(device=DEV).manual_seed(n1 + r)
    U, S, V, R = (torch.randn(*s, generator=g, device=DEV) for s in
                  [(B, n3, n1, r), (B, n3, r), (B, n3, n2, r), (B, n3, n1, n2)])
    ref = tsvd.reference.treconstruct(*(t.double() for t in (U, S, V, R)))
    outs = []
    for sa in ("0", "1", "2"):
        for passes in ("", "1", "3"):
            monkeypatch.setenv("TSVD_V2_FWD_SA", sa)
            if passes:
                monkeypatch.setenv("TSVD_V2_FWD_PASSES", passes)
            else:
                monkeypatch.delenv("TSVD_V2_FWD_PASSES", raising=False)
            poison(R.numel() * 8)
            outs.append(OPS.treconstruct(U, S, V, R))
    assert torch.isfinite(outs[0]).all() and trel(outs[0], ref) < 1e-5
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
