"""The TRL side of benchmarks/e2e_cpu.py: one GRPOTrainer run in this process, timed per step.

    python benchmarks/e2e_trl_worker.py SPEC_JSON    # started by e2e_cpu.py, one run per TRL row

SPEC_JSON: {"ckpt", "data" (train jsonl), "size" [prompts, group, tokens], "steps", "threads",
"out" (a JSON list of {"s", "gen_s", "tokens"} per step is written there), "work"}. The
hyper-parameters mirror configs/tiny-arith.yaml's trainer and reward (see e2e_cpu.py).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-arith.yaml"


def trl_worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import ring_rl.model  # noqa: F401  registers the Ring-linear auto classes
    from ring_rl.config import load_config
    from ring_rl.model.tokenizer import load_tokenizer
    from ring_rl.rl.reward import RewardFn

    cfg = load_config(str(CONFIG), [])
    p, g, t = spec["size"]
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    tokenizer = load_tokenizer(spec["ckpt"])
    model = AutoModelForCausalLM.from_pretrained(spec["ckpt"])

    current = {"tokens": 0, "gen_s": 0.0}
    generate = model.generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        current["gen_s"] += time.perf_counter() - t0
        return out

    model.generate = timed_generate
    reward_fn = RewardFn(cfg.reward)

    def reward(prompts, completions, completion_ids, answer, **_):
        current["tokens"] += sum(len(ids) for ids in completion_ids)
        return reward_fn.score(completions, answer)

    tc = cfg.trainer
    args = GRPOConfig(
        output_dir=str(Path(spec["work"]) / "trl-out"), use_cpu=True, bf16=False, report_to="none",
        max_steps=spec["steps"] + 1, logging_strategy="no", save_strategy="no", disable_tqdm=True,
        gradient_checkpointing=False, seed=0, dataloader_num_workers=0,
        num_generations=g, per_device_train_batch_size=p * g, gradient_accumulation_steps=1,
        max_completion_length=t, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=tc.lr, lr_scheduler_type="constant", weight_decay=tc.weight_decay,
        max_grad_norm=tc.grad_clip, epsilon=tc.clip_low, epsilon_high=tc.clip_high,
        beta=0.0, loss_type="dapo", scale_rewards="group" if tc.adv_std_norm else "none",
    )
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            current.update(tokens=0, gen_s=0.0, t0=time.perf_counter())

        def on_step_end(self, *_, **__):
            steps.append({"s": time.perf_counter() - current["t0"], "gen_s": current["gen_s"],
                          "tokens": current["tokens"]})

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    reward_fn.close()
    Path(spec["out"]).write_text(json.dumps(steps))


if __name__ == "__main__":
    trl_worker(json.loads(sys.argv[1]))
