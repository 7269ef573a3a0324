"""`benchmarks/moe.py --variants`: the MoE block under each switchable backward / plan /
router setting (VARIANTS), the parts those settings change timed one by one, and a per-kernel
profile of the fastest variant. Same shapes, inputs and timing as benchmarks/moe.py, whose
helpers this uses; the results are in benchmarks/results/moe.md ("Switchable paths").
"""
from __future__ import annotations

import contextlib
import statistics
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
    matmul_peak,
    row,
)

from ring_rl.kernels.moe import moe_route, router_logits
from ring_rl.kernels.moe import triton_experts as kx
from ring_rl.kernels.moe import triton_experts_bwd as kb
from ring_rl.kernels.moe import triton_router as kr
from ring_rl.kernels.moe import triton_rows as krows

# Block variants: module constants -> value, each applied on top of BASE (the committed
# configuration before this round, H100 run of 2026-11-23, except that the router's dx is
# now rounded to bf16 in its kernel and the G GEMM reads the dy rows copied for the dW
# GEMMs: both always on). The names are explained in triton_experts.py (BWD_GEMMS, FWD_ROWS,
# FWD_GEMMS, TMA_GEMMS, PLAN) and triton_router.py (PRESPLIT, MM_*, DW_SPLIT_ROWS).
BASE = {"BWD_GEMMS": "gmm_dw", "PLAN": "triton", "DW_SPLIT_ROWS": 2048, "PRESPLIT": False,
        "FWD_ROWS": "gather", "TMA_GEMMS": (), "FWD_GEMMS": "triton",
        "MM_BLOCK_M": 64, "MM_BLOCK_N": 128, "MM_WARPS": 4, "PERSISTENT_GEMMS": (),
        "SELECT_3D": False}
ROUTER = {"PRESPLIT": True, "MM_BLOCK_M": 128, "MM_WARPS": 8}
PREV = {**ROUTER, "TMA_GEMMS": ("gate_up", "down", "dx")}
NEW = {**ROUTER, "TMA_GEMMS": ("gate_up", "down", "dx", "down_bwd"),
       "PERSISTENT_GEMMS": ("down", "dx", "down_bwd"), "SELECT_3D": True}
VARIANTS = [
    ("before: pointer GEMMs, router split in every program, 64x128 router tiles", {}),
    ("router pre-split, 128x128 tiles; pointer GEMMs", ROUTER),
    ("previous default: router pre-split + TMA down and dx", PREV),
    ("default: + persistent TMA down, dx and G; 3D group select", NEW),
    ("default + x rows sorted in the forward and kept (TMA gate-up)",
     {**NEW, "FWD_ROWS": "sorted"}),
]
DEFAULT = 3     # the index of the default in VARIANTS (its kernels are profiled)
ROUNDS = 5      # the variants are timed in turn, ROUNDS times over; the median is reported
SETTING_MODULE = {"BWD_GEMMS": kx, "PLAN": kx, "FWD_ROWS": kx, "TMA_GEMMS": kx,
                  "FWD_GEMMS": kx, "PERSISTENT_GEMMS": kx, "DW_SPLIT_ROWS": kr, "PRESPLIT": kr,
                  "MM_BLOCK_M": kr, "MM_BLOCK_N": kr, "MM_WARPS": kr, "SELECT_3D": kr}


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


