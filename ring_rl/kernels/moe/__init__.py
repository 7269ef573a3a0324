"""MoE ops: the fp32 router, group-limited top-k routing, and the routed SwiGLU experts.

    logits = router_logits(x, gate_weight)                 # fp32 [T, E]
    weights, ids = moe_route(logits, expert_bias, top_k, n_group, topk_group,
                             routed_scaling_factor, norm_topk_prob=True, replay_ids=None)
    y = moe_experts(x, ids, weights, w_gate_up, w_down)    # [T, H] in x.dtype

The maths (and the tie rule: equal scores go to the lower expert / group index) is defined
in `reference.py`. Dispatch (see `ring_rl.kernels.dispatch`): Triton on CUDA tensors, the
plain-PyTorch reference on CPU tensors (the experts as two padded batched GEMMs,
`torch_padded.py`, unless routing is skewed or `RING_RL_KERNELS=reference`). The Triton path:
- router_logits: an fp32-accurate Triton matmul (never TF32: IEEE FMA for fp32 x; for bf16
  x the fp32 weight is split into 3 exact bf16 parts, once per call, for the tensor cores)
  with fixed tiles and no split-K, so a row's logits are bitwise the same whatever the batch
  (`triton_router.py`); its backward reuses the same kernel.
- moe_route: the selection runs in one Triton kernel, the weights in another with an analytic
  backward (`triton_router.py`); the weights are the same bits as the reference's (same fp32
  operations, same order), their gradient equal to fp32 rounding.
- moe_experts: stable sort of the slots by expert (a Triton counting sort, or torch.sort:
  `triton_experts.PLAN`), then grouped Triton GEMMs with gathered rows and a fused SwiGLU
  epilogue (TMA tile loads where the rows are in expert order: `triton_tma.py`), and a
  per-token gather-combine (`triton_experts.py`, the row movers in `triton_rows.py`, backward
  in `triton_experts_bwd.py`). By
  default the forward does not use torch._grouped_mm (it needs a permuted copy of x, and our
  fixed tiles keep the forward batch invariant by construction; `triton_experts.FWD_GEMMS`
  switches it on); the backward's weight gradients run through it on sm90
  (`triton_experts.BWD_GEMMS`; benchmarks/results/moe.md has the timings).
  No float atomics anywhere: every output element is written by one program, weight
  gradients are per-expert GEMMs over that expert's rows, and the per-token sums run in a
  fixed order -- so results are bitwise reproducible.
"""
from __future__ import annotations

import torch

from ring_rl.kernels.dispatch import kernel_mode, use_triton
from ring_rl.kernels.moe.reference import (
    check_route_args,
    moe_experts_ref,
    moe_route_ref,
    permute_by_expert,
    route_weights,
    router_logits_ref,
    select_experts_ref,
)
from ring_rl.kernels.moe.torch_padded import (
    moe_experts_padded,
    padded_layout,
    padding_pays,
)

__all__ = [
    "router_logits",
    "moe_route",
    "moe_experts",
    "router_logits_ref",
    "moe_route_ref",
    "moe_experts_ref",
    "select_experts_ref",
    "route_weights",
    "permute_by_expert",
]


class RouterLogitsFunction(torch.autograd.Function):
    """fp32 logits = x.float() @ W.float().T; backward: dx = dl @ W, dW = dl.T @ x (fp32
    accumulation; see triton_router.matmul_fp32 for how bf16 activations are handled)."""

    @staticmethod
    def forward(ctx, x, gate_weight):
        from ring_rl.kernels.moe import triton_router as k

        xc, wc = x.contiguous(), gate_weight.contiguous()
        # bf16 x: W's bf16 parts once here (k.PRESPLIT), not in every program; same bits.
        wp = k.split_bf16(wc) if k.PRESPLIT and xc.dtype == torch.bfloat16 else None
        ctx.save_for_backward(xc, wc, wp)
        return k.matmul_fp32(xc, wc.T if wp is None else wp.transpose(1, 2))

    @staticmethod
    def backward(ctx, dlogits):
        from ring_rl.kernels.moe import triton_router as k

        x, w, wp = ctx.saved_tensors
        dl = dlogits.float().contiguous()
        dlp = k.split_bf16(dl) if wp is not None else None     # for dx and dW alike
        # dx is rounded to x's dtype (in the kernel): below fp32, the bf16-split tensor-core
        # product is plenty (and ~10x faster than the IEEE FMA dot).
        exact = x.dtype == torch.float32
        dx = None
        if ctx.needs_input_grad[0]:
            bm, bn, warps = k.DX_TILES
            dx = k.matmul_fp32(dl if dlp is None else dlp, w if wp is None else wp, exact,
                               tiles=(bm, bn), warps=warps, out_dtype=x.dtype)
        # dW = dl^T x reduces over the tokens and has few outputs (E x H): small tiles and a
        # deterministic split over the tokens give enough programs (triton_router.dw_splits).
        dw = None
        if ctx.needs_input_grad[1]:
            dw = k.matmul_fp32(dl.T if dlp is None else dlp.transpose(1, 2), x, tiles=(64, 64),
                               splits=k.dw_splits(x.shape[0]), warps=4).to(w.dtype)
        return dx, dw


