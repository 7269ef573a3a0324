"""Prompt loading (HF datasets), bad rows, the resumable stream, the arithmetic data set."""

import json
import re

import pytest

from ring_rl.config import DataConfig
from ring_rl.rl.arith import write_arith_dataset
from ring_rl.rl.data import DataError, PromptStream, eval_batches, gsm8k_gold, load_prompts


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _load(tmp_path, files, split="train", tokenizer=None, **cfg):
    key = "train_files" if split == "train" else "test_files"
    return load_prompts(DataConfig(**{key: files}, **cfg), split, tokenizer, cache_dir=str(tmp_path / "hf"))


class CharTokenizer:
    """Stands in for an HF tokenizer: one id per character."""
    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[0] * add_special_tokens + [ord(c) for c in t] for t in texts]}


def test_gsm8k_rows_and_template(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", [
        {"question": "How many?", "answer": "3 + 4 = 7\n#### 1,234"},
        {"question": "And now?", "answer": "so #### -5"},
    ])
    data = _load(tmp_path, [path], prompt_template="Q: {question}\nA:")
    ds = data.dataset
    assert ds["prompt"] == ["Q: How many?\nA:", "Q: And now?\nA:"]
    assert ds["answer"] == ["1234", "-5"]
    assert ds["source"] == [path, path] and ds["row"] == [0, 1]
    assert data.skipped == 0 and gsm8k_gold("a #### b #### 1,000,000") == "1000000"


def test_prompt_answer_parquet_and_jsonl_together(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "answer": [2, 4]}), tmp_path / "a.parquet")
    jl = _jsonl(tmp_path / "b.jsonl", [{"prompt": "3+3=", "answer": "6"}])
    ds = _load(tmp_path, [str(tmp_path / "*.parquet"), jl]).dataset
    assert ds["prompt"] == ["1+1=", "2+2=", "3+3="]
    assert ds["answer"] == ["2", "4", "6"]  # numbers become gold strings


def test_file_and_layout_errors(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/nope.jsonl': no such file")):
        _load(tmp_path, [str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataError, match="matches no file"):
        _load(tmp_path, [str(tmp_path / "*.parquet")])
    odd = _jsonl(tmp_path / "odd.jsonl", [{"text": "hi", "label": 1}])
    with pytest.raises(DataError, match=r"odd.jsonl: cannot tell the format from columns \['text', 'label'\]"):
        _load(tmp_path, [odd])
    pa_file = _jsonl(tmp_path / "pa.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    with pytest.raises(DataError, match=r"pa.jsonl: data.format=gsm8k needs columns \['question', 'answer'\], missing \['question'\]"):
        _load(tmp_path, [pa_file], format="gsm8k")


BAD_ROWS = [
    {"prompt": "1+1=", "answer": "2"},
    {"prompt": None, "answer": "3"},  # row 1: no question
    {"prompt": "2+2="},  # row 2: no answer
    {"prompt": "   ", "answer": "5"},  # row 3: empty question
    {"prompt": "4+4=", "answer": ""},  # row 4: empty answer
    {"prompt": "5+5=", "answer": "10"},
]


def test_bad_row_error_names_file_and_row(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(DataError, match=re.escape(f"{path} row 1: question/prompt is NoneType")):
        _load(tmp_path, [path])


def test_bad_rows_skip_counts(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    data = _load(tmp_path, [path], bad_rows="skip")
    assert data.skipped == 4 and len(data) == 2
    assert data.dataset["row"] == [0, 5]
    assert data.skip_examples[1] == f"{path} row 2: no answer"


def test_long_prompts_are_bad_rows_with_a_tokenizer(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "12345+6=", "answer": "12351"}])
    with pytest.raises(DataError, match=r"row 1: prompt has 8 tokens > data.max_prompt_tokens=6"):
        _load(tmp_path, [path], tokenizer=CharTokenizer(), max_prompt_tokens=6)
    data = _load(tmp_path, [path], tokenizer=CharTokenizer(), max_prompt_tokens=6, bad_rows="skip")
    assert data.dataset["prompt"] == ["1+1="] and data.skipped == 1


@pytest.fixture
def ten_prompts(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)])
    return _load(tmp_path, [path]).dataset


def test_stream_epochs_cover_every_prompt_once(ten_prompts):
    stream = PromptStream(ten_prompts, prompts_per_step=4, seed=3, group_size=2)
    batches = [stream.next_batch() for _ in range(5)]  # 20 draws = 2 epochs, crossing mid-batch
    rows = [r for b in batches for r in b.rows]
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert rows[:10] != rows[10:]  # each epoch has its own shuffle
    assert [g for b in batches for g in b.group_ids] == list(range(20))
    b = batches[2]  # draws 8..11: the tail of epoch 0 and the head of epoch 1
    assert (b.position.epoch, b.position.index) == (0, 8)
    assert b.answers == [ten_prompts[r]["answer"] for r in b.rows]
    assert b.prompts == [f"p{a}" for a in b.answers]
    assert b.sequence_group_ids() == [8, 8, 9, 9, 10, 10, 11, 11]
    assert b.sequence_answers()[:2] == [b.answers[0]] * 2


def test_stream_resume_continues_the_same_order(ten_prompts):
    first = PromptStream(ten_prompts, 3, seed=7)
    for _ in range(4):
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch().rows for _ in range(5)]
    resumed = PromptStream(ten_prompts, 3, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_batch().rows for _ in range(5)] == expected
    other = PromptStream(ten_prompts, 3, seed=8)
    assert other.epoch_order(0).tolist() != resumed.epoch_order(0).tolist()
    with pytest.raises(DataError, match="saved seed=7"):
        other.load_state_dict(state)


