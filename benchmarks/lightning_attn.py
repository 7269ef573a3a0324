"""Lightning attention on the GPU: ours vs fla-core 0.6.0 and PyTorch SDPA (flash), one table.

    python benchmarks/lightning_attn.py            # the table (results/lightning_attn.md)
    python benchmarks/lightning_attn.py --sweep    # the table, then a few kernel configs timed

Rows: HBM copy bandwidth (1 GiB bf16 copy, bytes read + written); for T in 4K/16K/64K
(B=1, H=16, d=128, bf16) forward and forward+backward of ours, fla's `chunk_lightning_attn`
and causal softmax SDPA; one decode step at batch 64 and 256 (fp32 state) of ours and fla's
`fused_recurrent_lightning_attn`. Each: median ms (triton.testing.do_bench: warm-up, L2
flushed between runs), speed-up over fla (fla ms / ours ms), and % of the HBM roofline =
minimum bytes / time / measured copy bandwidth. Minimum bytes: forward reads q, k, v and
writes o (4 T H d x 2 B); forward+backward adds reading q, k, v, do and writing dq, dk, dv
(11 T H d x 2 B in all); decode reads and writes the fp32 state (2 N H d^2 x 4 B) plus
q, k, v, o. Random normal inputs, never zeros.
"""
from __future__ import annotations

import argparse
import warnings

import torch
from triton.testing import do_bench

from ring_rl.kernels.lightning_attn import lightning_attn, lightning_attn_decode, triton_chunk
from ring_rl.kernels.lightning_attn.triton_chunk_bwd import _dkdv

H, D = 16, 128
DEV = "cuda"


