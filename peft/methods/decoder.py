"""``decoder``: the transformer encoder frozen, everything else (UNETR's CNN encoder/decoder and
head) trains: what the published LoRA-PT script really does. Nothing is installed."""
from __future__ import annotations

from . import register
from .base import Method


@register
class Decoder(Method):
    name = "decoder"
    summary = ("decoder only: the transformer encoder frozen, the rest (UNETR's CNN "
               "encoder/decoder and head) trains.")
    options = {}

    @classmethod
    def validate(cls, cfg):
        if not cfg["train_decoder"]:
            raise ValueError("train_decoder: method 'decoder' trains only the decoder; "
                             "train_decoder=False would leave nothing to train")
