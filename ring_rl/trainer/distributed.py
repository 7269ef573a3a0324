"""The trainer's process group: DeepSpeed's, made once per process."""
from __future__ import annotations

import os
import socket


def init_distributed(device: str) -> None:
    """A one-process group unless a launcher set RANK/WORLD_SIZE; gloo on CPU, NCCL on GPU."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        # Someone in this process made the group already (vLLM does, for align-check's vLLM
        # side): DeepSpeed joins it, and only needs to be told this process's local rank.
        if dist.get_world_size() == 1:
            os.environ.setdefault("LOCAL_RANK", "0")
        if device == "cpu":
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        return

    backend = "gloo" if device == "cpu" else "nccl"
    if "WORLD_SIZE" in os.environ:  # a launcher (torchrun, deepspeed) set the rendezvous
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        return
    # One process: a private rendezvous on a free port, passed explicitly rather than through
    # MASTER_PORT, which child processes (Ray actors) would inherit and collide on.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("LOCAL_RANK", "0")
    if device == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce op for CPU groups (2+ minutes on a
        # fresh machine); a one-process group never communicates, so mark it unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
