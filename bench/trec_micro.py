"""Microbenchmark of the fused reconstruction op alone, against a clone and plain PyTorch.

    python bench/trec_micro.py [--device cuda] [--shapes lora|small|N3xN1xN2,...] [--rank 8]
                               [--reps N] [--warmup N] [--inner N] [--budget-s 100] [--out DIR]

Op under test: ``torch.ops.tsvd.treconstruct(U (B,n3,n1,r), S (B,n3,r), V (B,n3,n2,r),
R (B,n3,n1,n2) | None)`` = R + U * fdiag(S) * V^T (t-products), called raw (no public-API
validation, no backend choice), with B = 1; its backward (``treconstruct_backward``) runs
through autograd. Shapes are (n3, n1, n2): ``lora`` = the three UNETR-Base LoRA-PT tensors
(48,768,768), (12,3072,768), (12,768,3072) (the default); ``small`` = (5,16,12), (4,8,20)
(CPU, tests); or a comma-separated list such as ``12x64x48,5x16x12``.

For each shape, in this order:

1. Correctness, before anything is timed. The allocator is first filled with NaN: a NaN
   tensor of the output's size is allocated and freed, so that on CUDA (caching
   allocator) the output is carved out of NaN memory and an element the kernel never
   writes stays NaN. The block is twice the output's size because the op's own
   temporaries (over 1 MB at the LoRA shapes, so from the same pool) may be carved out of
   it first. Then the forward with and without R, and the gradients of U, S, V for a
   fixed output gradient G (each over its own freed NaN blocks), are checked: all finite,
   and max relative error max|x - x64| / max|x64| against tsvd.reference run in float64
   at most --tol. ``poisoned`` says whether the result really lay in the NaN memory (CUDA
   only; on CPU it is null and only finiteness and error are checked: freed memory goes
   back to malloc, which overwrites it with its own bookkeeping or unmaps it).
2. Timing, interleaved (each round runs every candidate once, in turn), --warmup rounds
   then --reps rounds; reported as the median and min per call in microseconds:
   ``clone`` = R.clone() (the memory-traffic floor: it reads and writes what the fused
   forward must), ``fwd`` = the op with R, ``fb`` = forward + autograd gradients of U, S,
   V, R for G, ``ref_fwd`` / ``ref_fb`` = the same in plain PyTorch (tsvd.reference:
   rfft, batched matmul, irfft). On CUDA a sample is --inner back-to-back calls between
   two CUDA events (divided by --inner); on CPU it is one call timed with perf_counter.

Figures per shape: clone bandwidth ``clone_GBps`` = 2 x bytes(R) / time, the forward's
effective bandwidth ``fwd_GBps`` (R read + output written, the same bytes) and its share
of the clone's, ``fwd_pct_clone`` (issue 13's goal: >= 70), ``fwd_x_ref`` =
ref_fwd / fwd and ``fb_x_ref`` = ref_fb / fb (goal: >= 4).

Kernel variants (--kernels, CUDA): ``v1,v2`` checks and times the op under each value of
``TSVD_CUDA_KERNELS`` (v2: the fixed-length kernels of csrc/cuda/kernels_v2.cu, float32 and
n3 in {12, 48}, the default; v1: the kernels they replaced; v2pq: v2 with the backward's fused
P/Q kernel in place of its two cuBLAS GEMMs, opt-in), interleaved in the same rounds as the clone and
the plain-PyTorch baselines. The first variant's figures are the row's top-level fields;
every variant's are under ``kernels`` (``fwd_x_first`` / ``fb_x_first``: speed-up over
the first). Default: ``default``, the environment as it is.

Budget: --budget-s (default 100) counts from the start of the script; once it is spent no
new measurement (correctness check or timing round) is started, the run says so, and the
JSON marks the rows and the run as cut short (a row keeps the rounds it finished).
JSON: DIR/trec_micro.json (DIR from --out, else $OUT, else none written), rewritten
atomically after every shape, so a run killed from outside still leaves the shapes it
finished. Exit status: 0; 1 when a correctness check failed or a shape raised; 2 for bad
arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time

T_START = time.perf_counter()

SHAPE_SETS = {
    "lora": [(48, 768, 768), (12, 3072, 768), (12, 768, 3072)],
    "small": [(5, 16, 12), (4, 8, 20)],
}
GOALS = {"fwd_pct_clone": 70.0, "fb_x_ref": 4.0}  # issue 13
TOL = {"float32": 1e-4, "float64": 1e-10}
KERNEL_VARIANTS = ("default", "v1", "v2", "v2pq")
_ENV0 = os.environ.get("TSVD_CUDA_KERNELS")


def set_kernels(kv: str) -> None:
    """Selects the CUDA kernel variant read by the op on every call (``default``: the
    environment the script started with)."""
    v = _ENV0 if kv == "default" else kv
    if v is None:
        os.environ.pop("TSVD_CUDA_KERNELS", None)
    else:
        os.environ["TSVD_CUDA_KERNELS"] = v


# --------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------
def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``lora`` / ``small`` / ``N3xN1xN2[,N3xN1xN2...]`` -> list of (n3, n1, n2)."""
    if text in SHAPE_SETS:
        return list(SHAPE_SETS[text])
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", part)
        if not m or min(int(g) for g in m.groups()) < 1:
            raise ValueError(f"expected lora, small or N3xN1xN2[,...] with positive sizes, "
                             f"got {part!r}")
        out.append(tuple(int(g) for g in m.groups()))
    return out


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="bench/trec_micro.py", description=doc[0],
                                epilog="\n\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--shapes", default="lora",
                   help="lora (default), small, or N3xN1xN2[,N3xN1xN2...]")
    p.add_argument("--rank", type=int, default=8, help="rank r of U, S, V (default 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="dtype of the timed tensors (default float32)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed rounds per shape (default 30 on cuda, 5 on cpu)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds first (default 3 on cuda, 1 on cpu)")
    p.add_argument("--inner", type=int, default=None,
                   help="calls per CUDA-event sample (default 5 on cuda; 1 on cpu, the only "
                        "value allowed there)")
    p.add_argument("--budget-s", type=float, default=100.0,
                   help="start no new measurement after this many seconds (default 100)")
    p.add_argument("--tol", type=float, default=None,
                   help="max relative error allowed (default 1e-4 for float32, 1e-10 for "
                        "float64)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--kernels", default="default",
                   help="comma-separated TSVD_CUDA_KERNELS values to compare, e.g. v1,v2 "
                        "(default: default, the environment as it is)")
    p.add_argument("--out", default=None,
                   help="folder for trec_micro.json (created if missing; default $OUT; "
                        "neither: no JSON)")
    return p


def check_args(p: argparse.ArgumentParser, a) -> None:
    """Checks that need no torch; each error names its flag (argparse exits with 2)."""
    if a.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", a.device):
        p.error(f"--device: expected cpu, cuda or cuda:N, got {a.device!r}")
    try:
        a.shape_list = parse_shapes(a.shapes)
    except ValueError as e:
        p.error(f"--shapes: {e}")
    for flag, v, lo in (("--rank", a.rank, 1), ("--reps", a.reps, 1), ("--warmup", a.warmup, 0),
                        ("--inner", a.inner, 1), ("--threads", a.threads, 0)):
        if v is not None and v < lo:
            p.error(f"{flag}: expected an integer >= {lo}, got {v}")
    for flag, v in (("--budget-s", a.budget_s), ("--tol", a.tol)):
        if v is not None and not (math.isfinite(v) and v > 0):
            p.error(f"{flag}: expected a positive number, got {v}")
    a.kernel_list = [k.strip() for k in a.kernels.split(",")]
    bad = [k for k in a.kernel_list if k not in KERNEL_VARIANTS]
    if bad or len(set(a.kernel_list)) != len(a.kernel_list):
        p.error(f"--kernels: expected distinct values among {', '.join(KERNEL_VARIANTS)}, "
                f"got {a.kernels!r}")
    if a.out is None:
        a.out = os.environ.get("OUT") or None
    if a.out is not None and os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out: {a.out!r} exists and is not a folder")


# --------------------------------------------------------------------------------------
# NaN poisoning and result checks
# --------------------------------------------------------------------------------------
def poison(numels, dtype, device) -> list[tuple[int, int]]:
    """Allocate one NaN-filled tensor of each size in ``numels`` and free it again; returns
    the freed (address, bytes) ranges. The CUDA caching allocator keeps freed blocks with
    their contents and hands them to the next allocations of a similar size, so an output
    allocated next starts as NaN there (see :func:`in_ranges`)."""
    import torch
    blocks = [torch.full((max(int(n), 1),), math.nan, dtype=dtype, device=device)
              for n in numels]
    ranges = [(b.data_ptr(), b.numel() * b.element_size()) for b in blocks]
    del blocks
    return ranges


def in_ranges(t, ranges) -> bool:
    """True when all of ``t``'s elements lie inside one of the (address, bytes) ranges."""
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    return any(a <= lo and hi <= a + n for a, n in ranges)


def check_result(got, want64, tol: float, poisoned=None) -> dict:
    """Finiteness and max relative error of ``got`` against the float64 ``want64``.

    ``nonfinite`` counts NaN/inf elements of ``got``: over NaN-poisoned memory, an element
    the kernel never wrote is one of them. ``ok`` = all finite and ``err <= tol``."""
    import torch
    g = got.detach()
    finite = torch.isfinite(g)
    nonfinite = int(finite.numel() - finite.sum().item())
    w = want64.detach().to(torch.float64)
    scale = w.abs().max().item() if w.numel() else 0.0
    diff = (g.to(torch.float64) - w).abs().max().item() if w.numel() else 0.0
    err = diff / scale if scale > 0 else diff
    if nonfinite or not math.isfinite(err):
        err = math.inf
    return {"ok": nonfinite == 0 and err <= tol, "finite": nonfinite == 0,
            "nonfinite": nonfinite, "err": err, "tol": tol, "poisoned": poisoned}


# --------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.stopped_before = None  # what was not started when the budget ran out

    def elapsed(self) -> float:
        return time.perf_counter() - T_START

    def allows(self, what: str) -> bool:
        if self.stopped_before is None and self.elapsed() >= self.seconds:
            self.stopped_before = what
            print(f"budget of {self.seconds:g} s spent after {self.elapsed():.1f} s: "
                  f"no new measurement started ({what} and what follows skipped)", flush=True)
        return self.stopped_before is None


def make_sampler(device, inner: int):
    """Returns sample(fn) -> milliseconds per call of ``fn``."""
    import torch
    if device.type == "cuda":
        def sample(fn):
            torch.cuda.synchronize(device)
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(inner):
                fn()
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / inner
    else:
        def sample(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return sample


def correctness(shape, r, dtype, device, tol, seed, budget: Budget, op=None) -> dict:
    """The checks of one shape (see the module's docstring); ``op`` replaces the op under
    test (tests hand in a deliberately broken one)."""
    import torch
    from tsvd import reference as ref
    op = op or torch.ops.tsvd.treconstruct
    n3, n1, n2 = shape
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(seed)
    U, S, V, R, G = (torch.randn(*s, generator=g, dtype=torch.float64) for s in
                     [(1, n3, n1, r), (1, n3, r), (1, n3, n2, r), (1, n3, n1, n2),
                      (1, n3, n1, n2)])
    x64 = [t.to(device) for t in (U, S, V, R, G)]
    x = [t.to(device=device, dtype=dtype) for t in (U, S, V, R, G)]
    checks = {}
    numel = n3 * n1 * n2

    for name, with_r in (("fwd", True), ("fwd_nores", False)):
        if not budget.allows(f"check {name} {shape}"):
            return checks
        want = ref.treconstruct(*x64[:3], x64[3] if with_r else None)
        ranges = poison([2 * numel], dtype, device)
        got = op(*x[:3], x[3] if with_r else None)
        checks[name] = check_result(got, want, tol, in_ranges(got, ranges) if cuda else None)
        del got, want

    if not budget.allows(f"check grads {shape}"):
        return checks
    l64 = [t.clone().requires_grad_() for t in x64[:4]]
    want = torch.autograd.grad(ref.treconstruct(*l64), l64[:3], x64[4])
    leaves = [t.clone().requires_grad_() for t in x[:4]]
    y = op(*leaves)
    ranges = poison([2 * t.numel() for t in leaves[:3]], dtype, device)
    got = torch.autograd.grad(y, leaves[:3], x[4])
    for k, a, b in zip("USV", got, want):
        checks[f"grad_{k}"] = check_result(a, b, tol, in_ranges(a, ranges) if cuda else None)
    return checks


def timing(shape, r, dtype, device, reps, warmup, inner, seed, budget: Budget,
           kernels=("default",)) -> dict:
    """Interleaved timing of clone / fwd / ref_fwd / fb / ref_fb (and fwd@KV / fb@KV for
    every kernel variant after the first); ms lists per candidate."""
    import torch
    from tsvd import reference as ref
    n3, n1, n2 = shape
    g = torch.Generator().manual_seed(seed + 1)
    U, S, V, R, G = (torch.randn(*s, generator=g, dtype=dtype).to(device) for s in
                     [(1, n3, n1, r), (1, n3, r), (1, n3, n2, r), (1, n3, n1, n2),
                      (1, n3, n1, n2)])
    leaves = [t.clone().requires_grad_() for t in (U, S, V, R)]
    op = torch.ops.tsvd.treconstruct

    def fb(f):
        return lambda: torch.autograd.grad(f(*leaves), leaves, G)

    first = kernels[0]
    cands = {"clone": (lambda: R.clone(), first),
             "fwd": (lambda: op(U, S, V, R), first),
             "ref_fwd": (lambda: ref.treconstruct(U, S, V, R), first),
             "fb": (fb(op), first),
             "ref_fb": (fb(ref.treconstruct), first)}
    for kv in kernels[1:]:
        cands[f"fwd@{kv}"] = (lambda: op(U, S, V, R), kv)
        cands[f"fb@{kv}"] = (fb(op), kv)
    sample = make_sampler(device, inner)
    times = {k: [] for k in cands}
    for i in range(warmup + reps):
        if not budget.allows(f"timing round {i + 1} of {warmup + reps} {shape}"):
            break
        for k, (fn, kv) in cands.items():
            set_kernels(kv)
            t = sample(fn)
            if i >= warmup:
                times[k].append(t)
    return times


def figures(shape, dtype, times: dict) -> dict:
    n3, n1, n2 = shape
    nbytes = 2 * n3 * n1 * n2 * (4 if dtype == "float32" else 8)  # R read + output written
    if not times or not all(times.values()):
        return {"reps_done": 0}
    med = {k: statistics.median(v) for k, v in times.items()}
    gbps = lambda ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
    extra = {}
    for k in med:
        if k.startswith("fwd@"):
            kv = k[4:]
            fw, fbk = med[k], med[f"fb@{kv}"]
            extra[kv] = {"fwd_us": fw * 1e3, "fwd_GBps": gbps(fw),
                         "fwd_pct_clone": 100.0 * med["clone"] / fw,
                         "fwd_x_ref": med["ref_fwd"] / fw, "fwd_x_first": med["fwd"] / fw,
                         "fb_us": fbk * 1e3, "fb_x_ref": med["ref_fb"] / fbk,
                         "fb_x_first": med["fb"] / fbk}
    return {"kernel_figures": extra,
        "clone_us": med["clone"] * 1e3, "clone_GBps": gbps(med["clone"]),
        "fwd_us": med["fwd"] * 1e3, "fwd_GBps": gbps(med["fwd"]),
        "fwd_pct_clone": 100.0 * med["clone"] / med["fwd"],
        "fwd_x_ref": med["ref_fwd"] / med["fwd"],
        "fb_us": med["fb"] * 1e3, "fb_x_ref": med["ref_fb"] / med["fb"],
        "ref_fwd_us": med["ref_fwd"] * 1e3, "ref_fb_us": med["ref_fb"] * 1e3,
        "min_us": {k: min(v) * 1e3 for k, v in times.items()},
        "reps_done": len(times["clone"]), "bytes_moved": nbytes,
    }


def summarize(rows) -> dict:
    done = [r for r in rows if r.get("reps_done")]
    errs = [c["err"] for r in rows for c in r.get("checks", {}).values()]
    pois = [c["poisoned"] for r in rows for c in r.get("checks", {}).values()
            if c["poisoned"] is not None]
    s = {"all_ok": bool(rows) and all(r["ok"] for r in rows),
         "max_err": max(errs) if errs else None,
         "poisoned": f"{sum(pois)}/{len(pois)}" if pois else None}
    if done:
        s["min_fwd_pct_clone"] = min(r["fwd_pct_clone"] for r in done)
        s["min_fb_x_ref"] = min(r["fb_x_ref"] for r in done)
        s["meets_goals"] = (len(done) == len(rows)
                            and s["min_fwd_pct_clone"] >= GOALS["fwd_pct_clone"]
                            and s["min_fb_x_ref"] >= GOALS["fb_x_ref"])
        variants = {kv for r in done for kv in r.get("kernels", {})}
        per = {}
        for kv in sorted(variants):
            ks = [r["kernels"][kv] for r in done if kv in r.get("kernels", {})]
            if all("fwd_pct_clone" in k for k in ks) and ks:
                per[kv] = {"min_fwd_pct_clone": min(k["fwd_pct_clone"] for k in ks),
                           "min_fb_x_ref": min(k["fb_x_ref"] for k in ks),
                           "ok": all(k["ok"] for k in ks)}
        if per:
            s["kernels"] = per
    return s


def _fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


# --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    check_args(p, a)

    import torch

    import tsvd
    from tsvd import _ext
    from tsvd.models import atomic_write

    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: torch sees no CUDA device")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        p.error(f"--device {a.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if not _ext.available(dev):
        p.error(f"--device {a.device}: tsvd._C has no kernels for it "
                f"(build_info: {_ext.build_info()})")
    cuda = dev.type == "cuda"
    if not cuda and a.inner not in (None, 1):
        p.error("--inner: only 1 on cpu (each CPU sample is one call)")
    if a.out is not None:
        os.makedirs(a.out, exist_ok=True)
    if cuda:
        torch.cuda.set_device(dev.index if dev.index is not None else torch.cuda.current_device())
    if a.threads:
        torch.set_num_threads(a.threads)
    reps = a.reps or (30 if cuda else 5)
    warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    inner = a.inner or (5 if cuda else 1)
    tol = a.tol or TOL[a.dtype]
    dtype = getattr(torch, a.dtype)
    budget = Budget(a.budget_s)
    path = os.path.join(a.out, "trec_micro.json") if a.out else None

    info = _ext.build_info()
    meta = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if cuda else None,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": platform.python_version(), "cpu": platform.machine(),
            "threads": torch.get_num_threads(),
            "tsvd": os.path.dirname(tsvd.__file__),
            "build": {k: info.get(k) for k in ("with_cuda", "cpu_isa", "limited_api")},
            "op": "torch.ops.tsvd.treconstruct (raw op; backward through autograd)",
            "batch": 1, "rank": a.rank, "dtype": a.dtype, "shapes": [list(s) for s in a.shape_list],
            "reps": reps, "warmup": warmup, "inner": inner, "tol": tol,
            "timing": "CUDA events, median of reps" if cuda else "perf_counter, median of reps",
            "budget_s": a.budget_s, "goals": GOALS, "argv": sys.argv[1:] if argv is None else argv,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows: list[dict] = []
    state = {"complete": False, "cut_short": None, "shapes_not_run": []}

    def write():
        if path is None:
            return
        doc = dict(meta=meta, rows=rows, summary=summarize(rows),
                   elapsed_s=round(budget.elapsed(), 2), **state)

        def dump(tmp):
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1, default=str)
        atomic_write(path, dump)

    print(f"trec_micro: {meta['device']} {meta['gpu'] or meta['cpu']}, torch {meta['torch']}, "
          f"{a.dtype}, r={a.rank}, reps={reps}, warmup={warmup}, inner={inner}, "
          f"budget {a.budget_s:g} s", flush=True)
    write()
    failed = False
    for shape in a.shape_list:
        if not budget.allows(f"shape {shape}"):
            break
        row = {"shape": list(shape), "ok": False}
        try:
            kinfo = {}
            for kv in a.kernel_list:
                set_kernels(kv)
                checks = correctness(shape, a.rank, dtype, dev, tol, a.seed, budget)
                kinfo[kv] = {
                    "checks": checks,
                    "ok": len(checks) == 5 and all(c["ok"] for c in checks.values()),
                    "fwd_err": max((c["err"] for k, c in checks.items() if k.startswith("fwd")),
                                   default=None),
                    "grad_err": max((c["err"] for k, c in checks.items()
                                     if k.startswith("grad")), default=None)}
            set_kernels(a.kernel_list[0])
            first = kinfo[a.kernel_list[0]]
            row["checks"] = first["checks"]
            row["fwd_err"], row["grad_err"] = first["fwd_err"], first["grad_err"]
            row["ok"] = len(kinfo) == len(a.kernel_list) and all(k["ok"] for k in kinfo.values())
            times = timing(shape, a.rank, dtype, dev, reps, warmup, inner, a.seed, budget,
                           kernels=a.kernel_list)
            figs = figures(shape, a.dtype, times)
            kfig = figs.pop("kernel_figures", {})
            row.update(figs)
            if a.kernel_list != ["default"]:
                row["kernels"] = {}
                for kv, k in kinfo.items():
                    d = {"ok": k["ok"], "fwd_err": k["fwd_err"], "grad_err": k["grad_err"],
                         "failed": [n for n, c in k["checks"].items() if not c["ok"]]}
                    d.update(kfig.get(kv, {}))
                    if kv != a.kernel_list[0]:
                        d["checks"] = k["checks"]
                    row["kernels"][kv] = d
        except Exception as e:  # noqa: BLE001  (recorded; the next shape still runs)
            row["error"] = f"{type(e).__name__}: {e}"
        if budget.stopped_before is not None:
            row["cut_short"] = True
        if not row["ok"] and (budget.stopped_before is None or "error" in row
                              or any(not c["ok"] for c in row.get("checks", {}).values())):
            failed = True
        rows.append(row)
        write()
        bad = [k for k, c in row.get("checks", {}).items() if not c["ok"]]
        print(f"{'x'.join(map(str, shape)):>14}  ok={row['ok']}"
              + (f" (failed: {', '.join(bad)})" if bad else "")
              + f"  err fwd {_fmt(row.get('fwd_err'))} grad {_fmt(row.get('grad_err'))}"
              + f"  clone {_fmt(row.get('clone_us'))} us {_fmt(row.get('clone_GBps'))} GB/s"
              + f"  fwd {_fmt(row.get('fwd_us'))} us {_fmt(row.get('fwd_pct_clone'))} % of clone"
              + f" {_fmt(row.get('fwd_x_ref'))}x ref"
              + f"  fwd+bwd {_fmt(row.get('fb_us'))} us {_fmt(row.get('fb_x_ref'))}x ref"
              + (f"  ERROR {row['error']}" if "error" in row else ""), flush=True)
        for kv, d in list(row.get("kernels", {}).items())[1:]:
            print(f"{'':>14}  {kv}: ok={d['ok']}"
                  + (f" (failed: {', '.join(d['failed'])})" if d["failed"] else "")
                  + f"  err fwd {_fmt(d.get('fwd_err'))} grad {_fmt(d.get('grad_err'))}"
                  + f"  fwd {_fmt(d.get('fwd_us'))} us {_fmt(d.get('fwd_pct_clone'))} % of clone"
                  + f" {_fmt(d.get('fwd_x_ref'))}x ref {_fmt(d.get('fwd_x_first'))}x "
                  + f"{a.kernel_list[0]}  fwd+bwd {_fmt(d.get('fb_us'))} us "
                  + f"{_fmt(d.get('fb_x_ref'))}x ref {_fmt(d.get('fb_x_first'))}x "
                  + f"{a.kernel_list[0]}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    if budget.stopped_before is not None:
        state["cut_short"] = (f"budget of {a.budget_s:g} s spent: stopped before "
                              f"{budget.stopped_before}")
        state["shapes_not_run"] = [list(s) for s in a.shape_list[len(rows):]]
    else:
        state["complete"] = len(rows) == len(a.shape_list)
    write()
    s = summarize(rows)
    print("summary: " + json.dumps(s) + (f"  CUT SHORT: {state['cut_short']}"
                                         if state["cut_short"] else ""))
    if path:
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
