"""`benchmarks/moe.py --variants`: the MoE block under each switchable backward / plan /
router setting (VARIANTS), the parts those settings change timed one by one, and a per-kernel
profile of the fastest variant. Same shapes, inputs and timing as benchmarks/moe.py, whose
helpers this uses; the results are in benchmarks/results/moe.md ("Switchable paths").
"""
from __future__ import annotations

import contextlib
import sys

import torch
from moe import (
    DEVICE,
    FLOPS_FWD,
    N_GROUP,
    SCALE,
    TOPK_GROUP,
    E,
    H,
    I,
    K,
    T,
    bench,
    block,
    fwd_bwd,
    make_inputs,
    row,
)

from ring_rl.kernels.moe import moe_route, router_logits
from ring_rl.kernels.moe import triton_experts as kx
from ring_rl.kernels.moe import triton_experts_bwd as kb
from ring_rl.kernels.moe import triton_router as kr

# Block variants: module constants -> value. The first is the path the results file timed
# (and the constants' defaults); BWD_GEMMS is explained in triton_experts.py.
VARIANTS = [
    ("default: x, dy rows sorted by gather_rows, dW grouped_mm; Triton plan, router dW split",
     {"BWD_GEMMS": "gmm_dw", "PLAN": "triton", "DW_SPLIT_ROWS": 2048}),
    ("all-Triton backward, torch plan, router dW unsplit (the defaults before)",
     {"BWD_GEMMS": "triton", "PLAN": "torch", "DW_SPLIT_ROWS": 0}),
    ("all-Triton backward; Triton plan, router dW split",
     {"BWD_GEMMS": "triton", "PLAN": "triton", "DW_SPLIT_ROWS": 2048}),
    ("gmm_dw_dx: as the default, and dx grouped_mm",
     {"BWD_GEMMS": "gmm_dw_dx", "PLAN": "triton", "DW_SPLIT_ROWS": 2048}),
    ("gmm_all: as gmm_dw_dx, and G grouped_mm",
     {"BWD_GEMMS": "gmm_all", "PLAN": "triton", "DW_SPLIT_ROWS": 2048}),
]
SETTING_MODULE = {"BWD_GEMMS": kx, "PLAN": kx, "DW_SPLIT_ROWS": kr}


