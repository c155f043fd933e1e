"""Choose the demo's fine-tuning settings on the validation split (issue 12, item 4).

    python bench/demo_settings.py --out bench/results/demo_settings_cpu_2core_DATE [--cache DIR]

What it does, with the demo's data, pre-training and budget (:data:`tsvd.peft.seg.demo.DEMO`;
the test subjects are never loaded):

1. a learning-rate grid for the method (``--lrs``; the adapter at the derived rate, i.e. the
   same ``lr``), each run fine-tuned for the demo's budget and scored by its best validation
   Dice over the epochs (the checkpoint the demo keeps);
2. at the best of those rates, the adapter's rate alone moved by ``--adapter-factors``;
3. on the validation subjects, with the chosen run's checkpoint: post-processing (keep the
   2 largest components or not) and flip test-time augmentation (none, left-right, or all
   three axes).

The chosen value of each grid must not be at an end of it (a bracketed optimum); the script
says so when it is. Everything is written to ``OUT/selection.json`` (atomically) after every
run, and a finished run is reused when the script is started again.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import sys
import time
from pathlib import Path


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="output folder (runs, selection.json)")
    p.add_argument("--cache", default=None, help="dataset / pre-training cache (default: the "
                   "demo's, ~/.cache/tsvd or $TSVD_CACHE)")
    p.add_argument("--method", default="lorapt", help="fine-tuning method (default lorapt)")
    p.add_argument("--lrs", default="2e-3,5e-3,1.2e-2",
                   help="comma-separated learning rates of step 1 (default 2e-3,5e-3,1.2e-2)")
    p.add_argument("--adapter-factors", default="0.1,0.33,3",
                   help="step 2: adapter rate = factor x the best lr (default 0.1,0.33,3; "
                        "'none' skips the step)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    try:
        a.lrs = [float(v) for v in a.lrs.split(",")]
        a.adapter_factors = ([] if a.adapter_factors == "none" else
                             [float(v) for v in a.adapter_factors.split(",")])
    except ValueError:
        p.error("--lrs / --adapter-factors: expected comma-separated numbers")
    if not a.lrs or any(v <= 0 for v in a.lrs + a.adapter_factors):
        p.error("--lrs / --adapter-factors: expected positive numbers")
    if a.threads is not None and a.threads < 1:
        p.error("--threads: expected an integer >= 1")
    return a


def main(argv=None) -> int:
    import torch

    from tsvd.peft.seg import demo as Dm
    from tsvd.peft.seg import embedded as E
    from tsvd.peft.seg import infer as I
    from tsvd.peft.seg import train as T
    from tsvd.peft.seg.runtime import write_json

    a = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("demo_settings")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    S = copy.deepcopy(Dm.DEMO)
    cache = Path(a.cache) if a.cache else E.default_cache_dir()
    # the same datasets as the demo (test subjects included in the folder, never loaded here)
    src, tgt = Dm.build_data(S, cache, seed=0, log_fn=log.info)
    base = Dm.cached_pretrain(S, src, cache, seed=0)
    sel_path = out / "selection.json"
    sel = json.loads(sel_path.read_text()) if sel_path.is_file() else {}
    sel.update({"method": a.method, "settings": S, "pretrained": str(base),
                "dataset": str(tgt), "runs": sel.get("runs", {})})

    def run(name, lr, adapter_lr):
        d = out / name
        info = d / "run.json"
        if name in sel["runs"] and info.is_file() and json.loads(info.read_text()).get("complete"):
            log.info("%s: done before (best validation Dice %.4f)", name,
                     sel["runs"][name]["best_val_dice"])
            return sel["runs"][name]
        cfg = Dm.stage_config(dict(S, finetune=dict(S["finetune"], lr=lr)), tgt, "finetune",
                              method=a.method, seed=0)
        cfg.model.pretrained = str(base)
        cfg.adapter.adapter_lr = adapter_lr
        t = time.time()
        r = T.train(cfg.validate(), d, task="finetune", overwrite=True, progress=False)
        with open(d / "curves.csv") as f:
            hist = [row for row in csv.DictReader(f)]
        rec = {"lr": lr, "adapter_lr": adapter_lr, "best_val_dice": r["best_val_dice"],
               "best_epoch": json.loads(info.read_text()).get("best_epoch"),
               "val_dice": [float(h["val_dice"]) if h.get("val_dice") not in (None, "")
                             else None for h in hist], "seconds": time.time() - t}
        sel["runs"][name] = rec
        write_json(sel_path, sel)
        log.info("%s: best validation Dice %.4f (epoch %s), %.0f s", name, rec["best_val_dice"],
                 rec["best_epoch"], rec["seconds"])
        return rec

    def pick(names, key):
        best = max(names, key=lambda n: sel["runs"][n]["best_val_dice"])
        vals = sorted(sel["runs"][n][key] or 0.0 for n in names)
        edge = sel["runs"][best][key] in (vals[0], vals[-1]) if len(vals) > 2 else True
        return best, edge

    # 1. learning rate (adapter at the derived rate)
    names = [f"lr{lr:g}" for lr in a.lrs]
    for n, lr in zip(names, a.lrs):
        run(n, lr, None)
    best, edge = pick(names, "lr")
    sel["lr"] = {"grid": a.lrs, "chosen": sel["runs"][best]["lr"], "at_grid_edge": edge}
    # 2. the adapter's rate at the best lr
    lr = sel["runs"][best]["lr"]
    if a.adapter_factors:
        anames = [best]
        for f in a.adapter_factors:
            n = f"lr{lr:g}_alr{f * lr:.3g}"
            run(n, lr, f * lr)
            anames.append(n)
        for n in anames:
            r = sel["runs"][n]
            r["adapter_rate"] = r["adapter_lr"] if r["adapter_lr"] is not None else r["lr"]
        best, edge = pick(anames, "adapter_rate")
        sel["adapter_lr"] = {"grid": sorted(sel["runs"][n]["adapter_rate"] for n in anames),
                             "chosen": sel["runs"][best]["adapter_rate"], "at_grid_edge": edge}
    sel["chosen_run"] = best
    write_json(sel_path, sel)
    # 3. post-processing and test-time augmentation on the validation subjects
    ck = out / best
    cfg = Dm.stage_config(S, tgt, "finetune", method=a.method, seed=0)
    post = {}
    for kc in (0, 2):
        for tta in ([], [0], [0, 1, 2]):
            key = f"keep{kc}_tta{''.join(map(str, tta)) or 'none'}"
            c = cfg.copy()
            c.infer.keep_components = kc
            c.infer.tta_flip = tta
            ev = I.evaluate(c.validate(), ck, out / "post" / key, split="valid", overwrite=True,
                            progress=False)
            post[key] = {"keep_components": kc, "tta_flip": tta, "dice": ev["dice"],
                         "hd95_mm": ev["hd95_mm"]}
            log.info("post-processing %s: validation Dice %.4f", key, ev["dice"]["mean"])
    sel["post_processing"] = post
    sel["post_chosen"] = max(post, key=lambda k: post[k]["dice"]["mean"])
    write_json(sel_path, sel)
    log.info("chosen: run %s, post-processing %s", best, sel["post_chosen"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
