"""Test-split accuracy: greedy decoding with the rollout workers, scored by the reward."""
from __future__ import annotations

from ring_rl.config import RunConfig
from ring_rl.rl.data import eval_batches, tokenize_prompts
from ring_rl.rl.reward import RewardFn
from ring_rl.types import SamplingParams


def evaluate(workers, dataset, tokenizer, reward_fn: RewardFn, cfg: RunConfig,
             num_prompts: int | None = None) -> dict[str, float]:
    """Greedy answers to the first `num_prompts` (default `run.eval_prompts`; 0 = all) prompts
    of `dataset`; share correct. workers: anything with Workers.generate's signature."""
    params = SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens)
    correct = total = 0
    num_prompts = cfg.run.eval_prompts if num_prompts is None else num_prompts
    for batch in eval_batches(dataset, num_prompts, batch_size=256):
        ids = tokenize_prompts(batch.prompts, tokenizer)
        out = workers.generate(ids, params, seeds=[0] * len(ids), group_ids=batch.group_ids)
        texts = tokenizer.batch_decode([r.tolist() for r in out.response_ids], skip_special_tokens=True)
        infos = reward_fn.score_with_info(texts, batch.answers)
        correct += sum(i.correct for i in infos)
        total += len(infos)
    return {"eval/accuracy": correct / max(total, 1), "eval/prompts": total}
