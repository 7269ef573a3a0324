"""Mismatch-correction policies against weights worked out by hand, and a per-token loop."""
import math

import pytest
import torch

from ring_rl.alignment_checks.policies import POLICY_METRIC_NAMES, apply_policy
from ring_rl.config import AlignmentConfig

L = math.log
# Per-token ratios r = exp(trainer - rollout) of three responses (9 tokens):
#   seq 0: 1, 3, 0.25      (geometric mean 0.75^(1/3) = 0.909)
#   seq 1: 1.5 x 4         (geometric mean 1.5; product 5.06 would leave [1/2, 2])
#   seq 2: 1.8, 2.5        (geometric mean sqrt(4.5) = 2.12)
DELTAS = [[0.0, L(3), -L(4)], [L(1.5)] * 4, [L(1.8), L(2.5)]]
ROLLOUT = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7, -2.2], [-4.0, -0.9]]


def _case():
    rollout = [torch.tensor(r, dtype=torch.float32) for r in ROLLOUT]
    trainer = [torch.tensor([a + d for a, d in zip(r, ds)], dtype=torch.float32) for r, ds in zip(ROLLOUT, DELTAS)]
    return rollout, trainer


# expected weights per response, and (masked_frac, clipped_frac, weight_mean), by hand
CASES = {
    "tis": (dict(policy="tis", tis_cap=2.0),
            [[1, 2, 0.25], [1.5] * 4, [1.8, 2]], (0, 2 / 9, 13.05 / 9)),
    "mis_token": (dict(policy="mis", mis_threshold=2.0),
                  [[1, 0, 0], [1] * 4, [1, 0]], (3 / 9, 0, 6 / 9)),
    "mis_sequence": (dict(policy="mis", mis_threshold=2.0, mis_level="sequence"),
                     [[1, 1, 1], [1] * 4, [0, 0]], (2 / 9, 0, 7 / 9)),
    "icepop": (dict(policy="icepop", icepop_alpha=0.3, icepop_beta=2.6),
               [[1, 0, 0], [1] * 4, [1, 1]], (2 / 9, 0, 7 / 9)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_weighting_policies_by_hand(name):
    kwargs, weights, (masked, clipped, mean) = CASES[name]
    rollout, trainer = _case()
    out = apply_policy(AlignmentConfig(**kwargs), rollout, trainer)
    assert all(o is t for o, t in zip(out.old_logprobs, trainer))  # old policy = trainer recompute
    assert len(out.token_weights) == 3
    for got, want in zip(out.token_weights, weights):
        assert got.dtype == torch.float32
        # 1e-6: the ratios go through fp32 logprobs (ulp ~1e-7 at |lp| <= 4)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=0, atol=1e-6)
    m = out.metrics
    assert set(m) == set(POLICY_METRIC_NAMES)
    assert m["policy/masked_frac"] == pytest.approx(masked, abs=1e-12)
    assert m["policy/clipped_frac"] == pytest.approx(clipped, abs=1e-12)
    assert m["policy/weight_mean"] == pytest.approx(mean, abs=1e-6)


@pytest.mark.parametrize("policy", ["none", "recompute"])
def test_old_logprob_choice_without_weights(policy):
    rollout, trainer = _case()
    out = apply_policy(AlignmentConfig(policy=policy), rollout, trainer)
    expected = rollout if policy == "none" else trainer
    assert all(o is e for o, e in zip(out.old_logprobs, expected))
    assert out.token_weights is None
    assert out.metrics == {"policy/masked_frac": 0.0, "policy/clipped_frac": 0.0, "policy/weight_mean": 1.0}


def _loop_reference(cfg, rollout, trainer):
    """Token by token with math.exp: the definitions in shared/docs/alignment.md."""
    out = []
    for r, t in zip(rollout, trainer):
        ratios = [math.exp(b - a) for a, b in zip(r.tolist(), t.tolist())]
        if cfg.policy == "tis":
            out.append([min(x, cfg.tis_cap) for x in ratios])
        elif cfg.policy == "icepop":
            out.append([float(cfg.icepop_alpha <= x <= cfg.icepop_beta) for x in ratios])
        elif cfg.mis_level == "token":
            out.append([float(1 / cfg.mis_threshold <= x <= cfg.mis_threshold) for x in ratios])
        else:
            geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            out.append([float(1 / cfg.mis_threshold <= geo <= cfg.mis_threshold)] * len(ratios))
    return out


@pytest.mark.parametrize("kwargs", [dict(policy="tis", tis_cap=1.3),
                                    dict(policy="icepop", icepop_alpha=0.8, icepop_beta=1.25),
                                    dict(policy="mis", mis_threshold=1.2),
                                    dict(policy="mis", mis_threshold=1.1, mis_level="sequence")])
def test_policies_match_loop_reference_on_random_logprobs(kwargs):
    g = torch.Generator().manual_seed(0)
    lengths = [1, 7, 30, 12, 3, 19]
    rollout = [-torch.rand(n, generator=g) * 5 - 0.01 for n in lengths]
    # gaps up to ~|0.9|: ratios from 0.4 to 2.5, so every bound above masks or clips some tokens
    trainer = [r + torch.randn(n, generator=g) * 0.3 for r, n in zip(rollout, lengths)]
    cfg = AlignmentConfig(**kwargs)
    out = apply_policy(cfg, rollout, trainer)
    want = _loop_reference(cfg, rollout, trainer)
    for got, w in zip(out.token_weights, want):
        torch.testing.assert_close(got, torch.tensor(w, dtype=torch.float32), rtol=1e-6, atol=0)
    flat = torch.cat([torch.tensor(w) for w in want])
    assert out.metrics["policy/weight_mean"] == pytest.approx(flat.mean().item(), rel=1e-6)
    if cfg.policy != "tis":
        assert 0 < out.metrics["policy/masked_frac"] < 1  # the case is not trivial
        assert out.metrics["policy/masked_frac"] == pytest.approx((flat == 0).double().mean().item())
    else:
        assert 0 < out.metrics["policy/clipped_frac"] < 1


def test_empty_response_and_shape_errors():
    cfg = AlignmentConfig(policy="mis", mis_level="sequence")
    out = apply_policy(cfg, [torch.zeros(0), torch.zeros(2)], [torch.zeros(0), torch.full((2,), 5.0)])
    assert out.token_weights[0].numel() == 0 and out.token_weights[1].tolist() == [0.0, 0.0]
    assert out.metrics["policy/masked_frac"] == 1.0
    with pytest.raises(ValueError, match="sequence 1: rollout logprobs \\(3,\\) vs trainer \\(2,\\)"):
        apply_policy(cfg, [torch.zeros(1), torch.zeros(3)], [torch.zeros(1), torch.zeros(2)])
    with pytest.raises(ValueError, match="2 rollout sequences vs 1 trainer"):
        apply_policy(cfg, [torch.zeros(1)] * 2, [torch.zeros(1)])
