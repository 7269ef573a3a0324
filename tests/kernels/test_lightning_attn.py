"""lightning_attn / lightning_attn_decode: Triton kernels and reference forms against the
quadratic definition (`naive_lightning_attn`) run in fp64.

Error metric: ||out - ref|| / ||ref|| (Frobenius) against the fp64 truth computed from the
same (already rounded) inputs, so it measures only the kernel's own arithmetic:
- fp32 (CPU interpreter and GPU): <= 2e-5. True fp32 products (no tf32) leave ~1e-7 per
  dot; sums of up to a few hundred such terms stay far below 2e-5; tf32 (~3e-4) would fail.
- bf16 (GPU): <= 1e-2. The kernel rounds the decay-masked scores and the chunk states to
  bf16 (2^-9 relative each) before fp32-accumulated dots; ~3e-3 is typical.
Decays come from the model's schedule and from the extremes g = -8 (a token forgets
everything within a few steps) and g = -1e-4 (almost no forgetting: states grow large).
CPU cases are small (H=2, K=16, V=32, up to 200 tokens per sequence) so the interpreter
keeps this file under a minute; GPU cases (marked gpu) repeat them at H=16, K=V=128.
"""
from __future__ import annotations

import pytest
import torch

from ring_rl.kernels.lightning_attn import (
    chunk_lightning_attn_ref,
    lightning_attn,
    lightning_attn_decode,
    lightning_attn_decode_ref,
    lightning_attn_shared,
    naive_lightning_attn,
    recurrent_lightning_attn_ref,
    triton_chunk,
)
from ring_rl.kernels.lightning_attn.torch_batched import lightning_attn_batched
from ring_rl.kernels.prefix_blocks import prefix_blocks

