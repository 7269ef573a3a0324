"""Shared-prompt packing (`pack_shared`, trainer.share_prompts): every distinct prompt of a
micro-batch runs once, its continuations carry on from it. Against plain packing (every
sequence whole) on random inputs: the same logprobs, router ids and parameter gradients.

Tolerances (fp32): logprobs 1e-4 absolute, gradients 1e-3 of each tensor's largest entry.
The two layouts do the same maths with a different split of the lightning recurrence (a
continuation starts from its prompt's final state instead of re-summing the prompt), which
moves fp32 logprobs by ~1e-5 through six layers; a wrong mask or a wrong state moves them
by 0.1 and more.
"""
from __future__ import annotations

import pytest
import torch

from ring_rl.kernels import prefix_blocks
from ring_rl.model import RingLinearForCausalLM, load_model_config
from ring_rl.trainer.logprobs import (
    FlatPolicy,
    pack,
    pack_shared,
    response_sequences,
    score,
)
from ring_rl.types import RolloutBatch, SamplingParams, TrainBatch

LP_TOL, GRAD_TOL = 1e-4, 1e-3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RingLinearForCausalLM(load_model_config("tiny")).float()  # 6 layers: both attention kinds, MoE


def _groups(seed: int, prompt_lens=(7, 4, 9), group=4, interleave=True):
    """Groups sharing prompts, responses of 1..6 tokens (length 1: no continuation rows),
    optionally interleaved so one prompt's sequences are not adjacent."""
    g = torch.Generator().manual_seed(seed)
    base = [torch.randint(2, 128, (n,), generator=g) for n in prompt_lens]
    order = [u for _ in range(group) for u in range(len(base))] if interleave else \
        [u for u in range(len(base)) for _ in range(group)]
    prompts = [base[u].clone() for u in order]  # equal content, distinct tensors
    responses = [torch.randint(2, 128, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
                 for _ in order]
    responses[1] = responses[1][:1]
    return prompts, responses


def _scores(model, packed):
    """(logprobs, router ids, grads of a weighted logprob sum) of one packed batch."""
    model.zero_grad()
    logp, _, ids = score(FlatPolicy(model), packed, 0.9, with_entropy=False)
    (logp * torch.linspace(0.5, 2.0, logp.numel(), device=logp.device)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), ids, grads


@pytest.mark.parametrize("attention", ["blocks", "per-continuation"])
@pytest.mark.parametrize("interleave", [True, False])
def test_shared_prompts_match_plain_packing(model, interleave, attention, monkeypatch):
    """attention: how the CPU attention layers run the shared layout, as one masked block per
    prompt (groups this small) or per continuation over its prompt's gathered keys (groups
    longer than MAX_BLOCK rows)."""
    if attention == "per-continuation":
        monkeypatch.setattr(prefix_blocks, "MAX_BLOCK", 1)
    prompts, responses = _groups(1, interleave=interleave)
    plain = pack(*response_sequences(prompts, responses), "cpu")
    shared = pack_shared(prompts, responses, "cpu")
    assert (shared.batch.shared.blocks is None) == (attention == "per-continuation")
    # each prompt once, then every response minus its last token
    assert shared.input_ids.numel() == 7 + 4 + 9 + sum(r.numel() - 1 for r in responses)
    assert shared.input_ids.numel() < plain.input_ids.numel()
    assert torch.equal(shared.targets, plain.targets) and shared.num_targets == plain.num_targets
    lp_a, ids_a, g_a = _scores(model, plain)
    lp_b, ids_b, g_b = _scores(model, shared)
    assert (lp_a - lp_b).abs().max() <= LP_TOL
    assert ids_a.keys() == ids_b.keys() and all(torch.equal(ids_a[k], ids_b[k]) for k in ids_a)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        scale = g_a[name].abs().max().clamp_min(1e-12)
        assert (g_a[name] - g_b[name]).abs().max() / scale <= GRAD_TOL, name


def test_shared_prompts_replay_the_recorded_experts(model):
    """Replayed experts (here: a rollout's, altered so they differ from what the model would
    pick) land on the right rows of the shared layout: the same logprobs and ids as plain
    packing with the same replay."""
    prompts, responses = _groups(2)
    plain_free = pack(*response_sequences(prompts, responses), "cpu")
    _, ids, _ = _scores(model, plain_free)
    layers = sorted(ids)
    stacked = torch.stack([ids[layer] for layer in layers])
    stacked = (stacked + 1) % model.config.num_experts  # top-k stays distinct
    lens = plain_free.seqlens.tolist()
    replay = list(torch.split(stacked, lens, dim=1))
    plain = pack(*response_sequences(prompts, responses), "cpu", replay, layers)
    shared = pack_shared(prompts, responses, "cpu", replay, layers)
    lp_a, _, _ = _scores(model, plain)
    lp_b, ids_b, _ = _scores(model, shared)
    assert all(torch.equal(ids_b[layer], stacked[j]) for j, layer in enumerate(layers))
    assert (lp_a - lp_b).abs().max() <= LP_TOL


def test_pack_shared_refuses_an_empty_response():
    with pytest.raises(ValueError, match="sequence 1: pack_shared needs .* response of >= 1 token"):
        pack_shared([torch.tensor([3, 4]), torch.tensor([3, 4])], [torch.tensor([5]), torch.tensor([])], "cpu")


def test_trainer_update_is_the_same_with_and_without_sharing(tmp_path):
    """GRPO updates through DeepSpeed (two minibatches of micro-batches that split groups)
    with share_prompts on and off, from the same weights: the same logprobs before, the same
    loss and gradient norm, and weights that moved the same way."""
    # imported here: pydantic and DeepSpeed are not needed by the GPU test above
    from ring_rl.config import TrainerConfig
    from ring_rl.trainer.engine import TrainerEngine

    torch.manual_seed(0)
    config = load_model_config("tiny")
    config.num_hidden_layers = 3
    RingLinearForCausalLM(config).save_pretrained(tmp_path / "m")
    start = RingLinearForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    prompts, responses = _groups(3, group=3)
    n = len(prompts)
    rollout = RolloutBatch(prompt_ids=prompts, response_ids=responses, logprobs=[torch.zeros(len(r)) for r in responses],
                           finish_reasons=["stop"] * n, weight_version=0, sampling=SamplingParams(temperature=0.8))
    adv = torch.randn(n, generator=torch.Generator().manual_seed(4))
    out = {}
    for share in (False, True):
        cfg = TrainerConfig(zero_stage=0, lr=1e-3, micro_batch_size=4, num_minibatches=2, share_prompts=share)
        engine = TrainerEngine(tmp_path / "m", cfg)
        before = engine.compute_logprobs(rollout)[0]
        stats = engine.train_step(TrainBatch(rollout=rollout, rewards=torch.zeros(n), advantages=adv))
        out[share] = before, stats, {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    (lp_a, st_a, w_a), (lp_b, st_b, w_b) = out[False], out[True]
    assert max(float((a - b).abs().max()) for a, b in zip(lp_a, lp_b)) <= LP_TOL
    for key in ("loss", "grad_norm"):
        assert abs(st_a[key] - st_b[key]) <= 1e-4 * abs(st_a[key]), key
    # AdamW's first steps move each weight by ~lr * g / |g|: a gradient entry near 0 can move
    # its weight by up to lr in either run, so compare the whole update, not entry by entry.
    delta_a = torch.cat([(w_a[k] - w0).flatten() for k, w0 in start.items()])
    delta_b = torch.cat([(w_b[k] - w0).flatten() for k, w0 in start.items()])
    assert delta_a.abs().max() > 1e-4  # the updates did something
    assert torch.nn.functional.cosine_similarity(delta_a, delta_b, dim=0) > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prompts_on_the_gpu(model, dtype):
    """The Triton path: the lightning kernel's initial-state and final-state gradients carry
    a continuation's gradient back into its prompt. Prompts longer than a 64-token chunk.
    fp32: the CPU tolerances; bf16: logprobs within 0.05 (the trainer's bf16 self-test
    tolerance) and each gradient pointing the same way (cosine > 0.99)."""
    gpu = RingLinearForCausalLM(model.config).to("cuda", dtype)
    gpu.load_state_dict(model.state_dict())
    prompts, responses = _groups(5, prompt_lens=(70, 9, 130))
    plain = pack(*response_sequences(prompts, responses), "cuda")
    shared = pack_shared(prompts, responses, "cuda")
    lp_a, ids_a, g_a = _scores(gpu, plain)
    lp_b, ids_b, g_b = _scores(gpu, shared)
    if dtype == torch.float32:
        assert (lp_a - lp_b).abs().max() <= LP_TOL
        assert all((ids_a[k] == ids_b[k]).all() for k in ids_a)
    else:
        assert (lp_a - lp_b).abs().max() <= 0.05
    for name in g_a:
        a, b = g_a[name].float().flatten(), g_b[name].float().flatten()
        if dtype == torch.float32:
            assert (a - b).abs().max() / a.abs().max().clamp_min(1e-12) <= GRAD_TOL, name
        else:
            assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99, name


def test_shared_prompts_with_one_token_responses_only(model):
    """No continuation rows at all: every target is read off its prompt's last row."""
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7]), torch.tensor([9, 4])]
    responses = [torch.tensor([3]), torch.tensor([8]), torch.tensor([2])]
    shared = pack_shared(prompts, responses, "cpu")
    assert shared.input_ids.numel() == 5 and shared.batch.shared.parent.numel() == 0
    lp_a, ids_a, g_a = _scores(model, pack(*response_sequences(prompts, responses), "cpu"))
    lp_b, ids_b, g_b = _scores(model, shared)
    assert (lp_a - lp_b).abs().max() <= LP_TOL
    assert all(torch.equal(ids_a[k], ids_b[k]) for k in ids_a)
    assert all((g_a[n] - g_b[n]).abs().max() <= GRAD_TOL * g_a[n].abs().max().clamp_min(1e-12) for n in g_a)
