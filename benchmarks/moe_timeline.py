"""Where the MoE block's fwd+bwd time goes between kernels: a torch.profiler timeline of
a few calls timed as `benchmarks/moe.py` times them (L2 flushed before each), printed as one
call's kernels in launch order with the idle gap before each, plus the host time per call
(does the CPU keep ahead of the GPU?). Run on the GPU machine from benchmarks/:
`python3 moe_timeline.py`.
"""
from __future__ import annotations

import sys
import time

import torch
from moe import FLOPS_FWD, bench, block, fwd_bwd, make_inputs, matmul_peak


def main():
    peak = matmul_peak()
    x, gate, bias, wgu, wd, dy = make_inputs()
    run = fwd_bwd(lambda: block(x, gate, bias, wgu, wd), (x, gate, wgu, wd), dy)
    ms = bench(run)
    print(f"peak {peak:.0f} TFLOP/s; block fwd+bwd {ms:.3f} ms = "
          f"{300 * FLOPS_FWD / (ms * 1e9) / peak:.1f}% of peak")
    flush = torch.empty(256 * 2**20, device="cuda", dtype=torch.int8)
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    host = []
    for _ in range(20):            # host time per call, GPU not waited for
        flush.zero_()
        t0 = time.perf_counter()
        run()
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    host.sort()
    print(f"host time per call (no sync): median {1e3 * host[10]:.3f} ms, "
          f"min {1e3 * host[0]:.3f} ms")
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
           for _ in range(40)]
    for a, b in evs:               # do_bench's loop, by hand
        flush.zero_()
        a.record()
        run()
        b.record()
    torch.cuda.synchronize()
    ev = sorted(a.elapsed_time(b) for a, b in evs)
    print(f"event-timed calls: median {ev[20]:.3f} ms, min {ev[0]:.3f}, max {ev[-1]:.3f}")
    t0 = time.perf_counter()
    for _ in range(40):            # throughput by the wall clock, flush (~0.08 ms) included
        flush.zero_()
        run()
    torch.cuda.synchronize()
    print(f"wall clock per call, flush included: {(time.perf_counter() - t0) * 25:.3f} ms")
    from torch.profiler import ProfilerActivity, profile
    sustained = "--sustained" in sys.argv
    if sustained:                  # profile calls 30-33 of a busy stretch (do_bench's state)
        for _ in range(30):
            flush.zero_()
            run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            flush.zero_()
            run()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and e.device_time_total > 0 and "Memcpy" not in e.name),
                     key=lambda e: e.time_range.start)
    # split into calls at the flush kernels (a fill of the 256 MiB buffer)
    def is_flush(k):
        return "fill" in k.name.lower() and k.time_range.elapsed_us() > 20

    flushes = [k for k in kernels if is_flush(k)]
    print("flush kernels (us):", [round(k.time_range.elapsed_us(), 1) for k in flushes])
    for f in flushes:
        nxt = next((k for k in kernels if k.time_range.start >= f.time_range.end), None)
        if nxt is not None:
            print(f"  flush end -> next kernel {nxt.name[:30]}: "
                  f"{nxt.time_range.start - f.time_range.end:.1f} us")
    calls, cur = [], []
    for k in kernels:
        if not is_flush(k):
            cur.append(k)
        elif cur:
            calls.append(cur)
            cur = []
    calls.append(cur)
    one = calls[2] if len(calls) > 2 else calls[-1]
    t0 = one[0].time_range.start
    busy = sum(k.time_range.elapsed_us() for k in one)
    span = one[-1].time_range.end - t0
    print(f"\none call: {len(one)} kernels, span {span / 1e3:.3f} ms, kernel time "
          f"{busy / 1e3:.3f} ms, idle {(span - busy) / 1e3:.3f} ms\n")
    print("| # | start us | gap us | dur us | kernel |")
    print("|---|---|---|---|---|")
    prev = t0
    for i, k in enumerate(one):
        s, d = k.time_range.start, k.time_range.elapsed_us()
        print(f"| {i} | {s - t0:.0f} | {s - prev:.1f} | {d:.1f} | {k.name[:80]} |")
        prev = s + d


def phases():
    """Event pairs around each launcher of the block (no profiler attached), over 30 calls
    timed as do_bench times them: which parts take longer than their kernels do under the
    profiler."""
    from ring_rl.kernels.moe import triton_experts as kx
    from ring_rl.kernels.moe import triton_experts_bwd as kb
    from ring_rl.kernels.moe import triton_router as kr
    from ring_rl.kernels.moe import triton_rows as krows
    from ring_rl.kernels.moe import triton_tma as kt

    spans: dict[str, list] = {}

    def timed(mod, name, label):
        fn = getattr(mod, name)

        def wrapper(*a, **k):
            a0, b0 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a0.record()
            out = fn(*a, **k)
            b0.record()
            spans.setdefault(label, []).append((a0, b0))
            return out
        setattr(mod, name, wrapper)

    for mod, name in [(kx, "make_plan"), (kx, "gate_up"), (kt, "row_gemm"), (kx, "combine"),
                      (kb, "gather_rows"), (kb, "swiglu_bwd"), (kb, "grouped_wgrad"),
                      (kb, "combine"), (kr, "matmul_fp32"), (kr, "select_experts")]:
        timed(mod, name, f"{mod.__name__.rsplit('.', 1)[1]}.{name}")
    del krows
    x, gate, bias, wgu, wd, dy = make_inputs()
    run = fwd_bwd(lambda: block(x, gate, bias, wgu, wd), (x, gate, wgu, wd), dy)
    flush = torch.empty(256 * 2**20, device="cuda", dtype=torch.int8)
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    spans.clear()
    whole = []
    for _ in range(30):
        flush.zero_()
        a0, b0 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a0.record()
        run()
        b0.record()
        whole.append((a0, b0))
    torch.cuda.synchronize()
    total = sum(a.elapsed_time(b) for a, b in whole) / 30
    print(f"\nper call (events, 30 calls): {total:.3f} ms")
    print("| launcher | calls per block | ms per block |")
    print("|---|---|---|")
    acc = 0.0
    for label, pairs in spans.items():
        ms = sum(a.elapsed_time(b) for a, b in pairs) / 30
        acc += ms
        print(f"| {label} | {len(pairs) / 30:.0f} | {ms:.3f} |")
    print(f"| (sum of the above) | | {acc:.3f} |")


if __name__ == "__main__":
    if "--phases" in sys.argv:
        phases()
    else:
        main()
