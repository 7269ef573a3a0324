"""GPU benchmark: RMSNorm and the grouped RMSNorm gate, ours vs Liger-Kernel and torch.compile.

    python3 benchmarks/rms_norm.py            # the table (markdown) for benchmarks/results/
    python3 benchmarks/rms_norm.py --sweep    # also time our kernels over tile/warp choices

Times are medians of triton.testing.do_bench (CUDA events, L2 flushed before each call).
"% of roofline" = the fewest bytes the op must move (each input read once, each output
written once per pass; see `bytes_*` below) / time / the bandwidth of a 1 GiB
device-to-device copy measured in the same run (bytes read + written).
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
from triton.testing import do_bench

from ring_rl.kernels.rms_norm import group_rms_norm_gate, rms_norm, rms_norm_ref
from ring_rl.kernels.rms_norm import triton_group_norm_gate as gkern
from ring_rl.kernels.rms_norm import triton_rms_norm as kern

EPS = 1e-6
SHAPES = [(16384, 2048), (65536, 4096)]
QK_SHAPE = (16384 * 16, 128)  # per-head q/k norm: 16K tokens x 16 heads, head_dim 128


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def gpu_busy_ms(fn, iters=20, table=False) -> float:
    """Mean GPU time per call, summed over the kernels the profiler saw (no launch gaps)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if table else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    if table:
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14),
              file=sys.stderr)
    us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return us / iters / 1e3


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB bf16 device-to-device copy, counting bytes read and written."""
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def fwd_bwd(fn, inputs, grad_outs):
    """One forward and one backward for every input that requires grad."""
    leaves = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]

    def run():
        outs = fn(*inputs)
        torch.autograd.grad(outs if isinstance(outs, tuple) else (outs,), leaves, grad_outs)
    return run


def rms_candidates():
    """name -> f(x, w) (None when the library is missing)."""
    cands = {"ours (Triton)": lambda x, w: rms_norm(x, w, EPS)}
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        # Signature (0.8.5): apply(X, W, eps, offset=0.0, casting_mode="llama", in_place=True,
        # row_mode=None). "gemma" casting = all fp32, one cast at the end (our maths);
        # "llama" (its default) casts x*rstd to bf16 before the weight multiply.
        cands["Liger 0.8.5 (gemma casting = our maths)"] = (
            lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "gemma"))
        cands["Liger 0.8.5 (default llama casting)"] = (
            lambda x, w: LigerRMSNormFunction.apply(x, w, EPS))
    except ImportError as err:
        print(f"liger-kernel not importable ({err}): its rows are skipped", file=sys.stderr)
    compiled = torch.compile(rms_norm_ref, dynamic=False)
    cands["torch.compile(reference)"] = lambda x, w: compiled(x, w, EPS)
    cands["eager PyTorch reference"] = lambda x, w: rms_norm_ref(x, w, EPS)
    return cands


def rms_inputs(m, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(n, device="cuda", generator=g)).bfloat16().requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g)
    return x, w, dy


def row(name, shape, ms_f, ms_fb, busy_fb, bytes_f, bytes_fb, bw, peer=None):
    pct = lambda b, ms: f"{100 * b / (ms * 1e-3) / bw:.0f}%"
    vs = f"{ms_fb / peer:.2f}x" if peer else ""
    return (f"| {name} | {shape} | {ms_f:.3f} | {pct(bytes_f, ms_f)} | {ms_fb:.3f} | "
            f"{pct(bytes_fb, ms_fb)} | {busy_fb:.3f} ({pct(bytes_fb, busy_fb)}) | {vs} |")


def main_table(bw):
    lines = ["| op | shape [rows, N] | fwd ms | fwd % roofline | fwd+bwd ms | "
             "fwd+bwd % roofline | fwd+bwd GPU-busy ms (% roofline) | fwd+bwd vs Liger (gemma) |",
             "|---|---|---|---|---|---|---|---|"]
    for m, n in SHAPES + [QK_SHAPE]:
        x, w, dy = rms_inputs(m, n)
        mn = m * n
        bytes_f, bytes_fb = 4 * mn, 10 * mn  # bf16: fwd x->y; bwd reads dy, x, writes dx
        results = {}
        for name, f in rms_candidates().items():
            dy_own = dy.clone()  # Liger's in_place backward overwrites its dY with dX
            try:
                ms_f = bench(lambda: f(x, w))
                ms_fb = bench(fwd_bwd(f, (x, w), (dy_own,)))
                busy = gpu_busy_ms(fwd_bwd(f, (x, w), (dy_own,)), table=name.startswith("ours"))
            except Exception as err:  # one broken peer must not cost the whole table
                print(f"{name} at [{m}, {n}] failed: {err!r}", file=sys.stderr)
                continue
            results[name] = (ms_f, ms_fb, busy)
        peer = results.get("Liger 0.8.5 (gemma casting = our maths)", (None, None))[1]
        for name, (ms_f, ms_fb, busy) in results.items():
            lines.append(row(f"RMSNorm: {name}", f"[{m}, {n}]", ms_f, ms_fb, busy, bytes_f,
                             bytes_fb, bw, peer))
        if (m, n) == QK_SHAPE:
            del x, w, dy
            continue
        r = torch.randn_like(x).requires_grad_()
        fused = lambda x, r, w: rms_norm(x, w, EPS, residual=r)
        ms_f = bench(lambda: fused(x, r, w))
        # Gradients reach y and h (the residual stream): fwd reads x, r and writes y, h;
        # bwd reads dy, dh, h and writes dx (also returned as the residual's gradient).
        ms_fb = bench(fwd_bwd(fused, (x, r, w), (dy, dy.clone())))
        busy = gpu_busy_ms(fwd_bwd(fused, (x, r, w), (dy, dy.clone())), table=True)
        lines.append(row("fused residual add + RMSNorm: ours", f"[{m}, {n}]", ms_f, ms_fb,
                         busy, 8 * mn, 16 * mn, bw))
        del x, w, dy, r
    m, f, groups = 16384, 2048, 4
    g = torch.Generator(device="cuda").manual_seed(1)
    xg = torch.randn(m, f, device="cuda", generator=g).requires_grad_()  # fp32 attention output
    gate = torch.randn(m, f, device="cuda", generator=g).bfloat16().requires_grad_()
    wg = (1 + 0.1 * torch.randn(f, device="cuda", generator=g)).bfloat16().requires_grad_()
    do = torch.randn(m, f, device="cuda", generator=g).bfloat16()
    fn = lambda x, gt, w: group_rms_norm_gate(x, gt, w, groups, EPS)
    ms_f = bench(lambda: fn(xg, gate, wg))
    ms_fb = bench(fwd_bwd(fn, (xg, gate, wg), (do,)))
    busy = gpu_busy_ms(fwd_bwd(fn, (xg, gate, wg), (do,)), table=True)
    # fwd: x fp32 + gate bf16 in, out bf16; bwd: do, x, gate in, dx fp32 + dgate bf16 out.
    lines.append(row(f"group_rms_norm_gate ({groups} groups, x fp32, gate bf16): ours",
                     f"[{m}, {f}]", ms_f, ms_fb, busy, 8 * m * f, 22 * m * f, bw))
    return lines


def sweep_rms(bw):
    """Our RMSNorm kernels alone over the module's tile constants (fwd and bwd timed apart)."""
    lines = ["| shape | pass | tile | warps | programs/SM | ms | % roofline |",
             "|---|---|---|---|---|---|---|"]
    saved = {k: getattr(kern, k) for k in ("FWD_TILE", "FWD_WARPS", "BWD_TILE", "BWD_WARPS",
                                           "PROGRAMS_PER_SM")}
    for m, n in SHAPES:
        x, w, dy = rms_inputs(m, n)
        x, w = x.detach(), w.detach()
        _, _, rstd = kern.rms_norm_fwd(x, w, EPS)
        for tile, warps in [(4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 8),
                            (16384, 16)]:
            kern.FWD_TILE, kern.FWD_WARPS = tile, warps
            ms = bench(lambda: kern.rms_norm_fwd(x, w, EPS))
            lines.append(f"| [{m}, {n}] | fwd | {tile} | {warps} | - | {ms:.4f} | "
                         f"{100 * 4 * m * n / (ms * 1e-3) / bw:.0f}% |")
        for tile, warps, per_sm in [(2048, 8, 2), (4096, 4, 2), (4096, 8, 2), (4096, 16, 2),
                                    (8192, 8, 2), (8192, 16, 2), (4096, 8, 1), (4096, 8, 4),
                                    (2048, 4, 4), (8192, 16, 1)]:
            kern.BWD_TILE, kern.BWD_WARPS, kern.PROGRAMS_PER_SM = tile, warps, per_sm
            ms = bench(lambda: kern.rms_norm_bwd(dy, None, x, w, rstd, True))
            lines.append(f"| [{m}, {n}] | bwd | {tile} | {warps} | {per_sm} | {ms:.4f} | "
                         f"{100 * 6 * m * n / (ms * 1e-3) / bw:.0f}% |")
        for k, v in saved.items():
            setattr(kern, k, v)
    return lines


