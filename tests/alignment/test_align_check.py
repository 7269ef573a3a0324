"""align-check on the tiny model (CPU, fp32): each planted discrepancy is localised to its layer
and op, a clean run shows nothing above the fp32 noise floor, and the sampling-semantics,
self-test and golden checks each pass and fail when they should.

One DeepSpeed trainer serves the module (its init costs ~1 s); each test builds its own
native rollout engine, with the injection on the rollout side only.
"""
from __future__ import annotations

import json

import pytest
import torch

from ring_rl.alignment_checks import golden as gold
from ring_rl.alignment_checks.align_check import format_table, parse_rule, run_align_check
from ring_rl.alignment_checks.engines import NativeRollout, TrainerSide
from ring_rl.alignment_checks.inject import INJECTIONS, expected_first, get_injection, rollout_ops
from ring_rl.alignment_checks.localize import noise_floor, router_flips
from ring_rl.alignment_checks.sampling_check import classify
from ring_rl.alignment_checks.selftest import packing_selftest
from ring_rl.cli import main as cli
from ring_rl.model import RingLinearForCausalLM, load_checkpoint, load_model_config, save_checkpoint
from ring_rl.model.ops import DEFAULT_OPS
from ring_rl.model.tokenizer import build_char_tokenizer
from ring_rl.trainer.logprobs import FlatPolicy, response_sequences
from ring_rl.types import SamplingParams
from tests.model_weights import randomise

# T != 1 and a top-k that bites on a 128-token vocabulary: raw, processed and unscaled
# logprobs all differ, so the sampling-semantics check can tell them apart.
PARAMS = SamplingParams(temperature=0.9, top_k=40, max_new_tokens=6, seed=3)
PROMPT_LENS = (5, 9, 3, 12)
FLOOR = noise_floor(torch.float32)
DIVERGED = "localize/diverged>0.5:abort"
OP_BUGS = [name for name, inj in INJECTIONS.items() if inj.change_ops is not None]


