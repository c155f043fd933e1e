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

import copy
import csv
import io
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .data import DataError, check_cases, eval_transforms, load_cases, train_transforms
from .infer import infer_options, sliding_logits

__all__ = ["DEFAULTS", "merge_config", "train", "evaluate", "predict", "load_for_inference",
           "RunError"]

DEFAULTS = {
    "data": {
        "path": None, "format": "auto", "modality": "t1", "spacing": 1.5, "roi": None,
        "patch": None, "flip_axes": [0, 1, 2], "pos_fraction": 0.67, "foreground": None,
        "valid_fraction": 0.2, "max_train": None, "max_valid": None,
    },
    "model": {"preset": "cpu", "dropout": None},
    "method": "lorapt",
    "peft": {"rank": None, "alpha": None, "train_decoder": True},
    "pretrained": None,
    "train": {"epochs": 10, "batch_size": 2, "samples_per_epoch": None, "lr": 1e-3,
              "weight_decay": 1e-5, "optimizer": "adam", "poly_power": 0.9, "loss": "dicece", "val_every": 1,
              "average_last": 0, "amp": False, "seed": 0, "sw_overlap": 0.25,
              "device": "auto", "threads": None},
    # post-processing of evaluate/predict (None: the trained run's setting, else off)
    "infer": {"tta_flip": None, "keep_components": None},
}

METHODS = ("lorapt", "lora", "pissa", "full", "decoder")


class RunError(ValueError):
    """A bad argument or an unusable file; the message names it."""


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------
def merge_config(base: dict, over: dict | None, where: str = "config") -> dict:
    """Deep merge ``over`` into a copy of ``base``; unknown keys are an error."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if k not in out:
            raise RunError(f"{where}: unknown key {k!r} (known: {', '.join(sorted(out))})")
        if isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = merge_config(out[k], v, f"{where}.{k}")
        else:
            out[k] = copy.deepcopy(v)
    return out


def _atomic_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_bytes(path, buf.getvalue())


def save_yaml(obj, path: Path) -> None:
    import yaml
    _atomic_bytes(path, yaml.safe_dump(obj, sort_keys=False).encode())


def _models():
    import tsvd.models as M
    return M


def _peft():
    import tsvd.peft as P
    return P


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


def _device(cfg_train) -> torch.device:
    d = cfg_train.get("device", "auto")
    if d in (None, "auto"):
        if torch.cuda.is_available():
            lr = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{lr % torch.cuda.device_count()}")
        return torch.device("cpu")
    dev = torch.device(d)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {d!r}: CUDA is not available on this machine")
    return dev


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def _patch(cfg) -> list[int]:
    if cfg["data"].get("patch"):
        p = cfg["data"]["patch"]
        return [int(p)] * 3 if np.isscalar(p) else [int(x) for x in p]
    kw = _models().preset_kwargs(cfg["model"]["preset"])
    return list(kw["img_size"])


def _data_cfg(cfg) -> dict:
    d = dict(cfg["data"])
    d["patch"] = _patch(cfg)
    return d


def _apply(comp, case):
    """Run a Compose on one case; a DataError anywhere in MONAI's wrapping is re-raised as is."""
    try:
        return comp(dict(case))
    except Exception as e:  # MONAI wraps errors in RuntimeError("applying transform ...")
        err = e
        while err is not None:
            if isinstance(err, DataError):
                raise DataError(str(err)) from None
            err = err.__cause__
        raise DataError(f"{case['image']}: could not be loaded and preprocessed "
                        f"({type(e).__name__}: {e})") from e


def _prepare(cases, transforms, desc, log):
    from monai.transforms import Compose
    comp = Compose(transforms)
    return [_apply(comp, c) for c in cases]


def _plain(x) -> torch.Tensor:
    """A plain torch.Tensor view (MONAI's MetaTensor slows every op down)."""
    x = torch.as_tensor(x)
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


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
        return _plain(out["image"]).float(), _plain(out["label"]).float()


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------
def _build(cfg, out_channels=2):
    over = {}
    if cfg["model"].get("dropout") is not None:
        over["dropout_rate"] = float(cfg["model"]["dropout"])
    return _models().build_unetr(cfg["model"]["preset"], out_channels=out_channels, **over)


def _load_base(model, path, log):
    try:
        rep = _models().load_pretrained(model, str(path))
    except FileNotFoundError:
        raise RunError(f"{path}: checkpoint file not found") from None
    except (ValueError, RuntimeError, KeyError) as e:
        raise RunError(f"{path}: checkpoint does not fit this model: {e}") from None
    log(f"loaded {path}: {rep}")
    return rep


