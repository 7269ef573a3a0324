"""MoE ops: router_logits, moe_route, moe_experts -- Triton kernels against the references.

CPU: the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below when no GPU
is present) in fp32. Selection must match the reference exactly (same ids, bitwise), and the
weights too (the Triton weights kernel does the reference's fp32 operations in the same order,
with IEEE division). Logits, expert outputs and gradients must match
to fp32 rounding: max error <= 1e-5 of the largest reference value (the paths differ only in
summation order over <= 1000 terms). GPU tests (marked gpu) repeat at Ring-mini shapes in bf16
against the fp32 reference: 2e-2 of the largest value (a few bf16 ulps; h and o are rounded to
bf16 in both paths, but a 1-ulp flip of h propagates through the down projection).
The switchable backward paths are in test_moe_variants.py; shared inputs and checks in
moe_cases.py.
"""
from __future__ import annotations

import pytest
import torch

from ring_rl.kernels.moe import (
    moe_experts,
    moe_route,
    moe_route_ref,
    permute_by_expert,
    router_logits,
    router_logits_ref,
    triton_experts,
    triton_router,
)
from tests.kernels.moe_cases import (
    BF16_TOL,
    EXPERT_NAMES,
    MINI,
    assert_close,
    assert_same_plans,
    check_experts,
    check_reruns_and_idle,
    expert_inputs,
    gpu,
    ids_avoiding,
    mini_inputs,
    mini_routing,
    rnd,
    route_inputs,
    run_experts,
)


# ------------------------------------------------------------------- router_logits (CPU)
@pytest.mark.parametrize("t,h,e", [(1, 48, 16), (1000, 48, 16), (33, 100, 24)])
def test_router_logits_matches_reference(triton_mode, t, h, e):
    gen = torch.Generator().manual_seed(1)
    x = rnd(gen, t, h).requires_grad_()
    w = rnd(gen, e, h, scale=0.2).requires_grad_()
    dl = rnd(gen, t, e)
    got = router_logits(x, w)
    want = router_logits_ref(x, w)
    assert got.dtype == torch.float32
    assert_close(got, want, name="logits")
    for name, a, b in zip(("dx", "dw"), torch.autograd.grad((got * dl).sum(), (x, w)),
                          torch.autograd.grad((want * dl).sum(), (x, w))):
        assert_close(a, b, name=name)


def test_router_logits_batch_invariant(triton_mode):
    """A row's logits are bitwise the same whatever the batch around it. On CPU the
    interpreter's tl.dot is numpy's BLAS, whose result for a row can depend on the row's
    place inside the row tile (MM_BLOCK_M = 128 rows), so the slices here start on tile
    boundaries; the GPU test takes arbitrary slices."""
    gen = torch.Generator().manual_seed(2)
    x, w = rnd(gen, 300, 48), rnd(gen, 16, 48, scale=0.2)
    full = router_logits(x, w)
    for lo, hi in [(0, 1), (0, 7), (128, 129), (128, 256), (256, 300)]:
        assert torch.equal(router_logits(x[lo:hi], w), full[lo:hi]), (lo, hi)


# ----------------------------------------------------------------------- moe_route (CPU)
ROUTE_CASES = [  # (E, n_group, topk_group, top_k)
    (16, 4, 2, 4),
    (16, 8, 3, 5),
    (8, 1, 1, 2),
    (24, 4, 4, 8),
]


@pytest.mark.parametrize("t,e,n_group,topk_group,top_k,norm",
                         [(1000, *ROUTE_CASES[0], True), (1, *ROUTE_CASES[0], False)]
                         + [(37, *c, True) for c in ROUTE_CASES[1:]]
                         + [(5, *ROUTE_CASES[3], False)])
