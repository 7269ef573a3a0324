"""The DeepSpeed trainer on CPU (gloo, one process), fp32, on a 3-layer `tiny` model:
lightning + dense MLP, lightning + MoE, softmax + MoE.

Engines are shared per module (DeepSpeed init costs ~1 s each); tests that train say which
engine they own. Tolerances: 1e-5 for fp32 logprobs computed with a different packing (the
same maths, a different summation blocking), 1e-6 for weights after updates of size ~lr.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from ring_rl.config import TrainerConfig
from ring_rl.model import CheckpointError, RingLinearForCausalLM, SeqBatch, load_model_config
from ring_rl.model.sampling import token_logprobs
from ring_rl.trainer import checkpoint as ckpt
from ring_rl.trainer.engine import TrainerEngine
from ring_rl.types import RolloutBatch, SamplingParams, TrainBatch

TEMPERATURE = 0.8
PROMPT_LENS = [3, 5, 2, 6, 4, 3]
RESPONSE_LENS = [4, 1, 6, 0, 3, 5]  # one empty response: no tokens, skipped by the loss
ZERO_STAGES = [0, 1, 3]


def _cfg(**kw) -> TrainerConfig:
    base = dict(lr=1e-3, micro_batch_size=2, num_minibatches=2, warmup_steps=3, grad_clip=1.0,
                clip_low=0.2, clip_high=0.28, weight_decay=0.01)
    return TrainerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = load_model_config("tiny")
    config.num_hidden_layers = 3  # one layer of each kind keeps the file fast
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    RingLinearForCausalLM(config).save_pretrained(path)
    return path


def _rollout(seed: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    return RolloutBatch(
        prompt_ids=[torch.randint(2, 128, (p,), generator=g) for p in PROMPT_LENS],
        response_ids=[torch.randint(2, 128, (r,), generator=g) for r in RESPONSE_LENS],
        logprobs=[torch.zeros(r) for r in RESPONSE_LENS],
        finish_reasons=["length"] * len(PROMPT_LENS), weight_version=0,
        sampling=SamplingParams(temperature=TEMPERATURE))


def _train_batch(seed: int, advantages: list[float] | float) -> TrainBatch:
    rollout = _rollout(seed)
    adv = torch.full((len(rollout),), float(advantages)) if isinstance(advantages, float) else torch.tensor(advantages)
    return TrainBatch(rollout=rollout, rewards=torch.zeros(len(rollout)), advantages=adv)


@torch.no_grad()
def _per_sequence(model, rollout: RolloutBatch):
    """The plain reference: each sequence alone through the model's own forward_flat →
    (logprobs of its response tokens, router ids [L, P+R-1, k])."""
    logps, routes = [], []
    for p, r in zip(rollout.prompt_ids, rollout.response_ids):
        ids = torch.cat([p, r])[:-1]
        logits, out = model.forward_flat(ids, SeqBatch.build(torch.tensor([ids.numel()])))
        logps.append(token_logprobs(logits[len(p) - 1:], r, TEMPERATURE))
        routes.append(torch.stack([out.router_ids[k] for k in sorted(out.router_ids)]))
    return logps, routes


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b) if x.numel())


@pytest.fixture(scope="module")
def plain_engine(model_dir):
    """ZeRO 0, never trained: its module holds the checkpoint's weights."""
    return TrainerEngine(model_dir, _cfg(zero_stage=0, micro_batch_size=4), seed=0, num_threads=1)


# -- logprobs ---------------------------------------------------------------------------------
def test_compute_logprobs_matches_per_sequence_forward(plain_engine):
    rollout = _rollout(1)
    ref, ref_routes = _per_sequence(plain_engine.model, rollout)
    logps, entropies, routes = plain_engine.compute_logprobs(rollout)  # 2 micro-batches of packed sequences
    assert [x.numel() for x in logps] == RESPONSE_LENS
    assert all(x.dtype == torch.float32 for x in logps)
    assert _max_diff(logps, ref) <= 1e-5
    assert [e.shape for e in entropies] == [x.shape for x in logps]
    assert all(((e > 0) & (e <= torch.log(torch.tensor(128.0)) + 1e-4)).all() for e in entropies if e.numel())
    for i, r in enumerate(RESPONSE_LENS):
        if r:
            assert torch.equal(routes[i].long(), ref_routes[i].long()), f"router ids of sequence {i}"


