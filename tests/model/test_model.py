"""The tiny Ring-linear model: cache vs full forward, packed vs padded, checkpoints, config."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ring_rl.cli import main as cli
from ring_rl.model import (CheckpointError, RingLinearConfig, RingLinearForCausalLM, SeqBatch,
                           load_checkpoint, load_model_config)
from ring_rl.model.ops import alibi_slopes, decay_hf, decay_vllm
from tests.model_weights import randomise

FP32_TOL = 1e-5  # fp32 logits: different summation orders differ by ~1e-6


def _randomise(model: RingLinearForCausalLM) -> RingLinearForCausalLM:
    """Perturb norms and expert bias so no test passes on all-ones weights or zero bias."""
    return randomise(model).eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _randomise(RingLinearForCausalLM(load_model_config("tiny")))


@pytest.fixture(scope="module")
def seqs():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (n,), generator=g) for n in (7, 13, 1, 70)]


@pytest.fixture(scope="module")
def full_logits(model, seqs):
    with torch.no_grad():
        return [model(s[None]).logits[0] for s in seqs]


def test_model_info_matches_published_counts(capsys):
    for preset, total, active, tol in [("ring-mini-linear-2.0", 16.4e9, 957e6, 0.01),
                                       ("ring-flash-linear-2.0", 104e9, 6.1e9, 0.02)]:
        assert cli(["model-info", f"configs/model/{preset}.json", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert abs(info["total_params"] / total - 1) < tol, (preset, info["total_params"])
        assert abs(info["activated_params"] / active - 1) < tol, (preset, info["activated_params"])
    assert info["softmax_layers"] == [7, 15, 23, 31]


def test_layer_schedule_and_decay():
    mini = load_model_config("ring-mini-linear-2.0")
    assert [i for i in range(20) if mini.is_softmax_layer(i)] == [4, 9, 14, 19]
    assert alibi_slopes(8) == pytest.approx([2 ** (-(h + 1)) for h in range(8)])
    s12, s8, s16 = alibi_slopes(12), alibi_slopes(8), alibi_slopes(16)
    assert s12[:8] == s8 and s12[8:] == s16[0::2][:4]
    # HF form (ℓ = layer − 1) is vLLM's form one layer earlier: the known off-by-one.
    assert torch.equal(decay_hf(5, 20, 16), decay_vllm(4, 20, 16))
    assert (decay_hf(0, 20, 16) < decay_vllm(0, 20, 16)).all()  # layer 0: factor 1 + 1/(L-1)


def test_packed_and_padded_equal_one_by_one(model, seqs, full_logits):
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], cu_seqlens=cu).logits[0]
        width = int(lens.max())
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # left padding, as generate() uses
            ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
        padded = model(ids, attention_mask=mask).logits
    for i, s in enumerate(seqs):
        torch.testing.assert_close(packed[cu[i]:cu[i + 1]], full_logits[i], atol=FP32_TOL, rtol=0)
        torch.testing.assert_close(padded[i, width - len(s):], full_logits[i], atol=FP32_TOL, rtol=0)


def test_incremental_decoding_matches_full_forward(model, seqs, full_logits):
    """Prefill 1 token of every sequence, then decode one token per step; sequences end at
    different steps and leave the batch; one sequence also prefills a chunk mid-way."""
    n = len(seqs)
    cache = model.new_cache(n, capacity=8)  # small on purpose: the KV buffers must grow
    with torch.no_grad():
        got = [[] for _ in range(n)]
        logits, _ = model.forward_flat(torch.stack([s[0] for s in seqs]),
                                       SeqBatch.build(torch.ones(n, dtype=torch.long), cache))
        for i in range(n):
            got[i].append(logits[i])
        ptr = [1] * n
        while any(ptr[i] < len(seqs[i]) for i in range(n)):
            active = [i for i in range(n) if ptr[i] < len(seqs[i])]
            if 3 in active and ptr[3] == 20:  # a 10-token chunk for the longest sequence
                logits, _ = model.forward_flat(seqs[3][20:30], SeqBatch.build(torch.tensor([10]), cache,
                                                                                torch.tensor([3])))
                got[3].extend(logits)
                ptr[3] += 10
                active.remove(3)
            if active:
                ids = torch.stack([seqs[i][ptr[i]] for i in active])
                logits, _ = model.forward_flat(
                    ids, SeqBatch.build(torch.ones(len(active), dtype=torch.long), cache, torch.tensor(active)))
                for j, i in enumerate(active):
                    got[i].append(logits[j])
                    ptr[i] += 1
        for i in range(n):
            torch.testing.assert_close(torch.stack(got[i]), full_logits[i], atol=FP32_TOL, rtol=0)


def test_save_load_roundtrip_is_bitwise_and_auto_class(model, tmp_path, seqs):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is RingLinearForCausalLM
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.gate.expert_bias" in names
    with torch.no_grad():
        assert torch.equal(loaded(seqs[0][None]).logits, model(seqs[0][None]).logits)


def test_generate_with_cache_equals_without(model):
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = (ids > 0).long()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (2, 10) and torch.equal(with_cache, without)


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing tensor 'lm_head.weight'"),
    ("unexpected", "unexpected tensor 'model.layers.0.attention.bogus.weight'"),
    ("shape", "'model.norm.weight' has shape (3,)"),
])
def test_bad_checkpoint_is_refused_naming_the_tensor(model, tmp_path, damage, message):
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    if damage == "missing":
        del tensors["lm_head.weight"]
    elif damage == "unexpected":
        tensors["model.layers.0.attention.bogus.weight"] = torch.randn(2, 2)
    else:
        tensors["model.norm.weight"] = torch.randn(3)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(tmp_path)


def test_truncated_checkpoint_file_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("layer_group_size", 0), ("num_attention_heads", 3), ("num_key_value_heads", 3),
    ("topk_group", 9), ("group_norm_size", 3), ("score_function", "softmax"),
])
def test_invalid_config_is_refused_naming_the_field(field, value):
    fields = load_model_config("tiny").to_dict()
    fields[field] = value
    with pytest.raises(ValueError, match=f"RingLinearConfig.{field}"):
        RingLinearConfig(**{k: v for k, v in fields.items() if k != "model_type"})


def test_real_config_parses_field_for_field():
    cfg = load_model_config("ring-mini-linear-2.0")
    assert (cfg.hidden_size, cfg.num_experts, cfg.n_group, cfg.topk_group) == (2048, 256, 8, 4)
    assert cfg.routed_scaling_factor == 2.5 and cfg.partial_rotary_factor == 0.5 and cfg.rope_theta == 1e6
    assert cfg.linear_head_dim == 128 and cfg.eos_token_id == 156892 and not cfg.tie_word_embeddings