@pytest.mark.parametrize("groups_3d", [True, False])
def test_route_matches_reference(triton_mode, monkeypatch, t, e, n_group, topk_group, top_k,
                                 norm, groups_3d):
    monkeypatch.setattr(triton_router, "SELECT_3D", groups_3d)   # power-of-two E only
    logits, bias = route_inputs(t, e, seed=t + e)
    logits.requires_grad_()
    w, ids = moe_route(logits, bias, top_k, n_group, topk_group, 2.5, norm)
    w_ref, ids_ref = moe_route_ref(logits, bias, top_k, n_group, topk_group, 2.5, norm)
    assert ids.dtype == torch.int64 and ids.shape == (t, top_k)
    assert torch.equal(ids, ids_ref)
    assert w.dtype == torch.float32 and torch.equal(w, w_ref)
    # ids are ordered by descending biased score
    biased = torch.sigmoid(logits.detach()) + bias
    assert (biased.gather(1, ids).diff(dim=1) <= 0).all()
    if t > 100:
        return                 # the gradient is checked on the smaller cases (interpreter time)
    dw = torch.randn(t, top_k, generator=torch.Generator().manual_seed(3))
    g = torch.autograd.grad((w * dw).sum(), logits)[0]
    g_ref = torch.autograd.grad((w_ref * dw).sum(), logits)[0]
    assert g.abs().sum() > 0
    assert_close(g, g_ref, name="dlogits")


def hand_logits():
    """8 experts in 4 groups of 2. Scores (sigmoid of these logits) per group:
    g0 = [3.0, -4.0] (top-2 sum ~0.97), g1 = [1.0, 1.0] (~1.46), g2 = [2.0, 0.5] (~1.50),
    g3 = [-1, -1]. Keep 2 groups -> g2, g1; top-2 inside: expert 4 (2.0), then experts 2 and
    3 tie (1.0 each) -> the lower index, 2. Expert 0 (the best score) is in a losing group."""
    return torch.tensor([[3.0, -4.0, 1.0, 1.0, 2.0, 0.5, -1.0, -1.0]])


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_route_hand_made(monkeypatch, mode):
    monkeypatch.setenv("RING_RL_KERNELS", mode)
    logits = hand_logits()
    w, ids = moe_route(logits, None, 2, 4, 2, 1.5)
    assert ids.tolist() == [[4, 2]]
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    assert torch.allclose(w, (s / s.sum() * 1.5)[None], rtol=1e-6, atol=0)
    # A bias of 0.95 on expert 1 (sigmoid(-4) + 0.95 = 0.968 > sigmoid(3) = 0.953) lifts
    # group 0 to the top and expert 1 above expert 0; the weights stay the unbiased scores.
    bias = torch.tensor([0.0, 0.95, 0, 0, 0, 0, 0, 0])
    w, ids = moe_route(logits, bias, 2, 4, 2, 1.0)
    assert ids.tolist() == [[1, 0]]
    s = torch.sigmoid(torch.tensor([-4.0, 3.0]))
    assert torch.allclose(w, (s / s.sum())[None], rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode,groups_3d", [("triton", True), ("triton", False),
                                             ("reference", False)])
def test_route_ties_go_to_lower_index(monkeypatch, mode, groups_3d):
    monkeypatch.setenv("RING_RL_KERNELS", mode)
    monkeypatch.setattr(triton_router, "SELECT_3D", groups_3d)
    # All equal: groups 0, 1 kept, experts 0..3 in order.
    w, ids = moe_route(torch.zeros(3, 16), None, 4, 4, 2, 1.0)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3
    assert torch.equal(w, torch.full((3, 4), 0.25))
    # Group 3 ties group 1 (both top-2 sums equal): group 1 wins; inside, experts 5 and 6
    # tie on the score (lower index first) after expert 4.
    logits = torch.full((1, 16), -5.0)
    logits[0, [4, 5, 6, 12, 13, 14]] = torch.tensor([2.0, 1.0, 1.0, 2.0, 1.0, 1.0])
    _, ids = moe_route(logits, None, 3, 4, 1, 1.0)
    assert ids.tolist() == [[4, 5, 6]]


