"""Triton chunked lightning attention: three kernels that, with different operands, give the
forward output and all three input gradients (see `triton_chunk_bwd.py`).

Each sequence is cut into *state chunks* of L tokens (L = SUB * R), grouped into about
`segs` *segments* of whole chunks:

1. `_state_kernel`, one program per (segment, head, state tile), walks its segment's chunks in
   order (forward) or in reverse (backward) from a zero state and stores the *local* state at
   every chunk boundary, `S <- lambda^len * S + upd_scale * B^T diag(w) C`, plus the
   segment's local total. Forward: B = k, C = v, the state entering each chunk. Backward:
   B = q, C = do, dL/dS leaving each chunk. Segments make this pass parallel over T (a
   single walk per head, as in fla, leaves most of the GPU idle on one long sequence).
2. `_scan_kernel` chains the segments (a short elementwise recurrence in fp32) into the true
   state at each segment boundary, starting from the initial state (or d final_state), and
   gives the final state (or d initial_state).
3. `_output_kernel`, one program per (state chunk, C-column block, head), rebuilds the true
   boundary state = local + lambda^distance * segment boundary state, then walks the chunk in
   sub-chunks of SUB tokens: `out = scale_intra * (decay-masked A B^T) C + scale_inter *
   diag(w) A S`, advancing S by each sub-chunk in registers. Storing states every L tokens
   rather than every SUB tokens cuts the state traffic (the main extra bytes) by R.

The decay is a fixed per-head scalar, so every mask is exp(g * distance) with distance >= 0
(never overflows). Deterministic: no atomics; each output element is written by one
program with a fixed loop order; chunks and segments restart at every sequence start and no
block size depends on T or the batch, so a sequence's result does not depend on its
neighbours.
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Tunables (may depend on head dims and dtype, never on T or the batch: see above).
# `segs`: each sequence's chunks are grouped into about this many segments (a function of
# the sequence's own length only, so packing never changes a sequence's arithmetic).
CONFIG = dict(sub=64, r=8, segs=8, state_bb=128, state_bc=64, state_sb=64, state_warps=8,
              state_stages=2, scan_block=1024, out_bc=128, out_warps=8, out_stages=2,
              fuse_dkdv=True, dkdv_warps=8, dkdv_stages=2)
# fp32 operands take twice the shared memory per tile: narrower output tiles.
CONFIG_FP32 = dict(out_bc=64, out_stages=1)


def config(dtype: torch.dtype) -> dict:
    return {**CONFIG, **CONFIG_FP32} if dtype == torch.float32 else dict(CONFIG)


@dataclass
class Plan:
    """Where the state chunks and segments lie: shared by the forward and the backward."""
    n_seq: int
    n_chunks: int
    n_segs: int
    chunk: int  # L, tokens per state chunk
    cu_seqlens: torch.Tensor  # int32 [N+1] token offsets
    seg_offsets: torch.Tensor  # int32 [N+1]: first segment of each sequence
    segs: torch.Tensor  # int32 [n_segs, 3]: token start, token end, first chunk
    chunks: torch.Tensor  # int32 [n_chunks, 5]: start, end, segment, start - segment start,
    #                       segment end - end (token distances to the segment's boundaries)


def make_plan(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None) -> Plan:
    B, T = q.shape[:2]
    chunk, n_segs = CONFIG["sub"] * CONFIG["r"], CONFIG["segs"]
    if cu_seqlens is None:  # equal lengths: cached, so a training step pays no host work
        return _uniform_plan(B, T, chunk, n_segs, q.device)
    bounds = [int(x) for x in cu_seqlens.tolist()]  # one host sync per call, as in fla
    return _build_plan(bounds, chunk, n_segs, q.device)


@functools.lru_cache(maxsize=64)
def _uniform_plan(B: int, T: int, chunk: int, n_segs: int, device: torch.device) -> Plan:
    return _build_plan([b * T for b in range(B + 1)], chunk, n_segs, device)


def _build_plan(bounds: list[int], chunk: int, n_segs: int, device: torch.device) -> Plan:
    seg_offsets, segs, chunks = [0], [], []
    for n in range(len(bounds) - 1):
        seg = chunk * max(1, triton.cdiv(triton.cdiv(bounds[n + 1] - bounds[n], chunk), n_segs))
        for s0 in range(bounds[n], bounds[n + 1], seg):
            s1 = min(s0 + seg, bounds[n + 1])
            segs.append((s0, s1, len(chunks)))
            chunks += [(c0, min(c0 + chunk, s1), len(segs) - 1, c0 - s0, s1 - min(c0 + chunk, s1))
                       for c0 in range(s0, s1, chunk)]
        seg_offsets.append(len(segs))
    def as_i32(rows, width):  # an empty table still gets one (unused) row
        return torch.tensor(rows or [[0] * width], dtype=torch.int32, device=device)
    return Plan(len(bounds) - 1, len(chunks), len(segs), chunk,
                as_i32(bounds, 1).flatten(), as_i32(seg_offsets, 1).flatten(),
                as_i32(segs, 3), as_i32(chunks, 5))


@triton.jit
def _state_kernel(b_ptr, c_ptr, g_ptr, hs_ptr, seg_ptr, segs_ptr, upd_scale,
                  H: tl.constexpr, DB: tl.constexpr, DC: tl.constexpr, BB: tl.constexpr,
                  BC: tl.constexpr, L: tl.constexpr, SB: tl.constexpr, REVERSE: tl.constexpr,
                  PREC: tl.constexpr):
    # Steps of SB tokens (small tiles: several programs fit on an SM and keep loads in
    # flight); the state is stored only at chunk boundaries, every L // SB steps.
    i_s, i_tile, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(segs_ptr + 3 * i_s).to(tl.int64)
    end = tl.load(segs_ptr + 3 * i_s + 1).to(tl.int64)
    c0 = tl.load(segs_ptr + 3 * i_s + 2).to(tl.int64)
    nsteps = tl.cdiv(end - start, SB)
    g = tl.load(g_ptr + i_h)
    rows = (i_tile // tl.cdiv(DC, BC)) * BB + tl.arange(0, BB)
    cols = (i_tile % tl.cdiv(DC, BC)) * BC + tl.arange(0, BC)
    pos = tl.arange(0, SB)
    tile = rows[:, None] * DC + cols[None, :]
    tile_mask = (rows[:, None] < DB) & (cols[None, :] < DC)
    state = tl.zeros([BB, BC], dtype=tl.float32)
    for it in range(0, nsteps):
        if REVERSE:
            j = nsteps - 1 - it
        else:
            j = it
        jv = tl.zeros([BC], dtype=tl.int64) + j  # as a vector: masks must be tensors
        if REVERSE:
            at_boundary = ((jv % (L // SB)) == (L // SB - 1)) | (jv == nsteps - 1)
        else:
            at_boundary = (jv % (L // SB)) == 0
        # The local boundary state: entering a chunk (forward) / leaving it (backward).
        tl.store(hs_ptr + ((c0 + j // (L // SB)) * H + i_h) * DB * DC + tile,
                 state.to(hs_ptr.dtype.element_ty), mask=tile_mask & at_boundary[None, :])
        t0 = start + j * SB
        n = tl.minimum(end - t0, SB)
        live = pos < n
        bt = tl.load(b_ptr + ((t0 + pos[None, :]) * H + i_h) * DB + rows[:, None],
                     mask=live[None, :] & (rows[:, None] < DB), other=0.0)  # [BB, SB]
        c = tl.load(c_ptr + ((t0 + pos[:, None]) * H + i_h) * DC + cols[None, :],
                    mask=live[:, None] & (cols[None, :] < DC), other=0.0)  # [SB, BC]
        if REVERSE:
            dist = pos + 1  # dL/dS entering the step sees token i through lambda^(i+1)
        else:
            dist = n - 1 - pos  # token j reaches the step's last state through lambda^(n-1-j)
        w = tl.where(live, tl.exp(g * tl.maximum(dist, 0).to(tl.float32)), 0.0)
        bw = (bt * w[None, :]).to(c.dtype)
        state = state * tl.exp(g * n.to(tl.float32)) \
            + upd_scale * tl.dot(bw, c, input_precision=PREC)
    tl.store(seg_ptr + (i_s * H + i_h) * DB * DC + tile, state, mask=tile_mask)


@triton.jit
def _scan_kernel(seg_ptr, g_ptr, h0_ptr, ht_ptr, segs_ptr, seg_off_ptr,
                 H: tl.constexpr, KV: tl.constexpr, BLOCK: tl.constexpr,
                 REVERSE: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr):
    """In place: seg[s] (a segment's local total) becomes the true state at its boundary."""
    i_nh, i_blk = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    s0 = tl.load(seg_off_ptr + i_n)
    ns = tl.load(seg_off_ptr + i_n + 1) - s0
    g = tl.load(g_ptr + i_h)
    offs = i_blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < KV
    state = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + i_nh * KV + offs, mask=mask, other=0.0)
    for it in range(0, ns):
        if REVERSE:
            i_s = (s0 + ns - 1 - it).to(tl.int64)
        else:
            i_s = (s0 + it).to(tl.int64)
        ptrs = seg_ptr + (i_s * H + i_h) * KV + offs
        local = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, state, mask=mask)
        n = tl.load(segs_ptr + 3 * i_s + 1) - tl.load(segs_ptr + 3 * i_s)
        state = state * tl.exp(g * n.to(tl.float32)) + local
    if STORE_HT:
        tl.store(ht_ptr + i_nh * KV + offs, state, mask=mask)


