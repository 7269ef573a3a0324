"""Rollout generation throughput: vLLM + ring-rl's model plugin against the native engine (GPU).

    python benchmarks/rollout.py                                 # mid preset, batch 64 and 256, 512 + 1024
    python benchmarks/rollout.py --batches 64 --output-len 256   # a shorter look

Both engines run the same random-init bf16 checkpoint (preset `mid`: Ring-mini's per-layer
shapes, 5 layers, 64 experts; `ring-rl model-info mid`) with the same ring_rl kernels, on the
same random prompts (`--prompt-len` tokens each), sampling at T=1 with every sequence run to
`--output-len` tokens (EOS ignored), fp32 logprobs and each token's experts recorded as in
GRPO. Timed: one `generate` call per batch size, after a small warm-up call that compiles the
Triton kernels; tokens/s counts generated tokens only. vLLM runs eagerly (no CUDA graphs),
engine core in-process, `--gpu-mem` of the card.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def timed(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--gpu-mem", type=float, default=0.5, help="vLLM's gpu_memory_utilization")
    ap.add_argument("--engines", default="vllm,native")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (in .venv-vllm)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/rollout.py needs a CUDA GPU (--device cpu for a smoke run)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    from ring_rl.model import load_checkpoint
    from ring_rl.model.factory import build_random_checkpoint
    from ring_rl.rollout.native import NativeEngine
    from ring_rl.types import SamplingParams

    batches = [int(b) for b in args.batches.split(",")]
    engines = args.engines.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ring-rl-rollout-bench-") as tmp:
        t0 = time.perf_counter()
        ckpt = build_random_checkpoint(args.preset, Path(tmp) / args.preset, seed=0, dtype=dtype)
        model = load_checkpoint(ckpt, dtype=dtype)
        vocab = model.config.vocab_size
        n_params = sum(p.numel() for p in model.parameters())
        print(f"checkpoint {args.preset}: {n_params / 1e6:.0f}M parameters, built in {time.perf_counter() - t0:.0f} s",
              flush=True)
        prompts = random_prompts(max(batches), args.prompt_len, vocab)
        warm = SamplingParams(temperature=1.0, max_new_tokens=8, seed=1)
        params = SamplingParams(temperature=1.0, max_new_tokens=args.output_len, seed=0)

        if "vllm" in engines:
            from vllm import __version__ as vllm_version

            from ring_rl.rollout.vllm.engine import VllmEngine

            eng = VllmEngine(ckpt, [], dtype="bf16" if dtype == torch.bfloat16 else "fp32", device=args.device,
                             max_model_len=args.prompt_len + args.output_len + 8,
                             gpu_memory_utilization=args.gpu_mem, ignore_eos=True, max_num_seqs=max(batches))
            print(f"vLLM start-up {eng.startup_s:.0f} s", flush=True)
            eng.generate(prompts[:8], warm)
            for b in batches:
                out, s = timed(lambda b=b: eng.generate(prompts[:b], params))
                rows.append((f"vLLM {vllm_version} + plugin", b, out.num_response_tokens, s))
                print(f"vllm b={b}: {out.num_response_tokens} tokens in {s:.2f} s", flush=True)
            del eng
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()

        if "native" in engines:
            eng = NativeEngine(model.to(args.device), eos_token_ids=[])
            eng.generate(prompts[:8], warm)
            for b in batches:
                out, s = timed(lambda b=b: eng.generate(prompts[:b], params))
                rows.append(("native", b, out.num_response_tokens, s))
                print(f"native b={b}: {out.num_response_tokens} tokens in {s:.2f} s", flush=True)

    native = {b: n / s for name, b, n, s in rows if name == "native"}
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n{where}; preset {args.preset} ({n_params / 1e6:.0f}M params, {str(dtype).removeprefix('torch.')}); "
          f"prompt {args.prompt_len}, output {args.output_len} tokens; T=1, EOS ignored\n")
    print("| engine | batch | generated tokens | s | tokens/s | vs native |")
    print("|---|---|---|---|---|---|")
    for name, b, n, s in rows:
        ratio = f"{(n / s) / native[b]:.2f}x" if b in native else "-"
        print(f"| {name} | {b} | {n} | {s:.2f} | {n / s:,.0f} | {ratio} |")
    return 0


if __name__ == "__main__":  # vLLM may start processes that import this file
    sys.exit(main())
