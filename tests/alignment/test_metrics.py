"""logprob_mismatch on a hand-computed batch (definitions: shared/docs/alignment.md)."""
from __future__ import annotations

import math

import pytest
import torch

from ring_rl.alignment_checks.metrics import logprob_mismatch


def test_logprob_mismatch_hand_computed():
    """Two sequences: Δ = b - a = [-0.1, 0, 0.25] over 3 tokens; per-sequence sums -0.1 and
    0.25; one token of three bitwise equal."""
    rollout = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    trainer = [torch.tensor([-1.1, -2.0]), torch.tensor([-0.25])]
    m = logprob_mismatch(rollout, trainer)
    delta = [float(torch.tensor(-1.1) - torch.tensor(-1.0)), 0.0, 0.25]   # fp32 inputs
    assert m["align/tokens"] == 3
    assert m["align/bitwise_equal_frac"] == pytest.approx(1 / 3)
    assert m["align/delta_mean"] == pytest.approx(sum(delta) / 3)
    assert m["align/abs_delta_max"] == pytest.approx(0.25)
    assert m["align/k1"] == pytest.approx(-sum(delta) / 3)
    assert m["align/k3"] == pytest.approx(sum(math.exp(d) - 1 - d for d in delta) / 3)
    assert m["align/seq_abs_mismatch_max"] == pytest.approx(0.25)
    m1 = logprob_mismatch(rollout[:1], trainer[:1])
    assert m1["align/seq_abs_mismatch_max"] == pytest.approx(abs(delta[0]))


def test_logprob_mismatch_refuses_different_lengths():
    with pytest.raises(ValueError, match="3 rollout tokens vs 2 trainer tokens"):
        logprob_mismatch([torch.zeros(3)], [torch.zeros(2)])
