"""rms_norm / group_rms_norm_gate: Triton kernels against the plain-PyTorch references.

CPU: the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below when no
GPU is present) in fp32, where they must match the reference to fp32 rounding
(max error <= 1e-5 of the largest reference value: a few hundred fp32 ulps of headroom for
the different reduction order over up to 1000 rows). GPU tests (marked gpu) repeat at real
shapes in bf16 against the fp32 reference.
"""
from __future__ import annotations

import pytest
import torch

from ring_rl.kernels.rms_norm import (
    group_rms_norm_gate,
    group_rms_norm_gate_ref,
    rms_norm,
    rms_norm_ref,
)
from tests.kernels.checks import assert_close, gpu


def make_inputs(shape, with_residual, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = shape[-1]
    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)
    x = rnd(*shape, scale=3.0).requires_grad_()
    w = (1.0 + 0.5 * rnd(n)).requires_grad_()
    r = rnd(*shape).requires_grad_() if with_residual else None
    dy, dh = rnd(*shape), rnd(*shape)
    return x, w, r, dy, dh


def run_rms_norm(fn, x, w, r, dy, dh, use_dh=True):
    """Forward then backward with upstream gradients dy (for y) and dh (for h)."""
    leaves = [t for t in (x, r, w) if t is not None]
    if r is None:
        y = fn(x, w, 1e-6)
        loss, outs = (y.float() * dy.float()).sum(), (y,)
    else:
        y, h = fn(x, w, 1e-6, residual=r)
        loss = (y.float() * dy.float()).sum()
        if use_dh:
            loss = loss + (h.float() * dh.float()).sum()
        outs = (y, h)
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs] + list(grads)


