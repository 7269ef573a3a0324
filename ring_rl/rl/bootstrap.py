"""What a run needs before its first step: the data, the starting checkpoint, a tokenizer.

The embedded default builds everything itself: the synthetic arithmetic set when
`data.builtin: arith` and the files are missing, and the starting checkpoint by SFT when
`model.name_or_path` does not exist yet and `sft.enabled` (cached for the next run)."""
from __future__ import annotations

import logging
from pathlib import Path

from ring_rl.config import RunConfig
from ring_rl.model.tokenizer import load_tokenizer

log = logging.getLogger("ring_rl.bootstrap")


def ensure_data(cfg: RunConfig) -> None:
    if cfg.data.builtin != "arith":
        return
    files = [Path(p) for p in cfg.data.train_files + cfg.data.test_files]
    if all(f.exists() for f in files):
        return
    from ring_rl.rl.arith import write_arith_dataset

    out = files[0].parent
    b = cfg.data.builtin_args
    write_arith_dataset(out, n_train=b.n_train, n_test=b.n_test, seed=b.seed, max_operand=b.max_operand)
    log.info("wrote the synthetic arithmetic set to %s", out)


def ensure_checkpoint(cfg: RunConfig) -> Path:
    path = Path(cfg.model.name_or_path)
    if (path / "config.json").exists():
        return path
    if not cfg.sft.enabled:
        raise FileNotFoundError(f"model.name_or_path={str(path)!r}: no checkpoint there "
                                "(set sft.enabled=true to build one by SFT)")
    from ring_rl.rl.sft import run_sft

    until = (f"at most {cfg.sft.steps} steps, until {cfg.sft.target_accuracy:.0%} held-out accuracy"
             if cfg.sft.target_accuracy is not None else f"{cfg.sft.steps} steps")
    log.info("no starting checkpoint at %s: building it with SFT (%s)", path, until)
    return run_sft(cfg, path)


def prepare_run(cfg: RunConfig):
    ensure_data(cfg)
    model_dir = ensure_checkpoint(cfg)
    return model_dir, load_tokenizer(model_dir)


class LocalWorkers:
    """The `generate` of `ring_rl.rl.workers.Workers`, in-process (no Ray), for eval."""

    def __init__(self, model_dir: str | Path, dtype: str):
        from ring_rl.rollout.worker import RolloutWorker

        self.worker = RolloutWorker(str(model_dir), dtype=dtype)

    def generate(self, prompts, params, seeds, group_ids):
        return self.worker.generate(prompts, params, None, seeds, group_ids)


def evaluate_checkpoint(cfg: RunConfig, model_dir: str | Path, data_file: str | None) -> tuple[float, int]:
    from ring_rl.rl.data import load_prompts
    from ring_rl.rl.evaluate import evaluate
    from ring_rl.rl.reward import RewardFn

    if data_file:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"test_files": [data_file]})})
    tokenizer = load_tokenizer(model_dir)
    data = load_prompts(cfg.data, "test", tokenizer).dataset
    with RewardFn(cfg.reward) as reward_fn:
        out = evaluate(LocalWorkers(model_dir, cfg.model.dtype), data, tokenizer, reward_fn, cfg)
    return out["eval/accuracy"], int(out["eval/prompts"])