@pytest.mark.parametrize("e,n_group,topk_group,top_k", ROUTE_CASES[1:2])
def test_route_batch_invariant(triton_mode, e, n_group, topk_group, top_k):
    logits, bias = route_inputs(200, e, seed=5)
    w, ids = moe_route(logits, bias, top_k, n_group, topk_group, 1.0)
    for lo, hi in [(0, 1), (3, 4), (10, 27), (150, 200)]:
        w2, ids2 = moe_route(logits[lo:hi], bias, top_k, n_group, topk_group, 1.0)
        assert torch.equal(ids2, ids[lo:hi]) and torch.equal(w2, w[lo:hi]), (lo, hi)


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_route_replay_uses_recorded_ids(monkeypatch, mode):
    monkeypatch.setenv("RING_RL_KERNELS", mode)
    logits, bias = route_inputs(50, 16, seed=7)
    _, recorded = moe_route(logits + 0.3 * torch.randn(50, 16), bias, 4, 4, 2, 2.0)
    logits.requires_grad_()
    w, ids = moe_route(logits, bias, 4, 4, 2, 2.0, replay_ids=recorded.int())
    assert ids.dtype == torch.int64 and torch.equal(ids, recorded)
    s = torch.sigmoid(logits.detach()).gather(1, recorded)
    assert torch.allclose(w, s / s.sum(1, keepdim=True) * 2.0, rtol=1e-6, atol=0)
    assert torch.autograd.grad(w.sum() * 0 + (w * w).sum(), logits)[0].abs().sum() > 0


