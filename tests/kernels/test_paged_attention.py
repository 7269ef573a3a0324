"""paged_attention: the Triton kernel against the plain-PyTorch reference, and its batch
invariance (bitwise: a token's output does not depend on how tokens were batched or paged).

CPU: the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
when no GPU is present) in fp32 (max error <= 1e-5 of the largest reference value: only the
summation order differs) and fp16; the interpreter's bf16 tl.dot is broken, so bf16 is tested
on GPU only. Unwritten cache entries hold NaN, so any read outside a token's keys shows up.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ring_rl.kernels.attention import paged_attention, paged_attention_ref
from tests.kernels.checks import assert_close, gpu

LENS = (1, 5, 37, 70)


def make_seqs(lens, heads, kv_heads, d, dtype=torch.float32, device="cpu", seed=0):
    """Per sequence: q [L, H, d], k and v [L, Hkv, d] (random, never zero)."""
    gen = torch.Generator().manual_seed(seed)
    def rnd(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)
    return [(rnd(n, heads, d), rnd(n, kv_heads, d), rnd(n, kv_heads, d)) for n in lens]


def build_cache(seqs, layout, block_size=16, seed=1):
    """Writes each sequence's K/V into a cache; returns (k_cache, v_cache, block_table).

    "paged": vLLM-like [num_blocks, block_size, Hkv, d], blocks handed out in shuffled order
    among spare ones, unused table entries -1. "slots": the trainer's [slots, Hkv, cap, d]
    passed as its [slots, cap, Hkv, d] transpose, one block per sequence in a shuffled slot.
    """
    gen = torch.Generator().manual_seed(seed)
    k0 = seqs[0][1]
    hkv, d, b = k0.shape[1], k0.shape[2], len(seqs)
    lens = [s[1].shape[0] for s in seqs]
    if layout == "paged":
        per_seq = [-(-n // block_size) for n in lens]
        nblocks = sum(per_seq) + 3
        k_cache = torch.full((nblocks, block_size, hkv, d), float("nan"), dtype=k0.dtype,
                             device=k0.device)
        v_cache = k_cache.clone()
        order = torch.randperm(nblocks, generator=gen).tolist()
        table = torch.full((b, max(per_seq)), -1, dtype=torch.int32)
        for i, (_, k, v) in enumerate(seqs):
            for lb in range(per_seq[i]):
                blk = order.pop()
                table[i, lb] = blk
                rows = slice(lb * block_size, (lb + 1) * block_size)
                k_cache[blk, : k[rows].shape[0]] = k[rows]
                v_cache[blk, : v[rows].shape[0]] = v[rows]
    else:
        cap = max(lens) + 10
        raw_k = torch.full((b + 2, hkv, cap, d), float("nan"), dtype=k0.dtype, device=k0.device)
        raw_v = raw_k.clone()
        slots = torch.randperm(b + 2, generator=gen)[:b]
        for i, (_, k, v) in enumerate(seqs):
            raw_k[slots[i], :, : k.shape[0]] = k.transpose(0, 1)
            raw_v[slots[i], :, : v.shape[0]] = v.transpose(0, 1)
        k_cache, v_cache = raw_k.transpose(1, 2), raw_v.transpose(1, 2)
        table = slots[:, None].to(torch.int32)
    return k_cache, v_cache, table.to(k0.device)


def all_tokens(seqs, shuffle_seed=None):
    """Every token of every sequence as (q, seq_idx, positions), optionally interleaved."""
    q = torch.cat([s[0] for s in seqs])
    seq_idx = torch.cat([torch.full((s[0].shape[0],), i) for i, s in enumerate(seqs)])
    pos = torch.cat([torch.arange(s[0].shape[0]) for s in seqs])
    if shuffle_seed is not None:
        perm = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(shuffle_seed))
        q, seq_idx, pos = q[perm.to(q.device)], seq_idx[perm], pos[perm]
    return q, seq_idx.to(q.device), pos.to(q.device)


# ---------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_reference_matches_sdpa(heads, kv_heads):
    seqs = make_seqs(LENS, heads, kv_heads, 32, dtype=torch.float64)
    k_cache, v_cache, table = build_cache(seqs, "paged")
    q, seq_idx, pos = all_tokens(seqs)
    out = paged_attention_ref(q, k_cache, v_cache, table, seq_idx, pos, 0.3)
    g = heads // kv_heads
    want = torch.cat([
        F.scaled_dot_product_attention(
            sq.transpose(0, 1), sk.repeat_interleave(g, 1).transpose(0, 1),
            sv.repeat_interleave(g, 1).transpose(0, 1), is_causal=True, scale=0.3,
        ).transpose(0, 1)
        for sq, sk, sv in seqs
    ])
    assert_close(out, want, tol=1e-12, name="reference vs sdpa")


def test_cpu_default_is_reference(monkeypatch):
    monkeypatch.delenv("RING_RL_KERNELS", raising=False)
    seqs = make_seqs((3, 9), 4, 2, 16)
    args = (*all_tokens(seqs)[:1], *build_cache(seqs, "paged"), *all_tokens(seqs)[1:], 0.25)
    assert torch.equal(paged_attention(*args), paged_attention_ref(*args))


# ---------------------------------------------------------------- CPU (interpreter)
@pytest.mark.parametrize("heads,kv_heads,d,layout", [
    (8, 2, 32, "paged"), (8, 2, 64, "slots"), (2, 2, 64, "paged"), (2, 2, 32, "slots"),
    (6, 2, 48, "paged"),  # G = 3 and d = 48: padded rows and columns
])
def test_matches_reference(triton_mode, heads, kv_heads, d, layout):
    seqs = make_seqs(LENS, heads, kv_heads, d)
    k_cache, v_cache, table = build_cache(seqs, layout)
    q, seq_idx, pos = all_tokens(seqs, shuffle_seed=3)
    args = (q, k_cache, v_cache, table, seq_idx, pos, d ** -0.5)
    assert_close(paged_attention(*args), paged_attention_ref(*args),
                 name=f"H={heads} Hkv={kv_heads} d={d} {layout}")


def test_matches_reference_fp16(triton_mode):
    seqs = make_seqs((1, 37, 70), 4, 2, 32, dtype=torch.float16)
    k_cache, v_cache, table = build_cache(seqs, "paged")
    q, seq_idx, pos = all_tokens(seqs)
    args = (q, k_cache, v_cache, table, seq_idx, pos, 32 ** -0.5)
    # Both round p to fp16 (from different running maxima) and the output once: 2^-9 headroom.
    assert_close(paged_attention(*args), paged_attention_ref(*args), tol=2.0**-9, name="fp16")


@pytest.mark.parametrize("fn", [paged_attention, paged_attention_ref])
def test_negative_position_is_padding(triton_mode, fn):
    seqs = make_seqs((5,), 4, 2, 16)
    k_cache, v_cache, table = build_cache(seqs, "paged")
    q, seq_idx, pos = all_tokens(seqs)
    pos = pos.clone()
    pos[2] = -1
    out = fn(q, k_cache, v_cache, table, seq_idx, pos, 0.25)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isfinite(out).all()


def invariance_check(seqs, block_size=16):
    """Bitwise: (a) all tokens in one interleaved call, (b) each token in its own call,
    (c) a slot-per-sequence cache holding the same K/V, (d) chunked prefill (16-token calls)."""
    paged = build_cache(seqs, "paged", block_size)
    slots = build_cache(seqs, "slots")
    q, seq_idx, pos = all_tokens(seqs)
    perm = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(5))
    perm = perm.to(q.device)
    a = torch.empty_like(q)
    a[perm] = paged_attention(q[perm], *paged, seq_idx[perm], pos[perm], 0.2)
    b = torch.cat([paged_attention(q[t:t + 1], *paged, seq_idx[t:t + 1], pos[t:t + 1], 0.2)
                   for t in range(q.shape[0])])
    c = paged_attention(q, *slots, seq_idx, pos, 0.2)
    d = torch.cat([paged_attention(q[t:t + 16], *slots, seq_idx[t:t + 16], pos[t:t + 16], 0.2)
                   for t in range(0, q.shape[0], 16)])
    assert torch.isfinite(a).all()
    for name, x in (("per-token", b), ("slot layout", c), ("chunked", d)):
        assert torch.equal(a, x), f"{name}: max diff {(a - x).abs().max().item():.3g}"


def test_batch_invariance(triton_mode):
    invariance_check(make_seqs((1, 9, 70), 8, 2, 32))


@pytest.mark.parametrize("fn", [paged_attention, paged_attention_ref])
@pytest.mark.parametrize("bad,match", [
    (lambda a: {**a, "q": a["q"][0]}, "q has shape"),
    (lambda a: {**a, "k_cache": a["k_cache"][..., :8]}, "k_cache has shape"),
    (lambda a: {**a, "k_cache": a["k_cache"].double()}, "k_cache has shape"),
    (lambda a: {**a, "k_cache": torch.cat([a["k_cache"], a["k_cache"][:, :, :1]], 2),
                "v_cache": torch.cat([a["v_cache"], a["v_cache"][:, :, :1]], 2)},
     "Hkv=3 kv heads"),
    (lambda a: {**a, "v_cache": a["v_cache"][:-1]}, "v_cache has shape"),
    (lambda a: {**a, "block_table": a["block_table"][0]}, "block_table has shape"),
    (lambda a: {**a, "block_table": a["block_table"].float()}, "block_table has shape"),
    (lambda a: {**a, "seq_idx": a["seq_idx"][1:]}, "seq_idx has shape"),
    (lambda a: {**a, "positions": a["positions"].float()}, "positions has shape"),
])
def test_refuses_bad_arguments(triton_mode, fn, bad, match):
    seqs = make_seqs((3, 4), 4, 2, 16)
    k_cache, v_cache, table = build_cache(seqs, "paged")
    q, seq_idx, pos = all_tokens(seqs)
    args = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": table,
            "seq_idx": seq_idx, "positions": pos, "scale": 0.25}
    with pytest.raises(ValueError, match=match):
        fn(**bad(args))


def test_reference_refuses_positions_beyond_table():
    seqs = make_seqs((5,), 4, 2, 16)
    q, seq_idx, pos = all_tokens(seqs)
    with pytest.raises(ValueError, match="positions reach 20"):
        paged_attention_ref(q, *build_cache(seqs, "paged"), seq_idx, pos + 16, 0.25)


# ---------------------------------------------------------------- GPU, real shapes
GPU_LENS = (1, 17, 64, 65, 300, 1000, 2049)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [
    # 16-bit: both round each p to the input dtype (from different running maxima, so the
    # roundings differ: <= 1 ulp of max|v| in all) and the output once (<= 1/2 ulp each):
    # worst case ~2^-7.5 (bf16) and ~2^-10.5 (fp16) of the largest value; 2-4x headroom.
    (torch.bfloat16, 2.0**-6), (torch.float16, 2.0**-8),
    (torch.float32, 1e-5),  # ieee dot: a TF32 dot would miss this by ~100x
])
@pytest.mark.parametrize("heads,kv_heads,d,layout", [
    (16, 4, 128, "paged"), (64, 8, 128, "slots"), (32, 32, 64, "paged"), (12, 4, 96, "paged"),
])
def test_gpu_matches_reference(dtype, tol, heads, kv_heads, d, layout):
    seqs = make_seqs(GPU_LENS, heads, kv_heads, d, dtype=dtype, device="cuda")
    k_cache, v_cache, table = build_cache(seqs, layout)
    q, seq_idx, pos = all_tokens(seqs, shuffle_seed=3)
    args = (q, k_cache, v_cache, table, seq_idx, pos, d ** -0.5)
    if dtype == torch.float32:  # an fp64 reference: immune to a global TF32 matmul setting
        ref = paged_attention_ref(q.double(), k_cache.double(), v_cache.double(), *args[3:])
        ref = ref.float()
    else:
        ref = paged_attention_ref(*args)
    assert_close(paged_attention(*args), ref, tol=tol,
                 name=f"{dtype} H={heads} Hkv={kv_heads} d={d} {layout}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,d,block_size", [(16, 4, 128, 16), (8, 8, 64, 48)])
def test_gpu_batch_invariance(dtype, heads, kv_heads, d, block_size):
    invariance_check(make_seqs((1, 63, 64, 200, 777), heads, kv_heads, d, dtype=dtype,
                               device="cuda"), block_size)
