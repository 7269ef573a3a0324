"""CPU end-to-end benchmark: seconds per GRPO step, ring-rl against TRL's GRPOTrainer.

    python benchmarks/e2e_cpu.py                     # 8 prompts x 8 samples x 6 tokens; TRL also at 32x8x4
    python benchmarks/e2e_cpu.py --steps 5 --prompts 16 --group 8 --max-new-tokens 6 --peer-size both

Both systems start from the same random-init `tiny` Ring-linear checkpoint (built into a
temp dir), read the same synthetic arithmetic prompts and score with the same reward
(`ring_rl.rl.reward.RewardFn` on configs/tiny-arith.yaml's `reward`, i.e. math_verify).
One step = sample P prompts x G completions of at most T tokens at temperature 1, score
them, one optimizer step over all P*G sequences as one micro-batch, weights ready for the
next step's generation. Hyper-parameters that change no cost are matched too (lr, clip
0.2/0.28, token-mean loss, group std-normalised advantages, no KL, grad clip 1).

Each system runs in a subprocess of its own, one after the other, so they never share the
cores: ring-rl through the `ring-rl train` CLI (Ray actors: native rollout + DeepSpeed
trainer, one torch thread each) and TRL through `e2e_trl_worker.py` (one process,
`--trl-threads` intra-op threads). ring-rl runs twice: on-policy (the default) and with
`rollout.max_staleness=1` (step n+1 generated while the trainer updates on step n). The
first step of each run is warm-up; the table shows the median of the others. A ring-rl
step's seconds are the wall-clock time between consecutive metrics rows (everything between
two steps); TRL's from its on_step_begin to on_step_end. "gen s" is the time spent
generating (ring-rl: perf/rollout_s, overlapped with the update in the second run; TRL: its
calls to model.generate). tokens/s = generated tokens of a step (end tokens included) /
seconds of that step, median over steps.

TRL 1.16 scores log-probs through `model.base_model(...).last_hidden_state` (its fused LM
head): RingLinearModel.forward provides it (padded in, the flat maths, re-padded out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-arith.yaml"
TRL_WORKER = Path(__file__).with_name("e2e_trl_worker.py")
PEER_SIZE = (32, 8, 4)  # TRL's peer figure in shared/docs/benchmarks.md
KEPT = "\n## "  # a rewritten results file keeps its sections (analysis, history) from the first one on


# -- the common inputs -----------------------------------------------------------------------
def build_inputs(work: Path, n_train: int) -> tuple[Path, dict[str, str]]:
    from ring_rl.model.factory import build_random_checkpoint
    from ring_rl.rl.arith import write_arith_dataset

    ckpt = build_random_checkpoint("tiny", work / "ckpt", seed=0)
    paths = write_arith_dataset(work / "data", n_train=n_train, n_test=8, seed=0)
    return ckpt, paths


def describe_model(ckpt: Path) -> str:
    from ring_rl.model.config import load_model_config
    from ring_rl.model.info import model_info

    cfg = load_model_config(str(ckpt))
    info = model_info(cfg)
    return (f"random-init `tiny` Ring-linear, fp32, {info['total_params'] / 1e6:.2f}M parameters "
            f"({info['activated_params'] / 1e6:.2f}M active): hidden {cfg.hidden_size}, "
            f"{cfg.num_hidden_layers} layers, {cfg.num_experts} experts top-{cfg.num_experts_per_tok}")


def tree_state() -> str:
    """The commit and the uncommitted files of ring_rl/ and configs/ the numbers were taken on."""
    def git(*a):  # not stripped: porcelain lines start with a status column that may be a space
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "ring_rl", "configs").splitlines() if line]
    return f"{git('rev-parse', '--short', 'HEAD').strip() or '?'}" + (f" + uncommitted {', '.join(dirty)}" if dirty else "")


def load_avg() -> float:
    return os.getloadavg()[0]


# -- ring-rl: the CLI in a subprocess, steps read back from metrics.jsonl --------------------
RING_RL_MODES = {"on-policy": (), "overlapped": ("rollout.max_staleness=1",)}


def run_ring_rl(work: Path, ckpt: Path, data: dict[str, str], size: tuple[int, int, int], steps: int,
                mode: str = "on-policy", extra: tuple[str, ...] = (), tag: str = "") -> dict:
    """extra: more overrides after the mode's; tag: the run's name suffix (default: the mode)."""
    p, g, t = size
    extra, tag = (*RING_RL_MODES[mode], *extra), tag or f"-{mode}"
    run_dir = work / f"ring-rl-{p}x{g}x{t}{tag}"
    overrides = [
        f"run.dir={run_dir}", f"model.name_or_path={ckpt}", "sft.enabled=false",
        f"data.train_files=[{data['train']}]", f"data.test_files=[{data['test']}]",
        f"run.steps={steps + 1}", "run.eval_every=0", "run.checkpoint_every=0",
        f"run.prompts_per_step={p}", f"rollout.group_size={g}", f"rollout.max_new_tokens={t}",
        "rollout.temperature=1.0", f"trainer.micro_batch_size={p * g}", *extra,
    ]
    cmd = [sys.executable, "-m", "ring_rl.cli", "train", "--config", str(CONFIG), *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    load, t0 = load_avg(), time.perf_counter()
    with open(work / f"ring-rl-{p}x{g}x{t}{tag}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ring-rl train failed (rc {proc.returncode}):\n{Path(log.name).read_text()[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # Step 1 has no row before it: its own perf/step_s (it is the warm-up, left out anyway).
    pace = [rows[0]["perf/step_s"]] + [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    steps_out = [{"s": s, "gen_s": r["perf/rollout_s"],
                  "tokens": r["response/length_mean"] * p * g, "train_s": r["perf/train_s"],
                  "sync_s": r["perf/sync_s"], "reward_s": r["perf/reward_s"],
                  "update_s": r["train/time_s"], "align_s": r["perf/align_s"], "overlap_s": r["perf/overlap_s"],
                  "step_s": r["perf/step_s"], "staleness": r["rollout/staleness"],
                  "rollout_tok_s": r["perf/rollout_tokens_per_s"],
                  "bitwise": r["align/bitwise_equal_frac"]} for s, r in zip(pace, rows)]
    return {"system": f"ring-rl {mode}", "threads": "1 per actor", "size": size, "steps": steps_out,
            "wall_s": wall, "load": load}


# -- TRL: GRPOTrainer in a subprocess (e2e_trl_worker.py) ------------------------------------
def run_trl(work: Path, ckpt: Path, data: dict[str, str], size: tuple[int, int, int], steps: int, threads: int,
            ring_malloc: bool = False) -> dict:
    """ring_malloc: TRL's process starts with the glibc malloc settings ring-rl's actors get
    (ray.malloc_mmap_threshold_mb), so that the ratio does not credit ring-rl with them."""
    p, g, t = size
    tag = f"{p}x{g}x{t}-{threads}t" + ("-malloc" if ring_malloc else "")
    out = work / f"trl-{tag}.json"
    spec = {"ckpt": str(ckpt), "data": data["train"], "size": size, "steps": steps, "threads": threads,
            "out": str(out), "work": str(work)}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if ring_malloc:
        from ring_rl.config import RayConfig
        from ring_rl.rl.placement import malloc_env

        env.update(malloc_env(RayConfig().malloc_mmap_threshold_mb))
    load, t0 = load_avg(), time.perf_counter()
    log_path = work / f"trl-{tag}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(TRL_WORKER), json.dumps(spec)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, timeout=900, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"TRL worker failed (rc {proc.returncode}):\n{log_path.read_text()[-3000:]}")
    return {"system": "TRL 1.16 GRPOTrainer", "threads": f"{threads}" + (", ring-rl's malloc" if ring_malloc else ""),
            "size": size,
            "steps": json.loads(out.read_text()), "wall_s": wall, "load": load}


# -- the table --------------------------------------------------------------------------------
def summarise(result: dict) -> dict:
    measured = result["steps"][1:] or result["steps"]  # step 1 is warm-up
    s = [x["s"] for x in measured]
    return {**result, "n": len(measured), "s_med": statistics.median(s), "s_min": min(s), "s_max": max(s),
            "gen_med": statistics.median(x["gen_s"] for x in measured),
            "tok_s": statistics.median(x["tokens"] / x["s"] for x in measured),
            "tok_step": statistics.mean(x["tokens"] for x in measured)}


def table(rows: list[dict]) -> str:
    best_trl = {}
    for r in rows:
        if r["system"].startswith("TRL"):
            best_trl[r["size"]] = min(best_trl.get(r["size"], float("inf")), r["s_med"])
    lines = [("| system | prompts x group x tokens | torch threads | s/step (median) | min-max | gen s/step "
              "| tokens/s | ratio to TRL | load at start |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = best_trl.get(r["size"])
        ratio = f"{r['s_med'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['system']} | {'x'.join(map(str, r['size']))} | {r['threads']} | {r['s_med']:.3f} "
                     f"| {r['s_min']:.3f}-{r['s_max']:.3f} | {r['gen_med']:.3f} | {r['tok_s']:.0f} | {ratio} "
                     f"| {r['load']:.2f} |")
    return "\n".join(lines)


def ring_breakdown(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["system"].startswith("ring-rl"):
            m = r["steps"][1:] or r["steps"]
            med = {k: statistics.median(x[k] for x in m)
                   for k in ("s", "gen_s", "reward_s", "train_s", "update_s", "sync_s", "align_s", "overlap_s",
                             "step_s", "staleness")}
            size = "x".join(map(str, r["size"]))
            if r["system"].endswith("overlapped"):
                out.append(f"{r['system']} {size} median split of a step (driver clock): the trainer's check + "
                           f"update {med['train_s']:.3f} s (inside the trainer actor {med['update_s']:.3f} s), "
                           f"during which the next step's weights sync {med['sync_s']:.3f} s + rollout "
                           f"{med['gen_s']:.3f} s + reward {med['reward_s']:.3f} s ran ({med['overlap_s']:.3f} s "
                           f"in all); files to the writer thread {med['align_s']:.3f} s; the rest of the "
                           f"{med['s']:.3f} s step is the driver's bookkeeping between steps "
                           f"(staleness {med['staleness']:.0f})")
            else:
                out.append(f"{r['system']} {size} median split of a step (driver clock): rollout "
                           f"{med['gen_s']:.3f} s, reward {med['reward_s']:.3f} s, the trainer's check + update "
                           f"{med['train_s']:.3f} s (inside the trainer actor {med['update_s']:.3f} s; the "
                           f"rest is Ray calls), files to the writer thread {med['align_s']:.3f} s, weight sync "
                           f"{med['sync_s']:.3f} s; the rest of the {med['s']:.3f} s step is the driver's "
                           f"bookkeeping between steps")
    return out


def cpu_model() -> str:
    """The CPU's model name (the ratio moved between two 2-core machines)."""
    info = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", info.read_text(), re.M) if info.exists() else []
    return f"{names[0]}, {platform.machine()}" if names else platform.machine()


