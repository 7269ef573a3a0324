"""The dataclasses that cross actors pickle their per-sequence tensor lists as one flat buffer
per dtype (what Ray sends), and come back equal: values, dtypes, shapes, None entries."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from ring_rl.types import (AlignmentReport, RolloutBatch, SamplingParams, StaleWeightsError, TensorDict,
                           TensorList, TrainBatch, check_policy_lag)


def _rollout(n: int = 12) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    lens = [int(x) for x in torch.randint(0, 7, (n,), generator=g)]
    return RolloutBatch(
        prompt_ids=[torch.randint(0, 128, (3 + i % 4,), generator=g) for i in range(n)],
        response_ids=[torch.randint(0, 128, (r,), generator=g) for r in lens],
        logprobs=[-torch.rand(r, generator=g) for r in lens],
        finish_reasons=["eos", "length"] * (n // 2), weight_version=7, sampling=SamplingParams(top_k=5),
        group_ids=list(range(n)),
        router_ids=[torch.randint(0, 8, (5, 2 + i % 4 + r, 2), generator=g).to(torch.int16) for i, r in enumerate(lens)],
        schedule=[list(range(n // 2)), list(range(n // 2, n))], prefill_chunk=4)


def _transport(obj) -> tuple[int, int]:
    """(tensors pickled in band: each a torch.save of its own under Ray, buffers passed out of
    band: what Ray writes straight into its object store) for a protocol-5 pickle of obj."""
    tensors, buffers = 0, []

    class Counting(pickle.Pickler):
        def reducer_override(self, o):
            nonlocal tensors
            tensors += isinstance(o, torch.Tensor)
            return NotImplemented

    Counting(io.BytesIO(), protocol=5, buffer_callback=buffers.append).dump(obj)
    return tensors, len(buffers)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y))
        for x, y in zip(a, b))


def test_rollout_batch_round_trip_in_a_few_buffers():
    rollout = _rollout()
    back = pickle.loads(pickle.dumps(rollout))
    for name in ("prompt_ids", "response_ids", "logprobs", "router_ids"):
        assert _same(getattr(back, name), getattr(rollout, name)), name
        assert type(getattr(back, name)) is list
    assert (back.weight_version, back.sampling, back.schedule, back.prefill_chunk, back.finish_reasons) == \
        (7, SamplingParams(top_k=5), rollout.schedule, 4, rollout.finish_reasons)
    assert _transport(rollout) == (0, 4)  # one buffer per list (int64 ids twice, fp32 logprobs, int16 experts)


def test_train_batch_and_report_round_trip():
    rollout = _rollout()
    weights = [torch.rand(len(r)) for r in rollout.response_ids]
    batch = TrainBatch(rollout, torch.rand(len(rollout)), torch.randn(len(rollout)), list(rollout.logprobs), weights)
    back = pickle.loads(pickle.dumps(batch))
    assert _same(back.old_logprobs, batch.old_logprobs) and _same(back.token_weights, weights)
    assert torch.equal(back.advantages, batch.advantages) and _same(back.rollout.response_ids, rollout.response_ids)
    report = AlignmentReport({"align/k3": 0.5}, list(rollout.logprobs), list(rollout.logprobs), None, "warn")
    again = pickle.loads(pickle.dumps(report))
    assert _same(again.trainer_logprobs, report.trainer_logprobs) and again.token_weights is None
    assert again.update and again.metrics == {"align/k3": 0.5}


def test_tensor_list_and_dict_keep_entries_apart():
    items = TensorList([torch.arange(6).view(2, 3), None, torch.ones(0), torch.tensor(2.5), torch.zeros(2, 2, dtype=torch.bfloat16)])
    back = pickle.loads(pickle.dumps(items))
    assert _same(back, items)
    back[0].add_(1)  # views of one buffer, but each its own slice
    assert back[3].item() == 2.5 and back[0].tolist() == [[1, 2, 3], [4, 5, 6]]
    state = TensorDict(a=torch.randn(3, 4), b=torch.arange(5), c=torch.randn(2))
    loaded = pickle.loads(pickle.dumps(state))
    assert list(loaded) == ["a", "b", "c"] and all(torch.equal(loaded[k], state[k]) for k in state)
    assert _transport(state) == (0, 2)  # one fp32 buffer, one int64 buffer


def test_packed_tensor_dict_is_a_copy_sent_as_is():
    """TensorDict.packed (the trainer's weights for the rollout): a copy of the tensors taken
    at once, held as views of one buffer per dtype, pickled without another concatenation."""
    src = {"w": torch.randn(3, 4), "n": torch.arange(5), "b": torch.randn(2)}
    state = TensorDict.packed(list(src.items()))
    want = {k: v.clone() for k, v in src.items()}
    src["w"].add_(1.0)                                     # the live weights move on
    assert all(torch.equal(state[k], want[k]) for k in want)
    buffers = [b for b, _ in state._flat[0]]
    state["w"].mul_(2.0)                                   # the dict's tensors are the buffers' views
    assert torch.equal(torch.from_numpy(buffers[0]).view(torch.float32)[:12].view(3, 4), state["w"])
    loaded = pickle.loads(pickle.dumps(state))
    assert list(loaded) == ["w", "n", "b"] and all(torch.equal(loaded[k], state[k]) for k in state)
    assert _transport(state) == (0, 2)
    sent = []                                              # the buffers pickling hands to Ray
    pickle.dumps(state, protocol=5, buffer_callback=sent.append)
    assert [np.shares_memory(np.asarray(b.raw()), a) for b, a in zip(sent, buffers)] == [True, True]
    assert TensorDict.packed([]) == {}


def test_policy_lag():
    assert check_policy_lag(5, 5, 0) == 0 and check_policy_lag(5, 4, 1) == 1
    for trainer, rollout, allowed in ((5, 4, 0), (5, 3, 1), (4, 5, 1)):
        with pytest.raises(StaleWeightsError, match=f"lag {trainer - rollout}, allowed 0..{allowed}"):
            check_policy_lag(trainer, rollout, allowed)