def _write_model(path, seed: int = 0, perturb: float = 0.0):
    """Tiny random model with non-trivial norms and expert bias (no all-ones / all-zeros),
    and the char tokenizer. perturb: relative noise added to layer 2's attention output."""
    config = load_model_config("tiny")
    tok = build_char_tokenizer()
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = randomise(RingLinearForCausalLM(config))
    with torch.no_grad():
        if perturb:
            w = model.model.layers[2].attention.dense.weight
            w.add_(perturb * w.abs().mean() * torch.randn_like(w))
    save_checkpoint(model, path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _write_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trainer(model_dir):
    return TrainerSide(model_dir)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _check(model_dir, trainer, prompts, name=None, rules=(DIVERGED,)):
    injection = get_injection(name)
    rollout = NativeRollout(model_dir, rollout_ops(injection))
    res = run_align_check(rollout, trainer, rollout.model.config, prompts, PARAMS, injection,
                          [parse_rule(r) for r in rules])
    assert res.trace_vs_engine == 0.0  # the traced trainer forward is compute_logprobs' forward
    assert all(m.ops is DEFAULT_OPS for m in trainer.model.modules() if hasattr(m, "ops"))  # restored
    return res


@pytest.fixture(scope="module")
def clean(model_dir, trainer, prompts):
    return _check(model_dir, trainer, prompts)


def test_clean_run_stays_below_the_noise_floor(clean):
    assert clean.first is None and clean.gate.action == "none"
    assert len(clean.ops) == 6 * 10 - 2 * 2 - 1 + 2  # every layer's ops (softmax: no core/gate; dense: no router) + head
    assert max(d.rel_max for d in clean.ops) <= FLOOR
    assert max(clean.states.values()) <= FLOOR and sorted(clean.states) == [0, 1, 3, 4]
    assert clean.metrics["align/abs_delta_max"] < 1e-5 and clean.metrics["align/kl_full_max"] < 1e-9
    assert clean.metrics["router/flip_mean"] == 0.0 and sorted(clean.flips) == [1, 2, 3, 4, 5]
    # Rollout and trainer both report the raw temperature-scaled distribution, and only it.
    assert clean.sampling_check["rollout"]["matches"] == ["raw"] == clean.sampling_check["trainer"]["matches"]
    assert clean.sampling_check["consistent"] and len(clean.sampling_check["rollout"]["distinguishable"]) == 3
    assert clean.selftest["passed"] and not clean.failed
    assert "<- first" not in format_table(clean)


@pytest.mark.parametrize("name", OP_BUGS)
def test_injection_is_localised_and_gated(model_dir, trainer, prompts, name):
    res = _check(model_dir, trainer, prompts, name)
    config = load_model_config(model_dir)
    want = expected_first(INJECTIONS[name], config)
    assert res.first is not None and (res.first.layer, res.first.op) == want, (res.first, want)
    assert res.first.rel_max > 10 * FLOOR  # a decade clear of the floor, not a borderline call
    before = [d for d in res.ops if res.ops.index(d) < res.ops.index(res.first)]
    assert before and all(d.rel_max <= FLOOR for d in before)
    # The state at the end of the prompt moves exactly when the bug sits in or before the
    # first lightning layer's recurrence (the decay, the stored state, the rotated keys).
    lin0 = want[0] if want[1] == "attn_core" else 0
    assert (res.states[lin0] > FLOOR) == (name in ("decay_shift", "bf16_state", "rope_full")), res.states
    assert res.gate.action == "abort" and "localize/diverged" in res.gate.describe()
    assert "gate abort" in res.failed[0]
    table = format_table(res).splitlines()
    row = next(line for line in table if "<- first" in line)
    label = "head" if want[0] is None else str(want[0])
    assert row.split()[0] == label and row.endswith(f"<- first: {want[1]}")
    assert len(table) == 2 + config.num_hidden_layers + 1


def test_router_bug_moves_every_moe_layers_logits(model_dir, trainer, prompts):
    """bf16 router: the router logits of every MoE layer move by ~bf16 rounding."""
    res = _check(model_dir, trainer, prompts, "bf16_router")
    routers = {d.layer: d.rel_max for d in res.ops if d.op == "router"}
    assert sorted(routers) == [1, 2, 3, 4, 5] and min(routers.values()) > 1e-3


def test_processed_logprobs_are_caught_by_the_sampling_check(model_dir, trainer, prompts):
    res = _check(model_dir, trainer, prompts, "processed_logprobs", rules=["sampling/consistent<0.5:abort"])
    assert res.first is None  # every op agrees: the gap is in what the logprob means
    s = res.sampling_check
    assert s["rollout"]["matches"] == ["processed"] and s["trainer"]["matches"] == ["raw"]
    assert not s["consistent"] and "MISMATCH" in s["summary"]
    assert res.gate.action == "abort" and res.metrics["align/abs_delta_max"] > 0.1


def test_router_flips_by_hand():
    """Two MoE layers; sequence 0 (prompt 3, response 4: 6 input positions) has one flipped
    expert set at layer 1, input position 4 = response position 2, and a reordered but equal
    set at layer 0; sequence 1 (prompt 2, response 2: 3 positions) agrees everywhere."""
    g = torch.Generator().manual_seed(0)
    rollout = [torch.randint(0, 8, (2, 6, 2), generator=g), torch.randint(0, 8, (2, 3, 2), generator=g)]
    trainer = [r.clone() for r in rollout]
    trainer[0][0, 1] = trainer[0][0, 1].flip(0)                  # same set, other order: no flip
    trainer[0][1, 4, 0] = (rollout[0][1, 4] .max() + 1) % 8 + 8   # an expert id not in the set
    rates, grid, edges = router_flips(rollout, trainer, [1, 3], [3, 2], buckets=4)
    assert rates == {1: 0.0, 3: pytest.approx(1 / 9)}
    assert edges == [0, 1, 2, 3, 4] and grid[0] == [0.0] * 4 and grid[1] == [0.0, 0.0, 1.0, 0.0]


def test_parse_rule():
    rule = parse_rule(" router/flip_mean > 0.05 : warn")
    assert (rule.metric, rule.op, rule.threshold, rule.action) == ("router/flip_mean", ">", 0.05, "warn")
    assert parse_rule("k3<1e-3").action == "abort"
    for bad in ("k3 >= 1", "k3>abc", "k3>1:explode"):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_sampling_classify_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 3.0, 0.0, 0.0]])
    tokens = torch.tensor([1, 0])
    p = SamplingParams(temperature=0.5, top_k=2)
    raw = torch.log_softmax(logits / 0.5, -1)[[0, 1], tokens]
    top2 = torch.log_softmax(torch.tensor([[4.0, 2.0], [6.0, 1.0]]), -1)[[0, 1], [1, 1]]  # token's place in its top-2
    assert classify(logits, tokens, raw, p, 1e-6)["matches"] == ["raw"]
    assert classify(logits, tokens, top2, p, 1e-6)["matches"] == ["processed"]
    same = classify(logits, tokens, torch.log_softmax(logits, -1)[[0, 1], tokens], SamplingParams(), 1e-6)
    assert same["matches"] == ["raw", "processed", "unscaled"] and same["distinguishable"] == []


