"""Training, evaluation and prediction of UNETR (pre-training, full and PEFT fine-tuning).

The configuration is one nested dict (see :data:`DEFAULTS`); the CLI, YAML files and the demo
all fill it. A run folder holds::

    config.yaml            the resolved configuration
    run.json               what inference needs: preset, method, data processing, artefacts
    checkpoint_last.pt     resume state (trainable tensors, optimizer, scheduler, history)
    model_{best,last,avg}.safetensors      (method full / pre-training) or
    adapter_{best,last,avg}.safetensors    (PEFT methods: small, + pointer to the base checkpoint)
    curves.csv, curves.png, tb/            learning curves (CSV, PNG, TensorBoard)

Every file is written to a temporary name and renamed into place.

Reproducibility: before every epoch the torch/numpy/python generators are seeded from
(seed, epoch), and every training sample's random transforms from (seed, epoch, sample index),
so a resumed run and a run on N processes (torch.distributed: each rank takes its slice of
every global batch, gradients are averaged) see the same samples as one uninterrupted
single-process run.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig
from .config import save_yaml as _save_yaml
from .data import DataError, check_cases, eval_transforms, load_cases, train_transforms
from .infer import infer_options, predict_mask
from .metrics import dice
from tsvd.models import file_sha256, remove_stale_temporaries, save_checkpoint
from tsvd.peft import adapt

from .runtime import (RunError, apply_transforms, build_model, check_out_dir, load_base,
                      patch_size, plain, select_device, write_bytes)

__all__ = ["DEFAULTS", "merge_config", "train", "RunError", "save_yaml"]

#: the defaults of every setting as a nested dict (``config.yaml``'s layout), generated from
#: the typed declaration in :mod:`tsvd.peft.seg.config`
DEFAULTS = RunConfig().to_dict()


def merge_config(base: dict, over: dict | None, where: str = "config") -> dict:
    """``over`` laid over ``base`` (both in ``config.yaml``'s layout), every value checked
    against its declared type and range (:class:`~tsvd.peft.seg.config.ConfigError` naming the
    key); returns the validated nested dict."""
    return RunConfig.from_dict(over, where=where, base=RunConfig.from_dict(base)).to_dict()


def save_yaml(cfg: dict, path: Path) -> None:
    """Write a config dict as YAML (atomic; validated first)."""
    _save_yaml(RunConfig.from_dict(cfg), path)


# ------------------------------------------------------------------------------------------
# distributed
# ------------------------------------------------------------------------------------------
class _Dist:
    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.owned = False
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
            self.owned = True

    def close(self):
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def average_grads(self, params):
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        o = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[o:o + n].view_as(g))
            o += n

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def broadcast_params(self, module):
        if not self.enabled:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(t.data, 0)


def _seed_all(seed: int) -> None:
    """Seed python, numpy and torch (MONAI's ``set_determinism``)."""
    from monai.utils import set_determinism
    set_determinism(seed=seed % (2 ** 32))


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def _data_cfg(cfg) -> dict:
    d = dict(cfg["data"])
    d["patch"] = patch_size(RunConfig.from_dict(cfg))
    return d


def _prepare(cases, transforms, desc, log):
    from monai.transforms import Compose
    comp = Compose(transforms)
    return [apply_transforms(comp, c) for c in cases]


class _Sampler:
    """Random training samples: the cached deterministic item + per-sample seeded transforms."""

    def __init__(self, items, rnd, seed):
        from monai.transforms import Compose
        self.items = items
        self.rnd = Compose(rnd)
        self.seed = seed

    def sample(self, epoch: int, k: int, index: int):
        s = (self.seed * 1_000_003 + epoch * 10_007 + k) % (2 ** 31)
        self.rnd.set_random_state(seed=s)
        d = {"image": self.items[index]["image"].clone(), "label": self.items[index]["label"].clone()}
        out = self.rnd(d)
        if isinstance(out, list):
            out = out[0]
        return plain(out["image"]).float(), plain(out["label"]).float()


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------
def _save_torch(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def _count(params) -> int:
    return int(sum(p.numel() for p in params))


def _peft_options(cfg) -> dict:
    """The ``tsvd.peft.adapt`` options of ``cfg["adapter"]`` (those that were set)."""
    a = cfg["adapter"]
    o = {"train_decoder": bool(a["train_decoder"])}
    if a.get("rank") is not None:
        o["rank"] = int(a["rank"])
    if a.get("alpha") is not None:
        o["alpha"] = float(a["alpha"])
    return o


def _weights_in_use(model, adapter) -> torch.nn.Module:
    """A plain copy of the network with the weights the model uses now (adapter merged)."""
    import copy
    twin = adapter.merged_copy() if adapter is not None else copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.cpu()


def _averaged_model(first: torch.nn.Module):
    """``torch.optim.swa_utils.AveragedModel`` (equal weights) started from ``first``."""
    from torch.optim.swa_utils import AveragedModel
    avg = AveragedModel(first)
    avg.update_parameters(first)
    return avg


def _identity_diff(saved: dict, now: dict, prefix: str = "") -> list:
    """``["key: saved -> now", ...]`` for every leaf where two nested dicts differ."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<missing>"), now.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} (run) vs {b!r} (now)")
    return out


def _val_dice(model, items, patch, overlap, device, amp, opts) -> float:
    """Mean Dice over the validation items (preprocessed grid), with the same post-processing
    ``opts`` (TTA flips, keep-largest components) that evaluation applies."""
    model.eval()
    ds = [dice(predict_mask(model, it["image"], patch=patch, overlap=overlap, device=device,
                            amp=amp, opts=opts), plain(it["label"])[0] > 0.5) for it in items]
    model.train()
    return float(np.mean(ds)) if ds else float("nan")


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
def train(cfg: dict, out, *, task: str = "finetune", overwrite: bool = False,
          resume: bool = False, log=None, progress: bool = True) -> dict:
    """Train one run into folder ``out``; returns the summary dict (also ``summary.json``).

    ``cfg``: a :class:`~tsvd.peft.seg.config.RunConfig` or a dict in ``config.yaml``'s layout.
    Messages go to the ``tsvd.peft.seg`` logger, or to ``log(message)`` when given.

    ``task``: ``"pretrain"`` (all parameters, no adapter, saves model_*.safetensors) or
    ``"finetune"`` (``cfg["method"]``: lorapt, lora, pissa, full, decoder).
    """
    from tqdm.auto import tqdm
    out = Path(out)
    t_start = time.time()
    log = log or logging.getLogger("tsvd.peft.seg").info    # messages: logging by default
    if task not in ("pretrain", "finetune"):
        raise RunError(f"task: expected pretrain or finetune, got {task!r}")
    rc = cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)
    cfg = rc.to_dict()                      # validated, config.yaml's layout
    tcfg = cfg["train"]
    method = "full" if task == "pretrain" else cfg["adapter"]["method"]
    if not cfg["data"].get("path"):
        raise RunError("--data (data.path): a dataset folder is required")
    infer_opts = infer_options(cfg)
    device = select_device(tcfg.get("device"))
    dist = _Dist(device)
    if tcfg["batch_size"] % dist.world:
        raise RunError(f"--batch-size (train.batch_size): {tcfg['batch_size']} is not divisible "
                       f"by the number of processes {dist.world}")
    if tcfg.get("amp") and device.type != "cuda":
        log("note: --amp only applies on CUDA; training in float32 on the CPU")
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))
    pre = cfg["model"]["pretrained"]
    if task == "finetune" and method != "full" and not pre:
        raise RunError(f"--pretrained (model.pretrained): method {method} needs the base "
                       f"checkpoint")
    if pre and not Path(pre).is_file():
        raise RunError(f"--pretrained (model.pretrained): {pre}: checkpoint file not found")
    if task == "pretrain" and cfg["adapter"].get("adapter_lr") is not None:
        raise RunError("--adapter-lr (adapter.adapter_lr): pre-training has no adapter")
    if task == "pretrain" or method == "full":
        for k in ("rank", "alpha", "adapter_lr"):
            if cfg["adapter"].get(k) is not None:
                raise RunError(f"--{k.replace('_', '-')} (adapter.{k}): "
                               + ("pre-training" if task == "pretrain" else "--method full")
                               + " trains every parameter and has no adapter")
    ckpt_path = out / "checkpoint_last.pt"
    if dist.main:
        remove_stale_temporaries(out)
        # a folder left by a run killed before its first checkpoint restarts as new
        fresh_restart = out.is_dir() and not ckpt_path.exists() and not any(
            out.glob("*.safetensors"))
        check_out_dir(out, overwrite or fresh_restart, resume)
    if resume and not ckpt_path.is_file():
        raise RunError(f"{ckpt_path}: nothing to resume (no checkpoint in the output folder)")
    resumed = None
    if resume:
        try:
            resumed = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RunError(f"{ckpt_path}: cannot be read (truncated or corrupted?): "
                           f"{type(e).__name__}: {str(e)[:200]}") from None
    identity = {"task": task, "method": method, "config": rc.identity(),
                "base_sha256": file_sha256(pre) if pre else None,
                "peft": _peft_options(cfg) if task == "finetune" and method not in
                ("full",) else None}
    resume_changes = {}
    if resumed is not None:
        saved = resumed.get("identity")
        if saved is None:
            raise RunError(f"{ckpt_path}: written by an older version without the run's "
                           f"identity; start a new run (--overwrite)")
        diff = _identity_diff({k: v for k, v in saved.items() if k != "cases"}, identity)
        if diff:
            raise RunError(f"--resume: the run in {out} was trained with other settings; "
                           f"refusing to continue it with: " + "; ".join(diff)
                           + " (only epochs, val_every, device and threads may change)")
        old_train = resumed.get("train_settings", {})
        resume_changes = {k: [old_train.get(k), tcfg.get(k)] for k in
                          ("epochs", "val_every", "device", "threads")
                          if old_train.get(k) != tcfg.get(k)}
    # ---- data: header checks, then cached deterministic transforms (voxel checks)
    dcfg = _data_cfg(cfg)
    layout, splits, allowed = load_cases(dcfg["path"], dcfg["format"], modality=dcfg["modality"],
                                         valid_fraction=dcfg["valid_fraction"],
                                         seed=tcfg["seed"])
    tr, va = splits["train"], splits["valid"]
    if dcfg.get("max_train"):
        tr = tr[: int(dcfg["max_train"])]
    if dcfg.get("max_valid"):
        va = va[: int(dcfg["max_valid"])]
    if not tr:
        raise DataError(f"{dcfg['path']}: no training cases ({layout} layout)")
    check_cases(tr + va)
    identity["cases"] = {"train": [c["name"] for c in tr], "valid": [c["name"] for c in va]}
    if resumed is not None and resumed["identity"].get("cases") != identity["cases"]:
        raise RunError(f"--resume: the run in {out} was trained on other train/valid cases "
                       f"(dataset or split changed); refusing to continue it")
    # ---- model
    _seed_all(tcfg["seed"])
    model = build_model(RunConfig.from_dict(cfg))
    if pre:
        load_base(model, pre, log if dist.main else None)
    adapter = None
    if task == "finetune" and method != "full":
        try:
            adapter = adapt(model, method, **_peft_options(cfg))
        except (ValueError, TypeError) as e:
            raise RunError(f"--method {method} with --rank/--alpha/--train-decoder "
                           f"(adapter.*): {e}") from None
        params = list(adapter.trainable_parameters())
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        params = [p for p in model.parameters()]
    model.to(device)
    dist.broadcast_params(model)
    n_train = _count(params)
    n_total = _count(model.parameters())
    n_adapter = None
    if adapter is not None:
        c = adapter.num_trainable()
        n_train, n_total, n_adapter = c["total"], c["model_total"], c["adapter"]
    if dist.main:
        log(f"{task}: method {method}, trainable parameters {n_train:,} of {n_total:,} "
            f"({100.0 * n_train / max(n_total, 1):.2f} %"
            + (f"; adapter {n_adapter:,}" if n_adapter is not None else "")
            + f"), {len(tr)} train / {len(va)} valid "
            f"cases ({layout}), device {device}, processes {dist.world}")
    det, rnd = train_transforms(dcfg, allowed)
    t0 = time.time()
    tr_items = _prepare(tr, det, "train", log)
    va_items = _prepare(va, eval_transforms(dcfg, allowed), "valid", log)
    if dist.main:
        log(f"data: {len(tr_items) + len(va_items)} cases loaded and preprocessed in "
            f"{time.time() - t0:.1f} s")
    sampler = _Sampler(tr_items, rnd, tcfg["seed"])
    patch = dcfg["patch"]
    # ---- optimisation
    bs = tcfg["batch_size"]
    spe = int(tcfg.get("samples_per_epoch") or len(tr_items))
    iters = max(1, math.ceil(spe / bs))
    total = iters * tcfg["epochs"]
    if adapter is not None:          # adapter tensors and the rest at their own rates
        groups = adapter.param_groups(float(tcfg["lr"]), cfg["adapter"].get("adapter_lr"))
    else:
        groups = [{"params": params, "lr": float(tcfg["lr"]), "name": "model"}]
    if tcfg["optimizer"] == "adam":     # the paper's: Adam, amsgrad
        opt = torch.optim.Adam(groups, lr=float(tcfg["lr"]),
                               weight_decay=float(tcfg["weight_decay"]), amsgrad=True)
    else:
        opt = torch.optim.SGD(groups, lr=float(tcfg["lr"]), momentum=0.9,
                              weight_decay=float(tcfg["weight_decay"]))
    power = float(tcfg["poly_power"])

    def poly(it):            # LambdaLR (not PolynomialLR, whose saved total_iters would win
        return max(0.0, 1.0 - it / total) ** power      # over a --resume with more epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly)
    from monai.losses import DiceCELoss, DiceLoss
    # "-fg": the Dice term over the foreground classes only (the background's Dice is ~1 for a
    # small structure and only dilutes the gradient); cross-entropy always sees every class
    lname = str(tcfg["loss"])
    fg = lname.endswith("-fg")
    if lname.removesuffix("-fg") == "dicece":
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=not fg)
    elif lname.removesuffix("-fg") == "dice":
        loss_fn = DiceLoss(to_onehot_y=True, softmax=True, include_background=not fg)
    else:
        raise RunError(f"train.loss: expected dice, dicece, dice-fg or dicece-fg, got "
                       f"{tcfg['loss']!r}")
    amp = bool(tcfg.get("amp")) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def trainable_state():
        if adapter is not None:
            return {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def load_trainable(sd):
        if adapter is not None:
            adapter.load_state_dict(sd)
        else:
            model.load_state_dict(sd)

    history, best, start_epoch, resumes = [], -1.0, 0, []
    averaged = None          # torch.optim.swa_utils.AveragedModel of the weights the model uses
    if resumed is not None:
        st = resumed
        load_trainable(st["trainable"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        # the rate of the next step on the (possibly extended, --epochs raised) schedule; the
        # restored optimizer holds the rate of the old schedule's end otherwise
        for g, base in zip(opt.param_groups, sched.base_lrs):
            g["lr"] = base * poly(sched.last_epoch)
        history, best = st["history"], st["best"]
        resumes = list(st.get("resumes", []))
        start_epoch = st["epoch"] + 1
        if st.get("averaged") is not None:
            averaged = _averaged_model(_weights_in_use(model, adapter))
            averaged.load_state_dict(st["averaged"])
        if resume_changes:
            resumes.append({"at_epoch": start_epoch, "changed": resume_changes})
        if dist.main:
            log(f"resuming from {ckpt_path} after epoch {start_epoch}"
                + (f"; changed: {resume_changes}" if resume_changes else ""))
    run_info = {"task": task, "method": method, "preset": cfg["model"]["preset"],
                "model": cfg["model"], "data": {k: dcfg[k] for k in
                                                 ("spacing", "roi", "patch", "foreground",
                                                  "modality")},
                "base_checkpoint": str(Path(pre).resolve()) if pre else None,
                "peft": _peft_options(cfg) if adapter is not None else None,
                "trainable_parameters": n_train, "model_parameters": n_total,
                "adapter_parameters": n_adapter,
                "sw_overlap": cfg["infer"]["sw_overlap"], "infer": infer_opts,
                "lr": {"other": float(tcfg["lr"]),
                       "adapter": (cfg["adapter"].get("adapter_lr") or float(tcfg["lr"]))
                       if adapter is not None else None},
                "resumes": resumes}
    writer = None
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tb"))
        except Exception as e:  # tensorboard missing: curves still go to CSV/PNG
            log(f"note: no TensorBoard logs ({e})")
    prefix = "adapter" if adapter is not None else "model"
    # --overwrite: the previous run's files go once this run's first checkpoint is written
    previous = [p for p in out.glob("*") if p.name.endswith((".safetensors", ".csv", ".png",
                                                              ".json"))
                or p.name == "tb"] if (overwrite and resumed is None and out.is_dir()) else []

    def save_artefact(kind):
        path = out / f"{prefix}_{kind}.safetensors"
        if adapter is not None:
            adapter.save(str(path), base_checkpoint=str(Path(pre).resolve()))
        else:
            save_checkpoint(model, str(path), meta={"preset": cfg["model"]["preset"]})
        return path.name

    model.train()
    nvalid = len(va_items)
    for epoch in range(start_epoch, tcfg["epochs"]):
        _seed_all(tcfg["seed"] * 7919 + epoch)
        perm = np.random.default_rng([tcfg["seed"], epoch]).permutation(
            np.resize(np.arange(len(tr_items)), iters * bs))
        te = time.time()
        losses = []
        bar = tqdm(range(iters), desc=f"epoch {epoch + 1}/{tcfg['epochs']}", unit="it",
                   disable=not (progress and dist.main), leave=True, dynamic_ncols=True,
                   file=sys.stderr)
        for it in bar:
            glob_idx = list(range(it * bs, (it + 1) * bs))
            per = bs // dist.world
            mine = glob_idx[dist.rank * per:(dist.rank + 1) * per]
            xs, ys = zip(*[sampler.sample(epoch, k, int(perm[k])) for k in mine])
            x = torch.stack(xs).to(device)
            y = torch.stack(ys).to(device)
            with torch.autocast(device.type, enabled=amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            dist.average_grads(params)
            scaler.step(opt)
            scaler.update()
            sched.step()
            lv = dist.mean(float(loss.detach()))
            losses.append(lv)
            el = time.time() - te
            bar.set_postfix(loss=f"{lv:.4f}", samples_s=f"{(it + 1) * bs / max(el, 1e-9):.2f}")
        bar.close()
        train_time = time.time() - te
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
               "lr": float(tcfg["lr"]) * poly(sched.last_epoch),
               "epoch_time_s": round(train_time, 2),
               "val_dice": float("nan")}
        if tcfg["average_last"] and epoch >= tcfg["epochs"] - tcfg["average_last"]:
            if averaged is None:
                averaged = _averaged_model(_weights_in_use(model, adapter))
            else:
                averaged.update_parameters(_weights_in_use(model, adapter))
        if dist.main:
            do_val = nvalid and ((epoch + 1) % int(tcfg["val_every"]) == 0
                                 or epoch + 1 == tcfg["epochs"])
            if do_val:
                row["val_dice"] = _val_dice(model, va_items, patch, cfg["infer"]["sw_overlap"],
                                           device, amp, infer_opts)
            row["time_s"] = round(time.time() - te, 2)
            history.append(row)
            log(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, val Dice "
                f"{row['val_dice']:.4f}, {row['time_s']:.1f} s")
            if writer is not None:
                for k in ("train_loss", "lr", "val_dice"):
                    if not math.isnan(row[k]):
                        writer.add_scalar(k, row[k], epoch + 1)
                writer.flush()
            _write_curves(history, out / "curves.csv")
            if do_val and row["val_dice"] > best:
                best = row["val_dice"]
                run_info["best_epoch"] = epoch + 1
                save_artefact("best")
            save_artefact("last")
            run_info.setdefault("artefacts", {})
            run_info["artefacts"]["last"] = f"{prefix}_last.safetensors"
            if (out / f"{prefix}_best.safetensors").exists():
                run_info["artefacts"]["best"] = f"{prefix}_best.safetensors"
            write_bytes(out / "run.json", json.dumps(run_info, indent=1).encode())
            _save_torch({"epoch": epoch, "method": method, "identity": identity,
                         "train_settings": {k: tcfg.get(k) for k in
                                            ("epochs", "val_every", "device", "threads")},
                         "resumes": resumes, "preset": cfg["model"]["preset"],
                         "trainable": trainable_state(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "history": history,
                         "averaged": averaged.state_dict() if averaged is not None else None,
                         "best": best}, ckpt_path)
            for p in previous:             # the replaced run's files this run did not rewrite
                if p.is_dir() and p.name == "tb":
                    continue               # TensorBoard: this run's writer appends there
                if p.exists() and p.stat().st_mtime < t_start:
                    p.unlink()
            previous = []
        else:
            history.append(row)
        dist.barrier()
    summary = {}
    if dist.main:
        arts = run_info.setdefault("artefacts", {})
        if averaged is not None:
            # the average of the weights the model used (for LoRA-PT the rebuilt weights, not
            # the factors), saved as a plain model file
            save_checkpoint(averaged.module, str(out / "model_avg.safetensors"),
                            meta={"preset": cfg["model"]["preset"],
                                  "averaged_epochs": int(averaged.n_averaged)})
            arts["avg"] = "model_avg.safetensors"
            vd = _val_dice(averaged.module.to(device), va_items, patch,
                           cfg["infer"]["sw_overlap"], device, amp, infer_opts) \
                if nvalid else float("nan")
            run_info["avg_val_dice"] = vd
            run_info["averaged_epochs"] = int(averaged.n_averaged)
            log(f"average of the last {int(averaged.n_averaged)} epochs' weights: val Dice "
                f"{vd:.4f}")
        arts.setdefault("last", f"{prefix}_last.safetensors")
        run_info["default_artefact"] = ("avg" if "avg" in arts else
                                        "best" if "best" in arts else "last")
        run_info["complete"] = True
        write_bytes(out / "run.json", json.dumps(run_info, indent=1).encode())
        if writer is not None:
            writer.close()
        _plot_curves(history, out / "curves.png", log)
        summary = {"out": str(out), "method": method, "trainable_parameters": n_train,
                   "model_parameters": n_total, "adapter_parameters": n_adapter,
                   "best_val_dice": best if best >= 0 else None,
                   "final_val_dice": history[-1]["val_dice"] if history else None,
                   "wall_time_s": round(time.time() - t_start, 1),
                   "artefact": str(out / arts[run_info["default_artefact"]])}
        write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    dist.barrier()
    dist.close()
    return summary


def _write_curves(history, path: Path) -> None:
    buf = io.StringIO()
    keys = ["epoch", "train_loss", "val_dice", "lr", "epoch_time_s", "time_s"]
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in history:
        w.writerow(r)
    write_bytes(path, buf.getvalue().encode())


def _plot_curves(history, path: Path, log) -> None:
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(ep, [r["train_loss"] for r in history], "o-")
    ax[0].set_xlabel("epoch"), ax[0].set_ylabel("training loss"), ax[0].grid(alpha=0.3)
    ax[1].plot(ep, [r["val_dice"] for r in history], "o-", color="C1")
    ax[1].set_xlabel("epoch"), ax[1].set_ylabel("validation Dice"), ax[1].grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