def variant_table(peak, parts=False):
    """peak: the matmul peak measured at the start of the run. It is measured again in every
    round, between the variants, and the percentages here are of those rounds' median: the
    H200's sustained clock moves by 10-15% over a run (power), the peak with it."""
    x, gate, bias, wgu, wd, dy = make_inputs()

    def fn():
        return block(x, gate, bias, wgu, wd)

    times = {name: ([], []) for name, _ in VARIANTS}
    failed = {}
    peaks = []
    for _ in range(ROUNDS):       # interleaved: clock drift hits every variant alike
        peaks.append(matmul_peak())
        for name, change in VARIANTS:
            if name in failed:
                continue
            with configured({**BASE, **change}):
                try:
                    times[name][0].append(bench(fn))
                    times[name][1].append(bench(fwd_bwd(fn, (x, gate, wgu, wd), dy)))
                except Exception as exc:  # noqa: BLE001 - report, keep the other rows
                    failed[name] = f"; failed: {exc!r:.120}"
    start, peak = peak, statistics.median(peaks)
    target = 3 * FLOPS_FWD / (0.5 * peak * 1e12) * 1e3
    print(f"\n## Variants (same inputs; median of {ROUNDS} interleaved rounds; matmul peak in the "
          f"rounds {' / '.join(f'{p:.0f}' for p in peaks)} TFLOP/s, median {peak:.0f} (at the start "
          f"{start:.0f}); 50% of the median = {target:.2f} ms fwd+bwd)\n")
    print("| op | fwd ms | fwd TFLOP/s (% peak) | fwd+bwd ms | fwd+bwd TFLOP/s (% peak) | "
          "fwd+bwd ms, each round | note |")
    print("|---|---|---|---|---|---|---|")
    done = []
    for name, change in VARIANTS:
        note = (", ".join(f"{k}={v!r}" for k, v in change.items()) or "BASE")
        fwd, fb = (statistics.median(t) if t else None for t in times[name])
        rounds = " / ".join(f"{t:.3f}" for t in times[name][1])
        line = row(f"block, {name}", fwd, fb, peak, note + failed.get(name, ""))
        print(line.replace(f" | {note}", f" | {rounds} | {note}", 1))
        if fb is not None:
            done.append((fb, name, note))
    if done:
        fb, name, note = min(done)
        print(f"\nfastest block fwd+bwd: {fb:.3f} ms ({300 * FLOPS_FWD / (fb * 1e9) / peak:.1f}% "
              f"of peak, target <= {target:.2f} ms): {name} -- {note}")
    if parts:
        part_table(peak, x, gate, bias, wgu, wd, dy)
    try:
        name, change = VARIANTS[DEFAULT]
        with configured({**BASE, **change}):
            kernel_profile(fwd_bwd(fn, (x, gate, wgu, wd), dy), f"the default ({name})")
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
    xs, dys = krows.gather_rows(xd, plan), krows.gather_rows(dy, plan)
    o = kx.row_gemm(h, wdd, plan, transpose_w=True, cfg=kx.CONFIGS["down"])
    dl = torch.randn(T, E, device=DEVICE)
    gemm = 2 * T * K * H * I                          # one H x I GEMM over all rows
    gmm = torch._grouped_mm
    print("\n| part | variant | ms | TFLOP/s (% peak) |")
    print("|---|---|---|---|")
    for method in ("torch", "triton"):
        timed(peak, "plan: sort + tile schedule", method,
              lambda: kx.make_plan(ids, E).tiles(128), settings={"PLAN": method})
    router_parts(peak, xd, gd, dl)
    timed(peak, "combine, forward (weighted)", "Triton", lambda: krows.combine(o, wts, T))
    timed(peak, "x, dy rows sorted", "gather_rows (Triton), both",
          lambda: (krows.gather_rows(xd, plan), krows.gather_rows(dy, plan)))
    timed(peak, "x rows sorted", "gather_rows (Triton)", lambda: krows.gather_rows(xd, plan))
    # gate-up (2 GEMMs' worth of FLOPs), then the three row GEMMs, each engine alone
    timed(peak, "gate-up + SwiGLU", "pointer, x rows gathered", lambda: kx.gate_up(xd, wgud, plan),
          2 * gemm)
    timed(peak, "gate-up + SwiGLU", "pointer, sorted x rows",
          lambda: kx.gate_up(xs, wgud, plan, sorted_rows=True), 2 * gemm)
    for cfg in ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4)):
        timed(peak, "gate-up + SwiGLU", f"TMA, sorted x rows {cfg}",
              lambda c=cfg: kt().gate_up(xs, wgud, plan, c), 2 * gemm)
    timed(peak, "gate-up + SwiGLU", "grouped_mm on sorted x + swiglu_fwd",
          lambda: krows.swiglu_fwd(gmm(xs, wgud.transpose(1, 2), offs=plan.ends)), 2 * gemm)
    timed(peak, "SwiGLU forward alone (row-wise)", "Triton", lambda: krows.swiglu_fwd(gu))
    row_gemm_parts(peak, "down: o[slot] = h Wd^T", h, wdd, plan, True, "down", True, gemm,
                   lambda: krows.combine(gmm(h, wdd.transpose(1, 2), offs=plan.ends), wts, T,
                                      row_map=plan.inverse), "grouped_mm + combine (inverse)")
    timed(peak, "G = dy[tok] Wd", "pointer, dy rows gathered",
          lambda: kx.row_gemm(dy, wdd, plan, False, cfg_g, gather_a=True, scatter_c=False), gemm)
    row_gemm_parts(peak, "G = dy Wd (sorted dy rows)", dys, wdd, plan, False, "down_bwd", False,
                   gemm, lambda: gmm(dys, wdd, offs=plan.ends), "grouped_mm")
    timed(peak, "SwiGLU backward (row-wise, after G)", "Triton",
          lambda: kb.swiglu_bwd(g_rows, gu, wts, plan))
    row_gemm_parts(peak, "dx rows: dxs[slot] = dgu Wgu", dgu, wgud, plan, False, "dx", True,
                   2 * gemm, lambda: gmm(dgu, wgud, offs=plan.ends), "grouped_mm (sorted)")
    timed(peak, "combine, dx (unweighted)", "Triton",
          lambda: krows.combine(kx.row_gemm(dgu, wgud, plan, False, cfg_dx), None, T), 2 * gemm)
    timed(peak, "dW GEMMs (dWgu + dWd)", "grouped_mm on sorted rows",
          lambda: (kb.grouped_wgrad(dgu, xs, plan), kb.grouped_wgrad(dys, hw, plan)), 3 * gemm)


