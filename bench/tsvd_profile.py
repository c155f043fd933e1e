"""Where the time of the truncated t-SVD goes, on one device (issue 13's t-SVD target).

    python bench/tsvd_profile.py [--device cuda] [--shapes lora|N3xN1xN2,...] [--k 8]
                                 [--reps 3] [--profile-shape 48x768x768] [--count-ops]

For each shape (default: the three UNETR-Base LoRA-PT stacks), on the input of
``bench/kernels.py`` (singular values 1/i in every Fourier slice plus 1e-3 noise, float32), times ``tsvd.tsvd(X, k)`` with
``method="auto"`` (the default; again with the FFT's real slices in a batch of their own,
``tsvd._lowrank.REAL_SLICES = "separate"``, and with the small eigenproblems split over 8
threads, ``HOST_THREADS = "8"``, in the same process), ``"randomized"`` at tol
1e-4 and 1e-3, and ``"full"``
(median of --reps after one warm-up, synchronised wall clock), with what each did
(``tsvd._lowrank.last_info()``: iterations, slices sent to the full SVD) and the error of
the rank-k reconstruction against a float64 full t-SVD of the same input. Then one
``method="auto"`` call on --profile-shape under ``torch.profiler``: the ops by total device
time and by total host time, so a slow path can be named before it is changed. Prints
only (the GPU check's log keeps it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LORA = [(48, 768, 768), (12, 3072, 768), (12, 768, 3072)]


def parse_shapes(text):
    if text == "lora":
        return list(LORA)
    out = []
    for part in text.split(","):
        dims = part.strip().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"expected lora or N3xN1xN2[,...], got {part!r}")
        out.append(tuple(int(d) for d in dims))
    return out


def count_ops(shapes, k, make, tsvd, _lowrank):
    """Print the ATen ops of one ``tsvd.tsvd(X, k)`` per shape, with the
    FFT's real slices separate and merged (SMALL_LINALG "host")."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    saved = _lowrank.SMALL_LINALG, _lowrank.REAL_SLICES
    print("\nATen ops per call (device and host ops; SMALL_LINALG='host'):")
    try:
        _lowrank.SMALL_LINALG = "host"
        for shape in shapes:
            X = make(shape)
            row = []
            for mode in ("separate", "merged"):
                _lowrank.REAL_SLICES = mode
                with Count() as c:
                    tsvd.tsvd(X, k)
                it = _lowrank.last_info()["iterations"]
                row.append(f"{mode} {sum(c.ops.values())} ops, it {it}")
            print(f"{'x'.join(map(str, shape)):>12}  " + "; ".join(row), flush=True)
    finally:
        _lowrank.SMALL_LINALG, _lowrank.REAL_SLICES = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--shapes", default="lora", help="lora (default) or N3xN1xN2[,...]")
    p.add_argument("--k", type=int, default=8, help="rank (default 8)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per setting (default 3)")
    p.add_argument("--count-ops", action="store_true",
                   help="also count the ATen ops one method='auto' call dispatches (device and "
                        "host ops together), for the FFT's real slices separate and merged, with the small work "
                        "on the host (SMALL_LINALG='host', the CUDA path) on any device: the "
                        "launch count's proxy where no GPU is at hand")
    p.add_argument("--profile-shape", default="48x768x768",
                   help="shape profiled with torch.profiler (default 48x768x768; none: skip)")
    a = p.parse_args(argv)
    try:
        shapes = parse_shapes(a.shapes)
        prof_shape = None if a.profile_shape == "none" else parse_shapes(a.profile_shape)[0]
    except ValueError as e:
        p.error(f"--shapes/--profile-shape: {e}")
    if a.k < 1 or a.reps < 1:
        p.error("--k and --reps: expected integers >= 1")

    import torch

    import tsvd
    from tsvd import _lowrank
    from tsvd import reference as ref

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: torch sees no CUDA device")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernels import decaying as kernels_decaying  # bench/kernels.py's input

    def decaying(shape):
        return kernels_decaying(shape, dev).float()

    # (name, tsvd.tsvd keywords, tsvd._lowrank settings for the call); "real separate": the
    # FFT's real slices in a batch of their own (REAL_SLICES, the CPU's choice), side by side
    # with "auto" (on CUDA: merged into the complex batch); "8 host threads": the small
    # eigenproblems split over 8 CPU threads (HOST_THREADS)
    settings = [("auto", {}, {}), ("auto, real separate", {}, {"REAL_SLICES": "separate"}),
                ("auto, 8 host threads", {}, {"HOST_THREADS": "8"}),
                ("randomized tol 1e-4", {"method": "randomized", "tol": 1e-4}, {}),
                ("randomized tol 1e-3", {"method": "randomized", "tol": 1e-3}, {}),
                ("full", {"method": "full"}, {})]
    print(f"tsvd_profile: {dev} "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else ''} torch "
          f"{torch.__version__}, k={a.k}", flush=True)
    for shape in shapes:
        X = decaying(shape)
        U64, S64, V64 = ref.tsvd(X.double().cpu(), a.k)
        Xk64 = ref.treconstruct(U64, S64, V64)
        for name, kw, mod in settings:
            saved = {key: getattr(_lowrank, key) for key in mod}
            try:
                for key, val in mod.items():
                    setattr(_lowrank, key, val)
                tsvd.tsvd(X, a.k, **kw)
                sync()
                ts = []
                for _ in range(a.reps):
                    t0 = time.perf_counter()
                    U, S, V = tsvd.tsvd(X, a.k, **kw)
                    sync()
                    ts.append(time.perf_counter() - t0)
                info = _lowrank.last_info() if kw.get("method") != "full" else {}
                err = float((ref.treconstruct(U.double().cpu(), S.double().cpu(),
                                              V.double().cpu()) - Xk64).norm() / Xk64.norm())
                print(f"{'x'.join(map(str, shape)):>12} {name:<22} "
                      f"{1e3 * statistics.median(ts):9.2f} ms  err {err:.2e}  "
                      f"it {info.get('iterations', '-')} full {info.get('full', '-')} "
                      f"fallback {info.get('fallback', '-')} l {info.get('l', '-')} "
                      f"parts {len(info.get('parts', [])) or '-'}", flush=True)
            except Exception as e:  # noqa: BLE001  (reported; the next setting still runs)
                print(f"{'x'.join(map(str, shape)):>12} {name:<22} ERROR {type(e).__name__}: {e}",
                      flush=True)
            finally:
                for key, val in saved.items():
                    setattr(_lowrank, key, val)
        del X
    if a.count_ops:
        count_ops(shapes, a.k, decaying, tsvd, _lowrank)
    if prof_shape is not None:
        from torch.profiler import ProfilerActivity, profile
        X = decaying(prof_shape)
        tsvd.tsvd(X, a.k)
        sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            tsvd.tsvd(X, a.k)
            sync()
        ev = prof.key_averages()
        if dev.type == "cuda":
            print(f"\nprofile {prof_shape}, by device time:")
            print(ev.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=48))
        print(f"\nprofile {prof_shape}, by host time:")
        print(ev.table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