class MoEExpertsFunction(torch.autograd.Function):
    """Routed SwiGLU experts with Triton grouped GEMMs; gradients for x, weights and both
    weight tensors (ids are integers and get none)."""

    @staticmethod
    def forward(ctx, x, ids, weights, w_gate_up, w_down):
        from ring_rl.kernels.moe import triton_experts as k

        plan = k.make_plan(ids, w_gate_up.shape[0])
        # The GEMMs run in x's dtype: expert weights of another dtype are cast (a copy).
        ctx.param_dtypes = (w_gate_up.dtype, w_down.dtype)
        x = x.contiguous()
        w_gate_up = w_gate_up.to(x.dtype).contiguous()
        w_down = w_down.to(x.dtype).contiguous()
        wts = weights.float().contiguous()
        y, gu, xs = k.experts_fwd(x, wts, w_gate_up, w_down, plan)
        ctx.save_for_backward(x, wts, w_gate_up, w_down, gu, xs)
        ctx.plan, ctx.weights_dtype = plan, weights.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        from ring_rl.kernels.moe import triton_experts_bwd as k

        x, wts, w_gate_up, w_down, gu, xs = ctx.saved_tensors
        dx, dwts, dwgu, dwd = k.experts_bwd(dy.contiguous(), x, xs, wts, w_gate_up, w_down,
                                            gu, ctx.plan, ctx.needs_input_grad)
        if dwts is not None:
            dwts = dwts.to(ctx.weights_dtype)
        if dwgu is not None:
            dwgu = dwgu.to(ctx.param_dtypes[0])
        if dwd is not None:
            dwd = dwd.to(ctx.param_dtypes[1])
        return dx, None, dwts, dwgu, dwd


def router_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """fp32 router logits [T, E] = x.float() @ gate_weight.float().T (x [T, H], any float)."""
    if x.dim() != 2 or gate_weight.dim() != 2 or x.shape[1] != gate_weight.shape[1]:
        raise ValueError(f"router_logits: x {tuple(x.shape)} and gate_weight "
                         f"{tuple(gate_weight.shape)} must be [T, H] and [E, H]")
    if not use_triton(x, gate_weight):
        return router_logits_ref(x, gate_weight)
    return RouterLogitsFunction.apply(x, gate_weight)


def moe_route(logits: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
              n_group: int, topk_group: int, routed_scaling_factor: float,
              norm_topk_prob: bool = True, replay_ids: torch.Tensor | None = None):
    """Group-limited top-k routing on sigmoid scores. Returns (weights fp32 [T, top_k],
    ids int64 [T, top_k]); ids by descending biased score, ties to the lower index.

    expert_bias [E] (or None) is added for the selection only. replay_ids [T, top_k]: use
    these experts instead of selecting (routing replay); the weights are still computed from
    the current scores. weights are differentiable w.r.t. logits."""
    if logits.dim() != 2:
        raise ValueError(f"moe_route: logits {tuple(logits.shape)} must be [T, E]")
    t, e = logits.shape
    check_route_args(e, top_k, n_group, topk_group)
    if expert_bias is not None and expert_bias.shape != (e,):
        raise ValueError(f"moe_route: expert_bias {tuple(expert_bias.shape)} must be [{e}]")
    if replay_ids is not None and replay_ids.shape != (t, top_k):
        raise ValueError(f"moe_route: replay_ids {tuple(replay_ids.shape)} must be "
                         f"[{t}, {top_k}] (tokens, top_k)")
    if not use_triton(logits, expert_bias):
        return moe_route_ref(logits, expert_bias, top_k, n_group, topk_group,
                             routed_scaling_factor, norm_topk_prob, replay_ids)
    from ring_rl.kernels.moe import triton_router as k

    scores = torch.sigmoid(logits.float())
    if replay_ids is None:
        ids = k.select_experts(scores.detach(), expert_bias, top_k, n_group, topk_group)
    else:
        ids = replay_ids.to(device=logits.device, dtype=torch.int64)
    return k.route_weights(scores, ids, routed_scaling_factor, norm_topk_prob), ids


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """y [T, H] = sum_j weights[t, j] * SwiGLU-expert_{ids[t, j]}(x_t), in x.dtype.

    x [T, H]; ids int [T, k]; weights [T, k] (fp32); w_gate_up [E, 2I, H] (rows :I gate,
    I: up); w_down [E, H, I]. See reference.py for the roundings."""
    if x.dim() != 2 or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: x {tuple(x.shape)} and ids {tuple(ids.shape)} must be "
                         f"[T, H] and [T, k]")
    if weights.shape != ids.shape:
        raise ValueError(f"moe_experts: weights {tuple(weights.shape)} must match ids "
                         f"{tuple(ids.shape)}")
    e, two_i, h = w_gate_up.shape
    if h != x.shape[1] or two_i % 2 or w_down.shape != (e, h, two_i // 2):
        raise ValueError(f"moe_experts: w_gate_up {tuple(w_gate_up.shape)} / w_down "
                         f"{tuple(w_down.shape)} must be [E, 2I, H] / [E, H, I] with "
                         f"H={x.shape[1]}")
    if not use_triton(x, w_gate_up, w_down) or x.shape[0] == 0:
        layout = padded_layout(ids, e) if kernel_mode() == "auto" and x.shape[0] else None
        if layout is not None and padding_pays(layout, e):  # CPU: one bmm per GEMM unless skewed
            return moe_experts_padded(x, weights, w_gate_up, w_down, layout)
        return moe_experts_ref(x, ids, weights, w_gate_up, w_down)
    return MoEExpertsFunction.apply(x, ids, weights, w_gate_up, w_down)
