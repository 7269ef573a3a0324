"""GRPO maths against numbers worked out by hand, and against a per-token loop reference."""

import math

import pytest
import torch

from ring_rl.rl.grpo import group_advantages, kl_penalty, masked_aggregate, policy_loss

S = 1 / math.sqrt(2)  # 0.5 / unbiased std of {1, 0} = 0.5 / 0.7071


def test_group_advantages_by_hand():
    out = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    torch.testing.assert_close(out.advantages, torch.tensor([S, -S, -S, S]), rtol=1e-5, atol=0)
    assert out.num_equal_groups == 0
    plain = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2, std_norm=False)
    torch.testing.assert_close(plain.advantages, torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # group 0 all equal -> exact zeros, flagged; group 1: mean 0.25, unbiased std 0.5
    out = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), group_size=4)
    torch.testing.assert_close(out.advantages, torch.tensor([0, 0, 0, 0, 1.5, -0.5, -0.5, -0.5]), rtol=1e-5, atol=0)
    assert out.equal_groups.tolist() == [True, False] and out.num_equal_groups == 1
    advantages, equal = out  # unpacks as (advantages, equal_groups)
    assert advantages is out.advantages and equal is out.equal_groups
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        group_advantages(torch.ones(6), 4)


def _case(dtype=torch.float32):
    """Seq 0: A=+1, ratios 1, 1.5, 0.5. Seq 1: A=-2, ratios 0.5, 1.5, then a padding token."""
    ratios = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.5, 1.0]], dtype=dtype)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -2.0]], dtype=dtype)
    logp = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0], dtype=dtype)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, adv, mask


def test_policy_loss_token_and_sequence_by_hand():
    # per-token -min(rA, clip(r, .8, 1.2) A): seq 0 -> -1, -1.2, -0.5 ; seq 1 -> 1.6, 3.0
    logp, old, adv, mask = _case()
    token, stats = policy_loss(logp, old, adv, mask, 0.2, 0.2, agg="token")
    assert token.item() == pytest.approx(1.9 / 5, abs=1e-6)
    seq, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2, agg="sequence")
    assert seq.item() == pytest.approx((-2.7 / 3 + 4.6 / 2) / 2, abs=1e-6)  # 0.7
    assert stats["clip_frac_low"].item() == pytest.approx(0.2)  # r=.5 with A<0
    assert stats["clip_frac_high"].item() == pytest.approx(0.2)  # r=1.5 with A>0
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    k3 = (0.5 - math.log(1.5)) * 2 + (-0.5 - math.log(0.5)) * 2  # r - 1 - log r over the 5 tokens
    assert stats["approx_kl_k3"].item() == pytest.approx(k3 / 5, abs=1e-6)
    assert (stats["ratio_max"].item(), stats["ratio_min"].item()) == pytest.approx((1.5, 0.5))


def test_clipped_tokens_get_zero_gradient():
    logp, old, adv, mask = _case()
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2)
    loss.backward()
    # unclipped tokens: d/dlogp of -r A / 5 = -r A / 5 ; clipped ones and padding: 0
    expected = torch.tensor([[-0.2, 0.0, -0.1], [0.0, 0.6, 0.0]])
    torch.testing.assert_close(logp.grad, expected, rtol=1e-5, atol=1e-7)


def test_clip_higher_lets_the_high_ratio_through():
    logp, old, adv, mask = _case()
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.6)
    assert loss.item() == pytest.approx((-1 - 1.5 - 0.5 + 1.6 + 3.0) / 5, abs=1e-6)  # r=1.5 < 1.6
    assert stats["clip_frac_high"].item() == 0.0
    loss.backward()
    assert logp.grad[0, 1].item() == pytest.approx(-1.5 / 5, abs=1e-6)


def test_token_weights_scale_the_loss_not_the_count():
    logp, old, adv, mask = _case()
    weights = torch.tensor([[1.0, 1.0, 0.0], [2.0, 1.0, 9.0]])  # 9.0 sits on padding: ignored
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2, token_weights=weights)
    assert loss.item() == pytest.approx((-1 - 1.2 + 0 + 3.2 + 3.0) / 5, abs=1e-6)


def test_garbage_in_padding_does_not_leak():
    logp, old, adv, mask = _case()
    dirty = logp.detach().clone()
    dirty[1, 2] = float("nan")
    dirty.requires_grad_(True)
    old_dirty = old.clone()
    old_dirty[1, 2] = float("-inf")
    loss, stats = policy_loss(dirty, old_dirty, adv, mask, 0.2, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(1.9 / 5, abs=1e-6)
    assert torch.isfinite(dirty.grad).all() and dirty.grad[1, 2] == 0
    assert all(torch.isfinite(v) for v in stats.values())


def _loop_reference(logp, old, adv, mask, cl, ch, agg):
    """The definition, one token at a time in Python floats."""
    per_seq = []
    for b in range(len(logp)):
        terms = []
        for t in range(len(logp[b])):
            if mask[b][t]:
                r = math.exp(logp[b][t] - old[b][t])
                a = float(adv[b])
                terms.append(-min(r * a, min(max(r, 1 - cl), 1 + ch) * a))
        per_seq.append(terms)
    if agg == "token":
        flat = [x for s in per_seq for x in s]
        return sum(flat) / len(flat)
    kept = [sum(s) / len(s) for s in per_seq if s]
    return sum(kept) / len(kept)


@pytest.mark.parametrize("agg", ["token", "sequence"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_matches_loop_reference(agg, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios ~0.4..2.5
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[0] = False  # an empty response: excluded from the sequence mean
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, agg=agg)
    ref = _loop_reference(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, agg)
    assert loss.item() == pytest.approx(ref, rel=1e-12, abs=1e-12)  # fp64: only summation order differs


def test_masked_aggregate_by_hand():
    values = torch.tensor([[1.0, 3.0, 100.0], [4.0, 100.0, 100.0], [100.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert masked_aggregate(values, mask, "token").item() == pytest.approx(8 / 3)
    assert masked_aggregate(values, mask, "sequence").item() == pytest.approx((2 + 4) / 2)


def test_kl_penalty_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -7.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])  # ref - logp = -0.5, 1.0; third token masked
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(kl_penalty(logp, ref, mask, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, mask, "k2"), torch.tensor([[0.125, 0.5, 0.0]]))
    k3 = torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])  # e^d - 1 - d
    torch.testing.assert_close(kl_penalty(logp, ref, mask, "k3"), k3)
    assert (kl_penalty(logp + torch.randn(1, 3), ref, mask, "k3") >= 0).all()
