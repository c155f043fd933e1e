"""``full``: full fine-tuning. Nothing is installed; every parameter trains
(``train_decoder=False``: the transformer encoder only). All trained parameters are "other"
(one optimizer group at ``lr``)."""
from __future__ import annotations

from ..targets import in_prefixes, resolve
from . import register
from .base import Method


@register
class Full(Method):
    name = "full"
    summary = "full fine-tuning: every parameter trains (train_decoder=False: the transformer only)."
    options = {}

    @classmethod
    def plan(cls, model, cfg):
        if cfg["train_decoder"] and cfg["encoder"] is None:
            try:
                return resolve(model, groups=cfg["groups"], blocks=cfg["blocks"])
            except ValueError:
                return None            # everything trains: no need to know the encoder
        return super().plan(model, cfg)

    @classmethod
    def trainable_other(cls, model, cfg, plan):
        if cfg["train_decoder"]:
            return [n for n, _ in model.named_parameters()]
        return [n for n, _ in model.named_parameters() if in_prefixes(n, plan.encoder)]
