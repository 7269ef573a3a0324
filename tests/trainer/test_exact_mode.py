"""Exact mode on CPU: the DeepSpeed trainer's logprobs of a native rollout are bitwise the
rollout's own, with no router flip, for fp32 and bf16 weights — because the trainer replays
the rollout's schedule (ring_rl.model.stepping). The default packed pass is only close."""
from __future__ import annotations

import pytest
import torch

from ring_rl.config import TrainerConfig
from ring_rl.model import RingLinearForCausalLM, load_checkpoint, load_model_config
from ring_rl.rollout.native import NativeEngine
from ring_rl.types import RolloutBatch, SamplingParams

EOS = list(range(1, 11))  # ten end tokens of 128: sequences finish at different steps


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = RingLinearForCausalLM(load_model_config("tiny"))
    with torch.no_grad():  # a trained router has biases; random ones make routing non-trivial
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.expert_bias.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("tiny-exact")
    model.save_pretrained(path)
    return path


def _rollout(model_dir, dtype, n_calls=2, per_call=32, chunk=4) -> RolloutBatch:
    """Two engine calls (as two rollout actors would make), prompts of 2..13 tokens."""
    engine = NativeEngine(load_checkpoint(model_dir, dtype=dtype), EOS, prefill_chunk=chunk)
    g = torch.Generator().manual_seed(1)
    parts = []
    for call in range(n_calls):
        prompts = [torch.randint(11, 128, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(per_call)]
        params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=10, seed=call)
        parts.append(engine.generate(prompts, params))
    return RolloutBatch.concat(parts)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_exact_mode_is_bitwise(model_dir, bf16):
    from ring_rl.trainer.engine import TrainerEngine

    rollout = _rollout(model_dir, torch.bfloat16 if bf16 else torch.float32)
    lens = sorted({len(r) for r in rollout.response_ids})
    assert len(rollout) == 64 and len(lens) >= 4, f"want mixed response lengths, got {lens}"
    trainer = TrainerEngine(model_dir, TrainerConfig(zero_stage=1, bf16=bf16, micro_batch_size=16),
                            seed=0, num_threads=1)
    exact, entropies, routes = trainer.exact_logprobs(rollout)
    for i, (a, b) in enumerate(zip(rollout.logprobs, exact)):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b), f"sequence {i}: first differing token {int((a != b).nonzero()[0])}"
        assert torch.equal(rollout.router_ids[i], routes[i]), f"sequence {i}: router flip"
        assert entropies[i].shape == a.shape and bool((entropies[i] > 0).all())
    # The default packed pass computes the same maths in another blocking: close, and
    # (this is why exact mode exists) not guaranteed bitwise.
    packed, _, _ = trainer.compute_logprobs(rollout)
    worst = max((a - b).abs().max().item() for a, b in zip(rollout.logprobs, packed))
    assert worst < (0.1 if bf16 else 1e-4)


def test_exact_mode_refuses_a_schedule_that_does_not_cover_the_batch(model_dir):
    from ring_rl.trainer.engine import TrainerEngine

    rollout = _rollout(model_dir, torch.float32, n_calls=1, per_call=4)
    rollout.schedule = [[0, 1, 2]]
    trainer = TrainerEngine(model_dir, TrainerConfig(zero_stage=0), seed=0, num_threads=1)
    with pytest.raises(ValueError, match="schedule does not cover"):
        trainer.exact_logprobs(rollout)
