"""Supervised warm-up that makes the starting checkpoint for GRPO (`ring-rl sft`).

Same trainer and data pipeline as GRPO: prompts and gold answers from `data`, the
DeepSpeed TrainerEngine, loss on the answer tokens (and the end token) only.

With `sft.target_accuracy` it stops once greedy accuracy on prompts held out of the train
split reaches the target. On the tiny arithmetic task accuracy stays near 5% for hundreds of
steps and then climbs within about a hundred; when the climb starts moves by hundreds of steps
with the seed or the optimizer's rounding, so a fixed step count gave starts anywhere from 7%
to 54%. Stopping at the target gives GRPO the same kind of start every time: one with signal,
and (under the constant lr) still on its way up, where the GRPO update generalises. From an
annealed (cosine to 0) start the same GRPO run did not gain."""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ring_rl.config import RunConfig
from ring_rl.model.factory import build_random_checkpoint
from ring_rl.model.tokenizer import load_tokenizer
from ring_rl.rl.data import load_prompts

log = logging.getLogger("ring_rl.sft")
SFT_RECORD = "sft.json"  # beside the weights: how the warm-up ended (steps, held-out accuracy)


def sft_examples(prompts: list[str], answers: list[str], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """prompt ids + answer ids + eos, with a loss mask on answer and eos."""
    ids, masks = [], []
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    for p, a in zip(p_ids, a_ids):
        ids.append(p + a + [tokenizer.eos_token_id])
        masks.append([0] * len(p) + [1] * (len(a) + 1))
    return ids, masks


def hold_out(data, n: int, seed: int):
    """(train rows, n held-out rows), a seeded random split of a `datasets.Dataset`."""
    if n >= len(data):
        raise ValueError(f"sft.eval_prompts={n} leaves no training rows: the train split has {len(data)}")
    order = np.random.default_rng(seed + 1).permutation(len(data))
    return data.select(np.sort(order[n:])), data.select(np.sort(order[:n]))


class HeldOutAccuracy:
    """Greedy accuracy of the trainer's current weights on held-out prompts, scored by the
    run's reward: the same measure as the GRPO run's test accuracy."""

    def __init__(self, init_dir: Path, held_out, tokenizer, cfg: RunConfig):
        from ring_rl.rl.bootstrap import LocalWorkers
        from ring_rl.rl.reward import RewardFn

        self.workers = LocalWorkers(init_dir, cfg.model.dtype)
        self.reward_fn = RewardFn(cfg.reward)
        self.held_out, self.tokenizer, self.cfg = held_out, tokenizer, cfg

    def __call__(self, engine) -> float:
        from ring_rl.rl.evaluate import evaluate

        self.workers.worker.load_weights(*engine.weights_for_rollout())
        out = evaluate(self.workers, self.held_out, self.tokenizer, self.reward_fn, self.cfg, num_prompts=0)
        return out["eval/accuracy"]

    def close(self) -> None:
        self.reward_fn.close()


def run_sft(cfg: RunConfig, out_dir: str | Path) -> Path:
    """Train `cfg.sft.init_preset` from scratch (or `cfg.sft.init_from`) and save it to out_dir:
    `sft.steps` steps, or fewer when `sft.target_accuracy` is reached first."""
    from ring_rl.trainer.engine import TrainerEngine

    # One intra-op thread: tiny matmuls gain little from two, and with any other busy process
    # on a 2-core machine OpenMP's spinning threads made a step 10x slower (measured).
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".init")
    shutil.rmtree(work, ignore_errors=True)
    init = Path(cfg.sft.init_from) if cfg.sft.init_from else build_random_checkpoint(
        cfg.sft.init_preset, work, seed=cfg.run.seed)
    tokenizer = load_tokenizer(init)
    data = load_prompts(cfg.data, "train", tokenizer).dataset
    judge = None
    if cfg.sft.target_accuracy is not None:
        data, held_out = hold_out(data, cfg.sft.eval_prompts, cfg.run.seed)
        judge = HeldOutAccuracy(init, held_out, tokenizer, cfg)
    ids, masks = sft_examples(list(data["prompt"]), list(data["answer"]), tokenizer)
    engine = TrainerEngine(str(init), cfg.sft.trainer, cfg.run.seed, "cpu", total_steps=cfg.sft.steps)
    rng = np.random.default_rng(cfg.run.seed)
    bs, t0, acc = cfg.sft.batch_size, time.perf_counter(), None
    quiet = not sys.stderr.isatty()  # a log file gets a line every 100 steps instead of the bar
    bar = tqdm(range(1, cfg.sft.steps + 1), desc="SFT", unit="step", dynamic_ncols=True, disable=quiet)
    try:
        for step in bar:
            pick = rng.choice(len(ids), size=min(bs, len(ids)), replace=False)
            stats = engine.sft_step([ids[i] for i in pick], [masks[i] for i in pick])
            bar.set_postfix(loss=f"{stats['loss']:.3f}", **({} if acc is None else {"held_out_acc": f"{acc:.1%}"}))
            if quiet and step % 100 == 0:
                log.info("SFT step %d/%d: loss %.3f%s", step, cfg.sft.steps, stats["loss"],
                         "" if acc is None else f", held-out accuracy {acc:.1%} (last check)")
            if judge is not None and step % cfg.sft.eval_every == 0:
                acc = judge(engine)
                if acc >= cfg.sft.target_accuracy:
                    log.info("SFT: held-out accuracy %.1f%% at step %d reaches sft.target_accuracy=%.0f%%: stopping",
                             100 * acc, step, 100 * cfg.sft.target_accuracy)
                    break
        else:
            if judge is not None:
                if step % cfg.sft.eval_every:  # else the loop's last check measured these weights
                    acc = judge(engine)
                log.warning("SFT: held-out accuracy %.1f%% after all sft.steps=%d, below sft.target_accuracy=%.0f%%",
                            100 * acc, cfg.sft.steps, 100 * cfg.sft.target_accuracy)
    finally:
        if judge is not None:
            judge.close()
    log.info("SFT: %d steps in %.0f s, last loss %.3f", step, time.perf_counter() - t0, stats["loss"])
    record = {"steps": step, "last_loss": stats["loss"], "target_accuracy": cfg.sft.target_accuracy,
              "held_out_accuracy": acc, "held_out_prompts": cfg.sft.eval_prompts if judge else 0}
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    engine.save_model(str(staging))
    tokenizer.save_pretrained(staging)
    (staging / SFT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    return out_dir
