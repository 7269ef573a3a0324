"""The expert row GEMMs one at a time, one program per tile or persistent
(`triton_experts.PERSISTENT_GEMMS`), over tile configs; and the expert selection with and
without the 3D group view (`triton_router.SELECT_3D`). Same shapes, inputs and timing as
benchmarks/moe.py; results in benchmarks/results/moe.md. Run on the GPU machine from
benchmarks/: `python3 moe_tma_sweep.py [LABEL ...]` (label substrings: only those GEMMs).
"""
from __future__ import annotations

import sys

import torch
from moe import N_GROUP, SCALE, TOPK_GROUP, E, H, I, K, bench, make_inputs, matmul_peak

from ring_rl.kernels.moe import moe_route, router_logits
from ring_rl.kernels.moe import triton_experts as kx
from ring_rl.kernels.moe import triton_router as kr
from ring_rl.kernels.moe import triton_rows as krows
from ring_rl.kernels.moe import triton_tma as kt

TMA_CFGS = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 128, 8, 2),
            (128, 128, 128, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3),
            (64, 256, 64, 4, 4)]


def main():
    peak = matmul_peak()
    print(f"bf16 matmul peak: {peak:.0f} TFLOP/s\n")
    x, gate, bias, wgu, wd, dy = make_inputs()
    xd, wgud, wdd = x.detach(), wgu.detach(), wd.detach()
    with torch.no_grad():
        _, ids = moe_route(router_logits(xd, gate), bias, K, N_GROUP, TOPK_GROUP, SCALE)
    plan = kx.make_plan(ids, E)
    gu, h = kx.gate_up(xd, wgud, plan)   # gu stands in for dgu (same shape) in dx
    dys = krows.gather_rows(dy, plan)
    gemm = 2 * plan.num_rows * H * I
    jobs = [  # (label, PERSISTENT_GEMMS name, fn(cfg), flops, configs)
        ("down, TMA", "down", lambda c: kt.row_gemm(h, wdd, plan, True, c, True, "down"), gemm,
         TMA_CFGS),
        ("dx, TMA", "dx", lambda c: kt.row_gemm(gu, wgud, plan, False, c, True, "dx"), 2 * gemm,
         TMA_CFGS),
        ("G, TMA on sorted dy", "down_bwd",
         lambda c: kt.row_gemm(dys, wdd, plan, False, c, False, "down_bwd"), gemm,
         [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4)]),
    ]
    print("| GEMM | BLOCK_M, BLOCK_N, BLOCK_K, warps, stages | persistent | ms | TFLOP/s (% peak) |")
    print("|---|---|---|---|---|")
    saved = kx.PERSISTENT_GEMMS
    only = sys.argv[1:]          # label substrings: time only those GEMMs
    for label, name, fn, flops, cfgs in jobs:
        if only and not any(o in label for o in only):
            continue
        for cfg in cfgs:
            for persistent in (False, True):
                kx.PERSISTENT_GEMMS = (name,) if persistent else ()
                try:
                    ms = bench(lambda: fn(cfg), rep=100)
                    tf = flops / ms / 1e9
                    print(f"| {label} | {cfg} | {persistent} | {ms:.3f} | {tf:.0f} "
                          f"({100 * tf / peak:.0f}%) |")
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                    print(f"| {label} | {cfg} | {persistent} | failed: {type(exc).__name__} | |")
                sys.stdout.flush()
    kx.PERSISTENT_GEMMS = saved
    scores = torch.sigmoid(router_logits(xd, gate.detach()))
    saved = kr.SELECT_3D
    for view in (False, True):
        kr.SELECT_3D = view
        ms = bench(lambda: kr.select_experts(scores, bias, K, N_GROUP, TOPK_GROUP))
        print(f"\nselect_experts, SELECT_3D={view}: {ms:.4f} ms")
    kr.SELECT_3D = saved


if __name__ == "__main__":
    main()