def test_replay_routing(plain_engine):
    rollout = _rollout(1)
    free, routes = _per_sequence(plain_engine.model, rollout)
    rollout.router_ids = [r.to(torch.int16) for r in routes]  # the rollout's layout and dtype
    logps, _, got = plain_engine.compute_logprobs(rollout, replay_routing=True)
    assert _max_diff(logps, free) <= 1e-5
    assert all(torch.equal(a.long(), b.long()) for a, b, n in zip(got, routes, RESPONSE_LENS) if n)
    # Forcing other experts must change the result and be reported back: replay is real.
    k = plain_engine.model.config.num_experts_per_tok
    forced = [((r.long() + k) % plain_engine.model.config.num_experts).to(torch.int16) for r in routes]
    rollout.router_ids = forced
    moved, _, got = plain_engine.compute_logprobs(rollout, replay_routing=True)
    assert _max_diff(moved, free) > 1e-3
    assert all(torch.equal(a, b) for a, b, n in zip(got, forced, RESPONSE_LENS) if n)


# -- GRPO updates ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def positive_runs(model_dir):
    """One train_step with all advantages +1 on ZeRO 0, 1 and 3: 2 minibatches of 3
    sequences, micro-batches of 2 (so each optimizer step accumulates 2 micro-batches)."""
    batch = _train_batch(1, 1.0)
    runs = {}
    for stage in ZERO_STAGES:
        engine = TrainerEngine(model_dir, _cfg(zero_stage=stage), seed=0, num_threads=1)
        before = engine.compute_logprobs(batch.rollout)[0]
        stats = engine.train_step(batch)
        after = engine.compute_logprobs(batch.rollout)[0]
        runs[stage] = dict(engine=engine, before=before, after=after, stats=stats, weights=engine.weights_for_rollout())
    return runs


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_positive_advantages_raise_logprobs(positive_runs, stage):
    run = positive_runs[stage]
    before, after = torch.cat(run["before"]), torch.cat(run["after"])
    assert (after - before).mean() > 0.05
    for i, (b, a) in enumerate(zip(run["before"], run["after"])):
        if b.numel():
            assert a.mean() > b.mean(), f"sequence {i}"
    stats = run["stats"]
    assert stats["optimizer_steps"] == 2 and stats["tokens"] == sum(RESPONSE_LENS)
    assert stats["lr"] == pytest.approx(2e-3 / 3)  # warmup: step 2 of 3
    assert stats["grad_norm"] > 0 and stats["version"] == 1


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_give_the_same_update(positive_runs, stage):
    ref, run = positive_runs[0], positive_runs[stage]
    ref_w, w = ref["weights"][1], run["weights"][1]
    assert ref_w.keys() == w.keys()
    # Adam divides each coordinate by its own |gradient|: where a gradient is ~eps-sized,
    # rounding differences (ZeRO flattens and clips differently) show up in the update,
    # bounded by a few % of lr; a real error (lr, missing micro-batch, stale weights) moves
    # weights by ~lr = 1e-3.
    worst = max((ref_w[k] - w[k]).abs().max().item() for k in ref_w)
    assert worst <= 5e-6, f"ZeRO {stage} moved weights differently from ZeRO 0 by {worst}"
    # The pre-clip gradient norm sees any error of gradient scale that Adam would hide.
    assert run["stats"]["grad_norm"] == pytest.approx(ref["stats"]["grad_norm"], rel=1e-5)
    # Above grad_clip=1: both clipped, ZeRO 0 by the engine wrapper (clips_itself), the others by DeepSpeed.
    assert ref["stats"]["grad_norm_max"] > 1.0
    assert run["stats"]["loss"] == pytest.approx(ref["stats"]["loss"], abs=1e-6)


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(model_dir, agg):
    """The summed micro-batch gradients equal one big batch's: token agg divides by the
    minibatch's token count (not each micro-batch's), sequence agg by its sequence count."""
    engine = TrainerEngine(model_dir, _cfg(zero_stage=0, num_minibatches=1, loss_agg=agg), seed=0, num_threads=1)
    engine.engine.step = lambda *args, **kwargs: None  # keep the accumulated .grad, no update
    batch = _train_batch(1, [1.0, -0.5, 2.0, 0.0, -1.5, 0.7])
    g = torch.Generator().manual_seed(9)
    batch.token_weights = [torch.rand(n, generator=g) for n in RESPONSE_LENS]  # TIS-like weights
    grads = {}
    for mbs in (1, 2, len(PROMPT_LENS)):
        engine.cfg.micro_batch_size = mbs
        engine.model.zero_grad(set_to_none=True)
        engine.train_step(batch)
        grads[mbs] = torch.cat([p.grad.flatten() for p in engine.model.parameters() if p.grad is not None])
    full = grads[len(PROMPT_LENS)]
    for mbs in (1, 2):
        err = ((grads[mbs] - full).norm() / full.norm()).item()
        assert err <= 1e-5, f"micro-batch size {mbs}: relative gradient error {err}"


