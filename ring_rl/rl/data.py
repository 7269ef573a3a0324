"""Prompts and gold answers: loading (HF `datasets`), templating, a resumable stream.

Rows come from local JSONL or Parquet files in one of two layouts:
  gsm8k          {"question": ..., "answer": "... reasoning ... #### 1,234"}  gold = "1234"
  prompt_answer  {"prompt": ..., "answer": ...}                              gold = str(answer)
The loaded `datasets.Dataset` has the columns prompt (templated text), answer (gold string),
source (file) and row (index in that file), so any later error can still name file and row.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ring_rl.config import DataConfig

logger = logging.getLogger(__name__)

_LAYOUTS = {"gsm8k": ("question", "answer"), "prompt_answer": ("prompt", "answer")}
_READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SKIP_EXAMPLES = 5  # skipped rows quoted in the log; the count covers all of them


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file (and row)."""


@dataclass
class LoadedPrompts:
    dataset: Any  # datasets.Dataset with columns prompt, answer, source, row
    skipped: int = 0  # bad rows dropped under bad_rows: skip
    skip_examples: list[str] = field(default_factory=list)  # the first few reasons, "file row N: why"

    def __len__(self) -> int:
        return len(self.dataset)


def load_prompts(cfg: DataConfig, split: str = "train", tokenizer: Any = None,
                 cache_dir: str | None = None) -> LoadedPrompts:
    """Load cfg.train_files (split="train") or cfg.test_files (split="test").

    With a tokenizer, prompts longer than cfg.max_prompt_tokens are bad rows too.
    """
    import datasets  # heavy; keep `import ring_rl.rl.data` cheap for the CLI's --help

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    patterns = cfg.train_files if split == "train" else cfg.test_files
    if not patterns:
        raise DataError(f"data.{split}_files is empty")
    columns: dict[str, list] = {"prompt": [], "answer": [], "source": [], "row": []}
    skips: list[str] = []
    for path in _expand(patterns, split):
        table = _read_file(path, cache_dir)
        layout = _detect_layout(path, table.column_names, cfg.format)
        q_col, a_col = _LAYOUTS[layout]
        good: list[tuple[int, str, str]] = []
        bad: list[tuple[int, str]] = []
        for row, (question, answer) in enumerate(zip(table[q_col], table[a_col])):
            try:
                good.append((row, *_make_example(question, answer, layout, cfg.prompt_template)))
            except _BadRow as why:
                bad.append((row, str(why)))
        if tokenizer is not None and good:  # one batched call: per-row calls are slow on big files
            lengths = [len(ids) for ids in tokenize_prompts([p for _, p, _ in good], tokenizer)]
            limit = cfg.max_prompt_tokens
            bad += [(r, f"prompt has {n} tokens > data.max_prompt_tokens={limit}")
                    for (r, _, _), n in zip(good, lengths) if n > limit]
            good = [g for g, n in zip(good, lengths) if n <= limit]
        if bad:
            row, why = min(bad)
            if cfg.bad_rows == "error":
                raise DataError(f"{path} row {row}: {why} (set data.bad_rows=skip to drop such rows)")
            skips += [f"{path} row {r}: {w}" for r, w in sorted(bad)]
        for row, prompt, gold in good:
            columns["prompt"].append(prompt)
            columns["answer"].append(gold)
            columns["source"].append(path)
            columns["row"].append(row)
    if not columns["prompt"]:
        raise DataError(f"data.{split}_files: no usable rows in {patterns} ({len(skips)} skipped)")
    if skips:
        logger.warning("data.%s_files: skipped %d bad rows, e.g. %s", split, len(skips), skips[0])
    return LoadedPrompts(datasets.Dataset.from_dict(columns), len(skips), skips[:_SKIP_EXAMPLES])


def gsm8k_gold(answer: str) -> str:
    """The text after the last '#### ' with thousands commas removed: '... #### 1,234' -> '1234'."""
    head, sep, tail = answer.rpartition("####")
    if not sep:
        raise _BadRow("gsm8k answer has no '#### <gold>' line")
    gold = tail.strip().replace(",", "")
    if not gold:
        raise _BadRow("gsm8k answer is empty after '####'")
    return gold


