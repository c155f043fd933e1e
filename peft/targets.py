"""Which linear layers an adapter acts on: groups of repeated layers across transformer blocks.

A model is adaptable when it has a ``nn.ModuleList`` of transformer blocks (the *blocks*)
that all contain the same ``nn.Linear`` layers. A **group** names, by their path inside
one block, the layers whose weights form the frontal slices of one stacked tensor; a
layer whose weight is several matrices fused along its rows (MONAI's ``qkv``) is split
into ``n`` row blocks. Groups are written ``{name: [[path, n], ...]}`` (``"path"`` alone
or ``"path:n"`` are accepted too). Slices are ordered block by block, and inside a block
in the order the group lists its layers, so that every layer's weight is a run of
consecutive slices: the stacked tensor's buffer is viewed by the layers without copies.

Default groups (MONAI's ``TransformerBlock``, as in UNETR and ViT)::

    {"attn":     [["attn.qkv", 3], ["attn.out_proj", 1]],   # q, k, v, out: 4 slices / block
     "mlp_up":   [["mlp.linear1", 1]],
     "mlp_down": [["mlp.linear2", 1]]}

For a timm-style ViT (``blocks.i.attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``)::

    groups={"attn": [["attn.qkv", 3], ["attn.proj", 1]],
            "mlp_up": [["mlp.fc1", 1]], "mlp_down": [["mlp.fc2", 1]]}, blocks="blocks"

``torch.nn.TransformerEncoder`` is not supported for the attention group:
``nn.MultiheadAttention`` reads its ``in_proj_weight``/``out_proj.weight`` tensors directly
instead of calling the layers (its ``linear1``/``linear2`` MLP layers do work).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["DEFAULT_GROUPS", "Target", "GroupPlan", "Plan", "normalize_groups", "find_blocks",
           "resolve"]

DEFAULT_GROUPS: dict[str, list] = {
    "attn": [["attn.qkv", 3], ["attn.out_proj", 1]],
    "mlp_up": [["mlp.linear1", 1]],
    "mlp_down": [["mlp.linear2", 1]],
}


@dataclass
class Target:
    """One linear layer: ``name`` (path in the model), ``n`` row blocks of shape ``(n1, n2)``
    starting at slice ``start`` of its group's stacked tensor."""
    name: str
    n: int
    n1: int
    n2: int
    start: int
    has_bias: bool


@dataclass
class GroupPlan:
    name: str
    targets: list = field(default_factory=list)

    @property
    def n3(self) -> int:
        return sum(t.n for t in self.targets)

    @property
    def slice_shapes(self) -> set:
        return {(t.n1, t.n2) for t in self.targets}


@dataclass
class Plan:
    blocks: str
    groups: dict          # normalised spec {name: [[path, n], ...]}
    encoder: list         # name prefixes of the transformer encoder
    group_plans: dict     # name -> GroupPlan

    def targets(self):
        for g in self.group_plans.values():
            yield from g.targets


def _parse_entry(gname, e):
    if isinstance(e, str):
        path, _, n = e.partition(":")
        n = int(n) if n else 1
    elif isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str):
        path, n = e
    else:
        raise ValueError(f"groups[{gname!r}]: expected entries 'path', 'path:n' or [path, n], "
                         f"got {e!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"groups[{gname!r}]: the number of row blocks of {path!r} must be a "
                         f"positive int, got {n!r}")
    return [path, n]


def normalize_groups(groups) -> dict:
    """``None`` (all default groups), a list of default group names, or a dict
    ``{name: [entries]}`` -> ``{name: [[path, n], ...]}``."""
    if groups is None:
        return {k: [list(e) for e in v] for k, v in DEFAULT_GROUPS.items()}
    if isinstance(groups, str):
        groups = [groups]
    if isinstance(groups, (list, tuple)):
        unknown = [g for g in groups if g not in DEFAULT_GROUPS]
        if unknown:
            raise ValueError(f"groups: unknown group name(s) {unknown}; the default groups are "
                             f"{list(DEFAULT_GROUPS)} (pass a dict to define others)")
        if not groups:
            raise ValueError("groups: expected at least one group, got an empty list")
        return {g: [list(e) for e in DEFAULT_GROUPS[g]] for g in groups}
    if isinstance(groups, dict):
        if not groups:
            raise ValueError("groups: expected at least one group, got an empty dict")
        out = {}
        for name, entries in groups.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"groups: group names must be identifiers, got {name!r}")
            if isinstance(entries, str) or not entries:
                entries = [entries] if isinstance(entries, str) else entries
            if not entries:
                raise ValueError(f"groups[{name!r}]: expected at least one layer")
            out[name] = [_parse_entry(name, e) for e in entries]
        return out
    raise TypeError(f"groups: expected None, a list of names or a dict, got {type(groups).__name__}")


