"""The gate: rule firing, severity order, metric-name resolution and load-time validation."""
import math
from pathlib import Path

import pytest
import torch

from ring_rl.alignment_checks.gate import GateError, check_gate, known_metric_names, validate_rules
from ring_rl.alignment_checks.metrics import logprob_mismatch
from ring_rl.config import GateRule, load_config

RULES = [GateRule(metric="k3", op=">", threshold=0.01, action="warn"),
         GateRule(metric="align/abs_delta_max", op=">", threshold=0.5, action="skip"),
         GateRule(metric="bitwise_equal_frac", op="<", threshold=0.9, action="abort")]
QUIET = {"align/k3": 0.001, "align/abs_delta_max": 0.3, "align/bitwise_equal_frac": 0.95, "reward/mean": 0.4}


@pytest.mark.parametrize("changes, action, fired", [
    ({}, "none", []),
    ({"align/k3": 0.02}, "warn", [0]),
    ({"align/k3": 0.02, "align/abs_delta_max": 0.7}, "skip", [0, 1]),
    ({"align/bitwise_equal_frac": 0.5, "align/k3": 0.02}, "abort", [0, 2]),  # abort wins, rule order kept
    ({"align/abs_delta_max": 0.5}, "none", []),       # strict comparison: equal does not fire
    ({"align/k3": math.nan}, "warn", [0]),              # NaN fires whatever the op
    ({"align/bitwise_equal_frac": None}, "abort", [2]),  # None: a NaN/inf after JSON
])
def test_check_gate(changes, action, fired):
    metrics = {**QUIET, **changes}
    decision = check_gate(RULES, metrics)
    assert decision.action == action
    assert [RULES.index(r) for r, _ in decision.fired] == fired
    for rule, value in decision.fired:
        want = metrics["align/" + rule.metric.removeprefix("align/")]
        assert value == want or (math.isnan(value) and (want is None or math.isnan(want)))
    row = decision.as_row()
    assert row["gate/action"] == action and row["gate/fired"].count("->") == len(fired)


def test_describe_line():
    decision = check_gate(RULES[:1], {"align/k3": 0.0345})
    assert decision.describe() == "k3 > 0.01 (0.0345) -> warn"


def test_missing_metric_is_an_error_naming_it():
    with pytest.raises(GateError, match=r"gate\[1\]: metric 'align/abs_delta_max' is not among"):
        check_gate(RULES, {"align/k3": 0.0, "align/bitwise_equal_frac": 1.0})


def test_validate_rules_against_produced_names():
    known = known_metric_names(extra=["router/flip_layer_0"])
    real = logprob_mismatch([torch.tensor([-1.0, -2.0])], [torch.tensor([-1.1, -2.0])])
    assert set(real) <= known and {"policy/masked_frac", "router/flip_layer_0"} <= known
    validate_rules(RULES + [GateRule(metric="policy/masked_frac", threshold=0.2),
                            GateRule(metric="router/flip_layer_0")], known)
    assert check_gate(RULES, real).action in ("none", "warn", "skip", "abort")  # every name resolves
    with pytest.raises(GateError, match=r"gate\[1\]\.metric: unknown metric 'k3_mean' \(did you mean 'k3'\?\)"):
        validate_rules([RULES[0], GateRule(metric="k3_mean")], known)
    with pytest.raises(GateError, match="unknown metric 'bitwise_frac'.*did you mean 'bitwise_equal_frac'"):
        validate_rules([GateRule(metric="bitwise_frac")], known)


def test_shipped_config_gate_names_are_produced():
    """configs/tiny-arith.yaml and GateRule's default must name metrics the harness writes."""
    cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny-arith.yaml")
    validate_rules(cfg.alignment.gate + [GateRule()], known_metric_names())
