"""`ring-rl align-check`: run a rollout engine and the trainer on the same prompts and sampled
tokens, and say where — layer and op — their logprobs start to differ.

    run = rollout.run(prompts, sampling)             # tokens, logprobs, experts, op trace
    trainer.logprobs(run.batch)                      # TrainerEngine.compute_logprobs
    trainer.run_traced(run.batch)                    # the same forward, op trace attached
    compare_traces(...)                              # per layer and op: relative error
    -> first divergence above the dtype's noise floor, recurrent states at the end of the
       prompt, router flips, full-vocabulary KL / TV at the sampled positions, sampling
       semantics, packed/padded/one-by-one self-test, and the gate on all of it.

`run_align_check` does the measuring and returns an `AlignCheckResult`; `format_table`
prints it; `align_report.write_align_report` renders the HTML; `cli_main` is the command.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from ring_rl.alignment_checks.gate import GateDecision, check_gate, known_metric_names, validate_rules
from ring_rl.alignment_checks.inject import Injection, expected_first
from ring_rl.alignment_checks.localize import (OpDiff, coarser, compare_traces, first_divergence, noise_floor,
                                               router_flips, sampled_logits, state_diffs, vocab_divergence)
from ring_rl.alignment_checks.metrics import logprob_mismatch
from ring_rl.alignment_checks.sampling_check import candidate_logprobs, sampling_semantics
from ring_rl.alignment_checks.selftest import SELFTEST_TOL, packing_selftest
from ring_rl.alignment_checks.trace import OP_ORDER
from ring_rl.config import GateRule
from ring_rl.trainer.logprobs import logprob_temperature, response_sequences
from ring_rl.types import RolloutBatch, SamplingParams

SAMPLING_TOL = 1e-5  # logits are fp32 on both sides: a recomputed logprob moves by ~1e-6
# Names align-check adds to logprob_mismatch's `align/...` for the gate (router/flip_layer_{i} too).
EXTRA_METRICS = ("align/kl_full_mean", "align/kl_full_max", "align/tv_mean", "align/tv_max",
                 "router/flip_mean", "localize/diverged", "localize/max_rel_err", "localize/state_rel_err_max",
                 "sampling/consistent", "selftest/max_abs_diff")


@dataclass
class AlignCheckResult:
    engine: str
    injection: str | None
    compute_dtype: str
    noise_floor: float
    sampling: dict
    layer_kinds: dict[int, str]               # layer -> "lightning/moe", "softmax/dense", ...
    ops: list[OpDiff]                         # execution order
    first: OpDiff | None                      # first op above the noise floor
    expected: tuple[int | None, str] | None   # where the injection should show
    states: dict[int, float]                  # lightning layer -> state rel. error at end of prompt
    flips: dict[int, float]                   # MoE layer -> router flip rate
    flip_grid: list[list[float]]              # [MoE layer][response-position bucket]
    flip_edges: list[int]
    vocab: dict[str, list[float]]             # kl, tv, position per sampled token
    deltas: list[list[float]]                 # per sequence: trainer − rollout logprob per token
    sampling_check: dict
    selftest: dict
    trace_vs_engine: float                    # traced trainer forward vs compute_logprobs, max |Δ|
    metrics: dict[str, float]
    gate: GateDecision
    golden: dict | None = None
    notes: list[str] = field(default_factory=list)
    batch: RolloutBatch | None = None                    # the rollout (not in the JSON)
    trainer_logprobs: list[torch.Tensor] | None = None   # compute_logprobs of its tokens

    @property
    def failed(self) -> list[str]:
        """Why the command exits non-zero (empty: it passes)."""
        why = []
        if self.gate.action == "abort":
            why.append(f"gate abort: {self.gate.describe()}")
        if not self.selftest.get("passed", True):
            why.append("packed/padded/one-by-one self-test failed")
        if self.golden is not None and not self.golden["passed"]:
            why.append("golden logprobs moved: " + "; ".join(self.golden["problems"][:3]))
        return why

    def to_json(self) -> dict:
        return {
            "engine": self.engine, "injection": self.injection, "compute_dtype": self.compute_dtype,
            "noise_floor": self.noise_floor, "sampling": self.sampling,
            "first_divergence": None if self.first is None else self.first.as_dict(),
            "expected_first": None if self.expected is None else list(self.expected),
            "layers": {str(k): v for k, v in self.layer_kinds.items()},
            "ops": [d.as_dict() for d in self.ops],
            "state_rel_err": {str(k): v for k, v in self.states.items()},
            "router_flips": {str(k): v for k, v in self.flips.items()},
            "router_flip_grid": {"edges": self.flip_edges, "rates": self.flip_grid},
            "vocab": self.vocab, "logprob_delta": self.deltas, "sampling_semantics": self.sampling_check,
            "selftest": self.selftest, "trainer_trace_vs_compute_logprobs": self.trace_vs_engine,
            "metrics": self.metrics, "gate": {"action": self.gate.action, "fired": self.gate.describe()},
            "golden": self.golden, "failed": self.failed, "notes": self.notes,
        }


def layer_kinds(config) -> dict[int, str]:
    return {i: ("softmax" if config.is_softmax_layer(i) else "lightning") + ("/moe" if config.is_moe_layer(i) else "/dense")
            for i in range(config.num_hidden_layers)}


def metric_names(config) -> list[str]:
    """Every metric an align-check produces (for validating gate rules up front)."""
    moe = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    return sorted(known_metric_names(list(EXTRA_METRICS) + [f"router/flip_layer_{i}" for i in moe]))


_RULE = re.compile(r"^\s*([\w/.]+)\s*([<>])\s*([^:\s]+)\s*(?::\s*(\w+))?\s*$")


def parse_rule(text: str) -> GateRule:
    """'METRIC>THRESHOLD[:ACTION]' (action defaults to abort), e.g. 'k3>1e-4:warn'."""
    m = _RULE.match(text)
    if not m:
        raise ValueError(f"--gate {text!r}: expected METRIC>THRESHOLD[:ACTION] or METRIC<THRESHOLD[:ACTION], "
                         "e.g. 'k3>1e-4:abort'")
    try:
        threshold = float(m.group(3))
    except ValueError:
        raise ValueError(f"--gate {text!r}: threshold {m.group(3)!r} is not a number") from None
    return GateRule(metric=m.group(1), op=m.group(2), threshold=threshold, action=m.group(4) or "abort")


def run_align_check(rollout_side, trainer_side, config, prompts: list[list[int]], params: SamplingParams,
                    injection: Injection | None = None, rules: list = (), floor: float | None = None) -> AlignCheckResult:
    validate_rules(rules, metric_names(config))
    run = rollout_side.run(prompts, params)
    batch = run.batch
    temperature = logprob_temperature(params)
    prompt_lens = [len(p) for p in batch.prompt_ids]
    resp_lens = [len(r) for r in batch.response_ids]
    notes = list(getattr(rollout_side, "notes", []))  # what the engine had to say about this run
    roll_logits = sampled_logits(run.trace, prompt_lens, resp_lens) if run.trace else [None] * len(prompts)
    if injection is not None and injection.processed_logprobs:
        batch.logprobs = [lp if lg is None else candidate_logprobs(lg, r, params)["processed"].float()
                          for lp, lg, r in zip(batch.logprobs, roll_logits, batch.response_ids)]

    if getattr(trainer_side, "replay_routing", False):
        if batch.router_ids is None:
            raise ValueError(f"routing replay: the {rollout_side.name} engine recorded no expert choices")
        notes.append("routing replay: the trainer took the rollout's experts, so router flips are 0 by "
                     "construction and the table shows the kernels' gap alone")
    trainer_lp, trainer_ids = trainer_side.logprobs(batch, temperature)
    t_trace, traced_lp = trainer_side.run_traced(batch, temperature)
    trace_vs_engine = max([float((a - b).abs().max()) for a, b in zip(trainer_lp, traced_lp) if len(a)] or [0.0])
    if trace_vs_engine != 0.0:
        notes.append(f"the traced trainer forward differs from compute_logprobs by {trace_vs_engine:.3g}")

    dtype = coarser(rollout_side.compute_dtype, trainer_side.compute_dtype)
    floor = noise_floor(dtype) if floor is None else floor
    ops, first, states = [], None, {}
    if run.trace is None:
        notes.append(f"the {rollout_side.name} engine gives no op trace: logprob-level checks only")
    else:
        ops = compare_traces(run.trace, t_trace)
        first = first_divergence(ops, floor)
        states = state_diffs(run.trace, t_trace)
    train_logits = sampled_logits(t_trace, prompt_lens, resp_lens)
    vocab = vocab_divergence(roll_logits, train_logits, temperature)
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    flips, grid, edges = router_flips(batch.router_ids or [None] * len(prompts), trainer_ids, moe_layers, prompt_lens)
    semantics = _semantics(roll_logits, train_logits, batch, trainer_lp, params)

    live = [i for i, r in enumerate(resp_lens) if r > 0]
    seqs, masks = response_sequences([batch.prompt_ids[i] for i in live], [batch.response_ids[i] for i in live])
    replay = [batch.router_ids[i] for i in live] if getattr(trainer_side, "replay_routing", False) else None
    selftest = packing_selftest(trainer_side.policy, trainer_side.model, seqs, masks, temperature,
                                SELFTEST_TOL[trainer_side.compute_dtype], replay, moe_layers)

    metrics = logprob_mismatch(batch.logprobs, trainer_lp)
    metrics.update(_extra_metrics(vocab, flips, ops, first, states, semantics, selftest))
    gate = check_gate(rules, metrics)
    deltas = [(t.double() - r.double()).tolist() for r, t in zip(batch.logprobs, trainer_lp)]
    expected = expected_first(injection, config) if injection is not None else None
    return AlignCheckResult(rollout_side.name, injection.name if injection else None, str(dtype).removeprefix("torch."),
                            floor, params.__dict__.copy(), layer_kinds(config), ops, first, expected, states, flips,
                            grid, edges, vocab, deltas, semantics, selftest, trace_vs_engine, metrics, gate,
                            notes=notes, batch=batch, trainer_logprobs=trainer_lp)


def _semantics(roll_logits, train_logits, batch, trainer_lp, params) -> dict:
    have = [i for i, (a, b) in enumerate(zip(roll_logits, train_logits)) if a is not None and b is not None]
    if not have:
        return {"ok": False, "consistent": False, "summary": "no logits at the sampled positions to check"}
    def cat(xs):
        return torch.cat([xs[i] for i in have])
    return sampling_semantics(cat(roll_logits), cat(train_logits), cat(batch.response_ids), cat(batch.logprobs),
                              cat(trainer_lp), params, SAMPLING_TOL)


def _extra_metrics(vocab, flips, ops, first, states, semantics, selftest) -> dict[str, float]:
    def stat(xs, fn):
        return float(fn(torch.tensor(xs, dtype=torch.float64))) if xs else 0.0
    out = {"align/kl_full_mean": stat(vocab["kl"], torch.mean), "align/kl_full_max": stat(vocab["kl"], torch.max),
           "align/tv_mean": stat(vocab["tv"], torch.mean), "align/tv_max": stat(vocab["tv"], torch.max),
           "localize/diverged": float(first is not None),
           "localize/max_rel_err": max((d.rel_max for d in ops), default=0.0),
           "localize/state_rel_err_max": max(states.values(), default=0.0),
           "sampling/consistent": float(semantics.get("consistent", False)),
           "selftest/max_abs_diff": max(selftest["packed_vs_alone"], selftest["padded_vs_alone"])}
    out.update({f"router/flip_layer_{i}": v for i, v in flips.items()})
    out["router/flip_mean"] = sum(flips.values()) / len(flips) if flips else 0.0
    return out


# --------------------------------------------------------------------------- the printed table

def format_table(res: AlignCheckResult) -> str:
    """The per-layer table: each op's max per-token relative error, * above the noise floor."""
    diffs = {(d.layer, d.op): d for d in res.ops}
    cols = [op for op in OP_ORDER if any((layer, op) in diffs for layer in res.layer_kinds)]
    width = {op: max(len(op), 8) for op in cols}
    lines = [f"per-layer max relative error, rollout ({res.engine}) vs trainer; noise floor {res.noise_floor:.1e} "
             f"({res.compute_dtype}); * above it",
             f"{'layer':>5} {'kind':<15} " + " ".join(f"{op:>{width[op]}}" for op in cols)
             + f" {'state':>9}  {'flips':>6}"]

    def cell(d: OpDiff | None, w: int) -> str:
        if d is None:
            return f"{'-':>{w}}"
        mark = "*" if not d.rel_max <= res.noise_floor else " "
        return f"{d.rel_max:>{w - 1}.1e}{mark}"

    for layer, kind in res.layer_kinds.items():
        row = f"{layer:>5} {kind:<15} " + " ".join(cell(diffs.get((layer, op)), width[op]) for op in cols)
        state = "-"
        if layer in res.states:
            state = f"{res.states[layer]:.1e}" + ("*" if not res.states[layer] <= res.noise_floor else " ")
        flips = f"{res.flips[layer]:.3f}" if layer in res.flips else "-"
        row += f" {state:>10} {flips:>6}"
        if res.first is not None and res.first.layer == layer:
            row += f"  <- first: {res.first.op}"
        lines.append(row)
    head = [f"{op} {cell(diffs.get((None, op)), 9).strip()}" for op in ("final_norm", "lm_head") if (None, op) in diffs]
    if head:
        line = f"{'head':>5} {'':<15} " + "   ".join(head)
        if res.first is not None and res.first.layer is None:
            line += f"  <- first: {res.first.op}"
        lines.append(line)
    return "\n".join(lines)


