"""`ring-rl` command line: thin wrappers over the parts; heavy imports happen per command."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _model_info(args) -> int:
    from ring_rl.model.config import load_model_config
    from ring_rl.model.info import format_info, model_info

    info = model_info(load_model_config(args.config))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _init_model(args) -> int:
    from ring_rl.model.factory import build_random_checkpoint

    path = build_random_checkpoint(args.preset, args.out, seed=args.seed)
    print(f"wrote a random-init {args.preset} checkpoint and tokenizer to {path}")
    return 0


def _generate(args) -> int:
    import torch

    from ring_rl.model import load_checkpoint
    from ring_rl.model.tokenizer import load_tokenizer
    from ring_rl.rollout.native import NativeEngine
    from ring_rl.types import SamplingParams

    model = load_checkpoint(args.model)
    tok = load_tokenizer(args.model)
    engine = NativeEngine(model, [tok.eos_token_id])
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    prompts = [tok(p)["input_ids"] for p in args.prompt]
    batch = engine.generate(prompts, params)
    for text, ids, lp in zip(args.prompt, batch.response_ids, batch.logprobs):
        out = tok.decode(ids, skip_special_tokens=True)
        print(f"{text!r} -> {out!r}  (mean logprob {lp.mean().item() if len(lp) else float('nan'):.3f})")
    print(f"{batch.num_response_tokens} tokens, {engine.last_stats['rollout_tokens_per_s']:.0f} tokens/s",
          file=sys.stderr)
    del torch
    return 0


def _data_arith(args) -> int:
    from ring_rl.rl.arith import write_arith_dataset

    write_arith_dataset(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                        max_operand=args.max_operand)
    print(f"wrote {args.out}/train.jsonl and {args.out}/test.jsonl")
    return 0


def _load_run_config(args):
    from ring_rl.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "resume", False):
        overrides.append("run.resume=true")
    return load_config(args.config, overrides)


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _train(args) -> int:
    from ring_rl.rl.bootstrap import prepare_run
    from ring_rl.rl.driver import train
    from ring_rl.rl.stop import RunStopped
    from ring_rl.rl.workers import ActorFailed

    _setup_logging()
    cfg = _load_run_config(args)
    model_dir, tokenizer = prepare_run(cfg)
    try:
        result = train(cfg, model_dir, tokenizer)
    except RunStopped as e:
        print(f"ring-rl train: {e}", file=sys.stderr)
        return e.exit_code
    except ActorFailed as e:
        print(f"ring-rl train: error: {e}", file=sys.stderr)
        return 1
    if result.accuracy_before is not None and result.accuracy_after is not None:
        print(f"test accuracy: before GRPO {100 * result.accuracy_before:.1f}%, "
              f"after {100 * result.accuracy_after:.1f}% "
              f"({100 * (result.accuracy_after - result.accuracy_before):+.1f} points)")
    print(f"run directory: {result.run_dir} (metrics.jsonl, tensorboard/, checkpoints/)")
    return 0


def _sft(args) -> int:
    from ring_rl.rl.bootstrap import ensure_data
    from ring_rl.rl.sft import run_sft

    _setup_logging()
    cfg = _load_run_config(args)
    ensure_data(cfg)
    out = run_sft(cfg, args.out or cfg.model.name_or_path)
    print(f"wrote the SFT checkpoint to {out}")
    return 0


def _eval(args) -> int:
    from ring_rl.rl.bootstrap import evaluate_checkpoint

    _setup_logging()
    cfg = _load_run_config(args)
    acc, n = evaluate_checkpoint(cfg, args.model, args.data)
    print(f"accuracy {100 * acc:.1f}% on {n} prompts of {args.data or cfg.data.test_files}")
    return 0


def _report(args) -> int:
    from ring_rl.alignment_checks.report import write_report

    if not (Path(args.run_dir) / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{args.run_dir}: no metrics.jsonl (not a run directory)")
    print(f"wrote {write_report(args.run_dir)}")
    return 0


def _submit(args) -> int:
    from ring_rl.rl.submit import api_address, submit

    submit(api_address(args.address), args.config, args.overrides, resume=args.resume, job_id=args.job_id,
           root=args.root, pip=args.pip)
    return 0


def _job_status(args) -> int:
    from ring_rl.rl.submit import api_address, status

    state = status(api_address(args.address), args.job_id, wait=args.wait)
    return 0 if state == "SUCCEEDED" or (not args.wait and state != "FAILED") else 1


def _job_logs(args) -> int:
    from ring_rl.rl.submit import api_address, logs

    logs(api_address(args.address), args.job_id, follow=args.follow)
    return 0


def _job_stop(args) -> int:
    from ring_rl.rl.submit import api_address, stop

    stop(api_address(args.address), args.job_id, wait=args.wait)
    return 0


def _cluster(args) -> int:
    from ring_rl.rl.cluster import local_down, local_up

    if args.action == "down":
        local_down()
        return 0
    if not args.local:
        raise ValueError("cluster up: only --local (a one-node cluster on 127.0.0.1) is built in; "
                         "for several machines use `ray start` (README: Running on a Ray cluster)")
    rec = local_up(port=args.port, dashboard_port=args.dashboard_port, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    print(f"Ray cluster up on 127.0.0.1 only, token auth on (token: {rec['token']})\n"
          f"  jobs API / dashboard: {rec['address']}\n"
          f"  submit:  ring-rl submit --address {rec['address']} --config configs/tiny-arith.yaml\n"
          f"  stop:    ring-rl cluster down\n"
          f"  head log: {rec['log']}")
    return 0


def _add_address(s) -> None:
    s.add_argument("--address", help="Ray jobs API, e.g. http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS, "
                                     "then $RAY_ADDRESS)")


def _align_check(args) -> int:
    from ring_rl.alignment_checks.align_check import cli_main

    return cli_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ring-rl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("train", help="run GRPO (builds the data and starting checkpoint if missing)")
    s.add_argument("--config", required=True, help="run config YAML (see configs/)")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-5")
    s.set_defaults(fn=_train)

    s = sub.add_parser("submit", help="run `train` as a job on a Ray cluster (Ray Jobs API)")
    _add_address(s)
    s.add_argument("--config", required=True, help="run config YAML, inside this checkout (it is shipped)")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.dir")
    s.add_argument("--job-id", help="submission id (default: ring-rl-RUNNAME-TIMESTAMP)")
    s.add_argument("--root", help="base of the config's relative paths on the cluster (default: this directory)")
    s.add_argument("--pip", action="append", help="a pip requirement the cluster installs for the job (repeatable)")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.steps=10")
    s.set_defaults(fn=_submit)

    for name, fn, text in (("status", _job_status, "state of a submitted job and its run directory"),
                           ("logs", _job_logs, "output of a submitted job"),
                           ("stop", _job_stop, "stop a job; the run saves a checkpoint first")):
        s = sub.add_parser(name, help=text)
        _add_address(s)
        s.add_argument("job_id")
        if name == "logs":
            s.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        else:
            s.add_argument("--wait", action="store_true", help="wait until the job has ended")
        s.set_defaults(fn=fn)

    s = sub.add_parser("cluster", help="a one-node Ray cluster on 127.0.0.1 with token auth, to try submit")
    s.add_argument("action", choices=["up", "down"])
    s.add_argument("--local", action="store_true", help="one node, bound to 127.0.0.1 (the only kind built in)")
    s.add_argument("--port", type=int, default=6379, help="GCS port")
    s.add_argument("--dashboard-port", type=int, default=8265, help="jobs API / dashboard port")
    s.add_argument("--num-cpus", type=int, help="CPUs offered (default: all)")
    s.add_argument("--num-gpus", type=int, help="GPUs offered (default: all)")
    s.set_defaults(fn=_cluster)

    s = sub.add_parser("sft", help="supervised warm-up that makes the starting checkpoint")
    s.add_argument("--config", required=True)
    s.add_argument("--out", help="output checkpoint dir (default: model.name_or_path)")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=_sft)

    s = sub.add_parser("eval", help="greedy accuracy of a checkpoint on a test file")
    s.add_argument("--model", required=True, help="checkpoint directory")
    s.add_argument("--data", help="JSONL/Parquet file (default: the config's data.test_files)")
    s.add_argument("--config", help="run config for data format, template and reward (optional)")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=_eval)

    s = sub.add_parser("report", help="write RUN_DIR/report.html (mismatch, gate, rewards, samples)")
    s.add_argument("run_dir")
    s.set_defaults(fn=_report)

    s = sub.add_parser("align-check", help="rollout vs trainer on the same tokens: localise the gap by layer and op")
    s.add_argument("--model", required=True, help="checkpoint directory")
    s.add_argument("--data", help="JSONL/Parquet prompts (gsm8k or prompt/answer rows)")
    s.add_argument("--engine", choices=["native", "vllm"], default="native", help="rollout engine")
    s.add_argument("--prompts", type=int, default=8, help="first N prompts of --data")
    s.add_argument("--out", default="runs/align-check", help="directory for align_check.json and .html")
    s.add_argument("--inject", help="plant a known discrepancy on the rollout side (see alignment_checks/inject.py)")
    s.add_argument("--save-golden", metavar="FILE", help="store reference logprobs of these prompts")
    s.add_argument("--golden", metavar="FILE", help="fail when logprobs moved from this golden file")
    s.add_argument("--golden-tol", type=float, help="golden tolerance (default: the file's, by dtype)")
    s.add_argument("--gate", action="append", metavar="RULE", help="METRIC>THRESHOLD[:ACTION], e.g. 'k3>1e-4:abort'")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=50, help="top-k at sampling (lets the sampling-semantics check "
                   "tell processed from raw logprobs)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--trainer-bf16", action="store_true", help="trainer in bf16 mixed precision")
    s.add_argument("--routing-replay", action="store_true",
                   help="the trainer takes the rollout's experts (isolates the kernels from expert flips)")
    s.add_argument("--rollout-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="rollout engine's weights and compute (auto: the checkpoint's dtype)")
    s.add_argument("--noise-floor", type=float, help="override the dtype's relative-error noise floor")
    s.add_argument("--no-report", action="store_true", help="skip the HTML page (plots take seconds on a CPU)")
    s.set_defaults(fn=_align_check)

    s = sub.add_parser("model-info", help="parameter counts, layer schedule and memory of a config")
    s.add_argument("config", help="preset name, config.json or checkpoint directory")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_model_info)

    s = sub.add_parser("init-model", help="write a random-init checkpoint (+ tokenizer) of a preset")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_init_model)

    s = sub.add_parser("generate", help="sample completions with the native engine")
    s.add_argument("--model", required=True, help="checkpoint directory")
    s.add_argument("--prompt", action="append", required=True)
    s.add_argument("--max-new-tokens", type=int, default=16)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_generate)

    s = sub.add_parser("data", help="write a built-in data set")
    dsub = s.add_subparsers(dest="dataset", required=True)
    a = dsub.add_parser("arith", help="synthetic 2-digit arithmetic (train/test jsonl)")
    a.add_argument("--out", required=True)
    a.add_argument("--n-train", type=int, default=4000)
    a.add_argument("--n-test", type=int, default=200)
    a.add_argument("--max-operand", type=int, default=99)
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(fn=_data_arith)
    return p


def main(argv: list[str] | None = None) -> int:
    from ring_rl.rl.cluster import ClusterError  # stdlib-only at import: keeps `ring-rl --help` fast

    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():  # a log file: no progress-bar redraws from datasets (ours log lines)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, KeyError, ClusterError) as e:
        # Bad input: one clear line naming the problem, not a stack trace.
        print(f"ring-rl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