@triton.jit
def _output_kernel(a_ptr, b_ptr, c_ptr, g_ptr, hs_ptr, seg_ptr, out_ptr, chunks_ptr,
                   scale_intra, scale_inter, upd_scale, s_hr, s_hc,
                   H: tl.constexpr, DA: tl.constexpr, DC: tl.constexpr, BA: tl.constexpr,
                   BC: tl.constexpr, SUB: tl.constexpr, REVERSE: tl.constexpr,
                   PREC: tl.constexpr):
    i_t, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(chunks_ptr + 5 * i_t).to(tl.int64)
    end = tl.load(chunks_ptr + 5 * i_t + 1).to(tl.int64)
    i_seg = tl.load(chunks_ptr + 5 * i_t + 2).to(tl.int64)
    if REVERSE:
        gap = tl.load(chunks_ptr + 5 * i_t + 4)  # tokens from the chunk's end to the segment's
    else:
        gap = tl.load(chunks_ptr + 5 * i_t + 3)
    g = tl.load(g_ptr + i_h)
    ka = tl.arange(0, BA)
    cols = i_c * BC + tl.arange(0, BC)
    pos = tl.arange(0, SUB)
    a_in = ka < DA
    c_in = cols < DC
    # S is [DA, DC] whatever way it is stored (strides s_hr, s_hc): o uses h, dq uses h^T.
    tile = ka[:, None] * s_hr + cols[None, :] * s_hc
    tile_mask = a_in[:, None] & c_in[None, :]
    state = tl.load(hs_ptr + (i_t * H + i_h) * DA * DC + tile, mask=tile_mask, other=0.0)
    boundary = tl.load(seg_ptr + (i_seg * H + i_h) * DA * DC + tile, mask=tile_mask, other=0.0)
    state = state.to(tl.float32) + tl.exp(g * gap.to(tl.float32)) * boundary
    if REVERSE:
        causal = pos[:, None] <= pos[None, :]
        dist = pos[None, :] - pos[:, None]
    else:
        causal = pos[:, None] >= pos[None, :]
        dist = pos[:, None] - pos[None, :]
    decay = tl.where(causal, tl.exp(g * tl.maximum(dist, 0).to(tl.float32)), 0.0)
    nsub = tl.cdiv(end - start, SUB)
    for it in range(0, nsub):
        if REVERSE:
            i_s = nsub - 1 - it
        else:
            i_s = it
        s0 = start + i_s * SUB
        n = tl.minimum(end - s0, SUB)
        live = pos < n
        tok = (s0 + pos) * H + i_h
        a = tl.load(a_ptr + tok[:, None] * DA + ka[None, :], mask=live[:, None] & a_in[None, :],
                    other=0.0)
        b = tl.load(b_ptr + tok[:, None] * DA + ka[None, :], mask=live[:, None] & a_in[None, :],
                    other=0.0)
        c = tl.load(c_ptr + tok[:, None] * DC + cols[None, :], mask=live[:, None] & c_in[None, :],
                    other=0.0)
        scores = tl.dot(a, tl.trans(b), input_precision=PREC) * decay
        out = scale_intra * tl.dot(scores.to(c.dtype), c, input_precision=PREC)
        if REVERSE:
            d_in, d_up = n - 1 - pos, pos + 1
        else:
            d_in, d_up = pos + 1, n - 1 - pos
        w_in = tl.where(live, tl.exp(g * tl.maximum(d_in, 0).to(tl.float32)), 0.0)
        aw = (a * w_in[:, None]).to(a.dtype)
        out += scale_inter * tl.dot(aw, state.to(a.dtype), input_precision=PREC)
        tl.store(out_ptr + tok[:, None] * DC + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=live[:, None] & c_in[None, :])
        # Advance S past this sub-chunk (wasted on the last one; cheaper than a branch).
        w_up = tl.where(live, tl.exp(g * tl.maximum(d_up, 0).to(tl.float32)), 0.0)
        bw = (b * w_up[:, None]).to(b.dtype)
        state = state * tl.exp(g * n.to(tl.float32)) \
            + upd_scale * tl.dot(tl.trans(bw), c, input_precision=PREC)


