"""Markdown table of a ``bench/kernels.py --json`` result (what the README's tables are made of).

    python bench/table.py bench/results/<run>/kernels_cuda.json [--shapes lora|all]

One row per (op, shape): tsvd min ms, the plain-PyTorch reference, the published code's
formulation and, for treconstruct, a clone of the output (min ms each), the speed-ups, and
for the forward the memory bandwidth of treconstruct as a fraction of the clone's.
"""
from __future__ import annotations

import argparse
import json

LORA = [[48, 768, 768], [12, 3072, 768], [12, 768, 3072]]


def table(d: dict, shapes: str = "lora") -> str:
    rows = {}
    for r in d["rows"]:
        if shapes == "lora" and r["shape"] not in LORA:
            continue
        key = (r["op"], tuple(r["shape"]))
        e = rows.setdefault(key, {"tsvd": r["tsvd_ms_min"], "err": r["err"]})
        e[r["baseline"]] = r["baseline_ms_min"]
        if "bandwidth_fraction" in r:
            e["bw"] = r["bandwidth_fraction"]
            e["gbps"] = r["tsvd_GBps"]
    out = ["| op | shape | tsvd ms | plain PyTorch ms | speed-up | published ms | speed-up "
           "| clone ms | tsvd / clone | max rel. err |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x):
        return "" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")

    for (op, shape), e in rows.items():
        ref, pub, cl = e.get("reference"), e.get("published"), e.get("clone")
        name = {"treconstruct": "treconstruct fwd", "treconstruct_fb": "treconstruct fwd+bwd"}.get(op, op)
        t = e["tsvd"]
        sp_ref = "" if ref is None else f"{ref / t:.2f}x"
        sp_pub = "" if pub is None else f"{pub / t:.2f}x"
        vs_cl = "" if cl is None else f"{t / cl:.1f} ({100 * e['bw']:.0f}% of its GB/s)"
        out.append(f"| {name} | {tuple(shape)} | {f(t)} | {f(ref)} | {sp_ref} | {f(pub)} | "
                   f"{sp_pub} | {f(cl)} | {vs_cl} | {e['err']:.1e} |")
    s = d.get("summary", {})
    tail = []
    for k in ("treconstruct/reference", "treconstruct_fb/reference", "tsvd/reference",
              "tsvd/published"):
        if k in s:
            tail.append(f"{k}: {s[k]['tsvd_ms']:.1f} ms vs {s[k]['baseline_ms']:.1f} ms "
                        f"({s[k]['ratio']:.2f}x)")
    m = d.get("meta", {})
    head = (f"device {m.get('gpu') or m.get('processor') or m.get('device')}, torch {m.get('torch')}, "
            f"{m.get('threads')} threads, {m.get('date')}, repeats {m.get('repeats')}"
            + (f" x {m['inner']} calls" if m.get("inner", 1) > 1 else ""))
    return "\n".join([head, ""] + out + ([""] + ["sums over the three LoRA-PT tensors: "
                                                  + "; ".join(tail)] if tail else []))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json")
    ap.add_argument("--shapes", choices=["lora", "all"], default="lora")
    a = ap.parse_args(argv)
    with open(a.json) as fh:
        print(table(json.load(fh), a.shapes))


if __name__ == "__main__":
    main()
