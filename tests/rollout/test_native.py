"""The native rollout engine on CPU: sampling semantics, finishing, determinism, logprobs."""
from __future__ import annotations

import pytest
import torch

from ring_rl.model import RingLinearForCausalLM, SeqBatch, load_model_config
from ring_rl.model.sampling import token_logprobs
from ring_rl.rollout.native import NativeEngine, StaleWeightsError
from ring_rl.types import SamplingParams

EOS = [1, 2, 3, 4, 5, 6]  # several end tokens: random-init sequences finish at different steps


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RingLinearForCausalLM(load_model_config("tiny")).eval()


def _prompts(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(7, 128, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_same_seed_same_tokens_and_batch_invariant_tokens(model):
    engine = NativeEngine(model, EOS)
    prompts = _prompts()
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=12, seed=3)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [r.tolist() for r in a.response_ids] == [r.tolist() for r in b.response_ids]
    assert all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    # Per-sequence generators: sequence 5 alone, with its seed, draws the same tokens.
    seeds = [params.seed * 1_000_003 + i for i in range(len(prompts))]
    alone = engine.generate([prompts[5]], params, seeds=[seeds[5]])
    assert alone.response_ids[0].tolist() == a.response_ids[5].tolist()
    torch.testing.assert_close(alone.logprobs[0], a.logprobs[5], atol=1e-5, rtol=0)


def test_finishing_eos_and_length(model):
    engine = NativeEngine(model, EOS)
    params = SamplingParams(temperature=1.0, max_new_tokens=9, seed=1)
    out = engine.generate(_prompts(32, seed=2), params)
    lens = [len(r) for r in out.response_ids]
    assert max(lens) <= 9 and len(set(lens)) >= 3, lens
    for r, why in zip(out.response_ids, out.finish_reasons):
        if why == "eos":
            assert r[-1].item() in EOS and not any(t in EOS for t in r[:-1].tolist())
        else:
            assert len(r) == 9 and not any(t in EOS for t in r.tolist())
    assert "eos" in out.finish_reasons and "length" in out.finish_reasons


def test_logprobs_are_the_full_forward_temperature_scaled(model):
    """Each sampled token's logprob equals log_softmax(logits / T) of one full forward over
    prompt + response (the raw, temperature-scaled distribution, before top-k/top-p)."""
    engine = NativeEngine(model, EOS)
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=8, seed=4)
    out = engine.generate(_prompts(8, seed=5), params)
    for p, r, lp in zip(out.prompt_ids, out.response_ids, out.logprobs):
        ids = torch.cat([p, r])[:-1]
        with torch.no_grad():
            logits, _ = model.forward_flat(ids, SeqBatch.build(torch.tensor([ids.numel()])))
        torch.testing.assert_close(lp, token_logprobs(logits[len(p) - 1:], r, 0.7), atol=1e-5, rtol=0)
    assert out.router_ids is not None
    assert out.router_ids[0].shape[1] == len(out.prompt_ids[0]) + len(out.response_ids[0]) - 1


def test_top_k_one_is_greedy_and_greedy_is_argmax(model):
    engine = NativeEngine(model, EOS)
    prompts = _prompts(6, seed=7)
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    top1 = engine.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=6, seed=9))
    assert [r.tolist() for r in greedy.response_ids] == [r.tolist() for r in top1.response_ids]


def test_stale_weights_are_refused(model):
    engine = NativeEngine(model, EOS, weight_version=3)
    with pytest.raises(StaleWeightsError, match="v2"):
        engine.generate(_prompts(2), SamplingParams(max_new_tokens=2), expected_version=2)
    engine.load_weights(model.state_dict(), version=4)
    assert engine.generate(_prompts(2), SamplingParams(max_new_tokens=2), expected_version=4).weight_version == 4


def test_repeated_prompts_are_prefilled_once_with_the_same_results(model):
    """A group of G copies of a prompt (GRPO) is prefilled once and its cache slot copied: each
    row samples what it samples alone with its seed, with the same logprobs and experts."""
    engine = NativeEngine(model, EOS)
    prompts = [p for p in _prompts(3, seed=8) for _ in range(4)]
    params = SamplingParams(temperature=1.0, max_new_tokens=7, seed=2)
    calls = []
    forward_flat = model.forward_flat
    model.forward_flat = lambda ids, batch, *a, **k: calls.append(ids.numel()) or forward_flat(ids, batch, *a, **k)
    try:
        out = engine.generate(prompts, params, seeds=list(range(12)))
    finally:
        del model.forward_flat
    assert calls[0] == sum(len(p) for p in prompts[::4])  # the prefill ran the 3 distinct prompts
    for i in (0, 5, 11):
        alone = engine.generate([prompts[i]], params, seeds=[i])
        assert alone.response_ids[0].tolist() == out.response_ids[i].tolist()
        torch.testing.assert_close(alone.logprobs[0], out.logprobs[i], atol=1e-5, rtol=0)
        assert torch.equal(alone.router_ids[0], out.router_ids[i])


@pytest.mark.parametrize("prefill_chunk", [0, 3])
def test_a_used_cache_gives_what_a_new_one_gives(model, prefill_chunk):
    """The engine keeps its slot cache between calls of the same size without zeroing it:
    after a call on other prompts (longer ones, EOS at other steps), a call gives bitwise
    what a new engine gives."""
    params = SamplingParams(temperature=1.0, max_new_tokens=9, seed=4)
    prompts = [p for p in _prompts(3, seed=11) for _ in range(4)]
    used = NativeEngine(model, EOS, prefill_chunk=prefill_chunk)
    used.generate([p * 2 for p in _prompts(12, seed=12)], params, seeds=list(range(100, 112)))
    kept = used._cache
    got = used.generate(prompts, params, seeds=list(range(12)))
    assert used._cache is kept  # taken over, not rebuilt
    want = NativeEngine(model, EOS, prefill_chunk=prefill_chunk).generate(prompts, params, seeds=list(range(12)))
    assert [r.tolist() for r in got.response_ids] == [r.tolist() for r in want.response_ids]
    assert all(torch.equal(a, b) for a, b in zip(got.logprobs, want.logprobs))
    assert all(torch.equal(a, b) for a, b in zip(got.router_ids, want.router_ids))