def test_route_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_group"):
        moe_route(torch.zeros(2, 10), None, 2, 4, 2, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(torch.zeros(2, 16), None, 9, 4, 2, 1.0)
    with pytest.raises(ValueError, match="replay_ids"):
        moe_route(torch.zeros(2, 16), None, 2, 4, 2, 1.0, replay_ids=torch.zeros(3, 2))


# --------------------------------------------------------------------- moe_experts (CPU)
@pytest.mark.parametrize("t,h,inter,e,k,fused,mode", [(1, 48, 32, 8, 2, True, "triton"),
                                                      (37, 48, 32, 8, 3, False, "gmm_dw"),
                                                      (70, 40, 24, 16, 4, True, "gmm_dw"),
                                                      (64, 64, 32, 4, 1, False, "triton")])
def test_experts_match_reference(triton_mode, monkeypatch, t, h, inter, e, k, fused, mode):
    """fused: the SwiGLU backward in the down-projection GEMM's epilogue, or a separate
    row-wise kernel (both paths are kept; triton_experts.DOWN_BWD_FUSED picks one). mode:
    the weight gradients in Triton or (the default) through torch._grouped_mm on copied
    rows (on CPU torch's per-group loop)."""
    monkeypatch.setattr(triton_experts, "DOWN_BWD_FUSED", fused)
    monkeypatch.setattr(triton_experts, "BWD_GEMMS", mode)
    check_experts(expert_inputs(t, h, inter, e, k, seed=t))


def test_experts_with_idle_experts(triton_mode):
    """Experts 0, 5, 6, 7 of 8 get no token: their weight gradients must be exact zeros."""
    ids = ids_avoiding(40, 8, 2, (0, 5, 6, 7), seed=4)
    got = check_experts(expert_inputs(40, 48, 32, 8, 2, seed=4, ids=ids))
    for g in got[3:]:
        assert not g[[0, 5, 6, 7]].any() and g[1:5].abs().amin(dim=(1, 2)).gt(0).all()


def test_experts_all_tokens_on_one_expert(triton_mode):
    """A large bias on expert 6 routes every token's first slot there (and top-1: only
    there), through the real router."""
    gen = torch.Generator().manual_seed(6)
    logits = rnd(gen, 90, 8)
    bias = torch.zeros(8)
    bias[6] = 10.0
    w, ids = moe_route(logits, bias, 1, 4, 2, 1.0)
    assert (ids == 6).all()
    x, _, _, wgu, wd, dy = expert_inputs(90, 48, 32, 8, 1, seed=6)
    got = check_experts((x, ids, w.detach().requires_grad_(), wgu, wd, dy))
    assert got[3][6].abs().sum() > 0 and not got[3][torch.arange(8) != 6].any()


def test_experts_deterministic_and_batch_invariant(triton_mode):
    """Bitwise: two runs give the same outputs and gradients; a token's output does not
    depend on the batch (same tiles for every batch size, no cross-row reductions)."""
    inputs = expert_inputs(40, 48, 32, 4, 2, seed=8)
    first = run_experts(moe_experts, *inputs)
    second = run_experts(moe_experts, *inputs)
    for name, a, b in zip(EXPERT_NAMES, first, second):
        assert torch.equal(a, b), name
    x, ids, w, wgu, wd, _ = inputs
    y_part = moe_experts(x[:1], ids[:1], w[:1], wgu, wd)
    assert torch.equal(y_part, first[0][:1])


def test_permutation_is_stable_and_inverts():
    ids = torch.tensor([[3, 1], [1, 0], [3, 2], [1, 3]])
    order, offsets = permute_by_expert(ids, 5)
    assert order.tolist() == [3, 1, 2, 6, 5, 0, 4, 7]      # slots, by expert, slot order
    assert offsets.tolist() == [0, 1, 4, 5, 8, 8]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(8)
    assert torch.equal(ids.reshape(-1)[order][inverse], ids.reshape(-1))


def test_experts_reject_bad_shapes():
    x, ids, w, wgu, wd, _ = expert_inputs(4, 48, 32, 8, 2)
    with pytest.raises(ValueError, match="w_gate_up"):
        moe_experts(x, ids, w, wgu[:, :, :40], wd)
    with pytest.raises(ValueError, match="weights"):
        moe_experts(x, ids, w[:, :1], wgu, wd)


# ------------------------------------------------------------- GPU, Ring-mini shapes, bf16


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("split_rows", [0, 1024])
def test_gpu_router_logits_and_route(monkeypatch, split_rows):
    """split_rows: the gate-weight gradient unsplit, or in 4 token ranges."""
    monkeypatch.setattr(triton_router, "DW_SPLIT_ROWS", split_rows)
    gen = torch.Generator().manual_seed(10)
    t, h, e = 4096, MINI["h"], MINI["e"]
    x = rnd(gen, t, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = rnd(gen, e, h, scale=0.02, device="cuda").requires_grad_()
    logits = router_logits(x, w)
    want = router_logits_ref(x, w)
    assert_close(logits, want, 1e-5, "logits")
    for lo, hi in [(0, 1), (7, 8), (5, 1000), (4000, 4096)]:     # batch invariance, bitwise
        assert torch.equal(router_logits(x[lo:hi], w), logits[lo:hi]), (lo, hi)
    dl = rnd(gen, t, e, device="cuda")
    got = torch.autograd.grad((logits * dl).sum(), (x, w))
    ref = torch.autograd.grad((want * dl).sum(), (x, w))
    assert_close(got[0], ref[0], BF16_TOL, "dx")     # dx is rounded to bf16
    assert_close(got[1], ref[1], 1e-4, "dw")
    again = torch.autograd.grad((router_logits(x, w) * dl).sum(), (x, w))
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1]), "not reproducible"
    bias = rnd(gen, e, scale=0.1, device="cuda")
    args = (MINI["k"], MINI["n_group"], MINI["topk_group"], 2.5)
    wts, ids = moe_route(logits.detach(), bias, *args)
    wts_ref, ids_ref = moe_route_ref(logits.detach(), bias, *args)
    assert torch.equal(ids, ids_ref) and torch.equal(wts, wts_ref)
    for lo, hi in [(0, 1), (33, 900)]:
        w2, ids2 = moe_route(logits.detach()[lo:hi], bias, *args)
        assert torch.equal(ids2, ids[lo:hi]) and torch.equal(w2, wts[lo:hi])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("t,fused,mode", [(1, True, "triton"), (2048, True, "triton"),
                                          (2048, False, "triton"), (2048, False, "gmm_dw"),
                                          (2048, True, "gmm_dw"), (2048, False, "gmm_dw_dx"),
                                          (2048, False, "gmm_all"), (1, False, "gmm_dw_dx")])
