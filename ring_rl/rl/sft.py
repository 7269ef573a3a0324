"""Supervised warm-up that makes the starting checkpoint for GRPO (`ring-rl sft`).

Same trainer and data pipeline as GRPO: prompts and gold answers from `data`, the
DeepSpeed TrainerEngine, loss on the answer tokens (and the end token) only."""
from __future__ import annotations

import logging
import shutil
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


def sft_examples(prompts: list[str], answers: list[str], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """prompt ids + answer ids + eos, with a loss mask on answer and eos."""
    ids, masks = [], []
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    for p, a in zip(p_ids, a_ids):
        ids.append(p + a + [tokenizer.eos_token_id])
        masks.append([0] * len(p) + [1] * (len(a) + 1))
    return ids, masks


def run_sft(cfg: RunConfig, out_dir: str | Path) -> Path:
    """Train `cfg.sft.init_preset` from scratch (or `cfg.sft.init_from`) and save it to out_dir."""
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
    ids, masks = sft_examples(list(data["prompt"]), list(data["answer"]), tokenizer)
    engine = TrainerEngine(str(init), cfg.sft.trainer, cfg.run.seed, "cpu", total_steps=cfg.sft.steps)
    rng = np.random.default_rng(cfg.run.seed)
    bs, t0 = cfg.sft.batch_size, time.perf_counter()
    bar = tqdm(range(cfg.sft.steps), desc="SFT", unit="step", dynamic_ncols=True)
    for step in bar:
        pick = rng.choice(len(ids), size=min(bs, len(ids)), replace=False)
        stats = engine.sft_step([ids[i] for i in pick], [masks[i] for i in pick])
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
    log.info("SFT: %d steps in %.0f s, last loss %.3f", cfg.sft.steps, time.perf_counter() - t0, stats["loss"])
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    engine.save_model(str(staging))
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    return out_dir
