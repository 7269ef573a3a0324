"""A synthetic arithmetic task small enough for the tiny model to learn on a CPU.

Rows use the plain prompt/answer layout: {"prompt": "12+35=", "answer": "47"}. Prompts use
only digits and + - =, so a character-level tokenizer covers them; the model is expected to
answer with the bare number (an end token after it is fine: the reward takes the last number).
"""

from __future__ import annotations

import json
import os
import random
from typing import Sequence

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}


def arith_problem(k: int, max_operand: int, ops: Sequence[str]) -> tuple[str, str]:
    """Problem number k of the enumeration (op, a, b) with 0 <= a, b <= max_operand."""
    side = max_operand + 1
    op = ops[k // (side * side)]
    a, b = divmod(k % (side * side), side)
    return f"{a}{op}{b}=", str(_OPS[op](a, b))


def write_arith_dataset(out_dir: str | os.PathLike, n_train: int, n_test: int, seed: int = 0,
                        max_operand: int = 99, ops: Sequence[str] = ("+",)) -> dict[str, str]:
    """Write train.jsonl and test.jsonl with disjoint problems, deterministic in seed.

    Problems are drawn without replacement from every (op, a, b), so no prompt appears twice
    and none is shared between train and test. Subtraction may give negative answers.
    Returns {"train": path, "test": path}.
    """
    bad_ops = [op for op in ops if op not in _OPS]
    if not ops or bad_ops:
        raise ValueError(f"ops must be a non-empty subset of {sorted(_OPS)}, got {list(ops)}")
    if len(set(ops)) != len(ops):
        raise ValueError(f"ops repeats an operator: {list(ops)}")
    if max_operand < 0 or n_train < 0 or n_test < 0:
        raise ValueError("max_operand, n_train and n_test must be >= 0")
    space = len(ops) * (max_operand + 1) ** 2
    if n_train + n_test > space:
        raise ValueError(f"asked for {n_train} + {n_test} problems, but only {space} distinct ones exist "
                         f"with max_operand={max_operand} and ops={list(ops)}")
    # sample() over a range draws distinct numbers without building the whole range.
    picks = random.Random(seed).sample(range(space), n_train + n_test)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, ks in (("train", picks[:n_train]), ("test", picks[n_train:])):
        path = os.path.join(os.fspath(out_dir), f"{split}.jsonl")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for k in ks:
                prompt, answer = arith_problem(k, max_operand, ops)
                f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
        os.replace(tmp, path)  # a reader never sees a half-written file
        paths[split] = path
    return paths
