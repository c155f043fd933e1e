"""Host overhead of one tsvd op call: tiny tensors, so that the time is the call's, not the math's.

    python bench/host_overhead.py [--device cpu|cuda] [--reps 2000] [--n3 2] [--out FILE.json]

Times, in one process with one CPU thread, the median over ``--reps`` calls (after a warm-up)
of, for an (n3, 4, 4) tensor at rank 1 (``--n3``, default 2: issue 13's probe; on CUDA,
``--n3 12`` reaches the v2 kernels, which cover n3 = 12 and 48 in float32):

- ``torch.add`` of two such tensors (the floor of any dispatched op);
- ``torch.ops.tsvd.treconstruct`` forward (the raw op: dispatcher, Autograd kernel, kernel);
- ``tsvd.treconstruct`` forward (the public API: validation, flattening, backend choice);
- forward + backward of each of those two, and of the same product in plain PyTorch
  (``torch.fft`` + ``matmul``: the reference), with gradients for U, S, V and the residual;
- ``torch.ops.tsvd.tprod`` and ``tsvd.tprod`` forward and forward + backward.

Each figure is also given as a ratio to ``torch.add`` measured in the same process. On CUDA
every call is followed by a synchronize (the figure is then call + launch + sync).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time


def _median_us(fn, reps: int, sync) -> float:
    for _ in range(max(20, reps // 10)):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter_ns()
        fn()
        sync()
        ts.append(time.perf_counter_ns() - t)
    return statistics.median(ts) / 1e3


def main(argv=None) -> int:
    import torch

    import tsvd
    from tsvd import _ext
    from tsvd import reference as ref

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--reps", type=int, default=2000, help="timed calls per figure (default 2000)")
    p.add_argument("--n3", type=int, default=2,
                   help="tube length of the probe tensors (default 2; 12 reaches the CUDA v2 "
                        "kernels)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args(argv)
    if a.reps < 10:
        p.error("--reps: expected an integer >= 10")
    if a.n3 < 1:
        p.error(f"--n3: expected an integer >= 1, got {a.n3}")
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if not _ext.available(dev):
        p.error(f"--device {a.device}: tsvd._C has no kernels for it ({_ext.build_info()})")
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=False):
        x = torch.randn(*shape, generator=g).to(dev)
        return x.requires_grad_(grad)

    n3, n1, n2, r = a.n3, 4, 4, 1
    U, S, V, R = t(1, n3, n1, r), t(1, n3, r), t(1, n3, n2, r), t(1, n3, n1, n2)
    Ug, Sg, Vg, Rg = (x.detach().clone().requires_grad_(True) for x in (U, S, V, R))
    A, B = t(1, n3, n1, n2), t(1, n3, n2, n2)
    Ag, Bg = (x.detach().clone().requires_grad_(True) for x in (A, B))
    X, Y = t(n3, n1, n2), t(n3, n1, n2)
    op = torch.ops.tsvd

    def fb(f):
        def run():
            f().sum().backward()
        return run

    cases = {
        "torch.add": lambda: torch.add(X, Y),
        "treconstruct raw op fwd": lambda: op.treconstruct(U, S, V, R),
        "treconstruct api fwd": lambda: tsvd.treconstruct(U[0], S[0], V[0], residual=R[0]),
        "treconstruct raw op fwd+bwd": fb(lambda: op.treconstruct(Ug, Sg, Vg, Rg)),
        "treconstruct api fwd+bwd": fb(lambda: tsvd.treconstruct(Ug[0], Sg[0], Vg[0],
                                                                 residual=Rg[0])),
        "treconstruct plain torch fwd+bwd": fb(lambda: ref.treconstruct(Ug[0], Sg[0], Vg[0],
                                                                        Rg[0], "fft")),
        "tprod raw op fwd": lambda: op.tprod(A, B),
        "tprod api fwd": lambda: tsvd.tprod(A[0], B[0]),
        "tprod raw op fwd+bwd": fb(lambda: op.tprod(Ag, Bg)),
        "tprod api fwd+bwd": fb(lambda: tsvd.tprod(Ag[0], Bg[0])),
    }
    with tsvd.use_backend("compiled"):
        res = {k: _median_us(f, a.reps, sync) for k, f in cases.items()}
    floor = res["torch.add"]
    rows = {k: {"us": round(v, 2), "x_torch_add": round(v / floor, 1)} for k, v in res.items()}
    for k, v in rows.items():
        print(f"{k:36s} {v['us']:9.2f} us  {v['x_torch_add']:7.1f}x torch.add")
    if a.out:
        info = {"device": str(dev), "reps": a.reps, "threads": 1, "shape": [n3, n1, n2],
                "rank": r, "torch": torch.__version__, "python": platform.python_version(),
                "cpu": platform.processor() or platform.machine(),
                "build": {k: v for k, v in _ext.build_info().items()
                          if k in ("cpu_isa", "with_cuda", "limited_api")},
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows}
        from tsvd.models import atomic_write

        def dump(tmp):
            with open(tmp, "w") as f:
                json.dump(info, f, indent=1)
        atomic_write(a.out, dump)             # an existing file is never half-written
    return 0


if __name__ == "__main__":
    sys.exit(main())
