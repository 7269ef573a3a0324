"""Inputs and checks shared by the MoE kernel tests (test_moe.py, test_moe_variants.py,
test_moe_sorted_rows.py)."""
from __future__ import annotations

import torch

from ring_rl.kernels.moe import moe_experts, moe_experts_ref, moe_route, triton_experts
from tests.kernels.checks import FP32_TOL, assert_close, gpu  # noqa: F401 (re-exported)

BF16_TOL = 2e-2


def rnd(gen, *shape, scale=1.0, device="cpu", dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def route_inputs(t, e, seed=0, device="cpu", bias_scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    return rnd(gen, t, e, scale=2.0, device=device), rnd(gen, e, scale=bias_scale, device=device)


def expert_inputs(t, h, inter, e, k, seed=0, device="cpu", dtype=torch.float32, ids=None):
    gen = torch.Generator().manual_seed(seed)
    x = rnd(gen, t, h, device=device, dtype=dtype).requires_grad_()
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    w = (torch.rand(t, k, generator=gen) + 0.1).to(device).requires_grad_()
    wgu = rnd(gen, e, 2 * inter, h, scale=h ** -0.5, device=device, dtype=dtype)
    wd = rnd(gen, e, h, inter, scale=inter ** -0.5, device=device, dtype=dtype)
    dy = rnd(gen, t, h, device=device, dtype=dtype)
    return x, ids.to(device), w, wgu.requires_grad_(), wd.requires_grad_(), dy


def run_experts(fn, x, ids, w, wgu, wd, dy):
    """Forward, then the gradients of <y, dy> for x, weights, w_gate_up, w_down."""
    y = fn(x, ids, w, wgu, wd)
    grads = torch.autograd.grad((y.float() * dy.float()).sum(), (x, w, wgu, wd))
    return [y.detach()] + list(grads)


EXPERT_NAMES = ["y", "dx", "dweights", "dw_gate_up", "dw_down"]


def check_experts(inputs, tol=FP32_TOL, fn=moe_experts):
    got = run_experts(fn, *inputs)
    want = run_experts(moe_experts_ref, *inputs)
    for name, a, b in zip(EXPERT_NAMES, got, want):
        assert_close(a, b, tol, name)
    return got


def check_reruns_and_idle(inputs, idle, tol=FP32_TOL):
    """check_experts, then: a second run gives the same bits, and the experts `idle` (indices
    or a bool mask over experts) get exactly zero weight gradients. → the first run's results."""
    got = check_experts(inputs, tol)
    again = run_experts(moe_experts, *inputs)
    for name, a, b in zip(EXPERT_NAMES, got, again):
        assert torch.equal(a, b), f"{name} not bitwise reproducible"
    for name, g in zip(EXPERT_NAMES[3:], got[3:]):
        assert not g[idle].any(), f"{name}: idle experts got non-zero gradients"
    return got


MINI = dict(h=2048, e=256, inter=512, k=8, n_group=8, topk_group=4)  # Ring-mini's MoE


def mini_routing(t, seed, bias_scale=0.3):
    """Skewed Ring-mini routing through the real router: (weights, ids) on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    logits = rnd(gen, t, MINI["e"], device="cuda")
    bias = rnd(gen, MINI["e"], scale=bias_scale, device="cuda")
    return moe_route(logits, bias, MINI["k"], MINI["n_group"], MINI["topk_group"], 2.5)


def mini_inputs(t, seed, bias_scale=0.3):
    """(x, ids, weights, w_gate_up, w_down, dy) at Ring-mini shapes in bf16 on the GPU, routed
    by `mini_routing`; weights detached, requiring grad."""
    w, ids = mini_routing(t, seed, bias_scale)
    x, _, _, wgu, wd, dy = expert_inputs(t, MINI["h"], MINI["inter"], MINI["e"], MINI["k"],
                                         seed=seed, device="cuda", dtype=torch.bfloat16,
                                         ids=ids.cpu())
    return x, ids, w.detach().requires_grad_(), wgu, wd, dy


def ids_avoiding(t, e, k, idle, seed):
    """ids [t, k]: k distinct experts per token, none of them in `idle`."""
    gen = torch.Generator().manual_seed(seed)
    busy = torch.tensor([x for x in range(e) if x not in idle])
    return torch.stack([busy[torch.randperm(len(busy), generator=gen)[:k]] for _ in range(t)])


def assert_same_plans(monkeypatch, ids, e):
    """The Triton plan (counting sort, tile kernel) equals the torch plan bitwise (tiles past
    the last: same expert E, their row is unused)."""
    monkeypatch.setattr(triton_experts, "PLAN", "torch")
    want = triton_experts.make_plan(ids, e)
    monkeypatch.setattr(triton_experts, "PLAN", "triton")
    got = triton_experts.make_plan(ids, e)
    assert got.method == "triton" and want.method == "torch"
    for name in ("tokens", "slots", "offsets", "inverse", "by_load", "ends"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for bm in (16, 128):
        (te, tr), (te_ref, tr_ref) = got.tiles(bm), want.tiles(bm)
        live = te_ref < e
        assert torch.equal(te, te_ref) and torch.equal(tr[live], tr_ref[live]), bm
        count = got.tile_count(bm)
        assert torch.equal(count, want.tile_count(bm)) and count.item() == int(live.sum()), bm
