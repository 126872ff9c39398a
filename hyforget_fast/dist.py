"""Distributed setup shared by the collector and the hypernetwork trainer (torchrun, WORLD_SIZE > 1)."""
from __future__ import annotations

import os

import torch


def dist_setup(device=None) -> tuple[int, int, torch.device, bool]:
    """-> (rank, world, device, owned).

    WORLD_SIZE <= 1: (0, 1, device, False), nothing initialised. Under torchrun: a CUDA device
    becomes cuda:(LOCAL_RANK mod device count) and is made current; the process group is
    initialised unless it already is (nccl for CUDA, gloo on the CPU); owned = this call
    initialised it (the caller then destroys it when done). device None: cuda when available.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    import torch.distributed as dist
    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, owned


def barrier(world: int) -> None:
    """dist.barrier() when more than one process runs."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
