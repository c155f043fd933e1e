"""A target for Nsight Compute: the fused reconstruction's kernels, each launched once.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \\
        python bench/ncu_trec.py [--shapes lora|N3xN1xN2,...] [--rank 8] [--backward]

For each shape (default: the three UNETR-Base LoRA-PT stacks, float32, batch 1), calls the
raw op ``torch.ops.tsvd.treconstruct(U, S, V, R)`` twice to warm up, then once between
``cudaProfilerStart`` and ``cudaProfilerStop``; with --backward the same for its forward +
backward (autograd). Under ``ncu --profile-from-start off`` only the kernels of those calls
are profiled, so a report names each kernel of the hot path once per shape. Without ncu it
just runs (a smoke test of the script). Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="lora", help="lora (default) or N3xN1xN2[,...]")
    p.add_argument("--rank", type=int, default=8, help="rank r (default 8)")
    p.add_argument("--backward", action="store_true", help="also profile forward + backward")
    a = p.parse_args(argv)
    from tsvd_profile import parse_shapes
    try:
        shapes = parse_shapes(a.shapes)
    except ValueError as e:
        p.error(f"--shapes: {e}")
    if a.rank < 1:
        p.error(f"--rank: expected an integer >= 1, got {a.rank}")

    import torch

    from tsvd import _ext  # loading it registers torch.ops.tsvd

    if not torch.cuda.is_available():
        p.error("needs a CUDA device; torch sees none")
    if not _ext.available(torch.device("cuda")):
        p.error(f"tsvd._C has no CUDA kernels (build_info: {_ext.build_info()})")
    op = torch.ops.tsvd.treconstruct
    cudart = torch.cuda.cudart()
    g = torch.Generator(device="cuda").manual_seed(0)
    for n3, n1, n2 in shapes:
        U = torch.randn(1, n3, n1, a.rank, device="cuda", generator=g)
        S = torch.rand(1, n3, a.rank, device="cuda", generator=g)
        V = torch.randn(1, n3, n2, a.rank, device="cuda", generator=g)
        R = torch.randn(1, n3, n1, n2, device="cuda", generator=g)
        G = torch.randn(1, n3, n1, n2, device="cuda", generator=g)

        def fb():
            u, s, v = (t.detach().requires_grad_() for t in (U, S, V))
            op(u, s, v, R).backward(G)

        runs = [("fwd", lambda: op(U, S, V, R))] + ([("fwd+bwd", fb)] if a.backward else [])
        for name, fn in runs:
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
            cudart.cudaProfilerStart()
            fn()
            torch.cuda.synchronize()
            cudart.cudaProfilerStop()
            print(f"ncu_trec: {n3}x{n1}x{n2} r={a.rank} {name} profiled", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
