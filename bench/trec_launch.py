"""Sweep of the v2 forward kernel's launch settings, against a clone.

    python bench/trec_launch.py [--shapes lora|N3xN1xN2,...] [--rank 8]
                                [--passes 1,2,3,4,6,8,12,16,24] [--rounds 20] [--inner 5]
                                [--json PATH]

The v2 forward (csrc/cuda/kernels_v2.cu, float32, n3 in {12, 48}) stages a strip of
rfft(V) in shared memory once per block and then runs P passes of 8 rows over it; the
default P comes from a heuristic (about 4 waves of 2 blocks per SM, P <= 8). Two knobs,
read on every call, override the defaults: ``TSVD_V2_FWD_PASSES=P`` and
``TSVD_V2_FWD_SA=0|1|2``: trec_fwd_v2, which reads the rows of rfft(U) diag(rfft(S)) from
global memory inside its rank loop; trec_fwd_v2_sa, which stages them in shared memory per
pass (the default at n3 = 48 only); or (2, opt-in) the staged kernel without the residual
prefetch at 3 blocks per SM. This script times the raw op
``torch.ops.tsvd.treconstruct(U, S, V, R)`` (batch 1) with the defaults ("auto"), with
each kernel ("sa0", "sa1", "sa2"), and with every P of --passes for each kernel ("sa0,P",
"sa1,P", "sa2,P"), interleaved with ``R.clone()`` in each round (CUDA
events around --inner back-to-back calls; median over --rounds). Before timing it checks
that every setting gives bit-for-bit the default's output (the same arithmetic per
element; only the blocks' row ranges and where a2 is read from differ) over NaN-poisoned
memory. Prints a line per shape (µs, % of the clone's bandwidth); --json writes them.
Exit status 1 if any setting's output differs. Needs a CUDA device and the v2 kernels.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

KNOBS = ("TSVD_V2_FWD_PASSES", "TSVD_V2_FWD_SA")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="lora", help="lora (default) or N3xN1xN2[,...]")
    p.add_argument("--rank", type=int, default=8, help="rank r (default 8)")
    p.add_argument("--passes", default="1,2,3,4,6,8,12,16,24",
                   help="comma-separated passes per block to try (default 1,2,3,4,6,8,12,16,24)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    p.add_argument("--inner", type=int, default=5, help="calls per CUDA-event sample (default 5)")
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    a = p.parse_args(argv)
    from tsvd_profile import parse_shapes
    try:
        shapes = parse_shapes(a.shapes)
        passes = [int(v) for v in a.passes.split(",")]
    except ValueError as e:
        p.error(f"--shapes/--passes: {e}")
    if a.rank < 1 or a.rounds < 1 or a.inner < 1 or min(passes) < 1:
        p.error("--rank, --rounds, --inner and every --passes value: expected integers >= 1")

    import torch

    from tsvd import _ext
    from tsvd.models import atomic_write

    if not torch.cuda.is_available() or not _ext.available(torch.device("cuda")):
        p.error("needs a CUDA device and tsvd._C built with CUDA kernels")
    op = torch.ops.tsvd.treconstruct
    g = torch.Generator(device="cuda").manual_seed(0)
    env = {"auto": {}, "sa0": {"TSVD_V2_FWD_SA": "0"}, "sa1": {"TSVD_V2_FWD_SA": "1"},
           "sa2": {"TSVD_V2_FWD_SA": "2"}}
    for v in passes:
        for sa in "012":
            env[f"sa{sa},{v}"] = {"TSVD_V2_FWD_PASSES": str(v), "TSVD_V2_FWD_SA": sa}
    settings = list(env)

    def use(setting):
        for k in KNOBS:
            os.environ.pop(k, None)
        os.environ.update(env[setting])

    def sample(fn):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(a.inner):
            fn()
        e1.record()
        e1.synchronize()
        return 1e3 * e0.elapsed_time(e1) / a.inner

    rows = []
    for n3, n1, n2 in shapes:
        U = torch.randn(1, n3, n1, a.rank, device="cuda", generator=g)
        S = torch.rand(1, n3, a.rank, device="cuda", generator=g)
        V = torch.randn(1, n3, n2, a.rank, device="cuda", generator=g)
        R = torch.randn(1, n3, n1, n2, device="cuda", generator=g)
        ref = op(U, S, V, R)
        ok = {}
        for st in settings:
            use(st)
            torch.empty(2 * R.numel(), device="cuda").fill_(float("nan"))  # freed: NaN pool
            out = op(U, S, V, R)
            ok[st] = bool(torch.equal(out, ref))
            del out
        times = {st: [] for st in ["clone"] + settings}
        for _ in range(2):                                   # warm-up round
            for st in settings:
                use(st)
                op(U, S, V, R)
            R.clone()
        fwd, clone = functools.partial(op, U, S, V, R), R.clone
        for _ in range(a.rounds):
            times["clone"].append(sample(clone))
            for st in settings:
                use(st)
                times[st].append(sample(fwd))
        use("auto")
        med = {st: statistics.median(v) for st, v in times.items()}
        row = {"shape": [n3, n1, n2], "rank": a.rank, "identical": ok,
               "median_us": med, "pct_clone": {st: 100 * med["clone"] / med[st]
                                               for st in settings}}
        rows.append(row)
        best = min(settings, key=lambda st: med[st])
        print(f"{n3}x{n1}x{n2} r={a.rank}: clone {med['clone']:.1f} us; "
              + "; ".join(f"{st} {med[st]:.1f} us ({row['pct_clone'][st]:.1f} %)"
                          + ("" if ok[st] else " NOT IDENTICAL") for st in settings)
              + f"; best {best}", flush=True)
        del U, S, V, R, ref, fwd, clone
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "rounds": a.rounds, "inner": a.inner, "rows": rows}
    if a.json:
        def dump(tmp):
            with open(tmp, "w") as f:
                json.dump(res, f, indent=1)
        atomic_write(a.json, dump)
    return 0 if all(all(r["identical"].values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
