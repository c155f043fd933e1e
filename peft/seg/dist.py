"""Multi-process training under ``torchrun``: the process group, the model wrapper
(:class:`torch.nn.parallel.DistributedDataParallel`) and the sampler
(:class:`torch.utils.data.DistributedSampler`); a single process when ``WORLD_SIZE`` is unset
or 1, where every method is a no-op.

    torchrun --standalone --nproc_per_node 2 -m tsvd.peft finetune ...

The global batch (``--batch-size``) is split evenly over the processes; each process draws
its share of the same global sample list, and DDP averages the gradients, so N processes
train the same model as one process with the same global batch (to float rounding; tested
with two gloo processes on the CPU in ``tests/test_distributed.py``)."""
from __future__ import annotations

import os

import torch

__all__ = ["Distributed"]


class Distributed:
    """The run's process group: ``world`` processes, this one ``rank``; ``main`` writes files.

    Joins the group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) with NCCL on
    CUDA and gloo on the CPU, unless a group is already initialised (then it is used and left
    open); :meth:`close` ends a group this object started."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self._owned = False
        self._device = device              # NCCL reduces CUDA tensors only
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self._owned = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` in DDP (which broadcasts rank 0's weights now and averages the gradients
        of the trainable parameters in every backward); ``model`` itself in one process."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [device.index if device.index is not None else 0] if device.type == "cuda" \
            else None
        # MONAI's UNETR has trainable parameters its forward pass does not use (24 in the
        # transformer blocks), which DDP must be told about
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def sampler(self, dataset):
        """This process's share of ``dataset`` (in order; the dataset shuffles itself per
        epoch), or None in one process."""
        if not self.enabled:
            return None
        from torch.utils.data import DistributedSampler
        return DistributedSampler(dataset, num_replicas=self.world, rank=self.rank,
                                  shuffle=False, drop_last=False)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self._owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
