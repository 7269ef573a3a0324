"""The CPU norms' closed-form backward (torch_backward.py) against autograd through the
reference, on random inputs; the forward is the reference's, bit for bit."""
import pytest
import torch

from ring_rl.kernels.rms_norm import group_rms_norm_gate, rms_norm
from ring_rl.kernels.rms_norm.reference import group_rms_norm_gate_ref, rms_norm_ref
from tests.kernels.checks import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # the reference computes in fp32 whatever the input


def _leaf(gen, *shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype).requires_grad_()


def _grads(outs, inputs, upstream):
    pairs = [(o, u) for o, u in zip(outs, upstream) if u is not None]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [u for _, u in pairs], allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use", ["y", "h", "both", "no residual"])
def test_rms_norm_backward_matches_autograd_of_the_reference(dtype, use):
    gen = torch.Generator().manual_seed(7)
    x = _leaf(gen, 37, 3, 100, dtype=dtype)  # hidden not a power of two, 3-d input
    w = _leaf(gen, 100, dtype=dtype, scale=0.1, shift=1.0)
    res = None if use == "no residual" else _leaf(gen, 37, 3, 100, dtype=dtype)
    inputs = [t for t in (x, w, res) if t is not None]
    got, want = rms_norm(x, w, 1e-6, res), rms_norm_ref(x, w, 1e-6, res)
    got, want = (got, want) if res is not None else ((got,), (want,))
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # the forward is the reference's
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    dh = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    upstream = {"y": (dy, None), "h": (None, dh), "both": (dy, dh), "no residual": (dy,)}[use]
    for name, a, b in zip(["dx", "dw", "dresidual"], _grads(got, inputs, upstream), _grads(want, inputs, upstream)):
        assert (a is None) == (b is None), name  # w gets no gradient from h alone
        if b is not None:
            assert_close(a, b, TOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float32])
@pytest.mark.parametrize("groups", [1, 4])
def test_group_gate_backward_matches_autograd_of_the_reference(dtype, groups):
    gen = torch.Generator().manual_seed(groups)
    x = _leaf(gen, 1000, 128, dtype=dtype, scale=3.0)
    gate = _leaf(gen, 1000, 128, dtype=dtype, scale=2.0)
    w = _leaf(gen, 128, dtype=dtype, scale=0.1, shift=1.0)
    got = group_rms_norm_gate(x, gate, w, groups)
    want = group_rms_norm_gate_ref(x, gate, w, groups)
    assert torch.equal(got, want)
    do = torch.randn(got.shape, generator=gen, dtype=torch.float64).to(dtype)
    for name, a, b in zip(["dx", "dgate", "dw"], torch.autograd.grad(got, (x, gate, w), do),
                          torch.autograd.grad(want, (x, gate, w), do)):
        assert_close(a, b, TOL[dtype], name)


def test_without_gradients_the_reference_runs_as_is():
    x, w = torch.randn(4, 16), torch.ones(16, requires_grad=True)
    with torch.no_grad():
        y = rms_norm(x, w)
    assert y.grad_fn is None and torch.equal(y, rms_norm_ref(x, w))
    assert rms_norm(x, w).grad_fn is not None and "RMSNormTorch" in type(rms_norm(x, w).grad_fn).__name__
