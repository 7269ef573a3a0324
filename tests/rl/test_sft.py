"""The supervised warm-up's stop rule (`sft.target_accuracy`), through the real DeepSpeed
trainer, native engine and math-verify reward."""
from __future__ import annotations

import json
import logging

import pytest

from ring_rl.config import load_config
from ring_rl.rl.bootstrap import evaluate_checkpoint
from ring_rl.rl.sft import SFT_RECORD, hold_out, run_sft
from tests.rl.tiny_run import CONFIG, prepare


def _config(train, test, *extra):
    return load_config(CONFIG, [f"data.train_files=[{train}]", f"data.test_files=[{test}]", "sft.batch_size=16",
                                "sft.trainer.micro_batch_size=16", *extra])


def test_sft_stops_once_held_out_accuracy_reaches_the_target(tmp_path):
    # A task the tiny model learns in tens of steps: the answer is always 7.
    rows = [{"prompt": f"{a}+{b}=", "answer": "7"} for a in range(20) for b in range(15)]
    for name in ("train", "test"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(tmp_path / "train.jsonl", tmp_path / "test.jsonl", "sft.steps=300", "sft.target_accuracy=0.9",
                  "sft.eval_every=5", "sft.eval_prompts=40")
    out = run_sft(cfg, tmp_path / "sft")
    record = json.loads((out / SFT_RECORD).read_text())
    assert record["steps"] < 300 and record["steps"] % 5 == 0, record
    assert record["held_out_accuracy"] >= 0.9 and record["held_out_prompts"] == 40
    accuracy, n = evaluate_checkpoint(cfg, out, None)
    assert n == 300 and accuracy >= 0.9  # greedy, on the test file


def test_sft_runs_every_step_when_the_target_is_not_reached(tmp_path, caplog):
    base = prepare(tmp_path)
    cfg = _config(base / "data/train.jsonl", base / "data/test.jsonl", "sft.steps=3", "sft.target_accuracy=0.9",
                  "sft.eval_every=2", "sft.eval_prompts=20")
    with caplog.at_level(logging.WARNING, logger="ring_rl.sft"):
        out = run_sft(cfg, tmp_path / "sft")
    record = json.loads((out / SFT_RECORD).read_text())
    assert record["steps"] == 3 and record["held_out_accuracy"] < 0.9
    assert "below sft.target_accuracy=90%" in caplog.text


def test_hold_out_is_a_seeded_disjoint_split(tmp_path):
    import datasets

    data = datasets.Dataset.from_dict({"prompt": [f"q{i}" for i in range(50)], "answer": [str(i) for i in range(50)]})
    train, held = hold_out(data, 10, seed=3)
    assert len(train) == 40 and len(held) == 10
    assert set(train["prompt"]).isdisjoint(held["prompt"])
    assert hold_out(data, 10, seed=3)[1]["prompt"] == held["prompt"]
    assert hold_out(data, 10, seed=4)[1]["prompt"] != held["prompt"]
    with pytest.raises(ValueError, match="sft.eval_prompts=50 leaves no training rows"):
        hold_out(data, 50, seed=0)
