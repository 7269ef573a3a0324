"""Which implementation an op runs: Triton kernels or the plain-PyTorch reference.

Rule (the same for every op in `ring_rl.kernels`):
- `RING_RL_KERNELS=triton` forces Triton (with `TRITON_INTERPRET=1` the kernels then run
  on CPU tensors: that is how CI tests them);
- `RING_RL_KERNELS=reference` forces the reference;
- otherwise Triton on CUDA tensors, the reference on CPU tensors.
"""
from __future__ import annotations

import os

import torch

_CHOICES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    mode = os.environ.get("RING_RL_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _CHOICES:
        raise ValueError(f"RING_RL_KERNELS={mode!r}: expected one of {', '.join(_CHOICES)}")
    return mode


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should run its Triton kernel for these inputs."""
    mode = kernel_mode()
    if mode != "auto":
        return mode == "triton"
    return any(t is not None and t.is_cuda for t in tensors)