def test_negative_advantages_lower_logprobs_with_reference_kl(model_dir):
    engine = TrainerEngine(model_dir, _cfg(zero_stage=0, loss_agg="sequence", kl_coef=0.1, num_minibatches=1),
                           seed=0, num_threads=1)
    batch = _train_batch(2, -1.0)
    before = engine.compute_logprobs(batch.rollout)[0]
    stats = engine.train_step(batch)
    after = engine.compute_logprobs(batch.rollout)[0]
    for i, (b, a) in enumerate(zip(before, after)):
        if b.numel():
            assert a.mean() < b.mean(), f"sequence {i}"
    assert abs(stats["kl_ref"]) < 1e-6  # policy == reference before the first update
    assert engine.train_step(batch)["kl_ref"] > 1e-4  # and not after it


# -- weights and checkpoints ------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 3])
def test_weights_for_rollout_round_trip(positive_runs, model_dir, stage):
    engine = positive_runs[stage]["engine"]
    version, weights = engine.weights_for_rollout()
    assert version == engine.version >= 1
    fresh = RingLinearForCausalLM(load_model_config(model_dir))
    fresh.load_state_dict(weights, strict=True)
    rollout = _rollout(3)
    ref, _ = _per_sequence(fresh, rollout)
    assert _max_diff(engine.compute_logprobs(rollout)[0], ref) <= 1e-5
    if stage == 0:  # the engine's module is directly callable: logits must be identical
        ids = torch.cat([rollout.prompt_ids[0], rollout.response_ids[0]])
        batch = SeqBatch.build(torch.tensor([ids.numel()]))
        with torch.no_grad():
            assert torch.equal(fresh.forward_flat(ids, batch)[0], engine.model.forward_flat(ids, batch)[0])


@pytest.fixture(scope="module")
def resumed(positive_runs, model_dir, tmp_path_factory):
    """ZeRO-1 engine A (1 step from positive_runs): step 2, save, step 3. Engine B: load, step 3."""
    a = positive_runs[1]["engine"]
    a.train_step(_train_batch(4, [1.0, -1.0, 0.5, 0.0, -0.5, 1.0]))
    path = tmp_path_factory.mktemp("ckpt") / "trainer"
    a.save(path)
    third = _train_batch(5, [-1.0, 1.0, 1.0, 0.0, -1.0, 0.5])
    stats_a = a.train_step(third)
    b = TrainerEngine(model_dir, _cfg(zero_stage=1), seed=0, num_threads=1)
    b.load(path)
    stats_b = b.train_step(third)
    return dict(a=a, b=b, path=path, stats_a=stats_a, stats_b=stats_b)


