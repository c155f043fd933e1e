"""The configuration of a run, declared once: typed dataclasses whose fields carry their
default, help text, valid range and command-line flag.

    RunConfig
      data:    DataConfig      dataset folder and layout, preprocessing, augmentation
      model:   ModelConfig     UNETR preset, dropout, the pre-trained base checkpoint
      adapter: AdapterConfig   fine-tuning method, rank, learning rate of the adapter
      train:   TrainConfig     optimisation, schedule, validation, averaging, device
      infer:   InferConfig     sliding window, test-time augmentation, post-processing

Everything else is generated from these declarations: the ``lorapt`` flags
(:func:`add_flags` / :func:`apply_flags`), the YAML file a run writes (``config.yaml``,
:meth:`RunConfig.to_dict`) and reads back (:meth:`RunConfig.from_dict`; unknown keys and wrong
types are errors naming the key), and the checks of every value (:meth:`RunConfig.validate`:
a value outside its declared range is a :class:`ConfigError` naming the flag, the key and the
accepted range, raised before any work starts).

A field's ``metadata``:

``help``      one line for ``--help``
``flag``      the flag name without ``--`` (default: the field name with ``-``)
``choices``   accepted values (a callable returning them is called when needed)
``lo``/``hi`` numeric range, inclusive unless ``lo_open``/``hi_open``
``commands``  the subcommands that take the flag (default: pretrain and finetune)
``resume``    ``"may-change"``: the value may differ when a run is resumed (applied and
              recorded as a resume event); every other field is part of the run's identity
``items``     for lists: the accepted range / choices of each item
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "AdapterConfig", "TrainConfig",
           "InferConfig", "RunConfig", "SECTIONS", "add_flags", "apply_flags", "fields_of",
           "load_yaml", "save_yaml", "TRAIN_COMMANDS"]

TRAIN_COMMANDS = ("pretrain", "finetune")
_ALL = ("pretrain", "finetune", "evaluate", "predict")


class ConfigError(ValueError):
    """A bad configuration value; the message names the flag / key and the accepted values."""


def opt(default, help, *, flag=None, choices=None, lo=None, hi=None, lo_open=False,
        hi_open=False, commands=TRAIN_COMMANDS, resume=None, items=None):
    """A dataclass field with its declaration (see the module docstring)."""
    meta = {"help": help, "flag": flag, "choices": choices, "lo": lo, "hi": hi,
            "lo_open": lo_open, "hi_open": hi_open, "commands": tuple(commands),
            "resume": resume, "items": items}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _method_choices():
    from tsvd.peft import METHODS
    return tuple(METHODS)


def _preset_choices():
    from tsvd.models import PRESETS
    return tuple(PRESETS)


@dataclass
class DataConfig:
    path: str | None = opt(None, "dataset folder (layouts: eadc, msd, brats, nifti)", flag="data",
                           commands=("pretrain", "finetune", "evaluate"))
    format: str = opt("auto", "dataset layout", choices=("auto", "eadc", "msd", "brats", "nifti"),
                      commands=("pretrain", "finetune", "evaluate"))
    modality: str = opt("t1", "BraTS channel", choices=("t1", "t1ce", "t2", "flair"),
                        commands=("pretrain", "finetune", "evaluate"))
    spacing: float = opt(1.5, "voxel size in mm that the network sees", lo=0.1, hi=10.0,
                         commands=_ALL)
    roi: typing.Any = opt(None, "region of interest: none, mni-hippocampus (MNI-registered "
                          "data) or X,Y,Z,SIZE (world mm centre, size in voxels)", commands=_ALL)
    patch: int | None = opt(None, "training crop / sliding-window size in voxels (default: the "
                            "preset's input size)", lo=16, hi=512, commands=_ALL)
    crop_margin: int = opt(16, "with a region of interest: training crops come from it enlarged "
                           "by this many voxels per axis, so that they move by up to half of it "
                           "(validation and inference use the region itself)", lo=0, hi=256)
    flip_axes: list[int] = opt([0], "random flip axes during training (after RAS "
                               "reorientation: 0 = left-right, which keeps the anatomy "
                               "possible), e.g. 0 or 0,1,2 or none",
                               items={"choices": (0, 1, 2)})
    pos_fraction: float = opt(0.67, "fraction of training crops centred on the foreground "
                              "(without an ROI)", lo=0.0, hi=1.0)
    foreground: list[int] | None = opt(None, "label values counted as foreground (default: any "
                                       "nonzero)", commands=_ALL, items={"lo": 1})
    valid_fraction: float = opt(0.2, "fraction of the training cases held out for validation "
                                "when the dataset has no validation list", lo=0.0, hi=1.0,
                                lo_open=True, hi_open=True,
                                commands=("pretrain", "finetune", "evaluate"))
    max_train: int | None = opt(None, "use only the first N training cases", lo=1)
    max_valid: int | None = opt(None, "use only the first N validation cases", lo=1)


@dataclass
class ModelConfig:
    preset: str = opt("cpu", "UNETR preset: paper (128^3, hidden 768), cpu (64^3, hidden 192), "
                      "tiny (tests)", choices=_preset_choices, commands=_ALL)
    dropout: float | None = opt(None, "override the preset's dropout rate", lo=0.0, hi=1.0,
                                hi_open=True)
    pretrained: str | None = opt(None, "pre-trained base checkpoint (.pt/.pth/.safetensors; "
                                 "pretrain: start from it)")


@dataclass
class AdapterConfig:
    method: str = opt("lorapt", "fine-tuning method", choices=_method_choices,
                      commands=("finetune",))
    rank: int | None = opt(None, "adapter rank (lorapt, lora, pissa, dora; default 8)", lo=1,
                           commands=("finetune",))
    alpha: float | None = opt(None, "LoRA/DoRA scaling numerator (default: rank)", lo=0.0,
                              lo_open=True, commands=("finetune",))
    train_decoder: bool = opt(True, "also train the parts outside the transformer (UNETR's CNN "
                              "encoder/decoder and head), as the paper does",
                              commands=("finetune",))
    adapter_lr: float | None = opt(None, "learning rate of the adapter tensors (default: derived "
                                   "from --lr by the method, see tsvd.peft)", lo=0.0,
                                   lo_open=True, commands=("finetune",))


@dataclass
class TrainConfig:
    epochs: int = opt(10, "training epochs (on --resume: may be raised to extend the run)",
                      lo=1, resume="may-change")
    batch_size: int = opt(2, "global batch size", lo=1)
    samples_per_epoch: int | None = opt(None, "random crops per epoch (default: number of "
                                        "training cases)", lo=1)
    lr: float = opt(1e-3, "learning rate of the trained non-adapter parameters (and of the "
                    "adapter unless --adapter-lr)", lo=0.0, lo_open=True, hi=10.0)
    weight_decay: float = opt(1e-5, "weight decay", lo=0.0, hi=1.0)
    optimizer: str = opt("adam", "adam (Adam with amsgrad, as the paper) or sgd (momentum 0.9)",
                         choices=("adam", "sgd"))
    poly_power: float = opt(0.9, "power of the polynomial learning-rate decay", lo=0.0, hi=10.0)
    loss: str = opt("dicece", "loss: dice, dicece, or their -fg forms (Dice term without the "
                    "background)", choices=("dice", "dicece", "dice-fg", "dicece-fg"))
    val_every: int = opt(1, "validate every N epochs", lo=1, resume="may-change")
    average_last: int = opt(0, "average the model weights of the last N epochs at the end "
                            "(paper: 4; 0 = off)", lo=0)
    amp: bool = opt(False, "mixed precision (CUDA only)", commands=_ALL)
    seed: int = opt(0, "random seed", lo=0, hi=2 ** 31 - 1, commands=_ALL)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N", commands=_ALL, resume="may-change")
    threads: int | None = opt(None, "torch CPU threads", lo=1, hi=1024, commands=_ALL,
                              resume="may-change")
    workers: int = opt(0, "DataLoader worker processes making the random training crops (0: "
                       "in the training process; the crops are the same either way)", lo=0,
                       hi=64, resume="may-change")


@dataclass
class InferConfig:
    sw_overlap: float = opt(0.25, "sliding-window overlap", flag="overlap", lo=0.0, hi=1.0,
                            hi_open=True, commands=_ALL)
    tta_flip: list[int] | None = opt(None, "test-time augmentation: also predict the image "
                                     "mirrored along these axes (e.g. 0) and average; none = "
                                     "off (evaluate/predict default: the trained run's "
                                     "setting)", commands=_ALL, items={"choices": (0, 1, 2)})
    keep_components: int | None = opt(None, "keep only the N largest connected foreground "
                                      "components (2: left + right hippocampus; 0 keeps all; "
                                      "evaluate/predict default: the trained run's setting)",
                                      lo=0, commands=_ALL)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "adapter": AdapterConfig,
            "train": TrainConfig, "infer": InferConfig}


def fields_of(cls) -> list:
    """``[(field, resolved type)]`` of a section dataclass."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _flag(section: str, f) -> str:
    return f.metadata.get("flag") or f.name.replace("_", "-")