def render_prompt(template: str, question: str) -> str:
    """Apply the config's template; {prompt} and {question} both mean the row's question."""
    return template.format(prompt=question, question=question)


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any, add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each prompt with any HF tokenizer.

    No special tokens by default, as the SFT warm-up tokenizes its prompts (rl/sft.py): the
    policy must see the same prompt ids in SFT, rollout and training.
    """
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]


class _BadRow(Exception):
    pass


def _expand(patterns: Sequence[str], split: str) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            hits = sorted(glob.glob(pattern))
            if not hits:
                raise DataError(f"data.{split}_files: {pattern!r} matches no file")
            paths.extend(hits)
        elif not os.path.isfile(pattern):
            raise DataError(f"data.{split}_files: {pattern!r}: no such file")
        else:
            paths.append(pattern)
    return paths


def _read_file(path: str, cache_dir: str | None):
    import datasets

    reader = _READERS.get(os.path.splitext(path)[1].lower())
    if reader is None:
        raise DataError(f"{path}: unknown file type; expected one of {sorted(_READERS)}")
    try:
        return datasets.load_dataset(reader, data_files=path, split="train", cache_dir=cache_dir)
    except Exception as e:  # arrow/json errors: name the file, keep the library's reason
        raise DataError(f"{path}: cannot be read as {reader}: {type(e).__name__}: {e}") from e


def _detect_layout(path: str, columns: list[str], wanted: str) -> str:
    if wanted != "auto":
        missing = [c for c in _LAYOUTS[wanted] if c not in columns]
        if missing:
            raise DataError(f"{path}: data.format={wanted} needs columns {list(_LAYOUTS[wanted])}, "
                            f"missing {missing} (found {columns})")
        return wanted
    for layout, needed in _LAYOUTS.items():
        if all(c in columns for c in needed):
            return layout
    raise DataError(f"{path}: cannot tell the format from columns {columns}; "
                    "expected question+answer (gsm8k) or prompt+answer")


def _make_example(question: Any, answer: Any, layout: str, template: str) -> tuple[str, str]:
    if not isinstance(question, str) or not question.strip():
        raise _BadRow(f"question/prompt is {'empty' if isinstance(question, str) else type(question).__name__}")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise _BadRow("no answer")
    if isinstance(answer, (bool, list, dict)):
        raise _BadRow(f"answer is a {type(answer).__name__}, expected a string or number")
    if layout == "gsm8k":
        if not isinstance(answer, str):
            raise _BadRow("gsm8k answer is not a string")
        gold = gsm8k_gold(answer)
    else:
        gold = answer.strip() if isinstance(answer, str) else str(answer)
    return render_prompt(template, question), gold


# ---------------------------------------------------------------- the prompt stream

@dataclass(frozen=True)
class StreamPosition:
    epoch: int = 0  # passes completed over the data
    index: int = 0  # next slot in this epoch's shuffled order


@dataclass
class PromptBatch:
    """One step's prompts; each is sampled group_size times by the rollout."""
    prompts: list[str]  # templated prompt text, one per prompt (not repeated)
    answers: list[str]  # gold answers, aligned with prompts
    group_ids: list[int]  # unique over the run: the stream's draw counter
    rows: list[int]  # dataset indices (dataset[rows[i]] has source file and row)
    group_size: int
    position: StreamPosition  # where the stream stood before this batch
    prompt_ids: list[list[int]] | None = None  # filled by the rollout: tokenize_prompts(prompts, tok)

    def __len__(self) -> int:
        return len(self.prompts)

    def sequence_group_ids(self) -> list[int]:
        """Group id of each of the len * group_size sequences, prompt-major."""
        return [g for g in self.group_ids for _ in range(self.group_size)]

    def sequence_answers(self) -> list[str]:
        return [a for a in self.answers for _ in range(self.group_size)]


class PromptStream:
    """Endless, deterministic prompt order: a fresh seeded shuffle every epoch.

    Batches run across epoch ends (the tail of epoch e, then the head of e+1), so within an
    epoch every prompt is drawn exactly once. `state_dict()` after a step, saved with the
    checkpoint, makes `load_state_dict` continue with the same order: no repeats, no gaps.
    """

    def __init__(self, dataset: Any, prompts_per_step: int, seed: int, group_size: int = 1):
        if len(dataset) == 0:
            raise DataError("PromptStream: the dataset is empty")
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        self.dataset = dataset
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.group_size = group_size
        self.position = StreamPosition()
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The shuffled dataset indices of an epoch (a pure function of seed and epoch)."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._order_epoch = rng.permutation(len(self.dataset)), epoch
        return self._order

    def next_batch(self) -> PromptBatch:
        start, n = self.position, len(self.dataset)
        rows: list[int] = []
        group_ids: list[int] = []
        epoch, index = start.epoch, start.index
        while len(rows) < self.prompts_per_step:
            order = self.epoch_order(epoch)
            take = min(self.prompts_per_step - len(rows), n - index)
            rows.extend(int(i) for i in order[index:index + take])
            group_ids.extend(range(epoch * n + index, epoch * n + index + take))
            index += take
            if index == n:
                epoch, index = epoch + 1, 0
        self.position = StreamPosition(epoch, index)
        picked = self.dataset[rows]  # one Arrow take to lists: 0.06 ms, select + columns 1.9
        return PromptBatch(picked["prompt"], picked["answer"], group_ids, rows, self.group_size, start)

    def __iter__(self) -> Iterator[PromptBatch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "index": self.position.index,
                "seed": self.seed, "num_prompts": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A different seed or data size would silently change the order: refuse instead.
        if state["seed"] != self.seed or state["num_prompts"] != len(self.dataset):
            raise DataError(f"cannot resume the prompt stream: saved seed={state['seed']}, "
                            f"{state['num_prompts']} prompts; now seed={self.seed}, {len(self.dataset)} prompts")
        if not 0 <= state["index"] < len(self.dataset) or state["epoch"] < 0:
            raise DataError(f"cannot resume the prompt stream: bad position {state}")
        self.position = StreamPosition(int(state["epoch"]), int(state["index"]))


def eval_batches(dataset: Any, num_prompts: int, batch_size: int, group_size: int = 1) -> Iterator[PromptBatch]:
    """The first num_prompts (0 = all) in file order, unshuffled, in batches."""
    total = len(dataset) if num_prompts <= 0 else min(num_prompts, len(dataset))
    for lo in range(0, total, batch_size):
        rows = list(range(lo, min(lo + batch_size, total)))
        picked = dataset[rows]
        yield PromptBatch(picked["prompt"], picked["answer"], rows, rows, group_size, StreamPosition(0, lo))
