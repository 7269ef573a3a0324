"""The GRPO loop on Ray: generate → reward → diff & correct → train → sync weights.

The driver owns the loop, the data order, the metrics and the checkpoints; the actors own
the model copies. Read top to bottom, this file is one GRPO run."""
from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from ring_rl.alignment_checks.gate import check_gate, known_metric_names, validate_rules
from ring_rl.alignment_checks.metrics import logprob_mismatch, router_flip_rate
from ring_rl.alignment_checks.exact import first_exact_difference
from ring_rl.alignment_checks.policies import apply_policy
from ring_rl.alignment_checks.report import save_token_arrays, save_worst_tokens, write_report
from ring_rl.config import RunConfig, save_config
from ring_rl.rl.data import PromptBatch, PromptStream, load_prompts, tokenize_prompts
from ring_rl.rl.evaluate import evaluate
from ring_rl.rl.grpo import group_advantages
from ring_rl.rl.metrics import MetricsLogger, truncate_jsonl
from ring_rl.rl.reward import RewardFn
from ring_rl.rl.run_state import CheckpointDirs
from ring_rl.rl.stop import RunStopped, StopRequest
from ring_rl.rl.workers import TrainerFailed, Workers
from ring_rl.types import RolloutBatch, SamplingParams, TrainBatch

log = logging.getLogger("ring_rl.train")


@dataclass
class RunResult:
    steps_done: int
    accuracy_before: float | None
    accuracy_after: float | None
    run_dir: Path


def train(cfg: RunConfig, model_dir: str | Path, tokenizer) -> RunResult:
    """A trainer actor failure ends its step; with run.resume or run.auto_resume the run goes
    on from the newest checkpoint (at most ray.max_trainer_restarts times), else it stops
    saying how to resume. SIGTERM/Ctrl-C stop after the current step, with a checkpoint."""
    for attempt in itertools.count():
        try:
            return _train_once(cfg, model_dir, tokenizer)
        except TrainerFailed as e:
            cfg = _after_trainer_failure(cfg, e, attempt)


def _train_once(cfg: RunConfig, model_dir: str | Path, tokenizer) -> RunResult:
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    ckpts = CheckpointDirs(run_dir, keep=cfg.run.keep_checkpoints)
    metrics = MetricsLogger(run_dir)
    train_data = load_prompts(cfg.data, "train", tokenizer).dataset
    test_data = load_prompts(cfg.data, "test", tokenizer).dataset if cfg.run.eval_every else None
    stream = PromptStream(train_data, cfg.run.prompts_per_step, cfg.run.seed, cfg.rollout.group_size)
    reward_fn = RewardFn(cfg.reward)
    moe_layers = moe_layer_indices(model_dir)
    validate_rules(cfg.alignment.gate, known_metric_names(
        [f"router/flip_layer_{i}" for i in moe_layers] + ["router/flip_mean"]))

    start_step, resume_from, acc_before = 0, _resume_point(cfg, ckpts), None
    if resume_from is not None:
        state = ckpts.read_state(resume_from)
        start_step, acc_before = state["step"], state.get("accuracy_before")
        stream.load_state_dict(state["stream"])
        metrics.truncate_after(start_step)
        truncate_jsonl(run_dir / "samples.jsonl", start_step)
        log.info("resuming from %s (step %d)", resume_from, start_step)
    workers = Workers(cfg, model_dir, trainer_state=resume_from / "trainer" if resume_from else None)
    stop = StopRequest()
    try:
        stop.install()  # after ray.init, which installs a SIGTERM handler of its own
        if test_data is not None and acc_before is None:
            acc_before = evaluate(workers, test_data, tokenizer, reward_fn, cfg)["eval/accuracy"]
            log.info("test accuracy before training: %.1f%%", 100 * acc_before)
        bar = tqdm(range(start_step + 1, cfg.run.steps + 1), initial=start_step, total=cfg.run.steps,
                   desc="GRPO", unit="step", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())  # a log file gets the line per step below instead
        row = {}
        for step in bar:
            row, samples = grpo_step(cfg, step, stream.next_batch(), workers, tokenizer, reward_fn,
                                     run_dir, moe_layers)
            row["data/epoch"], row["data/index"] = stream.position.epoch, stream.position.index
            write_samples(run_dir, step, samples)
            if test_data is not None and (step % cfg.run.eval_every == 0 or step == cfg.run.steps):
                row.update(evaluate(workers, test_data, tokenizer, reward_fn, cfg))
            metrics.log(step, row)
            if "exact/first_difference" in row:
                write_report(run_dir)
                raise ExactModeBroken(f"step {step}: alignment.mode=exact but the trainer's logprobs are not "
                                      f"bitwise the rollout's: {row['exact/first_difference']}; localise it with "
                                      f"`ring-rl align-check`; report: {run_dir / 'report.html'}")
            if row.get("gate/action") == "abort":
                write_report(run_dir)
                raise GateAbort(f"step {step}: alignment gate aborted the run ({row['gate/fired']}); "
                                f"report: {run_dir / 'report.html'}")
            bar.set_postfix(reward=f"{row['reward/mean']:.3f}", tok_s=f"{row['perf/rollout_tokens_per_s']:.0f}")
            if not sys.stderr.isatty():  # a log file (a Ray job's): one line per step, not bar redraws
                log.info("step %d/%d: reward %.3f, %.1f s", step, cfg.run.steps, row["reward/mean"], row["perf/step_s"])
            if ((cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0) or step == cfg.run.steps
                    or stop.requested):
                saved = save_checkpoint(ckpts, workers, step, stream, acc_before)
                if stop.requested and step < cfg.run.steps:
                    raise RunStopped(f"stopped after step {step} of {cfg.run.steps}; checkpoint {saved}; "
                                     "run again with --resume to continue", stop.signum)
        acc_after = row.get("eval/accuracy")
        report = write_report(run_dir)
        log.info("report: %s", report)
        return RunResult(cfg.run.steps, acc_before, acc_after, run_dir)
    finally:
        stop.restore()
        metrics.close()
        workers.shutdown()


