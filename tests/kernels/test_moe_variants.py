"""The MoE kernels' switchable paths against the references (CPU, interpreter, fp32): the
backward's torch._grouped_mm variants (triton_experts.BWD_GEMMS; on CPU torch's per-group
loop), the Triton counting-sort plan (PLAN; bitwise the torch plan) and the router's split
gate-weight gradient (triton_router.DW_SPLIT_ROWS). GPU counterparts are in test_moe.py."""
from __future__ import annotations

import pytest
import torch

from ring_rl.kernels.moe import (
    router_logits,
    router_logits_ref,
    triton_experts,
    triton_plan,
    triton_router,
    triton_rows,
)
from tests.kernels.moe_cases import (
    assert_close,
    assert_same_plans,
    check_reruns_and_idle,
    expert_inputs,
    ids_avoiding,
    rnd,
)


@pytest.mark.parametrize("mode", ["gmm_dw", "gmm_dw_dx", "gmm_all"])
@pytest.mark.parametrize("t,h,inter,e,k,fused", [(37, 40, 48, 8, 3, False),
                                                 (29, 40, 48, 6, 2, True),
                                                 (21, 42, 30, 6, 2, False)])
def test_experts_backward_variants(triton_mode, monkeypatch, mode, t, h, inter, e, k, fused):
    """The torch._grouped_mm backward paths with the Triton plan, against the reference;
    experts 0 and e-1 idle (exact zero weight gradients); bitwise reproducible. The G GEMM
    runs with BLOCK_N 16, BLOCK_K 32 (three column blocks, a ragged K) and the row copy with
    16-column steps (a ragged last one). h=42 fp32 rows are not 16-byte multiples: grouped_mm
    cannot take them, and the Triton kernels must run instead."""
    monkeypatch.setattr(triton_experts, "BWD_GEMMS", mode)
    monkeypatch.setattr(triton_experts, "PLAN", "triton")
    monkeypatch.setattr(triton_experts, "DOWN_BWD_FUSED", fused)
    monkeypatch.setitem(triton_experts.CONFIGS, "down_bwd", (16, 16, 32, 4, 1))
    monkeypatch.setitem(triton_rows.CONFIGS, "gather_rows", (8, 16, 0, 4, 1))
    assert triton_rows.grouped_mm_ok(torch.zeros(1), h, inter) == (h != 42)
    inputs = expert_inputs(t, h, inter, e, k, seed=t, ids=ids_avoiding(t, e, k, (0, e - 1), t))
    check_reruns_and_idle(inputs, [0, e - 1])


@pytest.mark.parametrize("t,k,e,scan_rows", [(1, 2, 5, 256), (37, 3, 8, 256), (300, 8, 24, 4),
                                              (129, 4, 256, 256)])
def test_plan_counting_sort_matches_torch(triton_mode, monkeypatch, t, k, e, scan_rows):
    """Bitwise the torch plan; scan_rows 4: the column scan carries over 5 steps of 4 blocks
    (19 blocks of 128 slots, the last step ragged)."""
    monkeypatch.setattr(triton_plan, "CUMSUM_ROWS", scan_rows)
    assert_same_plans(monkeypatch, ids_avoiding(t, e, k, (1,), seed=e), e)


def test_gather_rows_copies_token_rows(triton_mode):
    """gather_rows = src[plan.tokens], every row and column (width not a multiple of the
    column step; several row blocks, the last ragged)."""
    gen = torch.Generator().manual_seed(4)
    ids = ids_avoiding(45, 7, 3, (2,), seed=4)
    plan = triton_experts.make_plan(ids, 7)
    src = rnd(gen, 45, 300)
    assert torch.equal(triton_rows.gather_rows(src, plan), src[plan.tokens.long()])


@pytest.mark.parametrize("t,split_rows", [(1000, 64), (130, 64)])
def test_router_dw_split_matches_reference(triton_mode, monkeypatch, t, split_rows):
    """The gate-weight gradient split over the tokens (8 ranges and 2, the last ragged),
    partials summed in order: fp32-accurate and reproducible; the forward never splits."""
    gen = torch.Generator().manual_seed(9)
    x = rnd(gen, t, 100).requires_grad_()
    w = rnd(gen, 24, 100, scale=0.2).requires_grad_()
    dl = rnd(gen, t, 24)
    unsplit = router_logits(x, w)
    monkeypatch.setattr(triton_router, "DW_SPLIT_ROWS", split_rows)
    assert triton_router.dw_splits(t) == min(8, t // split_rows) > 1
    logits = router_logits(x, w)
    assert torch.equal(logits, unsplit)
    dw = torch.autograd.grad((logits * dl).sum(), w)[0]
    assert_close(dw, torch.autograd.grad((router_logits_ref(x, w) * dl).sum(), w)[0], name="dw")
    assert torch.equal(dw, torch.autograd.grad((router_logits(x, w) * dl).sum(), w)[0])


def test_split_bf16_parts_are_exact(triton_mode):
    """hi + mid + lo == v exactly, each part bf16 (what the pre-split router matmul loads;
    its accuracy is checked on the GPU: the interpreter's bf16 dot is unusable)."""
    v = rnd(torch.Generator().manual_seed(3), 37, 50) * 1e3
    parts = triton_router.split_bf16(v)
    assert parts.shape == (3, 37, 50) and parts.dtype == torch.bfloat16
    assert torch.equal(parts[0].float() + parts[1].float() + parts[2].float(), v)
    assert parts[1].abs().le(parts[0].abs() * 2.0 ** -7).all()    # each part below the last