# ------------------------------------------------------------------------------------------
# values: types and ranges
# ------------------------------------------------------------------------------------------
def _where(section, f) -> str:
    return f"--{_flag(section, f)} ({section}.{f.name})"


def _choices(meta):
    c = meta.get("choices")
    return tuple(c()) if callable(c) else c


def _range_text(meta) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    parts = []
    if lo is not None:
        parts.append(f"{'>' if meta.get('lo_open') else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if meta.get('hi_open') else '<='} {hi:g}")
    return " and ".join(parts)


def _check_number(value, meta, where, kind):
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    bad = (lo is not None and (value < lo or (meta.get("lo_open") and value == lo))) or \
          (hi is not None and (value > hi or (meta.get("hi_open") and value == hi)))
    if bad:
        raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'} "
                          f"{_range_text(meta)}, got {value!r}")
    return float(value) if kind is float else int(value)


def _check_value(value, tp, meta, where):
    """``value`` checked against type ``tp`` and the field's range / choices; returns it
    normalised (ints as float where a float is declared, tuples as lists)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], meta, where)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = args
        items = meta.get("items") or {}
        out = [_check_value(v, item_tp, {**items, "choices": items.get("choices")},
                            f"{where}[{i}]") for i, v in enumerate(value)]
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        value = _check_number(value, meta, where, tp)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    ch = _choices(meta)
    if ch is not None and value not in ch:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, ch))}, got {value!r}")
    return value


def parse_roi(value):
    """ROI spec: None, ``"mni-hippocampus"``, or ``{"centre_mm": [x, y, z], "size": [a, b, c]}``
    (from the flag form ``X,Y,Z,SIZE``)."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
        return None
    if isinstance(value, str):
        if value.lower() == "mni-hippocampus":
            return "mni-hippocampus"
        parts = value.split(",")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != 4 or not all(math.isfinite(v) for v in vals) or vals[3] < 1 \
                or vals[3] != int(vals[3]):
            raise ConfigError(f"--roi (data.roi): expected none, mni-hippocampus or X,Y,Z,SIZE "
                              f"(SIZE a positive integer), got {value!r}")
        return {"centre_mm": vals[:3], "size": [int(vals[3])] * 3}
    if isinstance(value, dict) and set(value) == {"centre_mm", "size"}:
        c, s = value["centre_mm"], value["size"]
        if (isinstance(c, (list, tuple)) and len(c) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in c) and isinstance(s, (list, tuple)) and len(s) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in s)):
            return {"centre_mm": [float(v) for v in c], "size": [int(v) for v in s]}
    raise ConfigError(f"--roi (data.roi): expected none, mni-hippocampus or a mapping "
                      f"{{centre_mm: [x, y, z], size: [a, b, c]}}, got {value!r}")


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """Every setting of a run (see the module docstring); ``cfg.train.lr`` etc."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (the layout of ``config.yaml``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None, *, where: str = "config",
                  base: "RunConfig | None" = None) -> "RunConfig":
        """A validated config from a nested mapping (``config.yaml``'s layout) laid over
        ``base`` (default: the defaults). Unknown sections or keys and wrong types are
        :class:`ConfigError` naming the key."""
        out = dataclasses.replace(base) if base is not None else cls()
        out = cls(**{s: dataclasses.replace(getattr(out, s)) for s in SECTIONS})
        if d is None:
            return out.validate()
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of sections "
                              f"({', '.join(SECTIONS)}), got {type(d).__name__}")
        for s, v in d.items():
            if s not in SECTIONS:
                raise ConfigError(f"{where}: unknown section {s!r} (known: "
                                  f"{', '.join(SECTIONS)})")
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"{where}.{s}: expected a mapping, got {v!r}")
            sec = getattr(out, s)
            names = {f.name for f in dataclasses.fields(sec)}
            for k, val in v.items():
                if k not in names:
                    raise ConfigError(f"{where}.{s}: unknown key {k!r} (known: "
                                      f"{', '.join(sorted(names))})")
                setattr(sec, k, val)
        return out.validate()

    def validate(self) -> "RunConfig":
        """Check every value against its declared type and range (normalising ints given for
        floats and tuples given for lists); returns self. Raises :class:`ConfigError`."""
        for s, cls in SECTIONS.items():
            sec = getattr(self, s)
            if not isinstance(sec, cls):
                raise ConfigError(f"config.{s}: expected a {cls.__name__}, got "
                                  f"{type(sec).__name__}")
            for f, tp in fields_of(cls):
                v = getattr(sec, f.name)
                if s == "data" and f.name == "roi":
                    v = parse_roi(v)
                else:
                    v = _check_value(v, tp, f.metadata, _where(s, f))
                setattr(sec, f.name, v)
        return self

    def copy(self) -> "RunConfig":
        return RunConfig.from_dict(self.to_dict())

    def identity(self) -> dict:
        """The settings that define what a run trains (every field not marked
        ``resume="may-change"``), as a nested dict: resuming with a different identity is
        refused."""
        out = {}
        for s, cls in SECTIONS.items():
            sec = getattr(self, s)
            out[s] = {f.name: getattr(sec, f.name) for f in dataclasses.fields(cls)
                      if f.metadata.get("resume") != "may-change" and s != "infer"}
        return out


# ------------------------------------------------------------------------------------------
# YAML
# ------------------------------------------------------------------------------------------
def load_yaml(path, *, base: RunConfig | None = None) -> RunConfig:
    """A :class:`RunConfig` from a YAML file (``config.yaml``'s layout) over ``base``."""
    import yaml
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {p}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {p} is not valid YAML ({e})") from None
    return RunConfig.from_dict(d, where=str(p), base=base)


def save_yaml(cfg: RunConfig, path) -> Path:
    """Write ``cfg`` as YAML (atomic); :func:`load_yaml` reads it back to an equal config."""
    import yaml

    from tsvd.models import atomic_write
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ------------------------------------------------------------------------------------------
# command-line flags
# ------------------------------------------------------------------------------------------
def _axes(text):
    if text.lower() in ("none", ""):
        return []
    try:
        return [int(a) for a in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or none, got "
                                         f"{text!r}") from None


def _ints(text):
    try:
        return [int(a) for a in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got "
                                         f"{text!r}") from None


def _default_text(f) -> str:
    d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if d is None:
        return ""
    if isinstance(d, list):
        d = ",".join(map(str, d)) or "none"
    return f" (default {d})"


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Add one flag per config field that ``command`` takes, grouped by section. Every flag
    defaults to None (= not given), so :func:`apply_flags` only overrides what was typed."""
    for s, cls in SECTIONS.items():
        group = None
        for f, tp in fields_of(cls):
            if command not in f.metadata["commands"]:
                continue
            if group is None:
                group = parser.add_argument_group(f"{s} settings")
            name = "--" + _flag(s, f)
            meta = f.metadata
            helptext = meta["help"] + _default_text(f)
            dest = f"cfg__{s}__{f.name}"
            base = tp
            if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType",
                                                                  None)):
                base = [a for a in typing.get_args(tp) if a is not type(None)][0]
            if base is bool:
                group.add_argument(name, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=None, help=helptext)
            elif typing.get_origin(base) is list:
                conv = _axes if (meta.get("items") or {}).get("choices") else _ints
                group.add_argument(name, dest=dest, type=conv, default=None, metavar="A,B,..",
                                   help=helptext)
            elif s == "data" and f.name == "roi":
                group.add_argument(name, dest=dest, type=str, default=None, metavar="ROI",
                                   help=helptext)
            else:
                kw = {}
                ch = _choices(meta)
                if ch is not None:
                    kw["choices"] = ch
                else:
                    kw["metavar"] = f.name.upper()
                group.add_argument(name, dest=dest, type=base if base in (int, float, str)
                                   else str, default=None, help=helptext, **kw)


def apply_flags(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """``cfg`` with the flags given on the command line laid over it (validated)."""
    over: dict = {}
    for k, v in vars(args).items():
        if k.startswith("cfg__") and v is not None:
            _, s, name = k.split("__", 2)
            over.setdefault(s, {})[name] = v
    return RunConfig.from_dict(over, where="flags", base=cfg)


def given_flags(args: argparse.Namespace) -> dict:
    """``{"section.key": value}`` of the config flags given on the command line."""
    return {k[5:].replace("__", "."): v for k, v in vars(args).items()
            if k.startswith("cfg__") and v is not None}