def versions() -> str:
    import importlib.metadata as md

    return ", ".join(f"{n} {md.version(n)}" for n in ("torch", "transformers", "trl", "accelerate", "deepspeed", "ray"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="measured steps per run (one warm-up step is added)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=6, help="completion length limit")
    ap.add_argument("--peer-size", choices=["trl", "both", "off"], default="trl",
                    help=f"also run {'x'.join(map(str, PEER_SIZE))} (the peer figure's size): TRL only, both, or not")
    ap.add_argument("--systems", default="ring-rl,trl", help="which systems to run (comma list)")
    ap.add_argument("--ring-rl-modes", default="on-policy,overlapped",
                    help=f"comma list of ring-rl runs: {', '.join(RING_RL_MODES)}")
    ap.add_argument("--trl-threads", default="1,2", help="comma list of torch threads for TRL runs")
    ap.add_argument("--trl-ring-malloc", choices=["on", "off"], default="on",
                    help="one more TRL run (the most threads) with the glibc malloc settings of ring-rl's actors")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/e2e_cpu.md"), help="markdown file ('' = none)")
    args = ap.parse_args()

    size = (args.prompts, args.group, args.max_new_tokens)
    threads = [int(x) for x in args.trl_threads.split(",")]
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    t_start, tree = time.perf_counter(), tree_state()
    results = []
    with tempfile.TemporaryDirectory(prefix="e2e_cpu_") as tmp:
        work = Path(tmp)
        sizes = [size] + ([PEER_SIZE] if args.peer_size != "off" and PEER_SIZE != size else [])
        n_train = max(p * (args.steps + 1) for p, _, _ in sizes) + 64
        ckpt, data = build_inputs(work, n_train)
        model_line = describe_model(ckpt)
        for sz in sizes:
            if "ring-rl" in args.systems and (sz == size or args.peer_size == "both"):
                for mode in args.ring_rl_modes.split(","):
                    print(f"ring-rl {mode} {sz} ...", file=sys.stderr, flush=True)
                    results.append(summarise(run_ring_rl(work, ckpt, data, sz, args.steps, mode)))
            trl_runs = [(k, False) for k in threads] + [(max(threads), True)] * (args.trl_ring_malloc == "on")
            for k, ring_malloc in trl_runs if "trl" in args.systems else []:
                print(f"TRL {sz} threads={k}{' with ring-rl malloc' * ring_malloc} ...", file=sys.stderr, flush=True)
                results.append(summarise(run_trl(work, ckpt, data, sz, args.steps, k, ring_malloc)))
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    total = time.perf_counter() - t_start

    text = table(results)
    print(text)
    targets = []
    for r in results:
        base = [x for x in results if x["size"] == r["size"] and x["system"].startswith("TRL")]
        if r["system"].startswith("ring-rl") and base:
            # The target's peer is TRL as it ships (its fastest thread count); the row given
            # ring-rl's malloc settings is the stricter comparison, printed beside it.
            shipped = [b["s_med"] for b in base if "malloc" not in b["threads"]]
            ratio = r["s_med"] / min(shipped) if shipped else float("nan")
            strict = r["s_med"] / min(b["s_med"] for b in base)
            targets.append(f"{r['system']} / TRL at {'x'.join(map(str, r['size']))}: {ratio:.3f}x step "
                           f"time (target <= 0.5x: {'met' if ratio <= 0.5 else 'not met'}); {strict:.3f}x "
                           f"against the fastest TRL row, ring-rl's malloc included")
            print(targets[-1])
    notes = ring_breakdown(results)
    for n in notes:
        print(n)
    print("wall s per run (start-up included): " + ", ".join(
        f"{r['system']} {'x'.join(map(str, r['size']))} {r['wall_s']:.0f}" for r in results), file=sys.stderr)
    print(f"total {total:.0f} s; load before: {uptime_before}; after: {uptime_after}", file=sys.stderr)

    if args.out:
        cmd = "python benchmarks/e2e_cpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        md = [
            "# End-to-end GRPO step on CPU: ring-rl vs TRL GRPOTrainer",
            "",
            f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
            (f"- machine: {os.cpu_count()}-core CPU shared with other jobs ({cpu_model()}); "
             f"{versions()}"),
            f"- tree: {tree}",
            f"- command: `{cmd.strip()}` ({total:.0f} s in all, start-up of both systems included)",
            f"- load (`uptime`) before: `{uptime_before}`; after: `{uptime_after}`",
            f"- model: {model_line}; reward: math_verify",
            f"- {args.steps} measured steps per run after 1 warm-up step",
            "",
            text,
            "",
            "Notes:",
            "- ratio = s/step / the fastest TRL s/step at the same size (the row with ring-rl's malloc "
            "included: the stricter comparison; the target line printed by the script is against TRL "
            "as it ships).",
            ("- ring-rl threads: Ray rollout actor and DeepSpeed trainer actor, one torch thread each. Every "
             "step checks the trainer's log-probs of the rollout against the rollout's (alignment metrics, "
             "policy, gate) before its update; with one optimizer pass per step the update's own forward "
             "is that log-prob pass (no separate recompute), as TRL with one iteration per batch has none. "
             "The trainer runs each group's shared prompt once in that forward and its backward "
             "(`trainer.share_prompts`, on by default); TRL runs every sequence whole."),
            ("- ring-rl overlapped (`rollout.max_staleness=1`): one-step off-policy, each rollout sampled with "
             "weights one update older than the ones it trains (staleness 1; the old log-probs of the ratio "
             "are the trainer's current ones); on-policy is the default and TRL's semantics."),
            ("- TRL threads: 1 and 2 intra-op threads (`--trl-threads`). On a loaded 2-core machine 2 threads "
             "can run several times slower than 1 (OpenMP threads spin while waiting for a core). "
             "\"ring-rl's malloc\": TRL's process started with the glibc malloc thresholds ring-rl's actors "
             "get (`ray.malloc_mmap_threshold_mb`; `--trl-ring-malloc`), so the ratio does not credit "
             "ring-rl with them."),
            ("- TRL needs `model.base_model(input_ids, attention_mask).last_hidden_state` (its fused LM "
             "head); `RingLinearModel.forward` provides it (padded in, the flat maths of every engine, "
             "re-padded out), so TRL runs ring-rl's own model code per token."),
            ("- peer figure (shared/docs/benchmarks.md): TRL 1.16 on a 0.8M-parameter dense Llama at 32x8x4, "
             "0.35-0.47 s/step; the model here is an MoE with reference CPU kernels, so TRL's own time at that "
             "size is not comparable with it, only with ring-rl in the same run."),
            *[f"- {n}" for n in targets + notes],
        ]
        out = Path(args.out)
        old = out.read_text() if out.exists() else ""
        kept = old[old.index(KEPT) + 1:] if KEPT in old else ""  # analysis and earlier runs, written by hand
        out.write_text("\n".join(md) + "\n" + ("\n" + kept if kept else ""))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
