"""The batch-invariant op set of exact mode on a GPU (`BATCH_INVARIANT_OPS`).

CPU: the op set is wired right (its reference kernels give the default ops' logprobs to fp32
rounding, through the paged-attention path over the slot cache) and `using_ops` swaps and
restores it. GPU: the promise itself, bitwise. A token's logprob and experts do not depend on
which other sequences share the prefill or the decode steps, so the trainer can replay vLLM's
rollout without knowing vLLM's batches.
"""
from __future__ import annotations

import pytest
import torch

from ring_rl.model import RingLinearForCausalLM, load_model_config
from ring_rl.model.ops import BATCH_INVARIANT_OPS, DEFAULT_OPS, using_ops
from ring_rl.model.stepping import (
    ReplayChooser,
    SampleChooser,
    run_schedule,
    stack_routes,
)
from tests.model_weights import randomise

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_model(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return randomise(RingLinearForCausalLM(load_model_config("tiny")).eval()).to(device=device, dtype=dtype)


def prompts(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (int(L),), generator=g).tolist()
            for L in torch.randint(2, 30, (n,), generator=g)]


def sample(model, ps, new=8, seed=2):
    dev = model.lm_head.weight.device
    gens = [torch.Generator(device=dev).manual_seed(seed + i) for i in range(len(ps))]
    choose = SampleChooser(1.0, 1.0, 0, gens, torch.tensor([0]))
    res = run_schedule(model, ps, new, choose, 1.0)
    return [torch.tensor(t) for t in res.tokens], res


def replay(model, ps, responses, parts):
    """Score `responses` with the schedule split into `parts` (lists of sequence indices)."""
    lps, routes = [None] * len(ps), [None] * len(ps)
    for part in parts:
        res = run_schedule(model, [ps[i] for i in part], max(responses[i].numel() for i in part),
                           ReplayChooser([responses[i] for i in part]), 1.0)
        for j, i in enumerate(part):
            lps[i], routes[i] = res.logprobs[j], stack_routes(res.routes[j])
    return lps, routes


def test_using_ops_swaps_every_module_and_restores():
    model = tiny_model()
    with using_ops(model, BATCH_INVARIANT_OPS):
        assert all(m.ops is BATCH_INVARIANT_OPS for m in model.modules() if hasattr(m, "ops"))
    assert all(m.ops is DEFAULT_OPS for m in model.modules() if hasattr(m, "ops"))


def test_batch_invariant_ops_compute_the_default_maths_on_cpu():
    model, ps = tiny_model(), prompts()
    responses, _ = sample(model, ps)
    with torch.no_grad():
        ref, ref_routes = replay(model, ps, responses, [list(range(len(ps)))])
        with using_ops(model, BATCH_INVARIANT_OPS):
            got, got_routes = replay(model, ps, responses, [list(range(len(ps)))])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    flips = sum(int((a != b).sum()) for a, b in zip(got_routes, ref_routes))
    assert flips <= 2  # fp32 rounding may flip a near-tie, not more


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_logprobs_do_not_depend_on_the_batch(dtype):
    """Sampled in one batch; scored in one batch, one by one, and in uneven groups in another
    order: every logprob and every expert id is the same bits."""
    model = tiny_model(dtype, "cuda")
    ps = prompts(9)
    with torch.no_grad(), using_ops(model, BATCH_INVARIANT_OPS):
        responses, res = sample(model, ps)
        sampled = list(res.logprobs)
        for parts in ([list(range(9))], [[i] for i in range(9)], [[8, 2, 5], [0], [7, 1, 3, 4, 6]]):
            got, routes = replay(model, ps, responses, parts)
            for i in range(9):
                assert torch.equal(got[i], sampled[i]), (parts, i)
                assert torch.equal(routes[i], stack_routes(res.routes[i])), (parts, i)