def test_resume_is_bitwise(resumed):
    (va, wa), (vb, wb) = resumed["a"].weights_for_rollout(), resumed["b"].weights_for_rollout()
    assert va == vb == 3
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights after resume differ"
    sa, sb = resumed["stats_a"], resumed["stats_b"]
    for key in ("loss", "grad_norm", "lr", "clip_frac_low", "clip_frac_high", "approx_kl_k3"):
        assert sa[key] == sb[key], key
    # The Adam moments came back too, not only the weights: one more identical step agrees.
    batch = _train_batch(6, 1.0)
    resumed["a"].train_step(batch), resumed["b"].train_step(batch)
    wa, wb = resumed["a"].weights_for_rollout()[1], resumed["b"].weights_for_rollout()[1]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_layout_and_plain_optimizer_file(resumed):
    path = resumed["path"]
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "model.safetensors", "optimizer_rank0.pt", "trainer_state.json"]
    assert not list(path.parent.glob("*.tmp-*"))
    payload = torch.load(path / "optimizer_rank0.pt", weights_only=True)  # no pickled objects
    assert payload["optimizer_steps"] == 4 and payload["version"] == 2


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_refused(resumed, tmp_path, damage):
    bad = tmp_path / "trainer"
    shutil.copytree(resumed["path"], bad)
    target = bad / "optimizer_rank0.pt"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    before = resumed["b"].weights_for_rollout()
    with pytest.raises(CheckpointError, match="optimizer_rank0.pt"):
        resumed["b"].load(bad)
    after = resumed["b"].weights_for_rollout()
    assert before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    # Without the manifest's checksum, torch.load itself refuses the truncated file by name.
    if damage == "truncate":
        with pytest.raises(CheckpointError, match="optimizer_rank0.pt"):
            ckpt.read_optimizer_file(bad, 0)


def test_sft_step_lowers_the_masked_loss(plain_engine):
    torch.manual_seed(7)
    ids = [torch.randint(2, 128, (n,)).tolist() for n in (7, 5, 9)]
    masks = [[0] * 3 + [1] * (len(s) - 3) for s in ids]
    first = plain_engine.sft_step(ids, masks)
    second = plain_engine.sft_step(ids, masks)
    assert first["tokens"] == sum(len(s) - 3 for s in ids)
    assert second["loss"] < first["loss"]
    # The loss is the mean NLL of exactly the masked tokens (checked against a plain forward).
    model, nll = plain_engine.model, []
    with torch.no_grad():
        for s, m in zip(ids, masks):
            t = torch.tensor(s)
            logits, _ = model.forward_flat(t[:-1], SeqBatch.build(torch.tensor([t.numel() - 1])))
            keep = torch.tensor(m[1:], dtype=torch.bool)
            nll.append(-token_logprobs(logits[keep], t[1:][keep]))
    third = plain_engine.sft_step(ids, masks)
    assert third["loss"] == pytest.approx(torch.cat(nll).mean().item(), abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_on_the_gpu(model_dir):
    """DeepSpeed on CUDA in its one-process NCCL group (an in-process store, no port): the
    logprobs match the CPU reference's per-sequence forward (fp32: Triton kernels against the
    reference ops), and one update moves the weights. Run alone (`-m gpu`), the group is this
    engine's own; after a CPU engine in the same process it is that engine's gloo group."""
    import torch.distributed as dist

    from ring_rl.model import load_checkpoint

    fresh = not dist.is_initialized()
    engine = TrainerEngine(model_dir, _cfg(zero_stage=0, micro_batch_size=4), seed=0, device="cuda", num_threads=1)
    if fresh:
        assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    rollout = _rollout(1)
    ref, _ = _per_sequence(load_checkpoint(model_dir), rollout)
    logps, _, _ = engine.compute_logprobs(rollout)
    assert _max_diff(logps, ref) <= 1e-4
    before = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    stats = engine.train_step(_train_batch(2, [1.0, -1.0, 0.5, 0.0, -0.5, 1.0]))
    assert all(torch.isfinite(torch.tensor(float(v))) for v in stats.values() if isinstance(v, (int, float)))
    moved = max((engine.model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved > 1e-5
