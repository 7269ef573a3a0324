"""Batch-invariant linear layers: y = x @ W.T with fixed tiles.

    y = linear(x, weight)                      # [N, out] in x.dtype (fp32 accumulation)
    y = linear(x, weight, out_dtype=float32)   # e.g. the fp32 logits of a bf16 lm_head

cuBLAS picks its GEMM algorithm (tile shape, split-K) from the problem size, so the same
token's row of x @ W.T can round differently when the batch has 37 tokens or 512. Exact mode
needs a token's result to be independent of the batch: the Triton kernel here uses one tile
configuration for every size (a function of nothing) and walks K in one fixed order, so row
i is the same sequence of operations whatever N is (`triton_matmul.py`). The backward is not
bound by that (gradients need not be bitwise) and uses torch's matmuls.

Dispatch as everywhere in `ring_rl.kernels`: Triton on CUDA tensors (or RING_RL_KERNELS=triton),
the reference (`F.linear`, then a cast) on CPU.
"""
from __future__ import annotations

import torch

from ring_rl.kernels.dispatch import use_triton
from ring_rl.kernels.matmul.reference import linear_ref

__all__ = ["linear", "linear_ref"]


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        from ring_rl.kernels.matmul.triton_matmul import matmul_nt

        ctx.save_for_backward(x, weight)
        return matmul_nt(x, weight, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (dy.to(w.dtype) @ w).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (dy.to(x.dtype).T @ x).to(w.dtype)
        return dx, dw, None


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weight[out, K].T → [..., out] in out_dtype (default x.dtype). x and weight
    share a dtype (bf16, fp16 or fp32); accumulation is fp32, fp32 inputs never use TF32."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} must be "
                         f"[..., K] and [out, K]")
    if x.dtype != weight.dtype:
        raise ValueError(f"linear: x is {x.dtype} and weight {weight.dtype}; they must match")
    out_dtype = out_dtype or x.dtype
    if not use_triton(x, weight):
        return linear_ref(x, weight, out_dtype)
    lead = x.shape[:-1]
    y = _Linear.apply(x.reshape(-1, x.shape[-1]), weight, out_dtype)
    return y.reshape(*lead, weight.shape[0])