@contextlib.contextmanager
def configured(settings):
    old = {k: getattr(SETTING_MODULE[k], k) for k in settings}
    for k, v in settings.items():
        setattr(SETTING_MODULE[k], k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(SETTING_MODULE[k], k, v)


def variant_table(peak):
    x, gate, bias, wgu, wd, dy = make_inputs()

    def fn():
        return block(x, gate, bias, wgu, wd)

    target = 3 * FLOPS_FWD / (0.5 * peak * 1e12) * 1e3
    print(f"\n## Variants (same inputs; 50% of peak = {target:.2f} ms fwd+bwd)\n")
    print("| op | fwd ms | fwd TFLOP/s (% peak) | fwd+bwd ms | fwd+bwd TFLOP/s (% peak) | note |")
    print("|---|---|---|---|---|---|")
    done = []
    for name, settings in VARIANTS:
        note = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        fwd = fb = None
        with configured(settings):
            try:
                fwd = bench(fn)
                fb = bench(fwd_bwd(fn, (x, gate, wgu, wd), dy))
                done.append((fb, name, note))
            except Exception as exc:  # noqa: BLE001 - report, keep the other rows
                note += f"; failed: {exc!r:.120}"
        print(row(f"block, {name}", fwd, fb, peak, note))
        sys.stdout.flush()
    if done:
        fb, name, note = min(done)
        print(f"\nfastest block fwd+bwd: {fb:.3f} ms ({300 * FLOPS_FWD / (fb * 1e9) / peak:.1f}% "
              f"of peak, target <= {target:.2f} ms): {name} -- {note}")
    part_table(peak, x, gate, bias, wgu, wd, dy)
    if done:
        try:
            with configured(dict(VARIANTS)[name]):
                kernel_profile(fwd_bwd(fn, (x, gate, wgu, wd), dy), f"fastest variant ({name})")
        except Exception as exc:  # noqa: BLE001 - e.g. no CUPTI: the tables above stand
            print(f"\n(kernel profile failed: {exc!r:.120})")


def kernel_profile(run, title, reps=3, rows=30):
    """GPU time per kernel of `run` (torch.profiler, mean over reps calls after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        us = getattr(ev, "self_cuda_time_total", 0) if us is None else us
        if us > 0:
            kernels.append((us / reps, ev.count // reps, ev.key))
    kernels.sort(reverse=True)
    total = sum(k[0] for k in kernels)
    print(f"\n## Kernels of one block fwd+bwd, {title}: {total / 1e3:.3f} ms of kernel time\n")
    print("| kernel | calls | ms | % |")
    print("|---|---|---|---|")
    for us, count, key in kernels[:rows]:
        print(f"| {key[:90]} | {count} | {us / 1e3:.3f} | {100 * us / total:.1f} |")
    rest = kernels[rows:]
    if rest:
        us = sum(k[0] for k in rest)
        print(f"| ({len(rest)} more kernels) | {sum(k[1] for k in rest)} | {us / 1e3:.3f} | "
              f"{100 * us / total:.1f} |")


def timed(peak, part, variant, fn, flops=0, settings=None):
    """One row of the parts table (flops 0: no TFLOP/s)."""
    with configured(settings or {}):
        try:
            ms = bench(fn, rep=100)
            tf = f"{flops / ms / 1e9:.0f} ({flops / ms / 1e7 / peak:.0f}%)" if flops else "-"
            print(f"| {part} | {variant} | {ms:.3f} | {tf} |")
        except Exception as exc:  # noqa: BLE001
            print(f"| {part} | {variant} | failed: {exc!r:.120} | |")
    sys.stdout.flush()


def part_table(peak, x, gate, bias, wgu, wd, dy):
    """The parts the variants change, timed alone (operands of the real routing)."""
    xd, wgud, wdd, gd = x.detach(), wgu.detach(), wd.detach(), gate.detach()
    with torch.no_grad():
        w, ids = moe_route(router_logits(xd, gd), bias, K, N_GROUP, TOPK_GROUP, SCALE)
    wts = w.float().contiguous()
    plan = kx.make_plan(ids, E)
    gu, h = kx.gate_up(xd, wgud, plan)
    dgu, hw, _ = kb.down_bwd(dy, wdd, gu, wts, plan, fused=False)
    cfg_g, cfg_dx = kx.CONFIGS["down_bwd"], kx.CONFIGS["dx"]
    g_rows = kx.row_gemm(dy, wdd, plan, False, cfg_g, gather_a=True, scatter_c=False)
    xs, dys = kb.gather_rows(xd, plan), kb.gather_rows(dy, plan)
    o = kx.row_gemm(h, wdd, plan, transpose_w=True, cfg=kx.CONFIGS["down"])
    dl = torch.randn(T, E, device=DEVICE)
    gemm = 2 * T * K * H * I                          # one H x I GEMM over all rows
    gmm = torch._grouped_mm
    print("\n| part | variant | ms | TFLOP/s (% peak) |")
    print("|---|---|---|---|")
    for method in ("torch", "triton"):
        timed(peak, "plan: sort + tile schedule", method,
              lambda: kx.make_plan(ids, E).tiles(128), settings={"PLAN": method})
    for splits in (1, 8):
        timed(peak, "router dW = dl^T x (fp32 dl, 3 bf16 parts)", f"{splits} split(s)",
              lambda s=splits: kr.matmul_fp32(dl.T, xd, tiles=(64, 64), splits=s))
    for bm, bn, warps in ((64, 128, 4), (128, 128, 8), (128, 256, 8), (64, 256, 4)):
        timed(peak, "router dx = dl W (fp32 operands: 3 bf16 dots)", f"DX_TILES={(bm, bn, warps)}",
              lambda c=(bm, bn, warps): kr.matmul_fp32(dl, gd, False, tiles=c[:2], warps=c[2]))
    timed(peak, "combine, forward (weighted)", "Triton", lambda: kx.combine(o, wts, T))
    timed(peak, "G = dy[tok] Wd", "Triton",
          lambda: kx.row_gemm(dy, wdd, plan, False, cfg_g, gather_a=True, scatter_c=False), gemm)
    timed(peak, "G = dy[tok] Wd", "grouped_mm on sorted dy", lambda: gmm(dys, wdd, offs=plan.ends),
          gemm)
    timed(peak, "x, dy rows sorted", "index_select",
          lambda: (xd.index_select(0, plan.tokens), dy.index_select(0, plan.tokens)))
    timed(peak, "x, dy rows sorted", "gather_rows (Triton)",
          lambda: (kb.gather_rows(xd, plan), kb.gather_rows(dy, plan)))
    timed(peak, "SwiGLU backward (row-wise, after G)", "Triton",
          lambda: kb.swiglu_bwd(g_rows, gu, wts, plan))
    timed(peak, "dx = combine(dgu Wgu)", "Triton",
          lambda: kx.combine(kx.row_gemm(dgu, wgud, plan, False, cfg_dx), None, T), 2 * gemm)
    timed(peak, "dx = combine(dgu Wgu)", "grouped_mm, combine through the inverse",
          lambda: kx.combine(gmm(dgu, wgud, offs=plan.ends), None, T, row_map=plan.inverse),
          2 * gemm)
    timed(peak, "dW GEMMs (dWgu + dWd)", "Triton",
          lambda: (kb.wgrad(dgu, xd, plan, False, torch.bfloat16),
                   kb.wgrad(dy, hw, plan, True, torch.bfloat16)), 3 * gemm)
    timed(peak, "dW GEMMs (dWgu + dWd)", "grouped_mm on sorted rows",
          lambda: (kb.grouped_wgrad(dgu, xs, plan), kb.grouped_wgrad(dys, hw, plan)), 3 * gemm)