def sweep_group(bw):
    """group_rms_norm_gate kernels alone over tile/warps ([16384, 2048], 4 groups)."""
    lines = ["| shape | pass | tile | warps | ms | % roofline |", "|---|---|---|---|---|---|"]
    saved = {k: getattr(gkern, k) for k in ("FWD_TILE", "FWD_WARPS", "BWD_TILE", "BWD_WARPS")}
    m, f, groups = 16384, 2048, 4
    x = torch.randn(m, f, device="cuda")
    gate, do = torch.randn(2, m, f, device="cuda").bfloat16()
    w = (1 + 0.1 * torch.randn(f, device="cuda")).bfloat16()
    _, rstd = gkern.group_gate_fwd(x, gate, w, groups, EPS)
    for tile, warps in [(4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]:
        gkern.FWD_TILE, gkern.FWD_WARPS = tile, warps
        ms = bench(lambda: gkern.group_gate_fwd(x, gate, w, groups, EPS))
        lines.append(f"| [{m}, {f}] | fwd | {tile} | {warps} | {ms:.4f} | "
                     f"{100 * 8 * m * f / (ms * 1e-3) / bw:.0f}% |")
    for tile, warps in [(2048, 8), (2048, 4), (4096, 4), (4096, 8), (4096, 16), (8192, 8),
                        (8192, 16)]:
        gkern.BWD_TILE, gkern.BWD_WARPS = tile, warps
        ms = bench(lambda: gkern.group_gate_bwd(do, x, gate, w, rstd, groups, True))
        lines.append(f"| [{m}, {f}] | bwd | {tile} | {warps} | {ms:.4f} | "
                     f"{100 * 14 * m * f / (ms * 1e-3) / bw:.0f}% |")
    for k, v in saved.items():
        setattr(gkern, k, v)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=["rms", "group", "all"],
                        help="also time our kernels over tile / warp choices")
    parser.add_argument("--repeat", type=int, default=1, help="print the table this many times "
                        "(host-bound wall times vary run to run: see the GPU-busy column)")
    args = parser.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    head = [f"date: {datetime.date.today()}  GPU: {props.name} ({props.multi_processor_count} SMs)"
            f"  torch {torch.__version__}  triton {triton.__version__}",
            f"command: python3 benchmarks/rms_norm.py"
            f"{' --sweep ' + args.sweep if args.sweep else ''}"
            f"{f' --repeat {args.repeat}' if args.repeat > 1 else ''}",
            f"1 GiB bf16 copy: {bw / 1e9:.0f} GB/s (read + write) = the roofline below", ""]
    if args.sweep in ("rms", "all"):
        print("\n".join(sweep_rms(bw) + [""]), flush=True)
    if args.sweep in ("group", "all"):
        print("\n".join(sweep_group(bw) + [""]), flush=True)
    print("\n".join(head), flush=True)
    for _ in range(args.repeat):
        print("\n".join(main_table(bw) + [""]), flush=True)


if __name__ == "__main__":
    main()