def format_summary(res: AlignCheckResult) -> str:
    m = res.metrics
    if res.first is None:
        where = "no op diverges above the noise floor"
    else:
        layer = "after the decoder stack" if res.first.layer is None else f"layer {res.first.layer}"
        where = (f"first divergence: {layer}, op {res.first.op} (max rel. error {res.first.rel_max:.2e} at "
                 f"sequence {res.first.worst_seq}, position {res.first.worst_pos})")
    lines = [where,
             f"logprobs: {m.get('align/tokens', 0)} tokens, mean |Δ| {m.get('align/abs_delta_mean', 0):.3g}, "
             f"max |Δ| {m.get('align/abs_delta_max', 0):.3g}, k3 {m.get('align/k3', 0):.3g}, "
             f"bitwise equal {m.get('align/bitwise_equal_frac', 0):.1%}",
             f"full vocabulary at sampled positions: KL mean {m['align/kl_full_mean']:.3g} max {m['align/kl_full_max']:.3g}, "
             f"TV mean {m['align/tv_mean']:.3g} max {m['align/tv_max']:.3g}",
             f"router flips: mean {m['router/flip_mean']:.3f}",
             f"sampling semantics: {res.sampling_check.get('summary')}",
             f"self-test packed/padded/one-by-one: max |Δ| {m['selftest/max_abs_diff']:.2g} "
             f"(tol {res.selftest['tol']:g}) -> {'passed' if res.selftest['passed'] else 'FAILED'}",
             f"gate: {res.gate.action}" + (f" ({res.gate.describe()})" if res.gate.fired else "")]
    if res.golden is not None:
        g = res.golden
        lines.append(f"golden: {'passed' if g['passed'] else 'FAILED'} (max |Δ| rollout {g['max_abs_rollout']:.2g}, "
                     f"trainer {g['max_abs_trainer']:.2g}, tol {g['tolerance']:g})"
                     + "".join(f"\n  {p}" for p in g["problems"][:5]))
    lines += [f"note: {n}" for n in res.notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command

def load_data_prompts(model_dir, data_file: str, n: int) -> list[list[int]]:
    """The first n prompts of a JSONL/Parquet file (gsm8k or prompt/answer rows), tokenized
    as the RL loop tokenizes them."""
    from ring_rl.config import DataConfig
    from ring_rl.model.tokenizer import load_tokenizer
    from ring_rl.rl.data import load_prompts, tokenize_prompts

    tok = load_tokenizer(model_dir)
    data = load_prompts(DataConfig(test_files=[data_file]), "test", tok).dataset
    return tokenize_prompts(data["prompt"][:n], tok)


def cli_main(args) -> int:
    """`ring-rl align-check`: 0 passed, 1 a check failed (gate abort, golden, self-test),
    2 bad input or an engine that cannot run here."""
    import json
    import sys
    from pathlib import Path

    from ring_rl.alignment_checks import golden as gold
    from ring_rl.alignment_checks.align_report import write_align_report
    from ring_rl.alignment_checks.engines import EngineUnavailable, TrainerSide, make_rollout_side
    from ring_rl.alignment_checks.inject import get_injection, rollout_ops
    from ring_rl.model import load_model_config

    injection = get_injection(args.inject)
    config = load_model_config(args.model)
    rules = [parse_rule(r) for r in args.gate or []]
    validate_rules(rules, metric_names(config))  # a typo stops here, before any model loads
    doc = gold.load_golden(args.golden) if args.golden else None
    if doc is not None:
        prompts, params = gold.golden_prompts(doc)  # the golden's prompts, sampling and seeds
    elif args.data:
        prompts = load_data_prompts(args.model, args.data, args.prompts)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    else:
        raise ValueError("needs --data FILE (or --golden FILE, whose prompts it reuses)")
    if injection is not None and args.engine != "native":
        raise ValueError(f"--inject {injection.name}: injections swap the native model's ops; use --engine native")
    try:
        dtype = None if args.rollout_dtype == "auto" else args.rollout_dtype
        rollout = make_rollout_side(args.engine, args.model, rollout_ops(injection), args.device, dtype)
    except EngineUnavailable as e:
        print(f"ring-rl align-check: {e}", file=sys.stderr)
        return 2
    trainer = TrainerSide(args.model, args.device, bf16=args.trainer_bf16, replay_routing=args.routing_replay)
    res = run_align_check(rollout, trainer, config, prompts, params, injection, rules, args.noise_floor)
    dtype = getattr(torch, res.compute_dtype)
    if doc is not None:
        golden_lp, _ = trainer.logprobs(gold.golden_rollout(doc), logprob_temperature(params))
        res.golden = gold.compare_golden(doc, config, res.batch, golden_lp, args.golden_tol)
        res.notes.append(f"prompts, sampling and seeds came from the golden file {args.golden}")
    if args.save_golden:
        tol = args.golden_tol if args.golden_tol is not None else gold.GOLDEN_TOL[dtype]
        saved = gold.save_golden(args.save_golden, config, res.engine, dtype, res.batch, res.trainer_logprobs, tol)
        print(f"saved golden logprobs of {len(prompts)} prompts to {saved}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "align_check.json").write_text(json.dumps(_json_safe(res.to_json()), indent=1))
    written = [out / "align_check.json"]
    if not args.no_report:
        written.append(write_align_report(res, out / "align_check.html", str(args.model)))
    print(format_table(res))
    print(format_summary(res))
    print("wrote " + " and ".join(map(str, written)))
    if res.failed:
        print("align-check FAILED: " + " | ".join(res.failed), file=sys.stderr)
        return 1
    return 0


def _json_safe(obj):
    """NaN/inf -> None, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