class GateAbort(RuntimeError):
    """The alignment gate's `abort` rule fired (the report was written first)."""


class ExactModeBroken(RuntimeError):
    """alignment.mode=exact and a logprob or expert differed (the report was written first)."""


def moe_layer_indices(model_dir) -> list[int]:
    from ring_rl.model.config import load_model_config

    config = load_model_config(model_dir)
    return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]


def router_flips(rollout: RolloutBatch, trainer_ids: list, moe_layers: list[int]) -> dict[str, float]:
    """Per MoE layer, the share of positions where the trainer picked another expert set
    than the rollout engine recorded (both [layers, positions, k] per sequence)."""
    pairs = [(r, t) for r, t in zip(rollout.router_ids or [], trainer_ids or [])
             if r is not None and t is not None and r.shape[1] > 0]
    if not pairs:
        return {}
    rates = router_flip_rate(torch.cat([r for r, _ in pairs], 1), torch.cat([t for _, t in pairs], 1))
    out = {f"router/flip_layer_{i}": float(v) for i, v in zip(moe_layers, rates)}
    out["router/flip_mean"] = float(rates.mean())
    return out


def grpo_step(cfg: RunConfig, step: int, prompts: PromptBatch, workers: Workers, tokenizer,
              reward_fn: RewardFn, run_dir: Path, moe_layers: list[int]) -> tuple[dict, list[dict]]:
    t0 = time.perf_counter()
    G = cfg.rollout.group_size
    prompt_ids = tokenize_prompts(prompts.prompts, tokenizer)
    seq_prompts = [ids for ids in prompt_ids for _ in range(G)]
    params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k,
                            cfg.rollout.max_new_tokens, cfg.rollout.seed)
    # Seeds per (step, sequence): the same step samples the same tokens after a resume.
    seeds = [((cfg.rollout.seed * 1_000_003 + step) * 100_003 + i) % 2**31 for i in range(len(seq_prompts))]
    rollout = workers.generate(seq_prompts, params, seeds, prompts.sequence_group_ids())
    t_rollout = time.perf_counter()

    texts = tokenizer.batch_decode([r.tolist() for r in rollout.response_ids], skip_special_tokens=True)
    rewards = torch.tensor(reward_fn.score(texts, prompts.sequence_answers()), dtype=torch.float32)
    advantages, equal_groups = group_advantages(rewards, G, std_norm=cfg.trainer.adv_std_norm)
    t_reward = time.perf_counter()

    # Alignment: diff the engines' logprobs of the same tokens, correct, gate — then train.
    trainer_lp, trainer_ids = workers.trainer_logprobs(rollout, replay=cfg.alignment.routing_replay)
    align = logprob_mismatch(rollout.logprobs, trainer_lp)
    align.update(router_flips(rollout, trainer_ids, moe_layers))
    if cfg.alignment.mode == "exact":
        broken = first_exact_difference(rollout.logprobs, trainer_lp, rollout.router_ids, trainer_ids, moe_layers)
        align["align/exact_ok"] = float(broken is None)
    policy = apply_policy(cfg.alignment, rollout.logprobs, trainer_lp)
    gate = check_gate(cfg.alignment.gate, {**align, **policy.metrics}) if align["align/tokens"] else None
    save_token_arrays(run_dir, step, rollout.logprobs, trainer_lp)
    save_worst_tokens(run_dir, step, rollout.logprobs, trainer_lp, rollout.prompt_ids, rollout.response_ids,
                      tokenizer.decode)
    t_align = time.perf_counter()
    train_stats = {}
    if cfg.alignment.mode == "exact" and broken is not None:  # no update on a broken promise
        return {**align, "exact/first_difference": broken, "perf/step_s": time.perf_counter() - t0}, []
    if gate is None or gate.action not in ("skip", "abort"):
        batch = TrainBatch(rollout=rollout, rewards=rewards, advantages=advantages,
                           old_logprobs=policy.old_logprobs, token_weights=policy.token_weights)
        train_stats = workers.train(batch)
    t_train = time.perf_counter()
    version = workers.sync_weights() if train_stats else workers.version
    t_sync = time.perf_counter()

    n_tokens = rollout.num_response_tokens
    answers = prompts.sequence_answers()
    samples = [{"prompt": tokenizer.decode(rollout.prompt_ids[i].tolist()), "response": texts[i],
                "gold": answers[i], "reward": rewards[i].item()} for i in range(min(G, len(texts)))]
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "reward/accuracy": (rewards > 0.5).float().mean().item(),
        "reward/equal_reward_groups": int(equal_groups.sum()) if hasattr(equal_groups, "sum") else equal_groups,
        "response/length_mean": n_tokens / len(rollout),
        "response/eos_frac": sum(f == "eos" for f in rollout.finish_reasons) / len(rollout),
        **{f"train/{k}": v for k, v in train_stats.items()},
        **align,
        **policy.metrics,
        **(gate.as_row() if gate is not None else {}),
        "weights/version": version,
        "rollout/sequences": len(rollout),
        "rollout/actor_restarts": workers.restarts,  # replaced rollout actors so far in this run
        "perf/rollout_tokens_per_s": n_tokens / max(t_rollout - t0, 1e-9),
        "perf/rollout_s": t_rollout - t0,
        "perf/reward_s": t_reward - t_rollout,
        "perf/align_s": t_align - t_reward,
        "perf/train_s": t_train - t_align,
        "perf/sync_s": t_sync - t_train,
        "perf/step_s": t_sync - t0,
    }, samples


