"""Pipeline depth that fits the GPU: the MoE GEMM tile configs are tuned for bf16, and fp32
operands need twice the shared memory per stage (the fp32 backward asked an H100 for 288 KiB).
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def _smem_limit(device: int) -> int:
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 232448)


def fit_stages(bm: int, bn: int, bk: int, stages: int, dtype: torch.dtype, b_tiles: int = 1) -> int:
    """The configs are tuned for bf16; fp32 operands need twice the shared memory per
    pipeline stage (Triton keeps stages - 1 A and B tiles resident). Drop stages until the
    tiles fit the GPU's per-block limit; the tile shape, hence the reduction order, stays."""
    if not torch.cuda.is_available():  # the interpreter (CPU tests) has no shared memory limit
        return stages
    limit = _smem_limit(torch.cuda.current_device())
    while stages > 1 and (stages - 1) * (bm * bk + b_tiles * bk * bn) * dtype.itemsize > limit:
        stages -= 1
    return stages