def _prec(x: torch.Tensor) -> str:
    # fp32 inputs: true fp32 products (tf32 would break engine agreement); bf16/fp16 ignore it.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def run_states(b, c, g, h0, plan, reverse, upd_scale, store_final):
    """Boundary states of every chunk, as (local states [n_chunks, H, DB, DC] in b's dtype,
    true segment-boundary states [n_segs, H, DB, DC] fp32), and the state after the whole
    sequence [N, H, DB, DC] fp32 (None unless store_final)."""
    H, DB, DC = b.shape[-2], b.shape[-1], c.shape[-1]
    cfg = config(b.dtype)
    hs = b.new_empty(max(plan.n_chunks, 1), H, DB, DC)
    seg = b.new_empty(max(plan.n_segs, 1), H, DB, DC, dtype=torch.float32)
    ht = b.new_empty(plan.n_seq, H, DB, DC, dtype=torch.float32) if store_final else None
    bb = min(cfg["state_bb"], triton.next_power_of_2(DB))
    bc = min(cfg["state_bc"], triton.next_power_of_2(DC))
    if plan.n_segs:
        _state_kernel[(plan.n_segs, triton.cdiv(DB, bb) * triton.cdiv(DC, bc), H)](
            b, c, g, hs, seg, plan.segs, float(upd_scale),
            H=H, DB=DB, DC=DC, BB=bb, BC=bc, L=plan.chunk, SB=min(cfg["state_sb"], plan.chunk),
            REVERSE=reverse, PREC=_prec(b),
            num_warps=cfg["state_warps"], num_stages=cfg["state_stages"],
        )
    block = min(cfg["scan_block"], triton.next_power_of_2(DB * DC))
    _scan_kernel[(plan.n_seq * H, triton.cdiv(DB * DC, block))](
        seg, g, h0 if h0 is not None else seg, ht if ht is not None else seg, plan.segs,
        plan.seg_offsets, H=H, KV=DB * DC, BLOCK=block, REVERSE=reverse,
        HAS_H0=h0 is not None, STORE_HT=store_final, num_warps=4,
    )
    return (hs, seg), ht