def write_samples(run_dir: Path, step: int, samples: list[dict]) -> None:
    """One group of responses per step, for a person to read next to the curves."""
    with open(run_dir / "samples.jsonl", "a") as f:
        for sample in samples:
            f.write(json.dumps({"step": step, **sample}) + "\n")


def save_checkpoint(ckpts: CheckpointDirs, workers: Workers, step: int, stream: PromptStream,
                    acc_before: float | None) -> Path:
    staging = ckpts.staging(step)
    workers.save_trainer(staging / "trainer")
    return ckpts.commit(staging, step, {"stream": stream.state_dict(), "accuracy_before": acc_before})


def _resume_point(cfg: RunConfig, ckpts: CheckpointDirs) -> Path | None:
    """The newest checkpoint that verifies; newer broken ones are set aside (and logged)."""
    if not (cfg.run.resume or cfg.run.auto_resume):
        return None
    latest = ckpts.newest_valid()
    if cfg.run.resume and latest is None:
        raise FileNotFoundError(f"run.resume is set but {ckpts.root} has no usable checkpoint")
    return latest


def _after_trainer_failure(cfg: RunConfig, error: TrainerFailed, attempt: int) -> RunConfig:
    """The config of the next attempt (continue from the newest checkpoint), or the error
    again with what to do about it."""
    run_dir = Path(cfg.run.dir)
    newest = CheckpointDirs(run_dir, keep=cfg.run.keep_checkpoints).latest()
    where = f"the newest checkpoint is {newest}" if newest else "no checkpoint was saved yet"
    if not (cfg.run.resume or cfg.run.auto_resume):
        raise TrainerFailed(f"{error}. The run cannot go on without its trainer; {where}: run again with "
                            "--resume (or set run.auto_resume: true) to continue from it") from None
    if attempt >= cfg.ray.max_trainer_restarts:
        raise TrainerFailed(f"{error}. Gave up after {attempt} restart(s) (ray.max_trainer_restarts); "
                            f"{where}") from None
    log.warning("%s. The run goes on with a new trainer, %s (restart %d of %d)", error,
                f"from {newest}; steps after it are redone" if newest else "from step 0",
                attempt + 1, cfg.ray.max_trainer_restarts)
    if newest is None:  # starting over: the failed attempt's rows go
        truncate_jsonl(run_dir / "metrics.jsonl", 0)
        truncate_jsonl(run_dir / "samples.jsonl", 0)
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": False, "auto_resume": True})})


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
