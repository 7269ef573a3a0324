"""GPU benchmark: the MoE block (router + routing + experts) at Ring-mini shapes, bf16.

    python3 benchmarks/moe.py            # the table (markdown) for benchmarks/results/moe.md
    python3 benchmarks/moe.py --sweep    # first time each expert kernel over tile choices,
                                         # then the table with the fastest of each
    python3 benchmarks/moe.py --variants # the table, then the block under each variant of
                                         # the forward / backward / plan / router settings
                                         # (benchmarks/moe_variants.py); --parts: and the
                                         # parts they change; --variants-only: no table

Shapes: 16384 tokens, hidden 2048, 256 experts in 8 groups (4 kept), top-8, moe_intermediate
512. Routing is skewed on purpose: a random fp32 router plus an expert_bias drawn wide, so
expert loads are uneven (printed). Times: median of triton.testing.do_bench (CUDA events, L2
flushed before each call). TFLOP/s counts the experts' GEMMs only: 2*T*k*H*3I forward and
3x that for fwd+bwd, whatever else the row includes (router, routing, permutation).
The peak is an 8192^3 bf16 torch.matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
from triton.testing import do_bench

from ring_rl.kernels.moe import moe_experts, moe_route, router_logits
from ring_rl.kernels.moe import triton_experts as kx
from ring_rl.kernels.moe import triton_experts_bwd as kb
from ring_rl.kernels.moe import triton_router as kr
from ring_rl.kernels.moe import triton_rows as krows

T, H, E, I, K, N_GROUP, TOPK_GROUP, SCALE = 16384, 2048, 256, 512, 8, 8, 4, 2.5
FLOPS_FWD = 2 * T * K * H * 3 * I
DEVICE, DTYPE = "cuda", torch.bfloat16     # (a CPU dry run of this script swaps them)


def bench(fn, rep=200) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / (bench(lambda: a @ b) * 1e-3) / 1e12


def make_inputs(seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    def rnd(*s, scale=1.0, dtype=DTYPE):
        return (torch.randn(*s, device=DEVICE, generator=g) * scale).to(dtype)
    x = rnd(T, H).requires_grad_()
    gate = rnd(E, H, scale=0.02, dtype=torch.float32).requires_grad_()
    bias = rnd(E, scale=0.04, dtype=torch.float32)    # uneven loads: max/mean ~3 on CPU draws
    wgu = rnd(E, 2 * I, H, scale=H**-0.5).requires_grad_()
    wd = rnd(E, H, I, scale=I**-0.5).requires_grad_()
    dy = rnd(T, H)
    return x, gate, bias, wgu, wd, dy


def block(x, gate, bias, wgu, wd):
    logits = router_logits(x, gate)
    w, ids = moe_route(logits, bias, K, N_GROUP, TOPK_GROUP, SCALE)
    return moe_experts(x, ids, w, wgu, wd)


def torch_loop_experts(x, ids, w, wgu, wd):
    """The usual eager PyTorch MoE: a loop over experts, bf16 GEMMs, index_add_ combine."""
    y = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        slots = order[start:start + c]
        start += c
        tok = slots // K
        gu = x[tok] @ wgu[e].T
        h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
        o = (h @ wd[e].T).float() * w.reshape(-1)[slots, None]
        y = y.index_add(0, tok, o)
    return y.to(x.dtype)


def fwd_bwd(fn, inputs, dy):
    def run():
        y = fn()
        torch.autograd.grad(y, inputs, dy)
    return run


def row(name, fwd_ms, fb_ms, peak, note=""):
    def cell(ms, flops):
        if ms is None:
            return "-", "-"
        tf = flops / (ms * 1e-3) / 1e12
        return f"{ms:.3f}", f"{tf:.0f} ({100 * tf / peak:.0f}%)"
    f, ftf = cell(fwd_ms, FLOPS_FWD)
    b, btf = cell(fb_ms, 3 * FLOPS_FWD)
    return f"| {name} | {f} | {ftf} | {b} | {btf} | {note} |"


def main_table(peak):
    x, gate, bias, wgu, wd, dy = make_inputs()
    with torch.no_grad():
        w, ids = moe_route(router_logits(x, gate), bias, K, N_GROUP, TOPK_GROUP, SCALE)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    print(f"expert loads: mean {counts.float().mean():.0f}, max {counts.max().item()}, "
          f"min {counts.min().item()}, idle experts {(counts == 0).sum().item()}, "
          f"max/mean {counts.max().item() / counts.float().mean().item():.2f}\n")
    w = w.detach().requires_grad_()
    params = (x, gate, wgu, wd)
    print("| op | fwd ms | fwd TFLOP/s (% peak) | fwd+bwd ms | fwd+bwd TFLOP/s (% peak) | note |")
    print("|---|---|---|---|---|---|")
    # each row printed as it is measured (the slow peers last)
    emit(row("block: router_logits + moe_route + moe_experts (ours, Triton)",
             bench(lambda: block(x, gate, bias, wgu, wd)),
             bench(fwd_bwd(lambda: block(x, gate, bias, wgu, wd), params, dy)), peak,
             "grads: x, gate, w_gate_up, w_down"))
    ex_in = (x, w, wgu, wd)
    ours = lambda: moe_experts(x, ids, w, wgu, wd)  # noqa: E731
    emit(row("experts only: moe_experts (ours)", bench(ours),
             bench(fwd_bwd(ours, ex_in, dy)), peak, "same routing"))
    for line in gate_up_rows(x, ids, wgu, peak):
        emit(line)
    emit(router_row(x, gate, bias))
    emit(liger_row(x, ids, w, wgu, wd, dy, peak))
    loop = lambda: torch_loop_experts(x, ids, w, wgu, wd)  # noqa: E731
    emit(row("experts only: eager PyTorch loop over experts (bf16)", bench(loop, 500),
             bench(fwd_bwd(loop, ex_in, dy), 500), peak, "same routing"))


def emit(line):
    print(line)
    sys.stdout.flush()


def liger_row(x, ids, w, wgu, wd, dy, peak):
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception as exc:  # noqa: BLE001 - report the peer as missing, keep the table
        return f"| Liger LigerFusedMoEFunction | - | - | - | - | unavailable: {exc!r:.80} |"
    ids32 = ids.int()
    lig = lambda: LigerFusedMoEFunction.apply(x, wgu, wd, ids32, w)  # noqa: E731
    fwd = fb = None
    note = "same routing"
    try:
        fwd = bench(lig)
        fb = bench(fwd_bwd(lig, (x, w, wgu, wd), dy))
    except Exception as exc:  # noqa: BLE001
        note += f"; failed: {exc!r:.80}"
    return row("experts only: Liger 0.8.5 LigerFusedMoEFunction", fwd, fb, peak, note)


def gate_up_rows(x, ids, wgu, peak):
    """The gate-up GEMM alone: ours (gather + SwiGLU epilogue) vs torch._grouped_mm."""
    flops = 2 * T * K * H * 2 * I
    plan = kx.make_plan(ids, E)
    xd, wgud = x.detach(), wgu.detach()
    ms = bench(lambda: kx.gate_up(xd, wgud, plan))
    out = [f"| gate-up GEMM alone: ours (row gather + SwiGLU epilogue, writes gu and h) | "
           f"{ms:.3f} | {flops / ms / 1e9:.0f} ({flops / ms / 1e7 / peak:.0f}%) | - | - | "
           f"2*T*k*H*2I flops |"]
    xs = krows.gather_rows(xd, plan)
    ms = bench(lambda: kx.gate_up(xs, wgud, plan, sorted_rows=True))
    out.append(f"| gate-up GEMM alone: ours on sorted x rows (TMA where TMA_GEMMS has it) | "
               f"{ms:.3f} | {flops / ms / 1e9:.0f} ({flops / ms / 1e7 / peak:.0f}%) | - | - | "
               f"2*T*k*H*2I flops |")
    try:
        xs = xd[plan.tokens.long()]                       # pre-permuted rows, not timed
        offs = plan.offsets[1:].to(torch.int32)
        b = wgud.transpose(1, 2)                          # [E, H, 2I], column-major
        ms = bench(lambda: torch._grouped_mm(xs, b, offs=offs))
        out.append(f"| gate-up GEMM alone: torch._grouped_mm (rows pre-sorted) | {ms:.3f} | "
                   f"{flops / ms / 1e9:.0f} ({flops / ms / 1e7 / peak:.0f}%) | - | - | "
                   f"2*T*k*H*2I flops |")
    except Exception as exc:  # noqa: BLE001
        out.append(f"| torch._grouped_mm | - | - | - | - | unavailable: {exc!r:.80} |")
    return out


def router_row(x, gate, bias):
    xd, gd = x.detach(), gate.detach()
    ms_l = bench(lambda: router_logits(xd, gd))
    ms_t = bench(lambda: xd.float() @ gd.T)
    logits = router_logits(xd, gd)
    ms_r = bench(lambda: moe_route(logits, bias, K, N_GROUP, TOPK_GROUP, SCALE))
    return (f"| router alone: router_logits fwd {ms_l:.3f} ms (torch fp32 matmul {ms_t:.3f}); "
            f"moe_route fwd {ms_r:.3f} ms | - | - | - | - | |")


SWEEP = {
    "gate_up": [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3)],
    "down": [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3)],
    "down_bwd": [(64, 128, 64, 8, 4)],
    "down_bwd_unfused": [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4)],
    "dx": [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3)],
    "wgrad": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 2), (128, 128, 128, 8, 2),
              (128, 128, 32, 8, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3)],
}
LAUNCHER = {"gate_up": "gate_up", "down": "row_gemm", "down_bwd": "down_bwd",
            "down_bwd_unfused": "row_gemm", "dx": "row_gemm", "wgrad": "wgrad"}


def sweep(peak):
    x, gate, bias, wgu, wd, dy = make_inputs()
    with torch.no_grad():
        w, ids = moe_route(router_logits(x, gate), bias, K, N_GROUP, TOPK_GROUP, SCALE)
    xd, wgud, wdd = x.detach(), wgu.detach(), wd.detach()
    wts = w.float().contiguous()
    plan = kx.make_plan(ids, E)
    gu, h = kx.gate_up(xd, wgud, plan)
    n = plan.num_rows
    dgu, hw = gu, h                            # stand-ins of the right shapes for timing
    gemm = 2 * n * H * I                       # one H x I GEMM over all rows
    jobs = {
        "gate_up": (lambda c: kx.gate_up(xd, wgud, plan, c), 2 * gemm),
        "down": (lambda c: kx.row_gemm(h, wdd, plan, True, c), gemm),
        "down_bwd": (lambda c: kb.down_bwd(dy, wdd, gu, wts, plan, True, c), gemm),
        "down_bwd_unfused": (lambda c: kb.down_bwd(dy, wdd, gu, wts, plan, False, c), gemm),
        "dx": (lambda c: kx.row_gemm(dgu, wgud, plan, False, c), 2 * gemm),
        "wgrad": (lambda c: (kb.wgrad(dy, hw, plan, True, torch.bfloat16, c),
                             kb.wgrad(dgu, xd, plan, False, torch.bfloat16, c)), 3 * gemm),
    }
    best = {}
    print("| kernel | BLOCK_M, BLOCK_N, BLOCK_K, warps, stages | ms | TFLOP/s (% peak) | "
          "regs / spills |")
    print("|---|---|---|---|---|")
    for name, cfgs in SWEEP.items():
        fn, flops = jobs[name]
        for cfg in cfgs:
            try:
                ms = bench(lambda: fn(cfg), rep=100)
                tf = flops / ms / 1e9
                kern = kx.LAUNCHED.get(LAUNCHER[name])
                regs = f"{getattr(kern, 'n_regs', '?')} / {getattr(kern, 'n_spills', '?')}"
                print(f"| {name} | {cfg} | {ms:.3f} | {tf:.0f} ({100 * tf / peak:.0f}%) | {regs} |")
                if ms < best.get(name, (None, float("inf")))[1]:
                    best[name] = (cfg, ms)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                print(f"| {name} | {cfg} | failed: {type(exc).__name__} | |")
            sys.stdout.flush()
    # The main table then runs with the winners (the module constants are set to them).
    fused = best["down_bwd"][1] < best["down_bwd_unfused"][1]
    kx.DOWN_BWD_FUSED = fused
    best["down_bwd"] = best["down_bwd" if fused else "down_bwd_unfused"]
    del best["down_bwd_unfused"]
    for name, (cfg, _) in best.items():
        kx.CONFIGS[name] = cfg
    print(f"\nchosen: DOWN_BWD_FUSED={fused}, " + ", ".join(f"{n}={c}" for n, (c, _) in
                                                         best.items()) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="time tile choices first")
    ap.add_argument("--variants", action="store_true",
                    help="after the table: the block under each of VARIANTS")
    ap.add_argument("--variants-only", action="store_true",
                    help="the variants without the table above them")
    ap.add_argument("--parts", action="store_true",
                    help="with the variants: also time the parts they change, one by one")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"# MoE block, {datetime.date.today()}, {props.name} ({props.multi_processor_count} "
          f"SMs), torch {torch.__version__}, triton {triton.__version__}")
    peak = matmul_peak()
    print(f"bf16 matmul peak (8192^3 torch.matmul, this run): {peak:.0f} TFLOP/s")
    print(f"expert FLOPs forward 2*T*k*H*3I = {FLOPS_FWD / 1e12:.3f} TFLOP; "
          f"T={T} H={H} E={E} I={I} top-{K}\n")
    if args.sweep:
        sweep(peak)
    print(f"configs: DOWN_BWD_FUSED={kx.DOWN_BWD_FUSED}, BWD_GEMMS={kx.BWD_GEMMS!r}, "
          f"FWD_ROWS={kx.FWD_ROWS!r}, FWD_GEMMS={kx.FWD_GEMMS!r}, TMA_GEMMS={kx.TMA_GEMMS}, "
          f"PLAN={kx.PLAN!r}, router PRESPLIT={kr.PRESPLIT} tiles "
          f"{(kr.MM_BLOCK_M, kr.MM_BLOCK_N, kr.MM_WARPS)} DW_SPLIT_ROWS={kr.DW_SPLIT_ROWS} "
          f"DX_TILES={kr.DX_TILES}, {kx.CONFIGS}\n")
    if not args.variants_only:
        main_table(peak)
    if args.variants or args.variants_only:
        # benchmarks/ is on sys.path when this file runs as a script
        from moe_variants import variant_table

        variant_table(peak, parts=args.parts)
    print(f"\nbf16 matmul peak again at the end of the run: {matmul_peak():.0f} TFLOP/s")


if __name__ == "__main__":
    main()
