"""Where the time of the CUDA treconstruct goes, and whether its backward is reproducible.

    python bench/cuda_profile.py [--json PATH]

1. For each UNETR-Base LoRA-PT shape (r = 8, float32): torch.profiler over 10 calls of
   ``tsvd.treconstruct`` (forward with residual) and of forward + backward; prints the
   per-kernel device time (self time per call, microseconds) so the fused kernel can be
   told apart from its preparation (tube DFTs of the factors, the complex products, the
   permuted copies) and from the adjoint transforms of the backward.
2. Host overhead: microseconds per call of ``tsvd.treconstruct`` (validation + dispatch)
   and of ``torch.ops.tsvd.treconstruct`` on a tiny input, without synchronising.
3. Reproducibility of ``treconstruct_backward`` on small inputs (the opcheck inputs of
   tests/test_cuda.py): 20 eager calls against each other, against a float64 CPU
   computation, and a ``torch.compile(backend="aot_eager", dynamic=True)`` call.
Needs a GPU and tsvd._C built with CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import tsvd

SHAPES = [(48, 768, 768), (12, 3072, 768), (12, 768, 3072)]


def profile_rows(fn, n=10):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = e.self_cuda_time_total
        if t > 0:
            rows.append((e.key[:90], t / n, e.count / n))
    rows.sort(key=lambda x: -x[1])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cuda_profile: needs a GPU")
    dev = torch.device("cuda")
    out = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "profiles": {}}
    for shape in SHAPES:
        n3, n1, n2 = shape
        g = torch.Generator().manual_seed(0)
        U = (torch.randn(n3, n1, 8, generator=g) / n1 ** 0.5).to(dev)
        S = torch.randn(n3, 8, generator=g).to(dev)
        V = (torch.randn(n3, n2, 8, generator=g) / n2 ** 0.5).to(dev)
        R = torch.randn(n3, n1, n2, generator=g).to(dev)
        G = torch.randn(n3, n1, n2, generator=g).to(dev)
        leaves = [x.clone().requires_grad_() for x in (U, S, V)]

        def fb():
            for x in leaves:
                x.grad = None
            tsvd.treconstruct(*leaves, residual=R).backward(G)

        for name, fn in (("fwd", lambda: tsvd.treconstruct(U, S, V, residual=R)), ("fwd+bwd", fb)):
            rows = profile_rows(fn)
            total = sum(r[1] for r in rows)
            key = f"{name} {shape}"
            out["profiles"][key] = {"total_us": total, "kernels": rows}
            print(f"\n== {key}: {total:.1f} us of device time per call")
            for k, t, c in rows[:14]:
                print(f"  {t:9.1f} us  x{c:4.1f}  {k}")

    # host overhead per call (tiny input: the device work is negligible)
    U, S, V, R = (torch.randn(*s, device=dev) for s in [(4, 8, 2), (4, 2), (4, 6, 2), (4, 8, 6)])
    for name, fn in (("tsvd.treconstruct", lambda: tsvd.treconstruct(U, S, V, residual=R)),
                     ("torch.ops.tsvd.treconstruct", lambda: torch.ops.tsvd.treconstruct(
                         U[None], S[None], V[None], R[None]))):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        out[f"host_us {name}"] = host
        print(f"\nhost time per call, {name}: {host:.1f} us")

    # reproducibility of the backward (tests/test_cuda.py::test_gpu_opcheck inputs)
    ops = torch.ops.tsvd
    for n3 in (5, 12, 48):
        def rnd(*s, seed):
            return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        U, S, V = rnd(2, n3, 6, 3, seed=0), rnd(2, n3, 3, seed=1), rnd(2, n3, 7, 3, seed=2)
        G = rnd(2, n3, 6, 7, seed=5)
        ref = ops.treconstruct_backward(G, U, S, V)  # float64, CPU kernels
        args = [t.float().to(dev) for t in (G, U, S, V)]
        runs = [ops.treconstruct_backward(*args) for _ in range(20)]
        spread = max((a - b).abs().max().item() for r in runs for a, b in zip(r, runs[0]))
        err = max(((a.double().cpu() - b).abs().max() / b.abs().max()).item()
                  for a, b in zip(runs[0], ref))
        f = torch.compile(lambda *x: ops.treconstruct_backward(*x), backend="aot_eager", dynamic=True)
        comp = f(*args)
        cdiff = max((a - b).abs().max().item() for a, b in zip(comp, runs[0]))
        cerr = max(((a.double().cpu() - b).abs().max() / b.abs().max()).item() for a, b in zip(comp, ref))
        out[f"bwd_repro n3={n3}"] = dict(spread=spread, rel_err_vs_f64=err, compiled_diff=cdiff,
                                         compiled_rel_err=cerr)
        print(f"backward n3={n3}: spread over 20 eager calls {spread:.2e}, rel err vs float64 "
              f"{err:.2e}; aot_eager: diff {cdiff:.2e}, rel err {cerr:.2e}")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