def test_eval_batches_in_file_order(ten_prompts):
    batches = list(eval_batches(ten_prompts, num_prompts=5, batch_size=2))
    assert [b.rows for b in batches] == [[0, 1], [2, 3], [4]]
    assert sum(len(b) for b in eval_batches(ten_prompts, 0, 4)) == 10


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_arith_dataset(tmp_path):
    paths = write_arith_dataset(tmp_path / "a", n_train=300, n_test=50, seed=1, max_operand=99, ops=("+", "-"))
    train, test = _read(paths["train"]), _read(paths["test"])
    assert len(train) == 300 and len(test) == 50
    prompts = [r["prompt"] for r in train + test]
    assert len(set(prompts)) == 350  # no repeats, train and test disjoint
    for r in train + test:
        m = re.fullmatch(r"(\d{1,2})([+-])(\d{1,2})=", r["prompt"])
        a, op, b = int(m[1]), m[2], int(m[3])
        assert r["answer"] == str(a + b if op == "+" else a - b)
    assert {r["prompt"][-1] for r in train} == {"="} and any("-" in p for p in prompts)
    again = write_arith_dataset(tmp_path / "b", 300, 50, seed=1, max_operand=99, ops=("+", "-"))
    assert open(again["train"]).read() == open(paths["train"]).read()
    other = write_arith_dataset(tmp_path / "c", 300, 50, seed=2, max_operand=99, ops=("+", "-"))
    assert open(other["train"]).read() != open(paths["train"]).read()
    ds = _load(tmp_path, [paths["train"]]).dataset  # the loader reads it as prompt_answer
    assert ds["answer"][0] == train[0]["answer"]


def test_arith_dataset_refuses_more_problems_than_exist(tmp_path):
    with pytest.raises(ValueError, match="only 100 distinct ones exist"):
        write_arith_dataset(tmp_path, n_train=90, n_test=20, seed=0, max_operand=9)
    with pytest.raises(ValueError, match="ops must be"):
        write_arith_dataset(tmp_path, 1, 1, ops=("*",))