# ---------------------------------------------------------------- CPU (interpreter), fp32
@pytest.mark.parametrize("shape", [(1, 96), (1000, 96), (7, 200), (250, 4, 64), (3, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(triton_mode, shape, with_residual):
    x, w, r, dy, dh = make_inputs(shape, with_residual)
    got = run_rms_norm(rms_norm, x, w, r, dy, dh)
    want = run_rms_norm(rms_norm_ref, x, w, r, dy, dh)
    names = ["y", "h", "dx", "dr", "dw"] if with_residual else ["y", "dx", "dw"]
    for name, a, b in zip(names, got, want):
        assert_close(a, b, name=f"{name} {shape}")


def test_rms_norm_residual_without_h_gradient(triton_mode):
    """h unused downstream: its gradient is None, and dx = dr = the norm's gradient only."""
    x, w, r, dy, dh = make_inputs((33, 200), True)
    got = run_rms_norm(rms_norm, x, w, r, dy, dh, use_dh=False)
    want = run_rms_norm(rms_norm_ref, x, w, r, dy, dh, use_dh=False)
    for name, a, b in zip(["y", "h", "dx", "dr", "dw"], got, want):
        assert_close(a, b, name=name)


def test_rms_norm_cpu_default_is_reference(monkeypatch):
    monkeypatch.delenv("RING_RL_KERNELS", raising=False)
    x, w, _, _, _ = make_inputs((5, 96), False)
    assert torch.equal(rms_norm(x, w), rms_norm_ref(x, w))


def make_group_inputs(rows, features, gate_dtype=torch.float32, device="cpu", x_dtype=None,
                      seed=1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    def rnd(*s, scale=1.0, dtype=torch.float32):
        return (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)
    x = rnd(rows, features, scale=2.0, dtype=x_dtype or torch.float32).requires_grad_()
    gate = rnd(rows, features, scale=2.0, dtype=gate_dtype).requires_grad_()
    w = (1.0 + 0.5 * rnd(features, dtype=gate_dtype)).requires_grad_()
    do = rnd(rows, features, dtype=gate_dtype)
    return x, gate, w, do


def run_group(fn, x, gate, w, do, num_groups):
    out = fn(x, gate, w, num_groups, 1e-6)
    grads = torch.autograd.grad((out.float() * do.float()).sum(), (x, gate, w))
    return [out.detach(), *grads]


@pytest.mark.parametrize("features,num_groups,rows",
                         [(256, 1, 5), (256, 4, 37), (200, 4, 9), (96, 3, 1), (512, 8, 300)])
def test_group_rms_norm_gate_matches_reference(triton_mode, features, num_groups, rows):
    x, gate, w, do = make_group_inputs(rows, features)
    got = run_group(group_rms_norm_gate, x, gate, w, do, num_groups)
    want = run_group(group_rms_norm_gate_ref, x, gate, w, do, num_groups)
    for name, a, b in zip(["out", "dx", "dgate", "dw"], got, want):
        assert_close(a, b, name=f"{name} F={features} G={num_groups}")


def test_group_rms_norm_gate_mixed_dtypes(triton_mode):
    """x fp32, gate and weight fp16 (exact in the interpreter): out/dgate/dw come back in fp16."""
    x, gate, w, do = make_group_inputs(20, 128, gate_dtype=torch.float16)
    got = run_group(group_rms_norm_gate, x, gate, w, do, 4)
    want = run_group(group_rms_norm_gate_ref, x, gate, w, do, 4)
    # fp16 keeps 11 significant bits: one rounding of the output is <= 2^-11 relative.
    for name, a, b in zip(["out", "dx", "dgate", "dw"], got, want):
        assert_close(a, b, tol=2.0**-10, name=name)


@pytest.mark.parametrize("fn", [group_rms_norm_gate, group_rms_norm_gate_ref])
def test_group_rms_norm_gate_refuses_bad_groups(fn):
    x = torch.randn(4, 250)
    with pytest.raises(ValueError, match="num_groups=4 must be a positive divisor"):
        fn(x, x, torch.ones(250), 4)


def batch_invariance_check(device, dtype, n, group=None):
    """A row's outputs and input gradients are bitwise the same alone or among 1000 rows."""
    row = 517  # not a multiple of any tile height
    if group is None:
        x, w, r, dy, dh = make_inputs((1000, n), True, dtype=dtype, device=device)
        full = run_rms_norm(rms_norm, x, w, r, dy, dh)[:4]  # y, h, dx, dr
        sl = [t.detach()[row:row + 1].clone().requires_grad_() for t in (x, r)]
        alone = run_rms_norm(rms_norm, sl[0], w, sl[1], dy[row:row + 1], dh[row:row + 1])[:4]
    else:
        x, gate, w, do = make_group_inputs(1000, n, gate_dtype=dtype, device=device)
        full = run_group(group_rms_norm_gate, x, gate, w, do, group)[:3]  # out, dx, dgate
        sl = [t.detach()[row:row + 1].clone().requires_grad_() for t in (x, gate)]
        alone = run_group(group_rms_norm_gate, sl[0], sl[1], w, do[row:row + 1], group)[:3]
    for a, b in zip(full, alone):
        assert torch.equal(a[row:row + 1], b)


def determinism_check(device, dtype, shape, group=None):
    """Two identical runs give bitwise identical outputs and gradients (weight included)."""
    if group is None:
        x, w, r, dy, dh = make_inputs(shape, True, dtype=dtype, device=device)
        runs = [run_rms_norm(rms_norm, x, w, r, dy, dh) for _ in range(2)]
    else:
        x, gate, w, do = make_group_inputs(shape[0], shape[1], gate_dtype=dtype, device=device)
        runs = [run_group(group_rms_norm_gate, x, gate, w, do, group) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n,group", [(96, None), (200, 4)])
def test_batch_invariance(triton_mode, n, group):
    batch_invariance_check("cpu", torch.float32, n, group)


@pytest.mark.parametrize("group", [None, 4])
def test_determinism(triton_mode, group):
    determinism_check("cpu", torch.float32, (300, 256), group)


# ---------------------------------------------------------------- GPU, bf16, real shapes
# The reference runs in fp32 on the same bf16 inputs upcast, so the only differences are
# the final bf16 rounding (<= 2^-9 relative, half a bf16 ulp) and fp32 reduction order:
# each element must lie within 2^-8 (one bf16 ulp) of the fp32 value, plus an absolute
# 1e-3 of the tensor's largest value for elements near zero after cancellation.
BF16_RTOL = 2.0**-8


def assert_bf16_close(out, ref32, name):
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    out, ref32 = out.float(), ref32.float()
    err = (out - ref32).abs()
    bound = BF16_RTOL * ref32.abs() + 1e-3 * ref32.abs().max()
    assert (err <= bound).all(), f"{name}: worst excess {(err - bound).max().item():.3g}"


def fp32_copy(t):
    return None if t is None else t.detach().float().requires_grad_(t.requires_grad)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 2048), (1024, 4096), (2048, 16, 128), (2048, 32, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gpu_rms_norm_bf16(shape, with_residual):
    x, w, r, dy, dh = make_inputs(shape, with_residual, dtype=torch.bfloat16, device="cuda")
    got = run_rms_norm(rms_norm, x, w, r, dy, dh)
    if with_residual:
        assert torch.equal(got[1], x.detach() + r.detach()), "h must equal bf16 x + r exactly"
        # The fp32 reference starts from the same bf16 h (a leaf), so only rounding differs.
        h32 = got[1].float().requires_grad_()
        want = run_rms_norm(rms_norm_ref, h32, fp32_copy(w), None, dy.float(), None)
        want_dx = want[1] + dh.float()  # dh reaches h (hence x and r) directly
        pairs = [("y", got[0], want[0]), ("dx", got[2], want_dx), ("dr", got[3], want_dx),
                 ("dw", got[4], want[2])]
    else:
        want = run_rms_norm(rms_norm_ref, fp32_copy(x), fp32_copy(w), None, dy.float(), None)
        pairs = [("y", got[0], want[0]), ("dx", got[1], want[1]), ("dw", got[2], want[2])]
    for name, a, b in pairs:
        assert a.dtype == torch.bfloat16
        assert_bf16_close(a, b, f"{name} {shape}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_groups", [1, 4, 8])
def test_gpu_group_rms_norm_gate_bf16(num_groups):
    x, gate, w, do = make_group_inputs(4096, 2048, gate_dtype=torch.bfloat16, device="cuda")
    got = run_group(group_rms_norm_gate, x, gate, w, do, num_groups)
    want = run_group(group_rms_norm_gate_ref, x, fp32_copy(gate), fp32_copy(w), do.float(),
                     num_groups)
    for name, a, b in zip(["out", "dx", "dgate", "dw"], got, want):
        assert_bf16_close(a, b, f"{name} G={num_groups}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,group", [(64, None), (128, None), (2048, None), (4096, None),
                                     (2048, 4)])
def test_gpu_batch_invariance_and_determinism(n, group):
    batch_invariance_check("cuda", torch.bfloat16, n, group)
    determinism_check("cuda", torch.bfloat16, (16384, n), group)
