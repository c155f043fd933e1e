"""Benchmark of the PEFT methods on MONAI's UNETR: trainable parameters, adapter file size,
one training step's time and peak memory, side by side in one run.

    python bench/peft.py                       # presets cpu and paper, all methods, CPU
    python bench/peft.py --presets cpu --quick --json bench_peft.json
    python bench/peft.py --device cuda --presets paper,cpu

A training step is: zero_grad, forward of a random ``(B, 1, D, H, W)`` volume, cross-entropy
against random labels, backward, and the paper's optimizer step (Adam, lr 1e-3,
weight decay 1e-5, amsgrad) over ``adapter.param_groups(1e-3, weight_decay=1e-5)`` (the
adapter's own groups and rates, see ``tsvd.peft.Adapter.param_groups``). Every method of
``tsvd.peft.METHODS`` (lorapt ours; lora, pissa, dora from HF PEFT) runs with its defaults
(rank 8, ``train_decoder=True``: the CNN decoder and head train too).

How each number is measured:

- Each (preset, method) runs in a fresh child process. Step time: median of ``--repeats``
  steps after ``--warmup`` steps. On CPU, when ``--interleave`` is on (default for every
  preset but "paper"), the step times in the table come instead from one extra process that
  holds all methods' models and times them round-robin, so that load from other processes
  hits every method alike (the per-process times are kept in the JSON as ``step_s_alone``).
- Peak memory, CUDA: ``torch.cuda.max_memory_allocated()`` over one step after warm-up (all
  tensors: weights, residuals, optimizer state, activations, gradients).
- Peak memory, CPU: the child runs with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so that
  every tensor above 64 KiB is its own ``mmap`` and returns to the OS when freed. Peak =
  the peak resident set of the measured step (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before it) minus the file-backed resident pages (library code)
  minus the anonymous resident memory before the model was built (after all imports). It
  counts the same things as the CUDA number plus small allocator and thread overheads.
- Adapter file: ``adapter.save()`` (safetensors), against the full model saved the same way.
  ``adapter MB`` counts the adapter tensors only (``adapter.adapter_names``: U, S, V /
  lora_A, lora_B, DoRA's magnitudes), ``file MB`` the
  whole file, which with ``train_decoder=True`` also holds the trained decoder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# this script's folder holds peft.py and kernels.py, which would shadow HF PEFT and the
# ``kernels`` package that HF's transformers imports: take it off the import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from tsvd.peft import METHODS, get_method  # noqa: E402  (no HF PEFT import until needed)


def _has_rank(method) -> bool:
    return "rank" in get_method(method).options


def _rss_kb(field="VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _setup(preset, method, device, batch, rank, seed=0):
    import torch

    from tsvd.models import build_unetr
    from tsvd.peft import adapt
    torch.manual_seed(seed)
    model = build_unetr(preset).to(device).train()
    opts = {"rank": rank} if _has_rank(method) else {}
    t0 = time.perf_counter()
    adapter = adapt(model, method, **opts)
    t_adapt = time.perf_counter() - t0
    opt = torch.optim.Adam(adapter.param_groups(1e-3, weight_decay=1e-5), amsgrad=True)
    from tsvd.models import PRESETS
    size = tuple(PRESETS[preset]["img_size"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, *size, generator=g).to(device)
    y = torch.randint(0, 2, (batch, *size), generator=g).to(device)
    return model, adapter, opt, x, y, t_adapt


def _step(model, opt, x, y, device):
    import torch
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child_one(args) -> dict:
    """Everything about one (preset, method) pair, in this (fresh) process."""
    import torch

    import tsvd
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    import monai.networks.nets  # noqa: F401  (imports before the baseline)
    import safetensors.torch  # noqa: F401

    import tsvd.peft  # noqa: F401
    anon0 = _rss_kb("RssAnon") if dev == "cpu" else 0
    model, adapter, opt, x, y, t_adapt = _setup(args.preset, args.method, dev, args.batch,
                                                args.rank)
    counts = adapter.num_trainable()
    sd = adapter.state_dict()
    adapter_bytes = sum(v.numel() * v.element_size() for k, v in sd.items()
                        if k in set(adapter.adapter_names))
    with tempfile.TemporaryDirectory() as d:
        p = adapter.save(os.path.join(d, "a.safetensors"))
        file_bytes = os.path.getsize(p)
    for _ in range(args.warmup):
        _step(model, opt, x, y, dev)
    if dev == "cpu":
        _reset_peak()
        base = _rss_kb()
    else:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _step(model, opt, x, y, dev)
    times = [time.perf_counter() - t0]
    if dev == "cpu":
        # file-backed pages (libraries) are not tensors: only anonymous memory counts
        file_kb = _rss_kb("RssFile") + _rss_kb("RssShmem")
        peak = (_rss_kb("VmHWM") - file_kb - anon0) * 1024
        steady = (base - file_kb - anon0) * 1024
    else:
        peak = torch.cuda.max_memory_allocated()
        steady = torch.cuda.memory_allocated()
    for _ in range(args.repeats - 1):
        t0 = time.perf_counter()
        _step(model, opt, x, y, dev)
        times.append(time.perf_counter() - t0)
    return {
        "preset": args.preset, "method": args.method, "device": dev, "batch": args.batch,
        "rank": args.rank if _has_rank(args.method) else None,
        "trainable": counts, "adapter_bytes": adapter_bytes, "file_bytes": file_bytes,
        "adapt_s": t_adapt, "step_s_alone": statistics.median(times), "step_times_alone": times,
        "peak_bytes": peak, "before_step_bytes": steady,
        "treconstruct_backend": tsvd.last_backend("treconstruct") if args.method == "lorapt"
        else None,
    }


def child_interleaved(args) -> dict:
    """Step times of all methods, timed round-robin in one process."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    runs = {m: _setup(args.preset, m, dev, args.batch, args.rank) for m in args.methods}
    for _ in range(args.warmup):
        for m, (model, _, opt, x, y, _) in runs.items():
            _step(model, opt, x, y, dev)
    times = {m: [] for m in runs}
    for _ in range(args.repeats):
        for m, (model, _, opt, x, y, _) in runs.items():
            t0 = time.perf_counter()
            _step(model, opt, x, y, dev)
            times[m].append(time.perf_counter() - t0)
    return {m: {"step_s": statistics.median(t), "step_times": t} for m, t in times.items()}


