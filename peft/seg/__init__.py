"""The segmentation application on top of :mod:`tsvd.peft` (installed as ``tsvd.peft.seg``).

Modules: :mod:`~tsvd.peft.seg.config` (the typed run configuration), ``data`` / ``embedded``
(datasets and the embedded default data), ``train`` (the training loop), ``dist``
(``torchrun`` data parallelism), ``infer`` (sliding-window prediction, evaluation, NIfTI
output on the input grid), ``metrics`` (Dice, HD95, summaries), ``demo`` (``lorapt demo``)
and ``cli`` (the ``lorapt`` command line).
"""
