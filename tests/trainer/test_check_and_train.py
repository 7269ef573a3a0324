"""TrainerEngine.check_and_train: the alignment check and the update in one trainer call.

When the update is one pass over one micro-batch, its forward doubles as the logprob pass:
the result must be the same as the separate recompute followed by train_step (logprobs, loss,
gradient norm and weights), for every alignment policy. Also: a gate `skip` leaves the
weights and version alone, and the rollout's weight version may trail by at most max_lag.
Native rollouts of a random-init `tiny` model (real logprobs and experts). fp32: the fused
forward runs the same ops on the same packing, so logprobs agree to the last bit or nearly
(1e-6); weights after one Adam step of lr 1e-3 agree to 1e-6.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ring_rl.alignment_checks.step import StepCheck
from ring_rl.config import AlignmentConfig, GateRule, TrainerConfig
from ring_rl.model import RingLinearForCausalLM, load_checkpoint, load_model_config
from ring_rl.rollout.native import NativeEngine
from ring_rl.trainer.engine import TrainerEngine
from ring_rl.types import SamplingParams, StaleWeightsError, TrainBatch

MOE_LAYERS = [1, 2, 3, 4, 5]  # the `tiny` preset: layer 0 dense


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-fused")
    RingLinearForCausalLM(load_model_config("tiny")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch(model_dir) -> TrainBatch:
    """16 sampled responses (4 prompts x 4) of up to 6 tokens, advantages of both signs."""
    engine = NativeEngine(load_checkpoint(model_dir, dtype=torch.float32), [1, 2, 3])
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 128, (int(n),), generator=g).tolist() for n in (3, 5, 4, 7) for _ in range(4)]
    rollout = engine.generate(prompts, SamplingParams(temperature=0.9, max_new_tokens=6), seeds=list(range(16)))
    advantages = torch.randn(len(rollout), generator=g)
    return TrainBatch(rollout=rollout, rewards=torch.zeros(len(rollout)), advantages=advantages)


def _engine(model_dir, **kw) -> TrainerEngine:
    cfg = dict(zero_stage=1, lr=1e-3, micro_batch_size=16, num_minibatches=1, grad_clip=1.0)
    return TrainerEngine(model_dir, TrainerConfig(**{**cfg, **kw}), seed=0, num_threads=1)


def _weights(engine: TrainerEngine) -> torch.Tensor:
    return torch.cat([v.flatten().float() for v in engine.weights_for_rollout()[1].values()])


@pytest.mark.parametrize("policy", ["recompute", "none", "tis", "icepop"])
def test_fused_pass_equals_recompute_then_update(model_dir, batch, policy):
    # Rollout logprobs moved off the trainer's, so that the policies weigh, mask and clip.
    g = torch.Generator().manual_seed(1)
    rollout = replace(batch.rollout, logprobs=[x + 0.7 * torch.randn(x.shape, generator=g) for x in batch.rollout.logprobs])
    batch = replace(batch, rollout=rollout)
    check = StepCheck(AlignmentConfig(policy=policy), MOE_LAYERS)
    fused = _engine(model_dir)
    stats, report = fused.check_and_train(batch, check)
    assert stats["fused"] == 1.0 and stats["logprob_s"] == 0.0 and fused.version == 1

    ref = _engine(model_dir)
    logprobs, _, router_ids = ref.compute_logprobs(batch.rollout)
    ref_report = check(batch.rollout, logprobs, router_ids)
    ref_stats = ref.train_step(replace(batch, old_logprobs=ref_report.old_logprobs,
                                       token_weights=ref_report.token_weights))

    diff = max((a - b).abs().max().item() for a, b in zip(report.trainer_logprobs, logprobs) if a.numel())
    assert diff <= 1e-6
    assert report.metrics["router/flip_mean"] == ref_report.metrics["router/flip_mean"]
    assert report.metrics["align/tokens"] == batch.rollout.num_response_tokens
    assert stats["loss"] == pytest.approx(ref_stats["loss"], abs=1e-6)
    assert stats["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=1e-5)
    assert (_weights(fused) - _weights(ref)).abs().max().item() <= 1e-6
    assert (_weights(fused) - _weights(_engine(model_dir))).abs().max().item() > 1e-4  # it trained
    if policy in ("tis", "icepop"):
        assert report.metrics["policy/clipped_frac"] + report.metrics["policy/masked_frac"] > 0
    if policy != "none":  # old logprobs = the update's own: the ratio is exactly 1 on the first pass
        assert stats["ratio_max"] == stats["ratio_min"] == 1.0
    else:
        assert stats["ratio_max"] != stats["ratio_min"]  # the rollout's logprobs are another engine's


def test_several_passes_recompute_first(model_dir, batch):
    engine = _engine(model_dir, num_minibatches=2)
    stats, report = engine.check_and_train(batch, StepCheck(AlignmentConfig(), MOE_LAYERS))
    assert stats["fused"] == 0.0 and stats["logprob_s"] > 0 and stats["optimizer_steps"] == 2
    assert report.metrics["align/abs_delta_max"] < 1e-4  # same fp32 model in both engines


def test_gate_skip_runs_no_update(model_dir, batch):
    rule = GateRule(metric="tokens", op=">", threshold=0, action="skip")  # fires on every step
    engine = _engine(model_dir)
    before = _weights(engine)
    stats, report = engine.check_and_train(batch, StepCheck(AlignmentConfig(gate=[rule]), MOE_LAYERS))
    assert stats == {} and report.action == "skip" and not report.update
    assert report.metrics["gate/action"] == "skip" and report.metrics["align/tokens"] > 0
    assert engine.version == 0 and torch.equal(_weights(engine), before)


def test_rollout_may_trail_by_max_lag_only(model_dir, batch):
    engine = _engine(model_dir)
    check = StepCheck(AlignmentConfig(), MOE_LAYERS)
    engine.check_and_train(batch, check)  # v0 -> v1; the batch says v0
    with pytest.raises(StaleWeightsError, match="lag 1, allowed 0..0"):
        engine.check_and_train(batch, check)
    stats, report = engine.check_and_train(batch, check, max_lag=1)
    assert report.metrics["rollout/staleness"] == 1.0 and stats and engine.version == 2
    with pytest.raises(StaleWeightsError, match="lag 2, allowed 0..1"):
        engine.check_and_train(batch, check, max_lag=1)
    ahead = replace(batch, rollout=replace(batch.rollout, weight_version=3))
    with pytest.raises(StaleWeightsError, match="lag -1"):  # weights the trainer never had
        engine.check_and_train(ahead, check, max_lag=1)
