"""linear: the fixed-tile Triton GEMM against F.linear, and its batch invariance (bitwise: a
token's row does not depend on how many other rows share the call).

CPU: the kernel runs under the Triton interpreter in fp32 (IEEE dot; only the summation
order differs from the reference); bf16 on the GPU only (the interpreter's bf16 dot is broken).
Batch invariance is a GPU test: the interpreter's tl.dot is NumPy's BLAS, whose rounding
depends on the operand shapes, so it says nothing about the compiled kernel.
"""
from __future__ import annotations

import pytest
import torch

from ring_rl.kernels.matmul import linear, linear_ref
from tests.kernels.checks import assert_close, gpu

SHAPES = [(1, 40, 24), (70, 100, 130), (129, 64, 200)]  # (N tokens, K in, out): odd, not tile multiples


def rnd(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("n,k,m", SHAPES)
def test_matches_reference_fp32(triton_mode, n, k, m):
    x, w = rnd(n, k), rnd(m, k, seed=1)
    assert_close(linear(x, w), linear_ref(x, w), name="fp32")


def test_fp32_logits_of_half_inputs(triton_mode):
    x, w = rnd(33, 48, dtype=torch.float16), rnd(90, 48, dtype=torch.float16, seed=1)
    out = linear(x, w, out_dtype=torch.float32)
    assert_close(out, linear_ref(x, w, torch.float32), tol=1e-5, name="fp16 -> fp32")


def test_gradients(triton_mode):
    x, w = rnd(20, 30).requires_grad_(), rnd(40, 30, seed=1).requires_grad_()
    dy = rnd(20, 40, seed=2)
    (linear(x, w) * dy).sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (linear_ref(xr, wr) * dy).sum().backward()
    assert_close(x.grad, xr.grad, name="dx")
    assert_close(w.grad, wr.grad, name="dw")


def test_leading_dims_and_refusals(triton_mode):
    x, w = rnd(2, 3, 16), rnd(8, 16, seed=1)
    assert linear(x, w).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="weight"):
        linear(x, rnd(8, 15))
    with pytest.raises(ValueError, match="must match"):
        linear(x, w.double())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2 ** -7), (torch.float32, 1e-5)])
def test_gpu_matches_reference_and_is_batch_invariant(dtype, tol):
    x, w = rnd(4096, 2048, dtype=dtype, device="cuda"), rnd(3072, 2048, dtype=dtype, device="cuda", seed=1)
    full = linear(x, w)
    assert_close(full.float(), linear_ref(x.double(), w.double()).float(), tol=tol, name=str(dtype))
    for n in (1, 7, 64, 300, 1000):
        assert torch.equal(linear(x[:n], w), full[:n]), n
        assert torch.equal(linear(x[-n:], w), full[-n:]), n
    logits = linear(x[:100], w, out_dtype=torch.float32)
    assert torch.equal(linear(x[:3], w, out_dtype=torch.float32), logits[:3])
