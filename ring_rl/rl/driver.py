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
from typing import Callable

import ray
import torch
from tqdm import tqdm

from ring_rl.alignment_checks.gate import known_metric_names, validate_rules
from ring_rl.alignment_checks.report import (
    save_token_arrays,
    save_worst_tokens,
    write_report,
)
from ring_rl.alignment_checks.step import StepCheck
from ring_rl.config import RunConfig, save_config
from ring_rl.gc_startup import freeze_startup_objects
from ring_rl.rl.background import BackgroundWriter
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
    stop, writer = StopRequest(), BackgroundWriter()  # the step files, off the trainer's critical path
    try:
        stop.install()  # after ray.init, which installs a SIGTERM handler of its own
        if test_data is not None and acc_before is None:
            acc_before = evaluate(workers, test_data, tokenizer, reward_fn, cfg)["eval/accuracy"]
            log.info("test accuracy before training: %.1f%%", 100 * acc_before)
        freeze_startup_objects()  # as in the actors: see ring_rl.gc_startup
        bar = tqdm(range(start_step + 1, cfg.run.steps + 1), initial=start_step, total=cfg.run.steps,
                   desc="GRPO", unit="step", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())  # a log file gets the line per step below instead
        row, check = {}, StepCheck(cfg.alignment, moe_layers)

        def next_rollout(step: int) -> ScoredRollout:
            return generate_and_score(cfg, step, stream, workers, tokenizer, reward_fn)

        def overlapped(step: int) -> bool:
            return cfg.rollout.max_staleness > 0 and step < cfg.run.steps

        def queue_after(step: int) -> Callable[[ScoredRollout], TrainerCall | None]:
            """Queue step + 1's trainer calls behind step's update, unless something must see
            the trainer between the two: the evaluation, a checkpoint, a requested stop."""
            def queue(nxt: ScoredRollout) -> TrainerCall | None:
                evals = test_data is not None and (step % cfg.run.eval_every == 0 or step == cfg.run.steps)
                saves = bool(cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0)
                if evals or saves or stop.requested or step + 1 > cfg.run.steps:
                    return None
                return submit_step(workers, nxt, check, overlapped(step + 1))
            return queue

        ahead = None  # the next step's rollout, made during this step's update (rollout.max_staleness=1)
        queued = None  # its trainer calls, already behind this step's update in the trainer's queue
        for step in bar:
            t0 = time.perf_counter()
            scored = ahead or next_rollout(step)
            overlap = overlapped(step)
            row, samples, ahead, queued = grpo_step(
                cfg, scored, workers, tokenizer, run_dir, check, writer,
                (lambda s=step + 1: next_rollout(s)) if overlap else None, queued, queue_after(step))
            row["perf/step_s"] = time.perf_counter() - t0
            row["data/epoch"], row["data/index"] = scored.stream_state["epoch"], scored.stream_state["index"]
            writer.submit(write_samples, run_dir, step, samples)
            if test_data is not None and (step % cfg.run.eval_every == 0 or step == cfg.run.steps):
                if workers.version != row.get("weights/version", workers.version):
                    workers.sync_weights()  # overlapped steps leave the rollout one version behind
                row.update(evaluate(workers, test_data, tokenizer, reward_fn, cfg))
            writer.submit(metrics.log, step, row)
            if "exact/first_difference" in row or row.get("gate/action") == "abort":
                writer.flush()  # the report reads the files
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
            if stop.requested and queued is not None:  # its update is in the trainer's queue: save after it
                log.info("stop requested during step %d: finishing step %d, already queued, then saving",
                         step, step + 1)
            if (((cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0) or step == cfg.run.steps
                    or stop.requested) and queued is None):
                writer.flush()  # a resumed run continues after the checkpoint's step: its rows are on disk
                saved = save_checkpoint(ckpts, workers, step, scored.stream_state, acc_before)
                if stop.requested and step < cfg.run.steps:
                    raise RunStopped(f"stopped after step {step} of {cfg.run.steps}; checkpoint {saved}; "
                                     "run again with --resume to continue", stop.signum)
        acc_after = row.get("eval/accuracy")
        writer.flush()
        report = write_report(run_dir)
        log.info("report: %s", report)
        return RunResult(cfg.run.steps, acc_before, acc_after, run_dir)
    finally:
        stop.restore()
        try:
            writer.close(raise_errors=sys.exc_info()[1] is None)  # an error in flight goes first
        finally:
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


@dataclass
class ScoredRollout:
    """One step's rollout with its rewards, ready for the update."""
    step: int
    prompts: PromptBatch
    stream_state: dict  # the prompt stream just after this batch: what this step's checkpoint saves
    rollout: RolloutBatch
    texts: list[str]
    rewards: torch.Tensor
    advantages: torch.Tensor
    equal_groups: int
    rollout_s: float
    reward_s: float


def generate_and_score(cfg: RunConfig, step: int, stream: PromptStream, workers: Workers, tokenizer,
                       reward_fn: RewardFn) -> ScoredRollout:
    """The next prompts, G samples of each from the rollout actors, their rewards and advantages."""
    prompts = stream.next_batch()
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
    equal_groups = int(equal_groups.sum()) if hasattr(equal_groups, "sum") else equal_groups
    return ScoredRollout(step, prompts, stream.state_dict(), rollout, texts, rewards, advantages, equal_groups,
                         t_rollout - t0, time.perf_counter() - t_rollout)