class _LeakyPolicy(torch.nn.Module):
    """Scores packed sequences as one long sequence: state flows from one into the next."""

    def __init__(self, model):
        super().__init__()
        self.inner = FlatPolicy(model)

    def forward(self, input_ids, seqlens, rows, replay_ids=None, batch=None):
        assert batch is None  # the self-test packs plainly
        return self.inner(input_ids, seqlens.sum().reshape(1), rows, replay_ids)


def test_packing_selftest_passes_and_catches_a_leak(trainer, prompts):
    g = torch.Generator().manual_seed(5)
    responses = [torch.randint(3, 128, (n,), generator=g) for n in (4, 1, 7, 3)]
    seqs, masks = response_sequences([torch.tensor(p) for p in prompts], responses)
    good = packing_selftest(trainer.policy, trainer.model, seqs, masks, 0.9, 1e-5)
    assert good["passed"] and good["packed_vs_alone"] <= 1e-5 and good["padded_vs_alone"] <= 1e-5
    leak = packing_selftest(_LeakyPolicy(trainer.model), trainer.model, seqs, masks, 0.9, 1e-5)
    assert not leak["passed"] and leak["packed_vs_alone"] > 1e-2 and leak["padded_vs_alone"] <= 1e-5


def _data(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a, b in [(12, 7), (40, 33), (5, 91)]))
    return str(path)


def test_cli_golden_save_compare_and_perturbed_model(tmp_path, model_dir, capsys):
    args = ["align-check", "--data", _data(tmp_path), "--prompts", "3", "--max-new-tokens", "5",
            "--temperature", "0.9", "--top-k", "40"]
    golden = str(tmp_path / "golden.json")
    assert cli(args + ["--model", str(model_dir), "--out", str(tmp_path / "a"), "--save-golden", golden]) == 0
    doc = gold.load_golden(golden)
    assert len(doc["sequences"]) == 3 and doc["config_hash"] == gold.config_hash(load_model_config(model_dir))
    assert set(doc["versions"]) >= {"torch", "transformers", "ring_rl"} and doc["tolerance"] == 1e-4
    out = capsys.readouterr().out
    assert "first divergence" not in out and "no op diverges" in out and out.count("lightning/") == 4
    report = json.loads((tmp_path / "a" / "align_check.json").read_text())
    assert report["first_divergence"] is None and len(report["ops"]) == 57 and report["failed"] == []
    page = (tmp_path / "a" / "align_check.html").read_text()
    assert page.count("<img class='plot'") == 5 and "Per-layer divergence" in page and "http" not in page.split("<body>")[1]

    args.append("--no-report")  # the page is checked above; its plots take seconds each here
    assert cli(args + ["--model", str(model_dir), "--out", str(tmp_path / "b"), "--golden", golden]) == 0
    assert "golden: passed" in capsys.readouterr().out

    moved = _write_model(tmp_path / "moved", perturb=0.02)  # same config, layer 2 nudged by 2%
    assert cli(args + ["--model", str(moved), "--out", str(tmp_path / "c"), "--golden", golden]) == 1
    captured = capsys.readouterr()
    assert "golden: FAILED" in captured.out and "golden logprobs moved" in captured.err
    with pytest.raises(gold.GoldenError, match="not the same model"):
        config = load_model_config(model_dir)
        config.rope_theta = 20000.0
        gold.compare_golden(doc, config, None, [])