def _linear_at(block: nn.Module, path: str):
    try:
        mod = block.get_submodule(path)
    except AttributeError:
        return None
    return mod if isinstance(mod, nn.Linear) else None


def find_blocks(model: nn.Module, groups: dict) -> str:
    """Path of the ``nn.ModuleList`` whose every element has every layer of ``groups``."""
    paths = [p for g in groups.values() for p, _ in g]
    cands = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and all(
                _linear_at(b, p) is not None for b in mod for p in paths):
            cands.append(name)
    if not cands:
        raise ValueError(
            "model: no matching layers: no nn.ModuleList of blocks in which every block has "
            f"the nn.Linear layers {paths}. Pass blocks='path.to.blocks' and groups={{...}} "
            "naming the layers inside one block (see tsvd.peft.targets).")
    if len(cands) > 1:
        raise ValueError(f"model: several block lists match the groups: {cands}; pass blocks=")
    return cands[0]


def resolve(model: nn.Module, *, groups=None, blocks: str | None = None, encoder=None,
            need_equal_shapes: bool = False) -> Plan:
    """Find the target layers without changing the model.

    Args:
        groups: see :func:`normalize_groups`.
        blocks: path of the ``nn.ModuleList`` of transformer blocks (auto-detected if None).
        encoder: name prefix(es) of the transformer encoder, whose other parameters stay
            frozen (default: the module holding ``blocks``, e.g. ``"vit"`` in UNETR; when the
            blocks are at the top level, the blocks themselves).
        need_equal_shapes: every slice of a group must have the same shape (LoRA-PT).
    """
    groups = normalize_groups(groups)
    if blocks is None:
        blocks = find_blocks(model, groups)
    if not isinstance(blocks, str):
        raise TypeError(f"blocks: expected a module path (str), got {type(blocks).__name__}")
    try:
        blist = model.get_submodule(blocks)
    except AttributeError:
        raise ValueError(f"blocks: the model has no submodule {blocks!r}") from None
    if not isinstance(blist, (nn.ModuleList, nn.Sequential)) or len(blist) == 0:
        raise ValueError(f"blocks: {blocks!r} is a {type(blist).__name__}, expected a non-empty "
                         "nn.ModuleList of transformer blocks")
    plans = {}
    for gname, entries in groups.items():
        gp = GroupPlan(gname)
        start = 0
        for i, block in enumerate(blist):
            for path, n in entries:
                full = f"{blocks}.{i}.{path}" if blocks else f"{i}.{path}"
                try:
                    mod = block.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"model: no matching layer: block {blocks}.{i} has no "
                                     f"submodule {path!r} (group {gname!r})") from None
                parent = block.get_submodule(path.rsplit(".", 1)[0]) if "." in path else block
                if isinstance(parent, nn.MultiheadAttention):
                    raise ValueError(f"model: {full} belongs to nn.MultiheadAttention, which reads "
                                     "its weights directly; it cannot be adapted")
                if not isinstance(mod, nn.Linear):
                    raise ValueError(f"model: {full} (group {gname!r}) is a "
                                     f"{type(mod).__name__}, expected nn.Linear")
                out_f, in_f = mod.weight.shape
                if out_f % n:
                    raise ValueError(f"groups[{gname!r}]: {full} has {out_f} output rows, not "
                                     f"divisible into {n} row blocks")
                gp.targets.append(Target(full, n, out_f // n, in_f, start, mod.bias is not None))
                start += n
        if need_equal_shapes and len(gp.slice_shapes) > 1:
            raise ValueError(f"groups[{gname!r}]: the slices of one stacked tensor must share a "
                             f"shape, got {sorted(gp.slice_shapes)}; split the group by shape")
        plans[gname] = gp
    seen = {}
    for gname, gp in plans.items():
        for t in gp.targets:
            if t.name in seen:
                raise ValueError(f"groups: layer {t.name} is in groups {seen[t.name]!r} and "
                                 f"{gname!r}")
            seen[t.name] = gname
    if encoder is None:
        parent = blocks.rsplit(".", 1)[0] if "." in blocks else ""
        encoder = [parent] if parent else [blocks]
    elif isinstance(encoder, str):
        encoder = [encoder]
    encoder = list(encoder)
    names = [n for n, _ in model.named_modules()]
    for e in encoder:
        if not isinstance(e, str) or e not in names:
            raise ValueError(f"encoder: the model has no submodule {e!r}")
    return Plan(blocks=blocks, groups=groups, encoder=encoder, group_plans=plans)


def in_prefixes(name: str, prefixes) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)
