"""Collective weight sync (`rollout.weight_sync: collective`): the trainer broadcasts its
weights to the rollout actors over a group of their own (gloo here, NCCL between GPUs).

- SyncGroup alone, three ranks in threads: a mixed-dtype state dict arrives bit for bit, with
  its names, shapes and dtypes, twice over one group;
- real Ray actors (the DeepSpeed trainer actor and two native rollout actors that start from
  other weights): after one broadcast both generate exactly what the trainer's weights
  generate, at the trainer's version;
- `ring-rl train` with two rollout actors and rollout.weight_sync=collective: every step's
  rollout ran the weights of the update before it."""
from __future__ import annotations

import threading

import pytest
import torch

from ring_rl.rl.weight_sync import SyncGroup, free_address, manifest_of
from ring_rl.types import SamplingParams


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(7, 5, generator=g), "b.bias": torch.randn(3, generator=g).bfloat16(),
            "c.table": torch.randn(2, 3, 4, generator=g), "d.ids": torch.randint(0, 9, (6,), generator=g)}


def test_sync_group_broadcasts_a_mixed_dtype_state_dict():
    (host, port), world = free_address(), 3
    sent = [_state(0), _state(1)]
    manifest = manifest_of(sent[0])
    got, errors = {}, []

    def member(rank: int) -> None:
        try:
            group = SyncGroup(host, port, rank, world, "cpu")
            for i, state in enumerate(sent):
                if rank == 0:
                    group.send(state, manifest, version=10 + i)
                else:
                    got[(rank, i)] = group.receive(manifest)
        except Exception as e:  # noqa: BLE001 -- reported below, not lost in a thread
            errors.append(e)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for rank in (1, 2):
        for i, state in enumerate(sent):
            version, out = got[(rank, i)]
            assert version == 10 + i and list(out) == list(state)
            for name, t in state.items():
                assert out[name].dtype == t.dtype and torch.equal(out[name], t), (rank, i, name)


@pytest.mark.slow
def test_trainer_actor_broadcasts_to_rollout_actors(tmp_path):
    import ray

    from ring_rl.config import TrainerConfig
    from ring_rl.model import load_checkpoint
    from ring_rl.model.factory import build_random_checkpoint
    from ring_rl.rollout.native import NativeEngine
    from ring_rl.rollout.worker import RolloutWorker
    from ring_rl.trainer.actor import TrainerActor

    trained, other = build_random_checkpoint("tiny", tmp_path / "a", seed=0), build_random_checkpoint("tiny", tmp_path / "b", seed=1)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    model = load_checkpoint(trained)
    want = NativeEngine(model, [model.config.eos_token_id]).generate(prompts, greedy).response_ids
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        trainer = TrainerActor.options(num_cpus=0).remote(str(trained), TrainerConfig(zero_stage=1), 0, "cpu", 1)
        rollouts = [ray.remote(RolloutWorker).options(num_cpus=0).remote(str(other)) for _ in range(2)]
        before = ray.get(rollouts[0].generate.remote(prompts, greedy)).response_ids
        assert [r.tolist() for r in before] != [r.tolist() for r in want]  # they start elsewhere
        (host, port), manifest = ray.get(trainer.sync_setup.remote())
        world = 1 + len(rollouts)
        ray.get([trainer.sync_join.remote(host, port, world)]
                + [r.sync_join.remote(host, port, i + 1, world, manifest) for i, r in enumerate(rollouts)], timeout=120)
        send = trainer.sync_send.remote()
        versions = ray.get([r.sync_receive.remote() for r in rollouts], timeout=120)
        version, sent = ray.get(send)
        assert versions == [version, version] and sent == sum(t.numel() * t.element_size() for t in model.state_dict().values())
        for r in rollouts:
            out = ray.get(r.generate.remote(prompts, greedy, expected_version=version)).response_ids
            assert [x.tolist() for x in out] == [x.tolist() for x in want]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_run_syncs_weights_by_broadcast(tmp_path):
    from ring_rl.rl.metrics import read_metrics
    from tests.rl.tiny_run import CONFIG, overrides, prepare, run_ok

    prepared = prepare(tmp_path / "in")
    run_dir = tmp_path / "run"
    run_ok("train", "--config", str(CONFIG), *overrides(prepared, run_dir, 3, "rollout.weight_sync=collective",
                                                         "rollout.num_actors=2", "rollout.cpus_per_actor=0.5"),
           log=tmp_path / "log", timeout=240)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Each step's rollout ran the trainer's weights of that moment (the rollout worker refuses
    # a generate call at another version), and each update moved the version on.
    assert [r["weights/version"] for r in rows] == [1, 2, 3]
    assert [r["rollout/staleness"] for r in rows] == [0, 0, 0]
    # every broadcast carried the whole model: the tiny checkpoint's bytes, fp32 on CPU
    sizes = {r["perf/sync_gbytes"] for r in rows}
    assert len(sizes) == 1 and sizes.pop() * 1e9 > 0.5 * (prepared / "model" / "model.safetensors").stat().st_size


@pytest.mark.parametrize("extra,match", [
    (["rollout.gpus_per_actor=0.5", "ray.trainer_gpus_per_worker=0.5"], "NCCL needs every member on a GPU of its own"),
    (["rollout.max_staleness=1"], "with rollout.max_staleness=1 use weight_sync=object_store"),
])
def test_collective_sync_refusals(extra, match):
    from ring_rl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, ["rollout.weight_sync=collective", *extra])
