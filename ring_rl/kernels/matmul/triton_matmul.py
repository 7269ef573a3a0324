"""C = A @ B.T with one fixed tile configuration: batch-invariant rows.

Row i of C is computed by the programs of its BLOCK_M row band, each reducing K in BLOCK_K
steps from 0 upwards with fp32 accumulation (tensor-core dots for bf16/fp16, IEEE FMA for
fp32: never TF32). Nothing in the launch depends on M (the token count): the tiles, warps
and stages below are constants, there is no split-K and no autotuning, so a token's output
is the same bits whether it shares the batch with 0 or 4095 others. The tiles suit the H100
for both decode (M ~ 64: weight-bandwidth bound, each weight tile read once per row band)
and prefill (large M); benchmarks/matmul.py times them against cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 64, 128, 64, 4, 4
GROUP_M = 8  # row bands that share a column sweep (L2 reuse of B); order only, not maths


@triton.jit
def _matmul_nt_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                      IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * stride_bn + rk[:, None].to(tl.int64) * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = rk < K - k0
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & km[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=km[:, None] & (rn[None, :] < N), other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :].to(tl.int64) * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul_nt(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] @ b[N, K].T → [M, N] in out_dtype."""
    if a.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"linear: dtype {a.dtype} is not supported by the Triton path")
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    _matmul_nt_kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                            c.stride(0), c.stride(1), IEEE=a.dtype == torch.float32,
                            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                            num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=True)
    return c
