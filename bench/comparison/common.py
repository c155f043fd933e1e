"""Helpers shared by the comparison's plan, runner and report: the error type, atomic JSON /
CSV / text writes (through :func:`tsvd.models.atomic_write`), reading JSON, and the number
formats of the logs and tables."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

__all__ = ["CompareError", "atomic_write", "write_json", "read_json", "write_csv", "fmt_lr",
           "fmt_time", "fmt_pm", "fmt_mb", "fmt_num", "fmt_p", "n_used", "seed_stats"]


class CompareError(ValueError):
    """A bad argument or an inconsistent output folder; the message names it."""


def atomic_write(path, data) -> Path:
    """Write ``data`` (bytes or str) to ``path`` (creating its folder) through a temporary
    file renamed into place (:func:`tsvd.models.atomic_write`)."""
    from tsvd.models import atomic_write as _atomic
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else bytes(data)
    return _atomic(path, lambda tmp: Path(tmp).write_bytes(payload))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_json(path, obj) -> Path:
    """``obj`` as indented JSON (numpy scalars and paths converted), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=1, default=_json_default))


def read_json(path):
    return json.loads(Path(path).read_text())


def write_csv(path, rows: list[dict], fields: list[str]) -> Path:
    """``rows`` as CSV with columns ``fields`` (None written as an empty cell), atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return atomic_write(path, buf.getvalue())


def fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def fmt_time(s: float) -> str:
    s = max(0.0, float(s))
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def fmt_pm(s: dict, nd: int = 3) -> str:
    """``mean ± std`` of a :func:`seed_stats` dict; ``mean (n=1)`` without a std; n/a."""
    if s is None or not math.isfinite(s.get("mean", float("nan"))):
        return "n/a"
    if not math.isfinite(s.get("std", float("nan"))):
        return f"{s['mean']:.{nd}f} (n={s['n'] - s.get('n_nan', 0)})"
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}"


def fmt_mb(b) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:.2f} MB"


def fmt_num(n) -> str:
    return "n/a" if n is None else f"{int(n):,}"


def fmt_p(p) -> str:
    """A p-value with 2 significant digits (``< 0.001`` below that); n/a for None/NaN."""
    if p is None or not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 1e-3 else f"{p:.2g}"


def n_used(n_train: int, fraction: float) -> int:
    """Training subjects of a regime: round(fraction × n_train), at least 1."""
    return max(1, min(n_train, int(round(fraction * n_train))))


def seed_stats(values) -> dict:
    """Mean and sample std (ddof = 1; NaN for one value) over seeds of the finite values,
    the median, ``n`` (values given, None left out) and ``n_nan`` (non-finite values): the
    library's :func:`tsvd.peft.seg.metrics.summarize` with None dropped and ±inf as NaN."""
    from tsvd.peft.seg.metrics import summarize
    v = [float(x) for x in values if x is not None]
    return summarize([x if math.isfinite(x) else float("nan") for x in v])
