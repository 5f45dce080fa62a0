"""torchrun / DistributedDataParallel glue: PyTorch's own engine, not a home-made one.

    # one node, 4 GPUs (nccl), or 2 CPU processes (gloo)
    torchrun --nproc_per_node=4 -m noisystudent run CONFIG.yaml
    # two nodes, 8 GPUs each; run on every node with its --node_rank
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \
             --rdzv_endpoint=HOST0:29500 --rdzv_id=ns1 -m noisystudent run CONFIG.yaml

Without torchrun (WORLD_SIZE unset) everything here is a no-op and the process is rank 0 of 1.
Batch sizes in the config are PER RANK: the global batch is batch_size x world size.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Only rank 0 writes checkpoints, the manifest, metrics and summaries."""
    return rank() == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(device: torch.device, timeout_min: float = 30.0) -> torch.device:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and return this
    rank's device (cuda:LOCAL_RANK on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=timeout_min)}
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(backend, **kwargs)
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