def test_cli_injection_gate_exit_code_and_vllm_message(tmp_path, model_dir, capsys):
    base = ["align-check", "--model", str(model_dir), "--data", _data(tmp_path), "--prompts", "2",
            "--max-new-tokens", "4", "--out", str(tmp_path / "o"), "--no-report"]
    assert cli(base + ["--inject", "rope_full", "--gate", "k3>1e-6:abort"]) == 1
    captured = capsys.readouterr()
    assert "<- first: rotary" in captured.out and "gate abort: k3 > 1e-06" in captured.err
    assert cli(base + ["--engine", "vllm"]) == 2
    assert "vLLM engine not available:" in capsys.readouterr().err
    assert cli(base + ["--gate", "k3_mean>1"]) == 2  # a typo in a rule stops before any model loads
    assert "did you mean 'k3'" in capsys.readouterr().err


def test_tracing_does_not_change_the_rollout(model_dir, prompts):
    traced = NativeRollout(model_dir).run(prompts, PARAMS).batch
    from ring_rl.rollout.native import NativeEngine
    plain = NativeEngine(load_checkpoint(model_dir), [1]).generate(prompts, PARAMS)
    for a, b in zip(traced.logprobs, plain.logprobs):
        assert torch.equal(a, b)
    assert [r.tolist() for r in traced.response_ids] == [r.tolist() for r in plain.response_ids]


def test_routing_replay_takes_the_rollouts_experts(model_dir, prompts):
    """The rollout's recorded experts are altered (sequence 0, first MoE layer, every
    position: a different expert set). Without replay the trainer routes by itself and the
    alteration shows as router flips; with replay the trainer runs the altered experts (flips
    0, said in a note) and its logprobs of sequence 0 move, the others' do not (up to rounding)."""

    class AlteredRoutes(NativeRollout):
        def run(self, prompts, params):
            run = super().run(prompts, params)
            ids = run.batch.router_ids[0]
            ids[0] = (ids[0] + 1) % self.model.config.num_experts  # top-k stays distinct
            return run

    rollout = AlteredRoutes(model_dir)
    runs = {replay: run_align_check(rollout, TrainerSide(model_dir, replay_routing=replay), rollout.model.config,
                                    prompts, PARAMS) for replay in (False, True)}
    plain, replayed = runs[False], runs[True]
    assert replayed.trace_vs_engine == 0.0  # the traced forward replays too
    # ... and so do the self-test's packed, one-by-one and padded forwards (the padded one
    # routing by itself would differ from the other two on sequence 0)
    assert replayed.selftest["passed"] and replayed.selftest["padded_vs_alone"] <= 1e-5
    assert plain.flips[1] > 0 and replayed.metrics["router/flip_mean"] == 0.0
    assert any("routing replay" in n for n in replayed.notes) and not any("routing replay" in n for n in plain.notes)
    lp_plain, lp_replay = plain.trainer_logprobs, replayed.trainer_logprobs
    assert (lp_plain[0] - lp_replay[0]).abs().max() > 1e-3
    # The others route as before, but not always to the bit: sequence 0's altered experts change
    # the per-expert row counts, so the reference MoE's matmuls run at other shapes, and with
    # two or more torch threads BLAS may split them differently (4.8e-7 with 2 threads on a
    # 2-core AMD EPYC; bitwise with one, as scripts/test.sh runs).
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(lp_plain[1:], lp_replay[1:]))