def bench(fn, grad_to_none=None):
    return do_bench(fn, warmup=50, rep=200, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth():
    x = torch.randn(2**29, device=DEV, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms * 1e-3)  # bytes/s, read + write


def schedule(H):
    h = torch.arange(H, device=DEV, dtype=torch.float32)
    return -(2.0 ** (-8 * (h + 1) / H))


def try_import_fla():
    try:
        from fla.ops.lightning_attn import chunk_lightning_attn, fused_recurrent_lightning_attn
        return chunk_lightning_attn, fused_recurrent_lightning_attn
    except Exception as e:  # noqa: BLE001 - the table says n/a and why
        print(f"fla unavailable: {e!r}")
        return None, None


def prefill_fns(T, fla_chunk):
    """name -> (forward fn, forward+backward fn) for one T."""
    q, k, v = (torch.randn(1, T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn(1, T, H, D, device=DEV, dtype=torch.bfloat16)
    g = schedule(H)
    leaves = [q, k, v]

    def fb(f):
        return lambda: f().backward(do)

    fns = {"ours": lambda: lightning_attn(q, k, v, g)[0]}
    if fla_chunk is not None:
        fns["fla"] = lambda: fla_chunk(q, k, v, layer_idx=0, num_layers=20)[0]
    qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dos = do.transpose(1, 2).contiguous()

    def sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    out = {name: (f, fb(f), leaves) for name, f in fns.items()}
    out["sdpa"] = (sdpa, lambda: sdpa().backward(dos), [qs, ks, vs])
    return out


def decode_fns(N, fla_rec):
    mk = lambda: torch.randn(N, H, D, device=DEV, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(), mk(), mk()
    g = schedule(H)
    state = torch.randn(N, H, D, D, device=DEV) * 0.1
    fns = {"ours": lambda: lightning_attn_decode(q, k, v, g, state)}
    if fla_rec is not None:
        q1, k1, v1 = q[:, None], k[:, None], v[:, None]
        fns["fla"] = lambda: fla_rec(q1, k1, v1, layer_idx=0, num_layers=20,
                                     initial_state=state, output_final_state=True)
    return fns


def row(name, ms, fla_ms, nbytes, bw):
    speed = f"{fla_ms / ms:.2f}x" if fla_ms else "-"
    return f"| {name} | {ms:.3f} | {speed} | {100 * nbytes / (ms * 1e-3) / bw:.0f}% |"


def breakdown(T=65536):
    """Each kernel pass of the forward and backward alone, with its achieved bandwidth."""
    x = [torch.randn(1, T, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(4)]
    q, k, v, do = x
    g, scale = schedule(H), D ** -0.5
    plan = triton_chunk.make_plan(q, v, None)
    tc = triton_chunk
    fs, _ = tc.run_states(k, v, g, None, plan, False, 1.0, False)
    rs, _ = tc.run_states(q, do, g, None, plan, True, scale, False)
    unit, hs_bytes = T * H * D * 2, plan.n_chunks * H * D * D * 2
    passes = {
        "states fwd (k, v)": (lambda: tc.run_states(k, v, g, None, plan, False, 1.0, False),
                              2 * unit + hs_bytes),
        "output o": (lambda: tc.run_output(q, k, v, g, fs, plan, False, scale, scale, 1.0, False),
                     4 * unit + hs_bytes),
        "states bwd (q, do)": (lambda: tc.run_states(q, do, g, None, plan, True, scale, False),
                               2 * unit + hs_bytes),
        "output dq": (lambda: tc.run_output(do, v, k, g, fs, plan, False, scale, scale, 1.0, True),
                      4 * unit + hs_bytes),
        "output dk": (lambda: tc.run_output(v, do, q, g, rs, plan, True, scale, 1.0, scale, True),
                      4 * unit + hs_bytes),
        "output dv": (lambda: tc.run_output(k, q, do, g, rs, plan, True, scale, 1.0, scale, False),
                      4 * unit + hs_bytes),
        "fused dk+dv": (lambda: _dkdv(q, k, v, do, g, scale, rs, plan), 6 * unit + hs_bytes),
    }
    print(f"\n| pass (T={T // 1024}K, config {triton_chunk.CONFIG}) | ms | GB/s (min bytes) |")
    print("|---|---|---|")
    for name, (fn, nbytes) in passes.items():
        ms = bench(fn)
        print(f"| {name} | {ms:.3f} | {nbytes / (ms * 1e-3) / 1e9:.0f} |", flush=True)


def sweep():
    """Time a few kernel configs (fwd+bwd at 64K; decode at 256) and print them."""
    breakdown()
    T = 65536
    base = dict(triton_chunk.CONFIG)
    variants = [dict(), dict(segs=4), dict(segs=16), dict(r=4), dict(state_stages=3),
                dict(out_stages=3), dict(dkdv_stages=3)]
    print("\n| config | 64K fwd ms | 64K fwd+bwd ms | 4K fwd ms | 4K fwd+bwd ms |")
    print("|---|---|---|---|---|")
    for var in variants:
        triton_chunk.CONFIG.clear()
        triton_chunk.CONFIG.update(base, **var)
        try:
            cells = []
            for t in (T, 4096):
                fwd, fwdbwd, leaves = prefill_fns(t, None)["ours"]
                cells += [f"{bench(fwd):.3f}", f"{bench(fwdbwd, leaves):.3f}"]
            print(f"| {var or 'default'} | {' | '.join(cells)} |", flush=True)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported
            print(f"| {var} | failed: {type(e).__name__}: {str(e)[:80]} | |", flush=True)
    triton_chunk.CONFIG.clear()
    triton_chunk.CONFIG.update(base)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    fla_chunk, fla_rec = try_import_fla()
    bw = copy_bandwidth()
    lines = [f"GPU: {torch.cuda.get_device_name()}; HBM copy (1 GiB bf16): {bw / 1e9:.0f} GB/s",
             "", "| op | ms | speed-up vs fla | % HBM roofline |", "|---|---|---|---|"]
    for T in (4096, 16384, 65536):
        fns = prefill_fns(T, fla_chunk)
        times = {n: (bench(f), bench(fb, leaves)) for n, (f, fb, leaves) in fns.items()}
        fla_f, fla_fb = times.get("fla", (None, None))
        unit = T * H * D * 2
        for name, (f_ms, fb_ms) in times.items():
            lines.append(row(f"T={T // 1024}K {name} fwd", f_ms, fla_f, 4 * unit, bw))
            lines.append(row(f"T={T // 1024}K {name} fwd+bwd", fb_ms, fla_fb, 11 * unit, bw))
        del fns
        torch.cuda.empty_cache()
    for N in (64, 256):
        times = {n: bench(f) for n, f in decode_fns(N, fla_rec).items()}
        nbytes = 2 * N * H * D * D * 4 + 4 * N * H * D * 2
        for name, ms in times.items():
            lines.append(row(f"decode batch {N} {name}", ms, times.get("fla"), nbytes, bw))
    print("\n".join(lines), flush=True)
    if args.sweep:
        sweep()


if __name__ == "__main__":
    main()