def test_gpu_experts_bf16(monkeypatch, t, fused, mode):
    """Skewed routing through the real router (bias drawn wide: idle and crowded experts).
    mode: triton_experts.BWD_GEMMS (the grouped_mm ones with the Triton plan). Idle experts
    must get exact zero weight gradients: at t=1, 248 of the 256 grouped_mm dW groups are
    empty."""
    monkeypatch.setattr(triton_experts, "DOWN_BWD_FUSED", fused)
    monkeypatch.setattr(triton_experts, "BWD_GEMMS", mode)
    monkeypatch.setattr(triton_experts, "PLAN", "torch" if mode == "triton" else "triton")
    if mode != "triton" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the grouped_mm backward runs on sm90 only (elsewhere it is the Triton one)")
    inputs = x, ids, w, wgu, wd, _ = mini_inputs(t, seed=11)
    idle = torch.bincount(ids.reshape(-1), minlength=MINI["e"]) == 0
    assert idle.any()
    first = check_reruns_and_idle(inputs, idle, BF16_TOL)
    y1 = moe_experts(x[:1], ids[:1], w[:1], wgu, wd)
    assert torch.equal(y1, first[0][:1]), "forward not batch invariant"


@gpu
@pytest.mark.gpu
def test_gpu_router_presplit_same_bits(monkeypatch):
    """The gate weight (and dlogits) split into bf16 parts once per call (PRESPLIT) give the
    same logits and gradients bitwise as the split inside every program."""
    gen = torch.Generator().manual_seed(15)
    t, h, e = 4096, MINI["h"], MINI["e"]
    x = rnd(gen, t, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = rnd(gen, e, h, scale=0.02, device="cuda").requires_grad_()
    dl = rnd(gen, t, e, device="cuda")
    runs = []
    for presplit in (False, True):
        monkeypatch.setattr(triton_router, "PRESPLIT", presplit)
        logits = router_logits(x, w)
        runs.append([logits.detach(), *torch.autograd.grad((logits * dl).sum(), (x, w))])
    for name, a, b in zip(("logits", "dx", "dw"), *runs):
        assert torch.equal(a, b), name


@gpu
@pytest.mark.gpu
def test_gpu_plan_counting_sort_matches_torch(monkeypatch):
    _, ids = mini_routing(16384, seed=12)
    assert_same_plans(monkeypatch, ids, MINI["e"])


def test_fit_stages_keeps_fp32_tiles_within_shared_memory(monkeypatch):
    """The H100's 227 KiB per block: the down-backward tile (128x256x64, 4 stages) needs
    3 x 96 KiB in fp32 (what failed there) and 3 x 48 KiB in bf16. fp32 drops to 3 stages,
    bf16 keeps its 4; a limit that fits nothing still leaves one stage."""
    from ring_rl.kernels.moe import tile_fit

    monkeypatch.setattr(tile_fit.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tile_fit.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tile_fit, "_smem_limit", lambda device: 232448)
    assert tile_fit.fit_stages(128, 256, 64, 4, torch.float32) == 3
    assert tile_fit.fit_stages(128, 256, 64, 4, torch.bfloat16) == 4
    assert tile_fit.fit_stages(128, 128, 64, 3, torch.float32, b_tiles=2) == 3
    monkeypatch.setattr(tile_fit, "_smem_limit", lambda device: 1024)
    assert tile_fit.fit_stages(128, 256, 64, 4, torch.float32) == 1