def run_output(a, b, c, g, states, plan, reverse, scale_intra, scale_inter, upd_scale,
               transpose):
    """One pass of `_output_kernel`: out [*, H, DC] in a's dtype. `transpose` reads each
    stored [DC, DA] state as [DA, DC]."""
    H, DA, DC = a.shape[-2], a.shape[-1], c.shape[-1]
    cfg = config(a.dtype)
    out = torch.empty_like(c, dtype=a.dtype)
    if plan.n_chunks == 0:
        return out
    bc = min(cfg["out_bc"], triton.next_power_of_2(DC))
    s_hr, s_hc = (1, DA) if transpose else (DC, 1)
    _output_kernel[(plan.n_chunks, triton.cdiv(DC, bc), H)](
        a, b, c, g, states[0], states[1], out, plan.chunks, float(scale_intra),
        float(scale_inter), float(upd_scale), s_hr, s_hc,
        H=H, DA=DA, DC=DC, BA=triton.next_power_of_2(DA), BC=bc, SUB=cfg["sub"],
        REVERSE=reverse, PREC=_prec(a), num_warps=cfg["out_warps"], num_stages=cfg["out_stages"],
    )
    return out


def chunk_fwd(q, k, v, g, scale, h0, output_final_state, plan):
    """o [B, T, H, V] (v's dtype) and the final states (fp32) or None."""
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"lightning_attn: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    states, ht = run_states(k, v, g, h0, plan, False, 1.0, output_final_state)
    o = run_output(q, k, v, g, states, plan, False, scale, scale, 1.0, False)
    return o, ht