def _count(params) -> int:
    return int(sum(p.numel() for p in params))


def _peft_options(cfg) -> dict:
    o = {"train_decoder": bool(cfg["peft"].get("train_decoder", True))}
    if cfg["peft"].get("rank") is not None:
        o["rank"] = int(cfg["peft"]["rank"])
    if cfg["peft"].get("alpha") is not None:
        o["alpha"] = float(cfg["peft"]["alpha"])
    return o


def _val_dice(model, items, patch, overlap, device, amp) -> float:
    model.eval()
    ds = []
    for it in items:
        y = sliding_logits(model, it["image"], patch, overlap, device, amp)
        pred = y.argmax(0) == 1
        gt = _plain(it["label"])[0] > 0.5
        inter = (pred & gt).sum().item()
        s = pred.sum().item() + gt.sum().item()
        ds.append(1.0 if s == 0 else 2.0 * inter / s)
    model.train()
    return float(np.mean(ds)) if ds else float("nan")


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
def _check_out(out: Path, overwrite: bool, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise RunError(f"{out}: output folder exists and is not empty (use --overwrite to "
                       f"replace its files, or --resume to continue the run in it)")


def train(cfg: dict, out, *, task: str = "finetune", overwrite: bool = False,
          resume: bool = False, log=print, progress: bool = True) -> dict:
    """Train one run into folder ``out``; returns the summary dict (also ``summary.json``).

    ``task``: ``"pretrain"`` (all parameters, no adapter, saves model_*.safetensors) or
    ``"finetune"`` (``cfg["method"]``: lorapt, lora, pissa, full, decoder).
    """
    from tqdm.auto import tqdm
    out = Path(out)
    t_start = time.time()
    tcfg = cfg["train"]
    method = "full" if task == "pretrain" else cfg["method"]
    if method not in METHODS:
        raise RunError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    for k in ("epochs", "batch_size"):
        if not isinstance(tcfg[k], int) or tcfg[k] < 1:
            raise RunError(f"train.{k}: expected a positive integer, got {tcfg[k]!r}")
    if not cfg["data"].get("path"):
        raise RunError("data.path (--data): a dataset folder is required")
    infer_opts = infer_options(cfg)
    if tcfg.get("optimizer", "adam") not in ("adam", "sgd"):
        raise RunError(f"train.optimizer: expected adam or sgd, got {tcfg['optimizer']!r}")
    if str(tcfg["loss"]) not in ("dice", "dicece", "dice-fg", "dicece-fg"):
        raise RunError(f"train.loss: expected dice, dicece, dice-fg or dicece-fg, got "
                       f"{tcfg['loss']!r}")
    device = _device(tcfg)
    dist = _Dist(device)
    if tcfg["batch_size"] % dist.world:
        raise RunError(f"batch size {tcfg['batch_size']} is not divisible by the number of "
                       f"processes {dist.world}")
    if tcfg.get("amp") and device.type != "cuda":
        log("note: --amp only applies on CUDA; training in float32 on the CPU")
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))
    pre = cfg.get("pretrained")
    if task == "finetune" and method != "full" and not pre:
        raise RunError(f"method {method}: --pretrained CKPT (the base model) is required")
    if pre and not Path(pre).is_file():
        raise RunError(f"{pre}: pretrained checkpoint not found")
    if dist.main:
        _check_out(out, overwrite, resume)
    ckpt_path = out / "checkpoint_last.pt"
    if resume and not ckpt_path.is_file():
        raise RunError(f"{ckpt_path}: nothing to resume (no checkpoint in the output folder)")
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
    # ---- model
    _seed_all(tcfg["seed"])
    model = _build(cfg)
    if pre:
        _load_base(model, pre, log if dist.main else (lambda *a: None))
    adapter = None
    if task == "finetune" and method != "full":
        adapter = _peft().adapt(model, method, **_peft_options(cfg))
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
    if tcfg.get("optimizer", "adam") == "adam":     # the paper's: Adam, amsgrad
        opt = torch.optim.Adam(params, lr=float(tcfg["lr"]),
                               weight_decay=float(tcfg["weight_decay"]), amsgrad=True)
    elif tcfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=float(tcfg["lr"]), momentum=0.9,
                              weight_decay=float(tcfg["weight_decay"]))
    else:
        raise RunError(f"train.optimizer: expected adam or sgd, got {tcfg['optimizer']!r}")
    power = float(tcfg["poly_power"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: max(0.0, 1.0 - it / total) ** power)
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

    history, avg_buf, best, start_epoch = [], [], -1.0, 0
    if resume:
        st = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if st.get("method") != method or st.get("preset") != cfg["model"]["preset"]:
            raise RunError(f"{ckpt_path}: checkpoint of method {st.get('method')!r} / preset "
                           f"{st.get('preset')!r}, cannot resume a {method!r} / "
                           f"{cfg['model']['preset']!r} run")
        load_trainable(st["trainable"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        history, avg_buf, best = st["history"], st["avg_buf"], st["best"]
        start_epoch = st["epoch"] + 1
        if dist.main:
            log(f"resuming from {ckpt_path} after epoch {start_epoch}")
    run_info = {"task": task, "method": method, "preset": cfg["model"]["preset"],
                "model": cfg["model"], "data": {k: dcfg[k] for k in
                                                 ("spacing", "roi", "patch", "foreground",
                                                  "modality")},
                "base_checkpoint": str(Path(pre).resolve()) if pre else None,
                "peft": _peft_options(cfg) if adapter is not None else None,
                "trainable_parameters": n_train, "model_parameters": n_total,
                "adapter_parameters": n_adapter,
                "sw_overlap": tcfg["sw_overlap"], "infer": infer_opts}
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

    def save_artefact(kind):
        path = out / f"{prefix}_{kind}.safetensors"
        if adapter is not None:
            adapter.save(str(path), base_checkpoint=str(Path(pre).resolve()))
        else:
            _models().save_checkpoint(model, str(path), meta={"preset": cfg["model"]["preset"]})
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
               "lr": float(opt.param_groups[0]["lr"]), "epoch_time_s": round(train_time, 2),
               "val_dice": float("nan")}
        if tcfg.get("average_last"):
            avg_buf.append(trainable_state())
            avg_buf = avg_buf[-int(tcfg["average_last"]):]
        if dist.main:
            do_val = nvalid and ((epoch + 1) % int(tcfg["val_every"]) == 0
                                 or epoch + 1 == tcfg["epochs"])
            if do_val:
                row["val_dice"] = _val_dice(model, va_items, patch, tcfg["sw_overlap"], device, amp)
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
            _atomic_bytes(out / "run.json", json.dumps(run_info, indent=1).encode())
            _atomic_torch_save({"epoch": epoch, "method": method,
                                "preset": cfg["model"]["preset"],
                                "trainable": trainable_state(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "history": history,
                                "avg_buf": avg_buf, "best": best}, ckpt_path)
        else:
            history.append(row)
        dist.barrier()
    summary = {}
    if dist.main:
        arts = run_info.setdefault("artefacts", {})
        if tcfg.get("average_last") and avg_buf:
            avg = {k: torch.stack([s[k].float() for s in avg_buf]).mean(0).to(avg_buf[0][k].dtype)
                   for k in avg_buf[0]}
            load_trainable(avg)
            arts["avg"] = save_artefact("avg")
            vd = _val_dice(model, va_items, patch, tcfg["sw_overlap"], device, amp) if nvalid \
                else float("nan")
            run_info["avg_val_dice"] = vd
            run_info["averaged_epochs"] = len(avg_buf)
            log(f"average of the last {len(avg_buf)} epochs: val Dice {vd:.4f}")
        arts.setdefault("last", f"{prefix}_last.safetensors")
        run_info["default_artefact"] = ("avg" if "avg" in arts else
                                        "best" if "best" in arts else "last")
        run_info["complete"] = True
        _atomic_bytes(out / "run.json", json.dumps(run_info, indent=1).encode())
        if writer is not None:
            writer.close()
        _plot_curves(history, out / "curves.png", log)
        summary = {"out": str(out), "method": method, "trainable_parameters": n_train,
                   "model_parameters": n_total, "adapter_parameters": n_adapter,
                   "best_val_dice": best if best >= 0 else None,
                   "final_val_dice": history[-1]["val_dice"] if history else None,
                   "wall_time_s": round(time.time() - t_start, 1),
                   "artefact": str(out / arts[run_info["default_artefact"]])}
        _atomic_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
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
    _atomic_bytes(path, buf.getvalue().encode())


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
    _atomic_bytes(path, buf.getvalue())