GPU = [pytest.mark.gpu,
       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
SMALL = dict(device="cpu", H=2, K=16, V=32, lengths=(1, 2, 63, 64, 65, 200), batch=(2, 150))
BIG = dict(device="cuda", H=16, K=128, V=128, lengths=(1, 2, 63, 64, 65, 200, 1000, 4096),
           batch=(2, 4096))
SETUPS = [
    pytest.param(SMALL, torch.float32, id="cpu-fp32"),
    pytest.param(BIG, torch.float32, id="gpu-fp32", marks=GPU),
    pytest.param(BIG, torch.bfloat16, id="gpu-bf16", marks=GPU),
]


@pytest.fixture
def triton_mode(monkeypatch):
    """The public functions take the Triton path (on CPU: through the interpreter, with
    small tiles -- sub-chunks of 32, state steps of 32, state chunks of 64, two segments per
    sequence -- so that
    the CPU-sized sequences cross every kind of boundary; GPU tests use the real tiles)."""
    monkeypatch.setenv("RING_RL_KERNELS", "triton")
    if not torch.cuda.is_available():
        for key, value in dict(sub=32, r=2, segs=2, state_sb=32).items():
            monkeypatch.setitem(triton_chunk.CONFIG, key, value)


def schedule_decay(H, layer, num_layers=20):
    """Ring-linear's decay: g_h = -2^(-8(h+1)/H) * (1 - layer/(L-1) + 1e-5)."""
    h = torch.arange(H, dtype=torch.float64)
    return -(2.0 ** (-8 * (h + 1) / H)) * (1 - layer / (num_layers - 1) + 1e-5)


DECAYS = {
    "model-first-layer": lambda H: schedule_decay(H, 0),
    "model-late-layer": lambda H: schedule_decay(H, 18),
    "extreme": lambda H: torch.tensor([-8.0, -1e-4] * (H // 2), dtype=torch.float64),
}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values"
    return ((out - ref).norm() / ref.norm()).item()


def assert_close(out, ref, tol, name):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


def make_case(setup, dtype, layout, decay, seed=0):
    """Random non-zero inputs for a batch (B sequences of equal length) or a packed layout."""
    gen = torch.Generator().manual_seed(seed)
    H, K, V = setup["H"], setup["K"], setup["V"]
    if layout == "batch":
        B, T = setup["batch"]
        cu, N = None, B
    else:
        lengths = torch.tensor((0,) + setup["lengths"])
        cu, B, T, N = lengths.cumsum(0).to(torch.int32), 1, int(lengths.sum()), len(lengths) - 1
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(setup["device"])
    # q, k have roughly unit-norm rows (as after the model's qk RMSNorm and scale).
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    return dict(q=q, k=k, v=v, g=DECAYS[decay](H).float().to(setup["device"]),
                h0=torch.randn(N, H, K, V, generator=gen).to(setup["device"]),
                do=rnd(B, T, H, V), dht=torch.randn(N, H, K, V, generator=gen).to(setup["device"]),
                cu=None if cu is None else cu.to(setup["device"]))


def run(fn, c, with_h0=True, upcast=False, grads=True):
    """Forward and backward (upstream do and d final_state); returns o, final, grads."""
    cast = (lambda x: x.double()) if upcast else (lambda x: x)
    leaves = [cast(c[n]).detach().requires_grad_(grads) for n in ("q", "k", "v", "h0")]
    h0 = leaves[3] if with_h0 else None
    o, ht = fn(*leaves[:3], c["g"], None, h0, True, c["cu"])
    if grads:
        ((o.double() * c["do"].double()).sum() + (ht.double() * c["dht"].double()).sum()).backward()
    return o, ht, [x.grad for x in (leaves if with_h0 else leaves[:3])] if grads else []


def check_against_naive(fn, c, tol, with_h0=True, grads=True):
    o, ht, grad = run(fn, c, with_h0, grads=grads)
    o_ref, ht_ref, grad_ref = run(naive_lightning_attn, c, with_h0, upcast=True, grads=grads)
    assert o.dtype == c["v"].dtype and ht.dtype == torch.float32
    assert_close(o, o_ref, tol, "o")
    assert_close(ht, ht_ref, tol, "final_state")
    for name, gr, gr_ref in zip(("dq", "dk", "dv", "dh0"), grad, grad_ref):
        assert_close(gr, gr_ref, tol, name)


@pytest.mark.parametrize("decay", sorted(DECAYS))
@pytest.mark.parametrize("layout", ["batch", "packed"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("form", [chunk_lightning_attn_ref, recurrent_lightning_attn_ref],
                         ids=["chunk", "recurrent"])
def test_reference_forms_agree(form, with_h0, layout, decay):
    """The chunked and token-by-token references compute the naive definition (fp32);
    gradients for the chunked form, the op's CPU path (the recurrent one is too slow)."""
    c = make_case(SMALL, torch.float32, layout, decay)
    check_against_naive(form, c, TOL[torch.float32], with_h0,
                        grads=form is chunk_lightning_attn_ref)


@pytest.mark.parametrize("mode", ["auto", "reference", "triton"])
def test_shared_initial_states(monkeypatch, mode):
    """initial_state_index: 6 packed sequences (lengths 1..9) start from 3 shared states
    (groups of 1, 2 and 3 sequences, unordered). Same o, final states and gradients as
    starting from the gathered copies, the states' gradient summed over their sharers. auto:
    the CPU batched path (one GEMM per state); reference and triton (the interpreter on CPU,
    the GPU kernels where there is one): gathered."""
    monkeypatch.setenv("RING_RL_KERNELS", mode)
    device = "cuda" if mode == "triton" and torch.cuda.is_available() else "cpu"
    if mode == "triton" and device == "cpu":
        for key, value in {"sub": 32, "r": 2, "segs": 2, "state_sb": 32}.items():
            monkeypatch.setitem(triton_chunk.CONFIG, key, value)
    gen = torch.Generator().manual_seed(3)
    H, K, V = 2, 16, 32
    lengths = torch.tensor([0, 3, 1, 9, 4, 2, 7])
    cu = lengths.cumsum(0).to(torch.int32).to(device)
    T = int(lengths.sum())
    index = torch.tensor([2, 0, 2, 1, 2, 1], device=device)
    q, k, v, do = (torch.randn(1, T, H, d, generator=gen).to(device) for d in (K, K, V, V))
    states = torch.randn(3, H, K, V, generator=gen).to(device)
    dht = torch.randn(6, H, K, V, generator=gen).to(device)
    g = schedule_decay(H, 3).float().to(device)

    def run_with(shared: bool):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, states)]
        h0 = leaves[3] if shared else leaves[3][index]
        o, ht = lightning_attn(*leaves[:3], g, None, h0, True, cu,
                               initial_state_index=index if shared else None)
        ((o * do).sum() + (ht * dht).sum()).backward()
        return [o, ht] + [x.grad for x in leaves]

    names = ("o", "final_state", "dq", "dk", "dv", "dstates")
    for name, got, want in zip(names, run_with(True), run_with(False)):
        assert_close(got, want, TOL[torch.float32], name)
    with pytest.raises(ValueError, match="initial_state_index"):
        lightning_attn(q, k, v, g, None, states, False, cu, initial_state_index=index[:5])
    with pytest.raises(ValueError, match="initial_state_index"):
        lightning_attn(q, k, v, g, None, states[..., :8], False, cu, initial_state_index=index)


@pytest.mark.parametrize("decay", ["model-late-layer", "extreme"])
@pytest.mark.parametrize("mode", ["auto", "auto-gathered", "reference"])
def test_shared_prompts_layout_matches_whole_sequences(monkeypatch, mode, decay):
    """lightning_attn_shared: 3 prompts (9, 1, 4 tokens), then 6 continuations (1..5 tokens)
    of them, unordered. Against the fp64 naive form of each prompt alone and of each
    prompt + continuation as one sequence: the same outputs, and q/k/v gradients summed over
    a prompt's continuations. auto: the CPU form over one masked block per prompt;
    auto-gathered: no block layout (too long for a MAX_BLOCK of 4), the batched form over gathered
    prompt keys; reference: the prompts' final states carried into the continuations."""
    monkeypatch.setenv("RING_RL_KERNELS", mode.split("-")[0])
    gen = torch.Generator().manual_seed(5)
    H, K, V = 2, 16, 32
    plens, slens, parent = [9, 1, 4], [3, 1, 5, 2, 4, 1], torch.tensor([2, 0, 2, 1, 0, 0])
    n, total = sum(plens), sum(plens) + sum(slens)
    prefix_cu = torch.tensor([0, *torch.tensor(plens).cumsum(0).tolist()], dtype=torch.int32)
    suffix_cu = torch.tensor([0, *torch.tensor(slens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v, do = (torch.randn(total, H, d, generator=gen) for d in (K, K, V, V))
    g = DECAYS[decay](H).float()
    # longest block: 9 + 1 + 4 + 1 rows; auto-gathered: too long for a MAX_BLOCK of 4
    blocks = prefix_blocks(prefix_cu, suffix_cu, parent, max_size=4 if mode == "auto-gathered" else None)
    assert (blocks is None) == (mode == "auto-gathered") and (blocks is None or blocks.size == 15)
    # whole sequences: each prompt alone, then prompt + continuation for each continuation
    rows = [list(range(s, e)) for s, e in zip(prefix_cu[:-1].tolist(), prefix_cu[1:].tolist())]
    tails = [list(range(n + s, n + e)) for s, e in zip(suffix_cu[:-1].tolist(), suffix_cu[1:].tolist())]
    whole = rows + [rows[int(u)] + tail for u, tail in zip(parent, tails)]
    index = torch.tensor([r for seq in whole for r in seq])
    whole_cu = torch.tensor([0, *torch.tensor([len(s) for s in whole]).cumsum(0).tolist()], dtype=torch.int32)
    # the output rows that are this layout's: each prompt's, then each continuation's tail
    out_rows, at = [], 0
    for i, seq in enumerate(whole):
        out_rows += list(range(at, at + len(seq))) if i < len(rows) else list(range(at + len(seq) - len(tails[i - len(rows)]), at + len(seq)))
        at += len(seq)

    def grads(o, leaves):
        (o.double() * do.double()).sum().backward()
        return [o] + [x.grad for x in leaves]

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = grads(lightning_attn_shared(*leaves, g, None, prefix_cu, suffix_cu, parent, blocks=blocks), leaves)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    o_ref, _ = naive_lightning_attn(*(x[index][None] for x in ref_leaves), g.double(), cu_seqlens=whole_cu)
    want = grads(o_ref[0][torch.tensor(out_rows)], ref_leaves)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert_close(a, b, TOL[torch.float32], name)


@pytest.mark.parametrize("decay", sorted(DECAYS))
@pytest.mark.parametrize("layout", ["batch", "packed"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no-h0"])
def test_batched_torch_form_matches_naive(with_h0, layout, decay):
    """The CPU fast path for short sequences (padded quadratic form): outputs, final states
    and gradients equal the naive definition, packed lengths 1..200 included."""
    c = make_case(SMALL, torch.float32, layout, decay)
    check_against_naive(lightning_attn_batched, c, TOL[torch.float32], with_h0)


@pytest.mark.parametrize("decay", sorted(DECAYS))
@pytest.mark.parametrize("layout", ["batch", "packed"])
@pytest.mark.parametrize("setup,dtype", SETUPS)
def test_lightning_attn(triton_mode, setup, dtype, layout, decay):
    """Triton forward, final state and gradients of q, k, v, initial_state."""
    c = make_case(setup, dtype, layout, decay)
    if setup["device"] == "cuda" and layout == "batch" and dtype == torch.float32:
        pytest.skip("fp32 batch layout is covered by the packed one at the same lengths")
    check_against_naive(lightning_attn, c, TOL[dtype])


def test_unfused_dkdv_backward(triton_mode, monkeypatch):
    """The backward's other route: dk and dv from two runs of the output kernel."""
    monkeypatch.setitem(triton_chunk.CONFIG, "fuse_dkdv", False)
    check_against_naive(lightning_attn, make_case(SMALL, torch.float32, "packed", "extreme"),
                        TOL[torch.float32])


@pytest.mark.parametrize("setup,dtype", SETUPS)
def test_lightning_attn_without_initial_state(triton_mode, setup, dtype):
    c = make_case(setup, dtype, "packed", "model-first-layer", seed=1)
    check_against_naive(lightning_attn, c, TOL[dtype], with_h0=False)
    o, ht = lightning_attn(c["q"], c["k"], c["v"], c["g"], cu_seqlens=c["cu"])
    assert ht is None and o.shape == c["v"].shape


@pytest.mark.parametrize("setup,dtype", SETUPS)
def test_packed_sequence_is_independent_and_deterministic(triton_mode, setup, dtype):
    """Bitwise: a sequence alone == the same sequence inside a packed batch of 37, for the
    output, final state and all gradients; and two runs of the batch agree bitwise."""
    gen = torch.Generator().manual_seed(2)
    max_len = 12 if setup["device"] == "cpu" else 600
    lengths = torch.randint(1, max_len, (37,), generator=gen)
    lengths[17] = 150 if setup["device"] == "cpu" else 2000  # the sequence under test
    setup = dict(setup, lengths=tuple(lengths.tolist()))
    packed = make_case(setup, dtype, "packed", "extreme", seed=3)
    start, end = int(packed["cu"][17]), int(packed["cu"][18])
    alone = {n: packed[n][:, start:end] for n in ("q", "k", "v", "do")}
    alone.update(g=packed["g"], h0=packed["h0"][17:18], dht=packed["dht"][17:18],
                 cu=torch.tensor([0, end - start], dtype=torch.int32, device=packed["g"].device))
    o1, ht1, grads1 = run(lightning_attn, packed)
    oa, hta, gradsa = run(lightning_attn, alone)
    if setup["device"] == "cuda":  # the interpreter is trivially deterministic: GPU only
        o2, ht2, grads2 = run(lightning_attn, packed)
        assert torch.equal(o1, o2) and torch.equal(ht1, ht2)
        assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))
    assert torch.equal(o1[:, start:end], oa) and torch.equal(ht1[17:18], hta)
    for g_packed, g_alone in zip(grads1[:3], gradsa[:3]):
        assert torch.equal(g_packed[:, start:end], g_alone)
    assert torch.equal(grads1[3][17:18], gradsa[3])


def decode_case(setup, dtype, n_rows, seed):
    gen = torch.Generator().manual_seed(seed)
    H, K, V, dev = setup["H"], setup["K"], setup["V"], setup["device"]
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(dev)
    slots = torch.randperm(n_rows + 3, generator=gen)[:n_rows].to(dev)  # scattered slots
    state = torch.randn(n_rows + 3, H, K, V, generator=gen).to(dev)
    return rnd(n_rows, H, K), rnd(n_rows, H, K), rnd(n_rows, H, V), slots, state


@pytest.mark.parametrize("decay", ["model-late-layer", "extreme"])
@pytest.mark.parametrize("setup,dtype", SETUPS)
def test_decode_matches_reference(triton_mode, setup, dtype, decay):
    """One step: output and the in-place slot update; padding rows (slot -1) and slots
    nobody names stay untouched. Elementwise fp32 on both sides: rounding-level agreement."""
    q, k, v, slots, state = decode_case(setup, dtype, 9, seed=4)
    slots[3] = -1
    g = DECAYS[decay](setup["H"]).float().to(q.device)
    ref_state = state.clone()
    o_ref = lightning_attn_decode_ref(q, k, v, g, ref_state, slots)
    o = lightning_attn_decode(q, k, v, g, state, slots)
    assert o.dtype == v.dtype and torch.all(o[3] == 0)
    assert_close(o, o_ref, 1e-6 if dtype == torch.float32 else 1e-2, "o")
    assert_close(state, ref_state, 1e-6, "state")
    untouched = torch.ones(len(state), dtype=torch.bool, device=q.device)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(state[untouched], ref_state[untouched])


@pytest.mark.parametrize("setup,dtype", SETUPS)
def test_decode_chain_equals_prefill(triton_mode, setup, dtype):
    """Prefill T0 tokens, then decode 5 steps from its final state == prefill of T0 + 5."""
    c = make_case(setup, dtype, "batch", "model-first-layer", seed=5)
    T0 = c["q"].shape[1] - 5
    o_full, ht_full = lightning_attn(c["q"], c["k"], c["v"], c["g"], None, c["h0"], True)
    _, ht = lightning_attn(c["q"][:, :T0], c["k"][:, :T0], c["v"][:, :T0], c["g"], None,
                           c["h0"], True)
    cache = torch.zeros(4, *ht.shape[1:], device=ht.device)
    slots = torch.tensor([3, 1], device=ht.device)
    cache[slots] = ht
    steps = [lightning_attn_decode(c["q"][:, t], c["k"][:, t], c["v"][:, t], c["g"], cache, slots)
             for t in range(T0, T0 + 5)]
    assert_close(torch.stack(steps, 1), o_full[:, T0:], TOL[dtype], "decoded o")
    assert_close(cache[slots], ht_full, TOL[dtype], "decoded state")


@pytest.mark.parametrize("setup,dtype", SETUPS)
def test_decode_row_is_independent(triton_mode, setup, dtype):
    """Bitwise: one row decoded alone == the same row inside a batch of 37."""
    q, k, v, slots, state = decode_case(setup, dtype, 37, seed=6)
    g = DECAYS["extreme"](setup["H"]).float().to(q.device)
    alone = state.clone()
    o_batch = lightning_attn_decode(q, k, v, g, state, slots)
    o_alone = lightning_attn_decode(q[20:21], k[20:21], v[20:21], g, alone, slots[20:21])
    assert torch.equal(o_batch[20:21], o_alone) and torch.equal(state[slots[20]], alone[slots[20]])


def test_bad_shapes_are_refused():
    q = torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match="log_decay"):
        lightning_attn(q, q, q, torch.zeros(3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        lightning_attn(q, q, q, -torch.ones(2), cu_seqlens=torch.tensor([0, 8, 16]))
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attn(q, q, q, -torch.ones(2), initial_state=torch.zeros(1, 2, 16, 16))
