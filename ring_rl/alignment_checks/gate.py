"""The alignment gate: threshold rules on a step's metrics decide warn, skip or abort.

A rule (`config.GateRule`) fires when `metrics[metric] op threshold`. Every rule is checked;
the most severe action of those that fired wins (abort > skip > warn > none). A metric name
may be written with or without the `align/` prefix (`k3` and `align/k3` are the same rule);
other families keep their prefix (`policy/masked_frac`, `router/flip_layer_3`).

A NaN value fires its rule whatever the op: a broken measurement must not pass silently.
Names are checked twice: `validate_rules` at load time against the names the harness
produces, so a typo stops the run before the first rollout; `check_gate` again per step, so
a metric that a step did not produce is an error naming it rather than a rule that never fires.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch

from ring_rl.alignment_checks.metrics import logprob_mismatch
from ring_rl.alignment_checks.policies import POLICY_METRIC_NAMES

SEVERITY = {"none": 0, "warn": 1, "skip": 2, "abort": 3}
PREFIX = "align/"


class GateError(ValueError):
    """A gate rule that names a metric the harness does not produce."""


class Rule(Protocol):  # config.GateRule, or anything with these four fields
    metric: str
    op: str
    threshold: float
    action: str


@dataclass
class GateDecision:
    action: str = "none"                                        # none | warn | skip | abort
    fired: list[tuple[Rule, float]] = field(default_factory=list)  # (rule, the value that fired it)

    def describe(self) -> str:
        """One line for a log and for the report, e.g. 'k3 > 0.01 (0.034) -> warn'."""
        return "; ".join(f"{r.metric} {r.op} {r.threshold:g} ({v:.4g}) -> {r.action}" for r, v in self.fired)

    def as_row(self) -> dict[str, str]:
        """Keys for metrics.jsonl; the report marks steps whose `gate/action` is not none."""
        return {"gate/action": self.action, "gate/fired": self.describe()}


def known_metric_names(extra: Iterable[str] = ()) -> set[str]:
    """The names a rule may use: every `align/...` key of logprob_mismatch, the policy
    metrics, and `extra` (e.g. the lead's `router/flip_layer_{i}` keys)."""
    # Asked of the function itself, on a two-token dummy, so this list cannot drift from it.
    align = logprob_mismatch([torch.zeros(2)], [torch.zeros(2)])
    return set(align) | set(POLICY_METRIC_NAMES) | set(extra)


def resolve_metric(name: str, names: Iterable[str]) -> str | None:
    """The key in `names` that rule metric `name` means, or None."""
    names = set(names)
    for candidate in (name, PREFIX + name):
        if candidate in names:
            return candidate
    return None


def validate_rules(rules: Iterable[Rule], known_names: Iterable[str]) -> None:
    """Raise GateError listing every rule whose metric is not in `known_names`."""
    known = set(known_names)
    problems = []
    for i, rule in enumerate(rules):
        if resolve_metric(rule.metric, known) is None:
            problems.append(f"alignment.gate[{i}].metric: unknown metric {rule.metric!r}{_hint(rule.metric, known)}")
        if rule.op not in (">", "<") or rule.action not in ("warn", "skip", "abort"):
            problems.append(f"alignment.gate[{i}]: op must be > or < and action warn|skip|abort, "
                            f"got op={rule.op!r} action={rule.action!r}")
    if problems:
        shown = ", ".join(sorted(n.removeprefix(PREFIX) for n in known))
        raise GateError("; ".join(problems) + f". Known metrics (align/ prefix optional): {shown}")


def check_gate(rules: Iterable[Rule], metrics: dict[str, float | None]) -> GateDecision:
    """The gate's verdict on one step's metrics."""
    decision = GateDecision()
    for i, rule in enumerate(rules):
        key = resolve_metric(rule.metric, metrics)
        if key is None:
            raise GateError(f"alignment.gate[{i}]: metric {rule.metric!r} is not among this step's "
                            f"metrics{_hint(rule.metric, metrics)}")
        raw = metrics[key]
        value = math.nan if raw is None else float(raw)  # None: a non-finite value after JSON
        fires = math.isnan(value) or (value > rule.threshold if rule.op == ">" else value < rule.threshold)
        if fires:
            decision.fired.append((rule, value))
            if SEVERITY[rule.action] > SEVERITY[decision.action]:
                decision.action = rule.action
    return decision


def _hint(name: str, names: Iterable[str]) -> str:
    short = sorted({n.removeprefix(PREFIX) for n in names})
    name = name.removeprefix(PREFIX)
    # A known name plus a suffix ('k3_mean' for 'k3') first: difflib alone would pick 'delta_mean'.
    match = [s for s in short if name.startswith(s + "_")][-1:] or difflib.get_close_matches(name, short, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