@dataclass
class TrainerCall:
    """A step's calls in the trainer's queue: the weights from before its update (for the next
    step's rollout, when overlapped) and its check + update."""
    weights: ray.ObjectRef | None
    result: ray.ObjectRef


def submit_step(workers: Workers, scored: ScoredRollout, check: StepCheck, overlap: bool) -> TrainerCall:
    batch = TrainBatch(rollout=scored.rollout, rewards=scored.rewards, advantages=scored.advantages)
    weights = workers.request_weights() if overlap else None
    return TrainerCall(weights, workers.submit_check_and_train(batch, check))


def grpo_step(cfg: RunConfig, scored: ScoredRollout, workers: Workers, tokenizer, run_dir: Path,
              check: StepCheck, writer: BackgroundWriter, produce_next: Callable[[], ScoredRollout] | None = None,
              call: TrainerCall | None = None,
              queue_next: Callable[[ScoredRollout], TrainerCall | None] | None = None,
              ) -> tuple[dict, list[dict], ScoredRollout | None, TrainerCall | None]:
    """The alignment check and the update of one scored rollout, both in the trainer (one
    call; see TrainerEngine.check_and_train), and the weight sync. With `produce_next`, the
    next step's rollout is made while the trainer works, with the weights from before this
    update (rollout.max_staleness=1): they are asked for ahead of the update in the trainer's
    queue and handed to the rollout actors while it runs. Else the new weights follow it.
    `call`: this step's trainer calls when they were queued during the previous step;
    `queue_next(next rollout)` may queue the next step's the same way, so the trainer goes
    from one update to the next without waiting for the driver. The per-token files go to
    `writer`. → (metrics row, samples, the next step's rollout or None, its queued calls or None)."""
    t0, rollout, was_queued = time.perf_counter(), scored.rollout, call is not None
    call = call or submit_step(workers, scored, check, produce_next is not None)
    ahead, next_call, sync_s = None, None, 0.0
    if produce_next is not None:
        workers.sync_weights(call.weights)
        sync_s = time.perf_counter() - t0
        ahead = produce_next()
        if queue_next is not None:
            next_call = queue_next(ahead)
    t_ahead = time.perf_counter()
    train_stats, report = workers.trainer_result(call.result)
    t_train = time.perf_counter()
    writer.submit(save_token_arrays, run_dir, scored.step, rollout.logprobs, report.trainer_logprobs)
    writer.submit(save_worst_tokens, run_dir, scored.step, rollout.logprobs, report.trainer_logprobs,
                  rollout.prompt_ids, rollout.response_ids, tokenizer.decode)
    t_align = time.perf_counter()
    if report.exact_difference is not None:  # no update ran on a broken promise
        return {**report.metrics, "exact/first_difference": report.exact_difference}, [], None, next_call
    if produce_next is None and train_stats:
        workers.sync_weights()
        sync_s = time.perf_counter() - t_align

    n_tokens, rewards, texts = rollout.num_response_tokens, scored.rewards, scored.texts
    answers = scored.prompts.sequence_answers()
    samples = [{"prompt": tokenizer.decode(rollout.prompt_ids[i].tolist()), "response": texts[i],
                "gold": answers[i], "reward": rewards[i].item()} for i in range(min(cfg.rollout.group_size, len(texts)))]
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "reward/accuracy": (rewards > 0.5).float().mean().item(),
        "reward/equal_reward_groups": scored.equal_groups,
        "response/length_mean": n_tokens / len(rollout),
        "response/eos_frac": sum(f == "eos" for f in rollout.finish_reasons) / len(rollout),
        **{f"train/{k}": v for k, v in train_stats.items()},
        **report.metrics,  # align/*, router/*, policy/*, gate/*, rollout/staleness, weights/version
        "rollout/sequences": len(rollout),
        "rollout/actor_restarts": workers.restarts,  # replaced rollout actors so far in this run
        "perf/rollout_tokens_per_s": n_tokens / max(scored.rollout_s, 1e-9),
        "perf/rollout_s": scored.rollout_s,
        "perf/reward_s": scored.reward_s,
        "perf/train_s": t_train - t0,       # check + update as the driver waits for them
        "perf/overlap_s": t_ahead - t0,     # of which spent on the next step's rollout (and its weights)
        "perf/align_s": t_align - t_train,  # handing the per-token files to the writer
        "perf/sync_s": sync_s,
        "perf/queued": float(was_queued),  # its trainer calls were queued during the step before
        **({"perf/sync_gbytes": workers.sync_bytes / 1e9} if workers.sync_bytes else {}),  # collective sync
    }, samples, ahead, next_call


def write_samples(run_dir: Path, step: int, samples: list[dict]) -> None:
    """One group of responses per step, for a person to read next to the curves."""
    with open(run_dir / "samples.jsonl", "a") as f:
        for sample in samples:
            f.write(json.dumps({"step": step, **sample}) + "\n")


def save_checkpoint(ckpts: CheckpointDirs, workers: Workers, step: int, stream_state: dict,
                    acc_before: float | None) -> Path:
    staging = ckpts.staging(step)
    workers.save_trainer(staging / "trainer")
    return ckpts.commit(staging, step, {"stream": stream_state, "accuracy_before": acc_before})


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
