"""What exact mode costs: GRPO step time and rollout tokens/s, exact vs default, one run (CPU).

    python benchmarks/exact_mode.py                  # 8 prompts x 8 samples x 6 tokens, fp32 and bf16
    python benchmarks/exact_mode.py --steps 6 --prompts 16 --max-new-tokens 8 --dtypes fp32

Each configuration is a `ring-rl train` run in a subprocess (Ray actors: native rollout +
DeepSpeed trainer, one torch thread each) on the same random-init `tiny` checkpoint and the
same prompts; the first step is warm-up, the table shows medians of the others. Default mode
scores the rollout with one packed forward; exact mode replays the rollout's prefill and
decode schedule in the trainer (ring_rl.model.stepping), which is what "align s" measures.
Target (issue 10): exact step time <= 1.3x default.

On the GPU (vLLM 0.26 + plugin against the DeepSpeed trainer) the same comparison is
`bash scripts/gpu_vllm_checks.sh exact`: both modes of configs/gpu-tiny-vllm.yaml, 20 steps
each, one after the other in one device call; results in benchmarks/results/exact_mode.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_cpu import build_inputs, tree_state  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="measured steps per run (after 1 warm-up)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    from e2e_cpu import run_ring_rl

    size = (args.prompts, args.group, args.max_new_tokens)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ring-rl-exact-bench-") as tmp:
        work = Path(tmp)
        ckpt, data = build_inputs(work, n_train=2000)
        for dtype in args.dtypes.split(","):
            dt = [f"model.dtype={dtype}", f"trainer.bf16={'true' if dtype == 'bf16' else 'false'}"]
            for mode in ("default", "exact"):
                print(f"{dtype} {mode} ...", file=sys.stderr, flush=True)
                r = run_ring_rl(work, ckpt, data, size, args.steps, extra=(*dt, f"alignment.mode={mode}"),
                                tag=f"-{dtype}-{mode}")
                steps = r["steps"][1:]
                med = lambda k: statistics.median(s[k] for s in steps)  # noqa: E731
                rows.append(dict(dtype=dtype, mode=mode, step=med("s"), rollout=med("gen_s"),
                                 tok_s=med("rollout_tok_s"), align=med("align_s"), train=med("update_s"),
                                 bitwise=min(s["bitwise"] for s in steps), load=r["load"]))
    lines = ["| dtype | mode | s/step (median) | ratio to default | rollout s | rollout tok/s | "
             "trainer logprob pass s | update s | min bitwise-equal frac | load at start |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["dtype"] == r["dtype"] and b["mode"] == "default")
        lines.append(f"| {r['dtype']} | {r['mode']} | {r['step']:.3f} | {r['step'] / base['step']:.2f}x | "
                     f"{r['rollout']:.3f} | {r['tok_s']:.0f} | {r['align']:.3f} | {r['train']:.3f} | "
                     f"{r['bitwise']:.4f} | {r['load']:.2f} |")
    import importlib.metadata as md

    versions = ", ".join(f"{n} {md.version(n)}" for n in ("torch", "deepspeed", "ray"))
    print(f"# Exact mode vs default on CPU\n\n- tree: {tree_state()}\n- {versions}\n- size: "
          f"{'x'.join(map(str, size))} (prompts x group x max new tokens), {args.steps} measured steps per run\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
