"""The CPU experts as padded batched GEMMs (torch_padded.py) against the reference loop."""
import pytest
import torch

from ring_rl.kernels.moe import moe_experts, moe_experts_ref
from ring_rl.kernels.moe.torch_padded import (
    moe_experts_padded,
    padded_layout,
    padding_pays,
)
from tests.kernels.checks import FP32_TOL, assert_close
from tests.kernels.moe_cases import (
    EXPERT_NAMES,
    check_experts,
    expert_inputs,
    ids_avoiding,
    run_experts,
)


def _padded(x, ids, w, wgu, wd):
    """The padded path on these ids, whether or not the dispatcher would take it."""
    return moe_experts_padded(x, w, wgu, wd, padded_layout(ids, wgu.shape[0]))


def _check(inputs):
    return check_experts(inputs, fn=_padded)


@pytest.mark.parametrize("t,h,inter,e,k", [(1, 48, 32, 8, 2), (37, 100, 24, 8, 2), (1000, 48, 32, 16, 4)])
def test_padded_matches_reference(t, h, inter, e, k):
    _check(expert_inputs(t, h, inter, e, k, seed=t))


def test_padded_idle_experts_get_zero_weight_gradients():
    ids = ids_avoiding(40, 8, 2, (0, 5, 6, 7), seed=4)
    got = _check(expert_inputs(40, 48, 32, 8, 2, seed=4, ids=ids))
    for g in got[3:]:
        assert not g[[0, 5, 6, 7]].any() and g[1:5].abs().amin(dim=(1, 2)).gt(0).all()


def test_padded_bf16_rounds_like_the_reference():
    x, ids, w, wgu, wd, dy = expert_inputs(64, 48, 32, 8, 2, seed=3, dtype=torch.bfloat16)
    got = _padded(x, ids, w, wgu, wd)
    want = moe_experts_ref(x, ids, w, wgu, wd)
    assert got.dtype == torch.bfloat16
    assert_close(got, want, 1e-2, "y")  # h and o rounded to bf16 in both: a few ulps apart at most


def test_dispatch_pads_balanced_routing_and_loops_on_skewed():
    e, t = 8, 50
    balanced = torch.stack([torch.randperm(e)[:2] for _ in range(t)])
    skewed = torch.stack([torch.tensor([6, j % 6]) for j in range(t)])  # expert 6 in every token
    assert padding_pays(padded_layout(balanced, e), e)
    assert not padding_pays(padded_layout(skewed, e), e)  # 8 experts x 50 rows padded > 2 x 100 real slots
    for ids in (balanced, skewed):
        x, _, w, wgu, wd, dy = expert_inputs(t, 48, 32, e, 2, seed=5)
        got = run_experts(moe_experts, x, ids, w, wgu, wd, dy)
        want = run_experts(moe_experts_ref, x, ids, w, wgu, wd, dy)
        for name, a, b in zip(EXPERT_NAMES, got, want):
            assert_close(a, b, FP32_TOL, name)


def test_padded_token_output_does_not_depend_on_the_batch():
    x, ids, w, wgu, wd, _ = expert_inputs(40, 48, 32, 4, 2, seed=8)
    full = _padded(x, ids, w, wgu, wd)
    for i in (0, 17, 39):
        part = _padded(x[i:i + 1], ids[i:i + 1], w[i:i + 1], wgu, wd)
        assert_close(part, full[i:i + 1], FP32_TOL, f"row {i}")
