"""The trainer's process group: DeepSpeed's, made once per process."""
from __future__ import annotations

import os


def init_distributed(device: str) -> None:
    """A one-process group unless a launcher set RANK/WORLD_SIZE; gloo on CPU, NCCL on GPU."""
    import deepspeed
    import torch.distributed as dist

    backend = "gloo" if device == "cpu" else "nccl"
    if not dist.is_initialized():   # (vLLM makes the group first in align-check's vLLM side)
        if "WORLD_SIZE" in os.environ:  # a launcher (torchrun, deepspeed) set the rendezvous
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
            return
        # One process: an in-process store, no rendezvous port. (A free port found by binding
        # port 0 could be taken by another process before the store bound it: EADDRINUSE at
        # start-up, seen once beside a starting rollout actor.) Not MASTER_PORT either: child
        # processes (Ray actors) would inherit it and collide on it.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # DeepSpeed joins a group it did not make; it only needs this process's local rank.
    if dist.get_world_size() == 1:
        os.environ.setdefault("LOCAL_RANK", "0")
    if device == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce op for CPU groups (2+ minutes on a
        # fresh machine); a one-process group never communicates, so mark it unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