def full_model_bytes(preset) -> int:
    from tsvd.models import build_unetr, save_checkpoint
    with tempfile.TemporaryDirectory() as d:
        p = save_checkpoint(build_unetr(preset), os.path.join(d, "m.safetensors"))
        return os.path.getsize(p)


def _run_child(cmd_args, timeout):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, __file__] + cmd_args, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"child {cmd_args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="cpu,paper", help="comma-separated (cpu, paper, tiny)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=None,
                    help="default: 2 (cpu preset), 1 (paper on CPU), 4 (paper on CUDA)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--interleave", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--quick", action="store_true", help="fewest steps (paper: 1 warm-up, 1 timed)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per child process")
    # internal
    ap.add_argument("--child", choices=("one", "interleaved"), default=None)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--method", default=None)
    args = ap.parse_args(argv)

    if args.child:
        args.methods = args.methods.split(",")
        res = child_one(args) if args.child == "one" else child_interleaved(args)
        print(json.dumps(res))
        return 0

    import torch
    presets = [p for p in args.presets.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    info = {"torch": torch.__version__, "device": args.device, "threads": args.threads or
            torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "machine": platform.node(), "cuda_name": torch.cuda.get_device_name(args.device)
            if args.device.startswith("cuda") else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        import tsvd
        info["tsvd_compiled"] = tsvd.compiled_available(args.device.split(":")[0])
    except Exception:  # pragma: no cover - informational only
        info["tsvd_compiled"] = None
    results = []
    for preset in presets:
        heavy = preset == "paper" and args.device == "cpu"
        batch = args.batch or (1 if heavy else (4 if preset == "paper" else 2))
        warm = args.warmup if args.warmup is not None else (1 if heavy or args.quick else 2)
        reps = args.repeats if args.repeats is not None else (
            1 if heavy and args.quick else 2 if heavy else 3 if args.quick else 7)
        common = ["--device", args.device, "--rank", str(args.rank), "--batch", str(batch),
                  "--warmup", str(warm), "--repeats", str(reps), "--threads", str(args.threads),
                  "--preset", preset, "--methods", ",".join(methods)]
        full_bytes = full_model_bytes(preset)
        rows = {}
        for m in methods:
            print(f"[{preset}] {m} ...", file=sys.stderr, flush=True)
            rows[m] = _run_child(["--child", "one", "--method", m] + common, args.timeout)
            rows[m]["full_model_file_bytes"] = full_bytes
        # interleaving guards against load from other processes on a shared CPU; a GPU step
        # is timed with the device to itself, so "auto" means off there
        inter = args.interleave == "on" or (args.interleave == "auto" and not heavy
                                            and args.device == "cpu")
        if inter:
            print(f"[{preset}] interleaved timing ...", file=sys.stderr, flush=True)
            it = _run_child(["--child", "interleaved"] + common, args.timeout)
            for m in methods:
                rows[m].update(step_s=it[m]["step_s"], step_times=it[m]["step_times"],
                               timing="interleaved")
        else:
            for m in methods:
                rows[m].update(step_s=rows[m]["step_s_alone"], timing="separate processes")
        results += list(rows.values())
        _print_table(preset, rows, info, batch, warm, reps)
    if args.json:
        from tsvd.models import atomic_write
        payload = json.dumps({"info": info, "results": results}, indent=1)
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(payload))
    return 0


def _print_table(preset, rows, info, batch, warm, reps):
    mb = 1 / 2 ** 20
    any_row = next(iter(rows.values()))
    full = any_row["full_model_file_bytes"]
    print(f"\n## preset {preset}: device {info['device']}"
          f"{' (' + info['cuda_name'] + ')' if info['cuda_name'] else ''}, batch {batch}, "
          f"{info['threads']} threads, torch {info['torch']}, warm-up {warm}, median of {reps} "
          f"({any_row['timing']}); full model file {full * mb:.1f} MB")
    print("| method | trainable adapter | trainable other | adapter MB | file MB (% of model) "
          "| step s | peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m, r in rows.items():
        t = r["trainable"]
        print(f"| {m} | {t['adapter']:,} | {t['other']:,} | {r['adapter_bytes'] * mb:.2f} | "
              f"{r['file_bytes'] * mb:.2f} ({100 * r['file_bytes'] / full:.2f}%) | "
              f"{r['step_s']:.3f} | {r['peak_bytes'] * mb:.0f} |")
    if "lorapt" in rows and "lora" in rows:
        a, b = rows["lorapt"], rows["lora"]
        print(f"LoRA-PT / LoRA: step time x{a['step_s'] / b['step_s']:.3f} (target <= 1.10), "
              f"peak memory x{a['peak_bytes'] / b['peak_bytes']:.3f} (target <= 1.05); "
              f"treconstruct backend: {a['treconstruct_backend']}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