def kt():
    from ring_rl.kernels.moe import triton_tma
    return triton_tma


def row_gemm_parts(peak, part, a, w, plan, transpose_w, name, scatter, flops, gmm_fn, gmm_name):
    """One row GEMM on sorted A rows: the pointer kernel, TMA at a few tiles, grouped_mm."""
    timed(peak, part, f"pointer {kx.CONFIGS[name]}",
          lambda: kx.row_gemm(a, w, plan, transpose_w, kx.CONFIGS[name], scatter_c=scatter),
          flops)
    for cfg in ((128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4)):
        timed(peak, part, f"TMA {cfg}",
              lambda c=cfg: kt().row_gemm(a, w, plan, transpose_w, c, scatter), flops)
    timed(peak, part, gmm_name, gmm_fn, flops)


def router_parts(peak, xd, gd, dl):
    """Router matmuls: the fp32 weight / dlogits split in every program or once (PRESPLIT),
    the forward's fixed tiles, the backward's dx rounded to bf16 in the kernel."""
    wp, dlp = kr.split_bf16(gd), kr.split_bf16(dl)
    timed(peak, "router: split_bf16 of dlogits", "Triton", lambda: kr.split_bf16(dl))
    for tiles, warps in (((64, 128), 4), ((128, 128), 8), ((64, 256), 8), ((128, 256), 8)):
        timed(peak, "router fwd x W^T", f"in-kernel split {tiles} w{warps}",
              lambda t=tiles, n=warps: kr.matmul_fp32(xd, gd.T, tiles=t, warps=n))
        timed(peak, "router fwd x W^T", f"pre-split {tiles} w{warps}",
              lambda t=tiles, n=warps: kr.matmul_fp32(xd, wp.transpose(1, 2), tiles=t, warps=n))
    bm, bn, warps = kr.DX_TILES
    timed(peak, "router dx = dl W (bf16 out)", f"in-kernel split {kr.DX_TILES}",
          lambda: kr.matmul_fp32(dl, gd, False, tiles=(bm, bn), warps=warps,
                                 out_dtype=torch.bfloat16))
    timed(peak, "router dx = dl W (bf16 out)", f"pre-split {kr.DX_TILES}",
          lambda: kr.matmul_fp32(dlp, wp, False, tiles=(bm, bn), warps=warps,
                                 out_dtype=torch.bfloat16))
    timed(peak, "router dx = dl W", "fp32 out + .to(bf16) (before)",
          lambda: kr.matmul_fp32(dl, gd, False, tiles=(bm, bn), warps=warps).to(torch.bfloat16))
    timed(peak, "router dW = dl^T x, 8 splits", "in-kernel split",
          lambda: kr.matmul_fp32(dl.T, xd, tiles=(64, 64), splits=8))
    timed(peak, "router dW = dl^T x, 8 splits", "pre-split",
          lambda: kr.matmul_fp32(dlp.transpose(1, 2), xd, tiles=(64, 64), splits=8))
