"""The segmentation application on top of :mod:`tsvd.peft` (installed as ``tsvd.peft.seg``):
datasets and the embedded default data, the training loop, inference, metrics, the demo and
the ``lorapt`` command line."""
